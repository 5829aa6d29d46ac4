"""Serving benchmark: `camelid serve` against FastChat (controller + model_worker + openai_api_server from PyPI
`fschat`, its transformers path) on the same SmolLM2-135M f32 model, in the same run, on this machine.

Prints, for 1 and 16 concurrent streaming clients: throughput (tokens/s), time to first token and time per output
token (p50/p99), and the ratios camelid / FastChat; camelid's 16-client throughput against the compute bound
measured here (matmul FLOP/s / 2·params); and the gateway's own overhead (gateway → a worker answering at once) in
requests/s and latency against FastChat's openai_api_server in front of an equally instant FastChat worker.

    python bench/serve_speed.py --camelid target/release/camelid
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import common
from common import PY, ROOT, free_port, smollm2_gguf, stop, wait_http, wrk

PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a llama who learns to swim.",
    "Describe the water cycle.",
    "What are the benefits of regular exercise?",
    "Explain why the sky is blue.",
    "Give advice to a new programmer.",
    "Describe a day in the life of a farmer.",
    "How do airplanes fly?",
]


def start(cmd, log):
    # FastChat writes its own log files into the working directory: keep them under target/bench.
    return common.start(cmd, log, cwd=ROOT / "target/bench")


def hf_model_dir(gguf):
    """SmolLM2 as an HF f32 directory (what FastChat loads), made once from the GGUF."""
    out = ROOT / "target/bench/smollm2-135m-f32"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain copy of its (dequantized) weights does not.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def stream_completion(base, model, prompt, max_tokens, tokenizer):
    """One streaming /v1/completions request; returns (ttft, tpot or None, tokens, seconds)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    text = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            piece = "".join(c.get("text", "") for c in payload.get("choices", []))
            if piece and first is None:
                first = time.perf_counter()
            text.append(piece)
    end = time.perf_counter()
    n = len(tokenizer.encode("".join(text), add_special_tokens=False))
    first = first or end
    tpot = (end - first) / (n - 1) if n > 1 else None
    return first - t0, tpot, n, end - t0


def load_run(base, model, clients, per_client, max_tokens, tokenizer, chat_prompt):
    jobs = [chat_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(clients * per_client)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: stream_completion(base, model, p, max_tokens, tokenizer), jobs))
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    ttft = sorted(r[0] for r in results)
    tpot = sorted(r[1] for r in results if r[1] is not None)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
    return {"tok_s": tokens / wall, "tokens": tokens, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "tpot_p50": pct(tpot, 0.5), "tpot_p99": pct(tpot, 0.99)}


def matmul_gflops():
    import torch

    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n = 30
    t0 = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


# FastChat 0.2.36 predates transformers 5, whose configs carry `rope_scaling` without a "factor"; its model worker
# is run unmodified except for that one lookup.
FASTCHAT_WORKER = r'''
import sys, uvicorn
import fastchat.utils
import fastchat.serve.model_worker as mw

def get_context_length(config):
    scaling = getattr(config, "rope_scaling", None) or {}
    return int(scaling.get("factor", 1) * config.max_position_embeddings)

fastchat.utils.get_context_length = mw.get_context_length = get_context_length
sys.argv[0] = "model_worker"
args, worker = mw.create_model_worker()
uvicorn.run(mw.app, host=args.host, port=args.port, log_level="error")
'''

# FastChat's API server streams with pydantic v1's `.json(ensure_ascii=...)`, which pydantic 2 rejects; this maps
# that one call onto pydantic 2 and runs the server unmodified otherwise.
FASTCHAT_API_SERVER = r'''
import runpy, sys, pydantic

def json_compat(self, **kwargs):
    kwargs.pop("ensure_ascii", None)
    return self.model_dump_json(**kwargs)

pydantic.BaseModel.json = json_compat
sys.argv[0] = "openai_api_server"
runpy.run_module("fastchat.serve.openai_api_server", run_name="__main__")
'''

FAKE_FASTCHAT_WORKER = r'''
import sys, json, uvicorn
import fastchat.serve.base_model_worker as bmw
from transformers import AutoTokenizer

class InstantWorker(bmw.BaseModelWorker):
    def generate_gate(self, params):
        return {"text": "ok", "error_code": 0, "finish_reason": "length",
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    def generate_stream_gate(self, params):
        yield json.dumps(self.generate_gate(params)).encode() + b"\0"

controller, port, model_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
w = InstantWorker(controller, f"http://127.0.0.1:{port}", "instant", model_dir, ["instant"], 1000, "vicuna_v1.1")
w.tokenizer = AutoTokenizer.from_pretrained(model_dir)
w.context_len = 8192
w.init_heart_beat()
uvicorn.run(bmw.app, host="127.0.0.1", port=port, log_level="error")
'''


