"""Sharded training across 2 processes on CPU: camelid (`launch --nproc 2`, ZeRO-3 over c10d Gloo) against one
camelid process, and PyTorch FSDP2 (`fully_shard` over Gloo, started by torchrun) against one PyTorch process,
same machine, same run, same global batch (2 ranks x 1 micro-batch vs 1 process x 2 micro-batches).

Each side recomputes every decoder layer in backward (camelid's sharded engine always does; PyTorch gets per-layer
activation checkpointing) and reports tokens per second (median over the timed steps; the first step is warm-up).
For camelid the time rank 0 spends waiting for collectives (the communication compute did not hide) is printed
too. On a 2-core machine two ranks share the
cores one process had, so expect little or no speed-up: the numbers show what sharding costs, not what it buys.

    python bench/fsdp_speed.py --trainer target/release/camelid-trainer [--steps 4] [--max-length 256] [--rounds 2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def camelid(args, data, out, nproc):
    train = ["train", "--model", args.model, "--data", data, "--output", out, "--max-length", str(args.max_length),
             "--micro-batch", str(args.micro_batch), "--grad-accum", str(2 // nproc), "--max-steps",
             str(args.steps), "--learning-rate", "2e-5", "--device", "cpu", "--precision", "f32", "--resume", "never",
             "--checkpoint-interval-steps", "1000000", "--checkpoint-keep", "0", "--activation-checkpointing", "full"]
    cmd = [args.trainer] + (["launch", "--nproc", str(nproc), "--master-port", "29641", "--"] if nproc > 1 else []) + train
    env = dict(os.environ, CAMELID_LOG="warn", OMP_NUM_THREADS=str(max(1, args.threads // nproc)))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]
    rate = statistics.median(s["tokens"] / s["seconds"] for s in steps)
    comm = statistics.median(s.get("comm_seconds", 0.0) for s in steps)
    step_seconds = statistics.median(s["seconds"] for s in steps)
    return rate, comm, step_seconds


def pytorch(args, prepared, nproc):
    """Runs this script's worker: one process, or torchrun with 2 ranks and FSDP2."""
    result = os.path.join(prepared, f"pytorch-{nproc}.json")
    worker = [os.path.abspath(__file__), "--worker", "--model", args.model, "--prepared", prepared, "--steps",
              str(args.steps), "--micro-batch", str(args.micro_batch), "--result", result]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // nproc)))
    if nproc == 1:
        cmd = [sys.executable] + worker
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", "29642"] + worker
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(result) as f:
        return json.load(f)["tokens_per_second"]


def worker(args):
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from train_speed import to_batches

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    samples = [json.loads(line) for line in open(os.path.join(args.prepared, "samples.jsonl"))]
    batches = to_batches(samples, args.micro_batch)
    d, name = os.path.split(args.model)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    accum = 2 // world
    rates = []
    it = iter(batches)
    for step in range(args.steps):
        t = time.perf_counter()
        tokens = 0
        for round_ in range(accum):
            # Rank r takes the r-th micro-batch of each round of the global batch.
            round_batches = [next(it) for _ in range(world)]
            ids, labels = round_batches[rank]
            loss = model(input_ids=ids, labels=labels).loss / 2
            loss.backward()
            tokens += sum(b[0].numel() for b in round_batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            rates.append(tokens / (time.perf_counter() - t))
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump({"tokens_per_second": statistics.median(rates)}, f)
    if world > 1:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", default=os.path.join(ROOT, "target/release/camelid-trainer"))
    p.add_argument("--model", default=None)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    from train_speed import default_gguf, write_dataset

    args.model = args.model or default_gguf()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.json")
        write_dataset(data, args.micro_batch * 2 * args.steps, words_per_answer=args.max_length * 3)
        prepared = os.path.join(tmp, "prepared")
        subprocess.run([args.trainer, "prepare", "--model", args.model, "--data", data, "--output", prepared,
                        "--max-length", str(args.max_length)], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, CAMELID_LOG="warn"))
        print(f"SmolLM2-135M, CPU, {args.threads} threads in all, seq {args.max_length}, global batch "
              f"2 x micro-batch {args.micro_batch}, {args.steps} steps (first is warm-up), f32, layers recomputed")
        # The machine's speed drifts: each round measures all four back to back, and the medians over rounds are
        # printed (ratios are medians of the ratios within a round).
        rows = {k: [] for k in ("ours1", "ours2", "theirs1", "theirs2", "comm", "step")}
        for r in range(args.rounds):
            ours1, _, _ = camelid(args, data, os.path.join(tmp, f"c1-{r}"), 1)
            ours2, comm, step_seconds = camelid(args, data, os.path.join(tmp, f"c2-{r}"), 2)
            theirs1 = pytorch(args, prepared, 1)
            theirs2 = pytorch(args, prepared, 2)
            for k, v in zip(rows, (ours1, ours2, theirs1, theirs2, comm, step_seconds)):
                rows[k].append(v)
        m = {k: statistics.median(v) for k, v in rows.items()}
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(rows[a], rows[b]))  # noqa: E731
        print(f"medians over {args.rounds} rounds")
        print(f"{'':<28}{'1 process':>12}{'2 ranks':>12}{'2 vs 1':>9}")
        print(f"{'camelid tokens/s':<28}{m['ours1']:>12.1f}{m['ours2']:>12.1f}{ratio('ours2', 'ours1'):>8.2f}x")
        print(f"{'PyTorch (FSDP2) tokens/s':<28}{m['theirs1']:>12.1f}{m['theirs2']:>12.1f}"
              f"{ratio('theirs2', 'theirs1'):>8.2f}x")
        print(f"camelid vs PyTorch: 1 process {ratio('ours1', 'theirs1'):.2f}x, 2 ranks {ratio('ours2', 'theirs2'):.2f}x")
        print(f"camelid 2 ranks: {m['comm']:.3f} s of each {m['step']:.3f} s step waiting for collectives "
              f"({m['comm'] / m['step']:.0%}; the rest of the communication overlaps compute)")


if __name__ == "__main__":
    main()
