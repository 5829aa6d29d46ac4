"""Training speed of SmolLM2-135M on CPU: camelid-trainer vs transformers + PyTorch eager, same machine, same run.

Both sides train on the same samples (each exactly --max-length tokens, so no padding), with the same micro-batch,
gradient accumulation, AdamW and gradient clipping, on the same number of threads: in f32, and (unless --no-bf16)
in bf16 mixed precision (camelid: bf16 compute with f32 masters; PyTorch: autocast); with activation checkpointing
(camelid's full and selective against PyTorch's per-layer checkpointing) and without. Tokens per second is the
median over the timed steps (the first step of each run is warm-up). The compute bound is the measured matmul rate
of the precision divided by the model FLOPs per token (6 x parameters plus attention); the fraction printed is model
FLOPs utilization (recomputation not counted as useful work).

    python bench/train_speed.py --trainer target/release/camelid-trainer [--steps 3] [--rounds 2] [--max-length 512] [--no-bf16]
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from common import smollm2_gguf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def default_gguf():
    return str(smollm2_gguf())


def write_dataset(path, n, words_per_answer=1200):
    """Conversations whose single exchange is longer than --max-length: each sample is truncated to exactly --max-length
    tokens (and counted as truncated in the data report). 1200 words cover 512 tokens; 3000 cover 2048."""
    words = ("camels store fat in their humps while llamas carry loads across the high andes and "
             "vicuna wool is among the finest in the world ").split()
    records = []
    for i in range(n):
        answer = " ".join(words[(i + j) % len(words)] for j in range(words_per_answer))
        records.append({"id": f"bench-{i}", "conversations": [
            {"from": "human", "value": f"Tell me everything about camelids, part {i}."},
            {"from": "gpt", "value": answer}]})
    with open(path, "w") as f:
        json.dump(records, f)


def to_batches(samples, micro_batch):
    """`prepare`'s samples as (input ids, labels with -100 where no loss) tensors of `micro_batch` rows."""
    batches = []
    for i in range(0, len(samples), micro_batch):
        chunk = samples[i:i + micro_batch]
        ids = torch.tensor([s["ids"] for s in chunk])
        labels = torch.tensor([[t if l else -100 for t, l in zip(s["ids"], s["labels"])] for s in chunk])
        batches.append((ids, labels))
    return batches


def matmul_gflops(threads, dtype, n=2048, repeats=5):
    """Peak matmul rate (a large square product)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / statistics.median(times) / 1e9


def flops_per_token(params, layers, hidden, seq_len):
    # 6N for the parameters (forward 2N, backward 4N) plus causal attention scores and values.
    return 6 * params + 6 * layers * hidden * seq_len


def run_camelid(args, data, out, checkpointing, precision):
    cmd = [args.trainer, "train", "--model", args.model, "--data", data, "--output", out,
           "--max-length", str(args.max_length), "--micro-batch", str(args.micro_batch), "--grad-accum",
           str(args.grad_accum), "--max-steps", str(args.steps), "--learning-rate", "2e-5", "--device", "cpu",
           "--resume", "never", "--checkpoint-interval-steps", "1000000", "--checkpoint-keep", "0",
           "--activation-checkpointing", checkpointing, "--precision", precision]
    env = dict(os.environ, CAMELID_LOG="warn")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rates = [s["tokens"] / s["seconds"] for s in steps[1:]]
    return statistics.median(rates), steps


def run_pytorch(args, batches, checkpointing, threads, precision):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d, name = os.path.split(args.model)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    rates = []
    it = iter(batches)
    for step in range(args.steps):
        t = time.perf_counter()
        tokens = 0
        for _ in range(args.grad_accum):
            ids, labels = next(it)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(input_ids=ids, labels=labels).loss / args.grad_accum
            loss.backward()
            tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            rates.append(tokens / (time.perf_counter() - t))
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    return statistics.median(rates), params, cfg.num_hidden_layers, cfg.hidden_size


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", default=os.path.join(ROOT, "target/release/camelid-trainer"))
    p.add_argument("--model", default=None)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 mixed-precision rows")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    args.model = args.model or default_gguf()

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.json")
        write_dataset(data, args.micro_batch * args.grad_accum * args.steps)
        prep = os.path.join(tmp, "prepared")
        subprocess.run([args.trainer, "prepare", "--model", args.model, "--data", data, "--output", prep,
                        "--max-length", str(args.max_length)], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, CAMELID_LOG="warn"))
        samples = [json.loads(line) for line in open(os.path.join(prep, "samples.jsonl"))]
        assert all(len(s["ids"]) == args.max_length for s in samples), "samples must be exactly --max-length tokens"
        batches = to_batches(samples, args.micro_batch)

        print(f"SmolLM2-135M training on CPU, {args.threads} threads, seq {args.max_length}, micro-batch "
              f"{args.micro_batch} x grad-accum {args.grad_accum}, {args.steps} steps (first is warm-up)")
        gflops = {"f32": matmul_gflops(args.threads, torch.float32)}
        if not args.no_bf16:
            gflops["bf16"] = matmul_gflops(args.threads, torch.bfloat16)
        runs = [("f32", "full"), ("f32", "selective"), ("f32", "none")]
        if not args.no_bf16:
            runs += [("bf16", "full"), ("bf16", "none")]
        # The machine's speed drifts: each round measures every run back to back, PyTorch then camelid, and the
        # medians over rounds are printed (of the ratios within a round, not a ratio of medians).
        measured = {run: ([], [], []) for run in runs}
        for _ in range(args.rounds):
            pytorch = {}
            for precision, mode in runs:
                ckpt = mode != "none"
                if (precision, ckpt) not in pytorch:
                    pytorch[precision, ckpt] = run_pytorch(args, batches, ckpt, args.threads, precision)
                torch_rate, params, layers, hidden = pytorch[precision, ckpt]
                ours, _ = run_camelid(args, data, os.path.join(tmp, f"out-{precision}-{mode}"), mode, precision)
                ours_all, theirs_all, ratios = measured[precision, mode]
                ours_all.append(ours)
                theirs_all.append(torch_rate)
                ratios.append(ours / torch_rate)
        rows = []
        for (precision, mode), (ours_all, theirs_all, ratios) in measured.items():
            bound = gflops[precision] * 1e9 / flops_per_token(params, layers, hidden, args.max_length)
            rows.append((precision, mode, statistics.median(ours_all), statistics.median(theirs_all),
                         statistics.median(ratios), bound))
        for precision, rate in gflops.items():
            bound = next((r[5] for r in rows if r[0] == precision), 0)
            print(f"{precision} matmul {rate:.0f} GFLOP/s -> compute bound {bound:.0f} tokens/s")
        print("camelid full/selective activation checkpointing vs PyTorch per-layer checkpointing; none vs none;")
        print("bf16: camelid bf16 compute with f32 masters vs PyTorch autocast(cpu, bf16)")
        print(f"medians over {args.rounds} rounds")
        print(f"{'precision':<11}{'camelid ckpt':<14}{'camelid tok/s':>14}{'pytorch tok/s':>15}{'ratio':>8}"
              f"{'MFU camelid':>13}{'MFU pytorch':>13}")
        for precision, mode, ours, theirs, ratio, bound in rows:
            print(f"{precision:<11}{mode:<14}{ours:>14.1f}{theirs:>15.1f}{ratio:>7.2f}x"
                  f"{ours / bound:>12.0%}{theirs / bound:>13.0%}")


if __name__ == "__main__":
    main()
