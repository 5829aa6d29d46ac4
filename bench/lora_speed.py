"""LoRA on SmolLM2-135M, on this machine, in the same run:

1. Training: `camelid-trainer train --method lora` against PyTorch + PEFT on the same samples (each exactly
   --max-length tokens), the same LoRA settings (rank 16, alpha 32, dropout 0.05, every linear projection), micro-batch,
   gradient accumulation, AdamW and clipping, in f32 with activation checkpointing on both sides: tokens/s (median
   over the timed steps; the first is warm-up) and each process's peak resident memory.
2. Serving: `camelid-worker` (the shipped Q4_1 GGUF, quantized) behind `camelid-gateway`, 16 streaming clients:
   every request to the base model, against the same requests spread over 8 adapters in one batch (two clients
   each), for adapters of rank 16 on every projection and of rank 8 on q_proj and v_proj (PEFT wrote them, with
   random weights). The ratio is the throughput kept with adapters (the target: at least 85%).
3. Time to load an adapter: the first request naming an adapter the worker does not hold yet (the gateway loads it
   from its configured source) against the next one.

    python bench/lora_speed.py [--trainer target/release/camelid-trainer] [--steps 4] [--rounds 2]
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import common  # noqa: E402
from common import PY, ROOT, free_port, smollm2_gguf, stop, wait_http  # noqa: E402
from serve_speed import PROMPTS, hf_model_dir  # noqa: E402
from train_speed import to_batches, write_dataset  # noqa: E402

LORA = {"rank": 16, "alpha": 32, "dropout": 0.05}


def peak_rss_mb(cmd, env=None):
    """Runs `cmd` and returns (its exit status, its peak resident memory in MB)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed with {proc.returncode}")
    return usage.ru_maxrss / 1024


def run_camelid(args, data, out):
    cmd = [args.trainer, "train", "--model", args.model, "--data", data, "--output", out, "--method", "lora",
           "--lora-rank", str(LORA["rank"]), "--lora-alpha", str(LORA["alpha"]), "--lora-dropout",
           str(LORA["dropout"]), "--lora-target-modules", "all-linear", "--max-length", str(args.max_length),
           "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--max-steps",
           str(args.steps), "--learning-rate", "2e-4", "--device", "cpu", "--resume", "never",
           "--checkpoint-interval-steps", "1000000", "--checkpoint-keep", "0", "--activation-checkpointing",
           "full", "--precision", "f32"]
    rss = peak_rss_mb(cmd, env=dict(os.environ, CAMELID_LOG="warn"))
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return statistics.median(s["tokens"] / s["seconds"] for s in steps[1:]), rss


def peft_worker(args):
    """PyTorch + PEFT's side, in a process of its own (so that its peak memory is its own): prints tokens/s."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    samples = [json.loads(line) for line in open(args.peft_worker)]
    batches = to_batches(samples, args.micro_batch)
    model = AutoModelForCausalLM.from_pretrained(str(hf_model_dir(smollm2_gguf())), dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                        target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    rates, it = [], iter(batches)
    for step in range(args.steps):
        t = time.perf_counter()
        tokens = 0
        for _ in range(args.grad_accum):
            ids, labels = next(it)
            (model(input_ids=ids, labels=labels).loss / args.grad_accum).backward()
            tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            rates.append(tokens / (time.perf_counter() - t))
    print(json.dumps({"tok_s": statistics.median(rates), "trainable": sum(p.numel() for p in trainable)}))


def run_peft(args, samples_path):
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    cmd = [PY, __file__, "--peft-worker", samples_path, "--steps", str(args.steps), "--micro-batch",
           str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--threads", str(args.threads)]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("the PEFT run failed")
    result = json.loads(open(out).read().strip().splitlines()[-1])
    return result["tok_s"], usage.ru_maxrss / 1024


def training(args):
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.json")
        write_dataset(data, args.micro_batch * args.grad_accum * args.steps)
        prep = os.path.join(tmp, "prepared")
        subprocess.run([args.trainer, "prepare", "--model", args.model, "--data", data, "--output", prep,
                        "--max-length", str(args.max_length)], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, CAMELID_LOG="warn"))
        samples = os.path.join(prep, "samples.jsonl")
        rows = []
        for _ in range(args.rounds):
            theirs, their_rss = run_peft(args, samples)
            ours, our_rss = run_camelid(args, data, os.path.join(tmp, "out"))
            rows.append((ours, theirs, our_rss, their_rss))
    print(f"\nLoRA training, SmolLM2-135M f32 on CPU, {args.threads} threads, seq {args.max_length}, micro-batch "
          f"{args.micro_batch} x grad-accum {args.grad_accum}, rank {LORA['rank']} on every projection, "
          f"activation checkpointing, {args.steps} steps (first is warm-up), {args.rounds} rounds")
    print(f"{'':12}{'tok/s':>10}{'peak RSS MB':>14}")
    for name, i in (("camelid", 0), ("PEFT", 1)):
        print(f"{name:12}{statistics.median(r[i] for r in rows):>10.1f}"
              f"{statistics.median(r[i + 2] for r in rows):>14.0f}")
    print(f"camelid / PEFT tokens/s: {statistics.median(r[0] / r[1] for r in rows):.2f}x; "
          f"peak memory {statistics.median(r[2] / r[3] for r in rows):.2f}x")


def make_adapters(kind, count):
    """`count` PEFT adapters of `kind` with random weights (what a trained adapter's look like to the server)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = ROOT / "target/bench/lora" / kind
    if (root / f"a{count - 1}" / "adapter_config.json").exists():
        return root
    rank, modules = (16, "all-linear") if kind == "r16-all" else (8, ["q_proj", "v_proj"])
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(str(hf_model_dir(smollm2_gguf())), dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules, init_lora_weights=False,
                            task_type="CAUSAL_LM")
        get_peft_model(base, config).save_pretrained(str(root / f"a{i}"))
    return root


def stream(base, model, prompt, max_tokens):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    import urllib.request
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("choices") and first is None:
                first = time.perf_counter()
            if payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
    return (first or time.perf_counter()) - t0, tokens


def load_run(base, models, clients, per_client, max_tokens):
    jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(clients * per_client)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda j: stream(base, j[0], j[1], max_tokens), jobs))
    return sum(r[1] for r in results) / (time.perf_counter() - t0)


