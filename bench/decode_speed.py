"""Single-stream decode speed of SmolLM2-135M on CPU: camelid vs transformers `generate`, same machine, same run.

The machine is shared and its speed drifts, so each round measures, back to back: the memory read bandwidth, then
transformers and camelid in f32 and bf16. Ratios are taken within a round and the medians over rounds printed.
The bandwidth bound is the measured read bandwidth divided by the weight bytes read per token.

    python bench/decode_speed.py --camelid target/release/camelid [--tokens 128] [--rounds 3]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import smollm2_gguf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PROMPT = "Write a long, detailed essay about the history of the camel and the llama."
DTYPES = (("f32", torch.float32, 4), ("bf16", torch.bfloat16, 2))


def read_bandwidth_gbs(gib=1.0, repeats=5):
    """Median time of a full read (sum) of a tensor far larger than the caches, on all threads."""
    x = torch.ones(int(gib * (1 << 30) / 4), dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


class Transformers:
    def __init__(self, gguf, dtype):
        d, name = os.path.split(gguf)
        self.tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        self.model = model.to(dtype).eval()
        ids = self.tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt")
        self.ids = ids["input_ids"] if hasattr(ids, "input_ids") else ids
        self.params = sum(p.numel() for p in self.model.parameters())
        self._run(4)  # warm-up

    def _run(self, n):
        t = time.perf_counter()
        with torch.no_grad():
            self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, pad_token_id=self.tok.eos_token_id)
        return time.perf_counter() - t

    def decode_tps(self, tokens):
        prefill_and_first = self._run(1)
        return (tokens - 1) / (self._run(tokens) - prefill_and_first)


def camelid_tps(binary, gguf, dtype, tokens):
    env = dict(os.environ, CAMELID_LOG="info")
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
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    gguf = a.gguf or str(smollm2_gguf())
    threads = torch.get_num_threads()
    hf = {name: Transformers(gguf, dtype) for name, dtype, _ in DTYPES}
    params = hf["f32"].params

    rows = {name: [] for name, _, _ in DTYPES}
    bandwidths = []
    for r in range(a.rounds):
        bw = read_bandwidth_gbs()
        bandwidths.append(bw)
        for name, _, size in DTYPES:
            theirs = hf[name].decode_tps(a.tokens)
            ours = camelid_tps(a.camelid, gguf, name, a.tokens)
            bound = bw * 1e9 / (params * size)
            rows[name].append((ours, theirs, bound))
            print(f"round {r + 1}: {name:4} camelid {ours:6.1f} tok/s  transformers {theirs:6.1f} tok/s  "
                  f"bandwidth {bw:5.1f} GB/s (bound {bound:6.1f} tok/s)", flush=True)

    print()
    print(f"machine: {threads} threads, read bandwidth median {statistics.median(bandwidths):.1f} GB/s "
          f"(rounds: {', '.join(f'{b:.1f}' for b in bandwidths)}); model {params / 1e6:.1f}M params; "
          f"{a.tokens} tokens, medians of {a.rounds} rounds")
    print(f"{'dtype':6} {'camelid tok/s':>14} {'transformers':>13} {'ratio':>7} {'bw bound':>9} {'% of bound':>11}")
    for name, _, _ in DTYPES:
        med = lambda i: statistics.median(v[i] for v in rows[name])  # noqa: E731
        ratio = statistics.median(o / t for o, t, _ in rows[name])
        share = statistics.median(o / b for o, _, b in rows[name])
        print(f"{name:6} {med(0):14.1f} {med(1):13.1f} {ratio:6.2f}x {med(2):9.1f} {100 * share:10.0f}%")


if __name__ == "__main__":
    main()
