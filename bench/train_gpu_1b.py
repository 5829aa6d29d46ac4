"""Training a 1B-class LLaMA on one GPU: camelid-trainer against PyTorch FSDP2, same GPU, same run.

The model is a LLaMA shape of 1.07B parameters (hidden 2048, 16 layers, 32 query and 8 key/value heads, MLP 8192,
SmolLM2's 49152-token vocabulary, tied embeddings), random weights made on the device (speed does not depend on
them). Every side trains it in bf16 compute with f32 master weights, per-layer activation checkpointing, AdamW and
gradient clipping, on the same samples of exactly --max-length tokens (2048):

- camelid, one process (its single-GPU engine);
- camelid through c10d with world size 1 (`launch --nproc 1`: the sharded engine over NCCL, what a gang runs);
- PyTorch FSDP2 (`fully_shard` per decoder layer and at the root, bf16 parameters and f32 reductions) with world
  size 1 over NCCL.

Two ranks on one GPU are not run: NCCL refuses two ranks on the same device.

Printed per side: tokens/s (median over the steps after the first), MFU against the GPU's dense bf16 peak (6 x
parameters + attention FLOPs per token; recomputation not counted), peak GPU memory, and the loss of the first and
last step. `--dry-run` runs the same pipeline on the CPU at a toy shape over gloo, so `make test` keeps the script
working where no GPU is lent.

    python bench/train_gpu_1b.py --trainer PATH --template DIR [--steps 10] [--micro-batch 4] [--grad-accum 2]

PATH is a camelid-trainer built with `--features nccl` (the c10d row needs NCCL); DIR holds a SmolLM2-vocabulary
model's config.json, tokenizer.json, tokenizer_config.json and chat template (an exported model).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from common import free_port  # noqa: E402
from train_gpu import flops_per_token, peak_tflops  # noqa: E402
from train_speed import write_dataset  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),
    "toy": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128),
}

# Run in its own process (clean peak memory, its own process group): PyTorch FSDP2 on the batches in REQUEST.
FSDP2 = r'''
import json, math, os, statistics, sys, time
import torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

req = json.load(open(sys.argv[1]))
sys.path.insert(0, req["bench"])
from train_gpu import accumulate
cuda = req["device"] == "cuda"
device = torch.device("cuda", 0) if cuda else torch.device("cpu")
dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{req['port']}", rank=0,
                        world_size=1, device_id=device if cuda else None)
model = LlamaForCausalLM.from_pretrained(req["model"], dtype=torch.float32).to(device)
model.config.use_cache = False
apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for layer in model.model.layers:
    fully_shard(layer, mp_policy=policy)
fully_shard(model, mp_policy=policy)
opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0, fused=cuda)
samples = [json.loads(line) for line in open(req["samples"])]
mb, ga = req["micro_batch"], req["grad_accum"]
batches = []
for i in range(0, len(samples), mb):
    chunk = samples[i:i + mb]
    ids = torch.tensor([s["ids"] for s in chunk], device=device)
    labels = torch.tensor([[t if l else -100 for t, l in zip(s["ids"], s["labels"])] for s in chunk], device=device)
    batches.append((ids, labels))
sync = torch.cuda.synchronize if cuda else (lambda: None)
rates, losses = [], []
for step in range(req["steps"]):
    sync()
    t = time.perf_counter()
    loss_sum, tokens = accumulate(model, batches[step * ga:(step + 1) * ga], autocast=False)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    losses.append(float(loss_sum))
    if step > 0:
        rates.append(tokens / (time.perf_counter() - t))
json.dump({"rate": statistics.median(rates), "first": losses[0], "last": losses[-1]},
          open(sys.argv[2], "w"))
dist.destroy_process_group()
'''


class GpuMemory:
    """Peak used memory of GPU 0 (nvidia-smi, every 0.2 s) while a child process runs, less what was used before."""

    def __init__(self, enabled):
        self.enabled, self.peak, self.base, self._stop = enabled, 0.0, self._read() if enabled else 0.0, False

    @staticmethod
    def _read():
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True)
        return float(out.stdout.strip() or 0)

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self._read())
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop = True
        if self.enabled:
            self._thread.join()

    def used_mb(self):
        return self.peak - self.base if self.enabled else None


def make_model(template, out, shape, device):
    """A random model of `shape` with `template`'s tokenizer and chat template, made on `device`, saved in bf16."""
    shutil.copytree(template, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf", "config.json"))
    base = json.load(open(os.path.join(template, "config.json")))
    config = LlamaConfig(vocab_size=base["vocab_size"], max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=base.get("bos_token_id"),
                         eos_token_id=base.get("eos_token_id"), pad_token_id=base.get("pad_token_id"),
                         head_dim=SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"],
                         **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    return config, params


def run_camelid(args, model_dir, data, out, nproc):
    train = ["train", "--model", model_dir, "--data", data, "--output", out, "--max-length", str(args.max_length),
             "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--max-steps",
             str(args.steps), "--learning-rate", "2e-5", "--precision", "bf16", "--device", args.device,
             "--resume", "never", "--checkpoint-interval-steps", "1000000", "--checkpoint-keep", "0",
             "--activation-checkpointing", "full", "--export-dtype", "bf16"]
    cmd = [args.trainer] + (["launch", "--nproc", str(nproc), "--master-port", str(free_port()), "--"] + train
                            if nproc else train)
    with GpuMemory(args.device == "cuda") as memory:
        subprocess.run(cmd, check=True, env=dict(os.environ, CAMELID_LOG="warn"), stdout=subprocess.DEVNULL)
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rate = statistics.median(s["tokens"] / s["seconds"] for s in steps[1:])
    return {"rate": rate, "first": steps[0]["loss"], "last": steps[-1]["loss"], "peak_mb": memory.used_mb()}


def run_fsdp2(args, model_dir, samples, tmp):
    request, response = os.path.join(tmp, "fsdp2.json"), os.path.join(tmp, "fsdp2-out.json")
    json.dump({"model": model_dir, "samples": samples, "bench": os.path.dirname(os.path.abspath(__file__)), "device": args.device, "port": free_port(),
               "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "steps": args.steps},
              open(request, "w"))
    # Measured as camelid's is (the device's used memory), so the context and allocator reserve count on both sides.
    with GpuMemory(args.device == "cuda") as memory:
        subprocess.run([sys.executable, "-c", FSDP2, request, response], check=True)
    return {**json.load(open(response)), "peak_mb": memory.used_mb()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", required=True)
    p.add_argument("--template", required=True)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dry-run", action="store_true", help="CPU, toy shape, gloo: checks the pipeline, not speed")
    args = p.parse_args()
    shape = "toy" if args.dry_run else "1b"
    args.device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.max_length, args.micro_batch, args.grad_accum, args.steps = 64, 2, 1, 3
    tmp = tempfile.mkdtemp()
    try:
        model_dir = os.path.join(tmp, "model")
        config, params = make_model(args.template, model_dir, shape, args.device)
        data = os.path.join(tmp, "data.json")
        write_dataset(data, args.micro_batch * args.grad_accum * args.steps,
                      words_per_answer=3000 if args.max_length > 512 else 1200)
        prep = os.path.join(tmp, "prepared")
        subprocess.run([args.trainer, "prepare", "--model", model_dir, "--data", data, "--output", prep,
                        "--max-length", str(args.max_length)], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, CAMELID_LOG="warn"))
        samples = os.path.join(prep, "samples.jsonl")
        assert all(len(json.loads(line)["ids"]) == args.max_length for line in open(samples))
        name, peak = peak_tflops() if args.device == "cuda" else ("CPU (dry run)", float("nan"))
        print(f"{name}: LLaMA {params / 1e9:.2f}B ({shape}), bf16 compute / f32 masters, full activation "
              f"checkpointing, seq {args.max_length}, micro-batch {args.micro_batch} x grad-accum {args.grad_accum}, "
              f"{args.steps} steps; peak {peak} TFLOP/s", flush=True)
        fpt = flops_per_token(params, config.num_hidden_layers, config.hidden_size, args.max_length)
        runs = [("camelid, one process", lambda: run_camelid(args, model_dir, data, os.path.join(tmp, "one"), 0)),
                ("camelid, c10d world 1", lambda: run_camelid(args, model_dir, data, os.path.join(tmp, "c10d"), 1)),
                ("PyTorch FSDP2 world 1", lambda: run_fsdp2(args, model_dir, samples, tmp))]
        print(f"{'trainer':<24}{'tok/s':>10}{'MFU':>8}{'peak GPU MB':>13}{'loss first / last':>22}")
        results = {}
        for label, run in runs:
            r = results[label] = run()
            mfu = r["rate"] * fpt / (peak * 1e12)
            memory = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
            print(f"{label:<24}{r['rate']:>10.0f}{mfu:>8.1%}{memory:>13}{r['first']:>12.3f} / {r['last']:<7.3f}",
                  flush=True)
        theirs = results["PyTorch FSDP2 world 1"]["rate"]
        for label in list(results)[:2]:
            print(f"{label}: {results[label]['rate'] / theirs:.2f}x PyTorch FSDP2's tokens/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