def serving(args):
    kinds = ["r16-all", "r8-qv"]
    roots = {kind: make_adapters(kind, 8) for kind in kinds}
    logs = open(ROOT / "target/bench/lora_speed.log", "w")
    print(f"\nServing with adapters: camelid-worker (SmolLM2 Q4_1) behind camelid-gateway, {args.clients} streaming "
          f"clients x {args.per_client} requests, {args.max_tokens} tokens each, greedy")
    print(f"{'adapters':<10}{'MB each':>9}{'base tok/s':>12}{'8 adapters tok/s':>18}{'kept':>7}{'load ms':>9}")
    for kind in kinds:
        root = roots[kind]
        wport, gport = free_port(), free_port()
        modules = [arg for i in range(8) for arg in ("--lora-modules", f"{kind}-{i}={root / f'a{i}'}")]
        config = ROOT / "target/bench/lora_gateway.yaml"
        late = root / "a0"
        config.write_text(f"models:\n  base: [\"127.0.0.1:{wport}\"]\nprobe_interval_ms: 200\n"
                          f"adapters:\n  base: {{late: {late}}}\nallow_anonymous: true\n")
        procs = [common.start([str(ROOT / "target/release/camelid-worker"), "--listen", f"127.0.0.1:{wport}",
                               "--metrics-addr", f"127.0.0.1:{free_port()}", "--served-model-name", "base",
                               "--max-loras", "9", *modules], logs),
                 common.start([str(ROOT / "target/release/camelid-gateway"), "--config", str(config), "--listen",
                               f"127.0.0.1:{gport}", "--admin-listen", f"127.0.0.1:{free_port()}",
                               "--no-moderation"], logs)]
        base = f"http://127.0.0.1:{gport}"
        try:
            wait_http(base + "/v1/models", ok=lambda body: kind.encode() in body)
            stream(base, "base", "warm up", 8)
            names = [f"{kind}-{i}" for i in range(8)]
            plain, adapted = [], []
            for _ in range(args.rounds):
                plain.append(load_run(base, ["base"], args.clients, args.per_client, args.max_tokens))
                adapted.append(load_run(base, names, args.clients, args.per_client, args.max_tokens))
            first, _ = stream(base, "late", "hello", 1)
            second, _ = stream(base, "late", "hello", 1)
        finally:
            stop(procs)
        mb = sum(f.stat().st_size for f in (root / "a0").glob("*.safetensors")) / 1e6
        kept = statistics.median(a / p for a, p in zip(adapted, plain))
        print(f"{kind:<10}{mb:>9.1f}{statistics.median(plain):>12.1f}{statistics.median(adapted):>18.1f}"
              f"{kept:>7.0%}{(first - second) * 1000:>9.0f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", default=str(ROOT / "target/release/camelid-trainer"))
    p.add_argument("--model", default=None)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--only", choices=["training", "serving"])
    p.add_argument("--peft-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peft_worker:
        return peft_worker(args)
    args.model = args.model or str(smollm2_gguf())
    (ROOT / "target/bench").mkdir(parents=True, exist_ok=True)
    if args.only != "serving":
        training(args)
    if args.only != "training":
        serving(args)


if __name__ == "__main__":
    sys.exit(main())