def start_fastchat(model_dir, worker_cmd, logs):
    ctrl, api = free_port(), free_port()
    controller = f"http://127.0.0.1:{ctrl}"
    procs = [start([PY, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(ctrl)], logs)]
    time.sleep(3)
    procs.append(start(worker_cmd(controller), logs))
    api_script = ROOT / "target/bench/fastchat_api_server.py"
    api_script.write_text(FASTCHAT_API_SERVER)
    procs.append(start([PY, str(api_script), "--host", "127.0.0.1", "--port", str(api),
                        "--controller-address", controller], logs))
    base = f"http://127.0.0.1:{api}"
    try:
        wait_http(base + "/v1/models", ok=lambda b: len(json.loads(b).get("data", [])) > 0)
    except BaseException:
        stop(procs)
        raise
    return procs, base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--camelid", default=str(ROOT / "target/release/camelid"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-single", type=int, default=4)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--wrk-seconds", type=int, default=5)
    args = ap.parse_args()
    for tool in ["wrk"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install {tool}")
    (ROOT / "target/bench").mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    import glob

    gguf = smollm2_gguf()
    model_dir = hf_model_dir(gguf)
    tok = AutoTokenizer.from_pretrained(model_dir)
    chat_prompt = lambda q: tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=False)
    logs = open(ROOT / "target/bench/serve_speed.log", "w")
    rows = {}

    # camelid serve
    port = free_port()
    procs = [start([args.camelid, "serve", "--model", str(model_dir), "--port", str(port),
                    "--served-model-name", "smollm2"], logs)]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/readyz")
        stream_completion(base, "smollm2", chat_prompt("hi"), 4, tok)
        rows["camelid", 1] = load_run(base, "smollm2", 1, args.requests_single, args.max_tokens, tok, chat_prompt)
        rows["camelid", 16] = load_run(base, "smollm2", 16, args.requests_per_client, args.max_tokens, tok,
                                       chat_prompt)
    finally:
        stop(procs)

    # FastChat: controller + model_worker (transformers, CPU, f32) + openai_api_server
    worker_port = free_port()
    worker_script = ROOT / "target/bench/fastchat_model_worker.py"
    worker_script.write_text(FASTCHAT_WORKER)
    procs, base = start_fastchat(model_dir, lambda controller: [
        PY, str(worker_script), "--model-path", str(model_dir), "--model-names", "smollm2",
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(worker_port),
        "--worker-address", f"http://127.0.0.1:{worker_port}", "--controller-address", controller,
        "--limit-worker-concurrency", "16"], logs)
    try:
        stream_completion(base, "smollm2", chat_prompt("hi"), 4, tok)
        rows["fastchat", 1] = load_run(base, "smollm2", 1, args.requests_single, args.max_tokens, tok, chat_prompt)
        rows["fastchat", 16] = load_run(base, "smollm2", 16, args.requests_per_client, args.max_tokens, tok,
                                        chat_prompt)
    finally:
        stop(procs)

    print(f"\nServing SmolLM2-135M f32 on CPU ({os.cpu_count()} cores), streaming /v1/completions, greedy, "
          f"max_tokens {args.max_tokens}")
    print(f"{'system':10} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}")
    for (system, clients), r in rows.items():
        print(f"{system:10} {clients:>7} {r['tok_s']:>8.1f} {r['ttft_p50']*1e3:>7.0f}ms {r['ttft_p99']*1e3:>7.0f}ms "
              f"{r['tpot_p50']*1e3:>7.1f}ms {r['tpot_p99']*1e3:>7.1f}ms")
    for clients, target in [(1, 2), (16, 8)]:
        ratio = rows["camelid", clients]["tok_s"] / rows["fastchat", clients]["tok_s"]
        print(f"throughput camelid/FastChat at {clients:>2} clients: {ratio:.2f}x (target >= {target}x)")
    import torch
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    gflops = matmul_gflops()
    bound = gflops * 1e9 / (2 * params)
    print(f"compute bound: {gflops:.0f} GFLOP/s (1024^2 f32 matmul, torch {torch.__version__}) / "
          f"2x{params/1e6:.0f}M params = {bound:.0f} tok/s; camelid at 16 clients reaches "
          f"{rows['camelid', 16]['tok_s'] / bound:.0%} (target >= 50%)")

    # Gateway overhead: each gateway in front of a worker that answers at once.
    body = json.dumps({"model": "instant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    over = {}
    instant = ROOT / "target/release/examples/instant_worker"
    gateway = ROOT / "target/release/camelid-gateway"
    wport, gport = free_port(), free_port()
    procs = [start([str(instant), f"127.0.0.1:{wport}"], logs),
             start([str(gateway), "--listen", f"127.0.0.1:{gport}", "--admin-listen", "127.0.0.1:0", "--backend", f"instant=127.0.0.1:{wport}"],
                   logs)]
    try:
        wait_http(f"http://127.0.0.1:{gport}/readyz")
        url = f"http://127.0.0.1:{gport}/v1/chat/completions"
        over["camelid", 1] = wrk(url, body, 1, args.wrk_seconds)
        over["camelid", 16] = wrk(url, body, 16, args.wrk_seconds)
    finally:
        stop(procs)
    fake = ROOT / "target/bench/fastchat_instant_worker.py"
    fake.write_text(FAKE_FASTCHAT_WORKER)
    wport = free_port()
    procs, base = start_fastchat(model_dir, lambda controller: [PY, str(fake), controller, str(wport), str(model_dir)],
                                 logs)
    try:
        url = base + "/v1/chat/completions"
        over["fastchat", 1] = wrk(url, body, 1, args.wrk_seconds)
        over["fastchat", 16] = wrk(url, body, 16, args.wrk_seconds)
    finally:
        stop(procs)
    print("\nGateway overhead (gateway -> a worker answering at once; wrk POST /v1/chat/completions)")
    print(f"{'gateway':10} {'conns':>5} {'req/s':>9} {'p50':>8} {'p99':>8} {'non-2xx':>7}")
    for (system, conns), r in over.items():
        print(f"{system:10} {conns:>5} {r['rps']:>9.0f} {r['p50_ms']:>6.2f}ms {r['p99_ms']:>6.2f}ms {r['errors']:>7}")
    print(f"camelid p50 added latency (1 connection): {over['camelid', 1]['p50_ms']:.2f} ms (target <= 1 ms)")
    print(f"requests/s camelid/FastChat at 16 connections: "
          f"{over['camelid', 16]['rps'] / over['fastchat', 16]['rps']:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
