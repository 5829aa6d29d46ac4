"""What the gateway's guardrails cost: requests/s and p50/p99 latency of camelid-gateway in front of a worker that
answers at once (examples/instant_worker), with guardrails off, with rules moderation on (input and output), and
with rules moderation plus an API key with rate limits, in the same run on this machine. wrk posts a chat request
with a realistic ~600-character prompt. Target: rules moderation adds <= 0.2 ms at p50.

    python bench/guardrails_speed.py [--seconds 5]
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from common import ROOT, free_port, wait_http, wrk

KEY = "sk-camelid-bench"

# A rule set of the size a team would keep: five categories, words, phrases and spelling-tolerant patterns.
RULES = {
    "violence": ["kill", "murder", "stab", "shoot up", "blow up", "behead", "massacre", "assault",
                 "re:\\bk[i1!|]+l+(s|ed|ing|er)?\\b", "re:\\bmurd[e3]r", "re:\\bb[o0]mb(s|ing)?\\b"],
    "self-harm": ["hurt myself", "kill myself", "end my life", "cut myself", "re:\\bsu[i1]c[i1]d(e|al)\\b",
                  "re:\\bself[- ]?harm"],
    "hate": ["vermin", "subhuman", "re:\\bgo back to (your|their) country\\b", "ethnic cleansing"],
    "sexual/minors": ["re:\\bchild (porn|sexual)", "re:\\bunderage (sex|nude)"],
    "illicit": ["make meth", "cook meth", "buy a gun illegally", "re:\\bcredit card dump", "launder money",
                "re:\\bransomware (kit|builder)"],
}

PROMPT = ("I'm planning a week-long trip to Lisbon in the spring with two friends. We like food markets, old "
          "neighbourhoods, live music and the occasional museum, but we don't want to rush. Could you suggest a "
          "relaxed day-by-day plan, including a day trip to Sintra and one to the coast, tips on getting around "
          "with public transport, a few restaurants in different price ranges, and what we should book ahead? "
          "Please also mention anything we should know about the weather, tipping, and pickpockets in busy "
          "areas, and whether a Lisboa card is worth it for us.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: `make bench-deps` installs it")
    instant = ROOT / "target/release/examples/instant_worker"
    gateway = ROOT / "target/release/camelid-gateway"
    for exe in (instant, gateway):
        if not exe.exists():
            raise SystemExit(f"{exe} missing: cargo build --release -p camelid-gateway --bins --examples")
    work = ROOT / "target/bench/guardrails"
    work.mkdir(parents=True, exist_ok=True)
    wport = free_port()
    configs = {
        "off": {},
        "rules": {"moderation": {
            "providers": {"rules": {"type": "rules", "categories": RULES}},
            "profiles": {"default": {"input": ["rules"], "output": ["rules"]}},
            "default_profile": "default"}},
    }
    configs["rules+key"] = dict(configs["rules"], keys=[{
        "name": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
        "requests_per_minute": 100_000_000, "tokens_per_minute": 1_000_000_000}])
    body = json.dumps({"model": "instant", "messages": [{"role": "system", "content": "You are a helpful guide."},
                                                          {"role": "user", "content": PROMPT}], "max_tokens": 1})
    worker = subprocess.Popen([str(instant), f"127.0.0.1:{wport}"], stdout=subprocess.DEVNULL)
    results = {}
    try:
        for name, extra in configs.items():
            path = work / f"{name}.yaml"
            path.write_text(json.dumps(dict(extra, models={"instant": [f"127.0.0.1:{wport}"]})))
            gport = free_port()
            gw = subprocess.Popen([str(gateway), "--config", str(path), "--listen", f"127.0.0.1:{gport}", "--admin-listen", "127.0.0.1:0"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=dict(os.environ, CAMELID_LOG="error"))
            try:
                wait_http(f"http://127.0.0.1:{gport}/readyz", timeout=60)
                url = f"http://127.0.0.1:{gport}/v1/chat/completions"
                key = KEY if "key" in name else None
                wrk(url, body, 1, 1, key)  # warm-up
                results[name, 1] = wrk(url, body, 1, args.seconds, key)
                results[name, 16] = wrk(url, body, 16, args.seconds, key)
            finally:
                gw.terminate()
                gw.wait()
    finally:
        worker.terminate()
        worker.wait()
    print("Guardrails overhead (camelid-gateway -> a worker answering at once; wrk POST /v1/chat/completions, "
          f"{len(PROMPT)}-char prompt, {sum(len(v) for v in RULES.values())} rules in {len(RULES)} categories)")
    print(f"{'guardrails':12} {'conns':>5} {'req/s':>9} {'p50':>8} {'p99':>8} {'non-2xx':>7}")
    for (name, conns), r in results.items():
        print(f"{name:12} {conns:>5} {r['rps']:>9.0f} {r['p50_ms']:>6.3f}ms {r['p99_ms']:>6.3f}ms {r['errors']:>7}")
    for name in ("rules", "rules+key"):
        added = results[name, 1]["p50_ms"] - results["off", 1]["p50_ms"]
        added99 = results[name, 1]["p99_ms"] - results["off", 1]["p99_ms"]
        ratio = results[name, 16]["rps"] / results["off", 16]["rps"]
        print(f"{name}: adds {added:+.3f} ms p50, {added99:+.3f} ms p99 (1 connection; target p50 <= 0.2 ms); "
              f"{ratio:.2f}x the requests/s of guardrails off at 16 connections")


if __name__ == "__main__":
    main()
