"""bf16 training on one GPU: camelid-trainer vs transformers + PyTorch eager (autocast bf16, f32 master weights),
with activation checkpointing (camelid full or selective against PyTorch's per-layer checkpointing) and without, on a SmolLM2-135M-shaped model (random weights: speed does not
depend on them), same samples, same micro-batch, gradient accumulation, loss normalization, AdamW, learning-rate schedule and
clipping, so the loss curves should agree too.

Prints tokens/s (median over the steps after the first) and MFU against the GPU's dense bf16 peak.

    python3 bench/train_gpu.py --trainer PATH --template DIR [--steps 50] [--max-length 2048] [--micro-batch 8]

DIR holds an exported SmolLM2 model's config.json, tokenizer.json, tokenizer_config.json and chat template.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from train_speed import write_dataset  # noqa: E402  (bench/ is the script's directory)

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s.
PEAKS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops():
    name = torch.cuda.get_device_name(0)
    for key, value in PEAKS.items():
        if key in name:
            return name, value
    return name, float("nan")


def cosine_lr_factor(step, total, warmup_ratio=0.03):
    """camelid's schedule (trainer/src/optim.rs): linear warmup from lr/warmup, then cosine to 0."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def flops_per_token(n_params, layers, hidden, seq_len):
    return 6 * n_params + 6 * layers * hidden * seq_len


def accumulate(model, micro, autocast):
    """Forward and backward of a step's micro-batches `(ids, labels)`, the loss averaged over every trainable token
    of the step as camelid averages it; returns (the step's loss, tokens). Also run by train_gpu_1b.py's FSDP2 side."""
    step_tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
    loss_sum, tokens = 0.0, 0
    for ids, labels in micro:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100,
                                                 reduction="sum") / step_tokens
        loss.backward()
        loss_sum += loss.detach()
        tokens += ids.numel()
    return loss_sum, tokens


def run_camelid(args, model_dir, data, out, checkpointing):
    cmd = [args.trainer, "train", "--model", model_dir, "--data", data, "--output", out, "--max-length",
           str(args.max_length), "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum),
           "--max-steps", str(args.steps), "--learning-rate", "2e-5", "--precision", "bf16", "--device", "cuda",
           "--resume", "never", "--checkpoint-interval-steps", "1000000", "--activation-checkpointing", checkpointing,
           "--export-dtype", "bf16"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, CAMELID_LOG="warn"), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rate = statistics.median(s["tokens"] / s["seconds"] for s in steps[1:])
    return rate, steps[0]["loss"], steps[-1]["loss"], wall


def run_pytorch(args, model_dir, batches, checkpointing):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = model.cuda()
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr_factor(s, args.steps))
    rates, losses = [], []
    it = iter(batches)
    for step in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        micro = [next(it) for _ in range(args.grad_accum)]
        loss_sum, tokens = accumulate(model, micro, autocast=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        losses.append(float(loss_sum))
        if step > 0:
            rates.append(tokens / (time.perf_counter() - t))
    n = sum(p.numel() for p in model.parameters())
    del model, opt
    torch.cuda.empty_cache()
    return statistics.median(rates), losses[0], losses[-1], n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", required=True)
    p.add_argument("--template", required=True)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    model_dir = os.path.join(tmp, "model")
    shutil.copytree(args.template, model_dir)
    config = LlamaConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    data = os.path.join(tmp, "data.json")
    write_dataset(data, args.micro_batch * args.grad_accum * args.steps, words_per_answer=3000)
    prep = os.path.join(tmp, "prepared")
    subprocess.run([args.trainer, "prepare", "--model", model_dir, "--data", data, "--output", prep, "--max-length",
                    str(args.max_length)], check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, CAMELID_LOG="warn"))
    samples = [json.loads(line) for line in open(os.path.join(prep, "samples.jsonl"))]
    assert all(len(s["ids"]) == args.max_length for s in samples)
    batches = []
    for i in range(0, len(samples), args.micro_batch):
        chunk = samples[i:i + args.micro_batch]
        ids = torch.tensor([s["ids"] for s in chunk], device="cuda")
        labels = torch.tensor([[t if lab else -100 for t, lab in zip(s["ids"], s["labels"])] for s in chunk],
                              device="cuda")
        batches.append((ids, labels))
    name, peak = peak_tflops()
    print(f"{name}: SmolLM2-135M shape, bf16 compute / f32 master, seq {args.max_length}, micro-batch "
          f"{args.micro_batch} x grad-accum {args.grad_accum}, {args.steps} steps; peak {peak} TFLOP/s")
    print(f"{'act. ckpt':<10}{'camelid tok/s':>15}{'pytorch tok/s':>15}{'ratio':>8}{'MFU camelid':>13}"
          f"{'MFU pytorch':>13}{'loss first/last camelid':>26}{'pytorch':>18}")
    pytorch = {}
    for mode in ("full", "selective", "none"):
        ckpt = mode != "none"
        if ckpt not in pytorch:
            pytorch[ckpt] = run_pytorch(args, model_dir, batches, ckpt)
        theirs, t0, t1, n = pytorch[ckpt]
        ours, o0, o1, wall = run_camelid(args, model_dir, data, os.path.join(tmp, f"out-{mode}"), mode)
        fpt = flops_per_token(n, config.num_hidden_layers, config.hidden_size, args.max_length)
        mfu = lambda r: r * fpt / (peak * 1e12)  # noqa: E731
        print(f"{mode:<10}{ours:>15.0f}{theirs:>15.0f}{ours / theirs:>7.2f}x{mfu(ours):>12.1%}"
              f"{mfu(theirs):>13.1%}{o0:>14.3f} / {o1:<9.3f}{t0:>9.3f} / {t1:<7.3f}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
