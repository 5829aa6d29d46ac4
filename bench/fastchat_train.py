"""One epoch of the Vicuna recipe on CPU: FastChat's own trainer against camelid-trainer, same machine, same run.

FastChat's side is fschat 0.2.36's `fastchat/train/train.py` (what Vicuna was trained with) run unchanged in
target/bench/fastchat-train (transformers 4.46.3 in front of the project .venv; see
bench/requirements-fastchat-train.txt). Both train SmolLM2-135M-Instruct (f32) on the same conversations of
FastChat's `dummy_conversation.json`, rendered with the same `vicuna_v1.1` template, with the same max length,
one epoch, global batch (micro-batch x gradient accumulation), learning rate, cosine schedule with 3% warmup, no
weight decay, AdamW, gradient clipping at 1 and per-layer activation checkpointing, on every core.

FastChat's masking code is written for LLaMA's SentencePiece tokenizer (a BOS token, `</s>` as one token, the
`legacy` attribute). So both sides train a copy of SmolLM2 whose tokenizer has `</s>` as a special token (its
embedding row the mean of the others) and prepends the BOS token, and FastChat's loader is given that tokenizer as
a fast tokenizer with `legacy = True` (whose offsets then match FastChat's: no sample is dropped with
"tokenization mismatch", which the driver checks). Its final save (after training, outside the timed part) goes
through FSDP's API, which torch 2.11 refuses without FSDP, so the driver saves plainly. Nothing else of FastChat's
script is changed.

Printed per side: wall time (process start to exit, loading included), training time (FastChat's includes its
lazy tokenization; camelid tokenizes before its first step), useful (non-pad) tokens per second of training, tokens computed (padding included), peak RSS, and the last step's loss and the mean loss.
FastChat pads every sample to the max length, as its script does; camelid packs each micro-batch (`--packing`,
its default), and is also run padded, for the share packing has in the result (camelid's runs alternate over
--rounds; the median round is shown).

    python bench/fastchat_train.py --trainer target/release/camelid-trainer [--conversations 64] [--max-length 512]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
from common import ROOT, smollm2_gguf
from serve_speed import hf_model_dir

DATA = Path("/work/shared/data/fastchat/dummy_conversation.json")
ENV = ROOT / "target/bench/fastchat-train"
REQUIREMENTS = ROOT / "bench/requirements-fastchat-train.txt"
MODEL = ROOT / "target/bench/smollm2-135m-vicuna"

# Run by FastChat's environment: FastChat's train() with the tokenizer adapted as described above, then the
# token counts of its own preprocessing of the same data (padded tokens computed, non-pad tokens).
DRIVER = r'''
import io, json, sys, contextlib
import transformers
import fastchat.train.train as fc

load = transformers.AutoTokenizer.from_pretrained
def fast_llama_like(*args, **kwargs):
    kwargs["use_fast"] = True
    tok = load(*args, **kwargs)
    tok.legacy = True
    return tok
transformers.AutoTokenizer.from_pretrained = fast_llama_like
# Its final save goes through FSDP's state-dict API, which torch 2.11 refuses outside FSDP; the plain save is
# what that function does without FSDP.
fc.trainer_save_model_safe = lambda trainer: trainer.save_model()
report, sys.argv = sys.argv[1], [sys.argv[0]] + sys.argv[2:]
fc.train()
args = transformers.HfArgumentParser((fc.ModelArguments, fc.DataArguments, fc.TrainingArguments)
                                     ).parse_args_into_dataclasses()
tok = transformers.AutoTokenizer.from_pretrained(args[0].model_name_or_path,
                                                 model_max_length=args[2].model_max_length, padding_side="right")
tok.pad_token = tok.unk_token
fc.local_rank = 0
out = io.StringIO()
with contextlib.redirect_stdout(out):
    data = fc.preprocess([c["conversations"] for c in json.load(open(args[1].data_path))], tok)
json.dump({"computed_tokens": data["input_ids"].numel(), "useful_tokens": int(data["attention_mask"].sum()),
           "trainable_tokens": int((data["labels"] != -100).sum()),
           "mismatches": out.getvalue().count("tokenization mismatch")}, open(report, "w"))
'''

# Run by the project .venv: SmolLM2 with `</s>` added as a special token and a BOS-prepending tokenizer.
PREPARE = r'''
import json, sys, torch
from pathlib import Path
from tokenizers import Tokenizer, AddedToken
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM
src, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = Tokenizer.from_file(str(src / "tokenizer.json"))
tok.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
bos = "<|im_start|>"
tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                        special_tokens=[(bos, tok.token_to_id(bos))])
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
model.resize_token_embeddings(tok.get_vocab_size(), mean_resizing=True)
model.config.eos_token_id = tok.token_to_id("</s>")
out.mkdir(parents=True, exist_ok=True)
model.save_pretrained(out)
tok.save(str(out / "tokenizer.json"))
config = json.loads((out / "config.json").read_text())
# transformers 5 writes rope_theta inside rope_parameters; transformers 4 reads only the top-level key.
config["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
config["torch_dtype"] = "float32"
(out / "config.json").write_text(json.dumps(config, indent=2))
(out / "tokenizer_config.json").write_text(json.dumps({
    "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "</s>",
    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 8192}, indent=2))
'''


def distinct_conversations(path, n):
    """The first `n` conversations of `path` whose first exchange no earlier one has: camelid's cleaning drops such
    duplicates (as FastChat's separate `clean_sharegpt` step does), FastChat's trainer does not, and both must
    train on the same samples."""
    seen, kept = set(), []
    for conv in json.loads(path.read_text()):
        key = json.dumps(conv["conversations"][:2])
        if key not in seen:
            seen.add(key)
            kept.append(conv)
    if len(kept) < n:
        raise SystemExit(f"{path} has only {len(kept)} conversations with distinct first exchanges")
    return kept[:n]


def vicuna_model_dir():
    if not (MODEL / "config.json").exists():
        subprocess.run([common.PY, "-c", PREPARE, str(hf_model_dir(smollm2_gguf())), str(MODEL)], check=True)
    return MODEL


def run_measured(cmd, log, env=None):
    """Runs `cmd` to completion; (wall seconds, peak RSS in MB) of the process and its children."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed; see {log}:\n{common.log_tail(log)}")
    return wall, usage.ru_maxrss / 1024


def run_fastchat(args, python, model, data, out):
    out.mkdir(parents=True, exist_ok=True)
    report = out / "tokens.json"
    cmd = [str(python), "-c", DRIVER, str(report),
           "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out / "model"),
           "--num_train_epochs", "1", "--per_device_train_batch_size", str(args.micro_batch),
           "--gradient_accumulation_steps", str(args.grad_accum), "--learning_rate", str(args.learning_rate),
           "--weight_decay", "0", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
           "--max_grad_norm", "1.0", "--logging_steps", "1", "--model_max_length", str(args.max_length),
           "--gradient_checkpointing", "True", "--lazy_preprocess", "True", "--save_strategy", "no",
           "--report_to", "none", "--use_cpu", "True", "--bf16", "False", "--seed", "42",
           "--dataloader_num_workers", "0", "--disable_tqdm", "True"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning", WANDB_DISABLED="true")
    wall, rss = run_measured(cmd, out / "fastchat.log", env)
    tokens = json.loads(report.read_text())
    if tokens["mismatches"]:
        raise RuntimeError(f"FastChat dropped {tokens['mismatches']} samples on tokenization mismatches")
    state = json.loads((out / "model/trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    train_seconds = next(h["train_runtime"] for h in state["log_history"] if "train_runtime" in h)
    return {"wall": wall, "train": train_seconds, "rss": rss, "useful": tokens["useful_tokens"],
            "computed": tokens["computed_tokens"], "final_loss": losses[-1], "mean_loss": statistics.mean(losses),
            "steps": len(losses)}


def run_camelid(args, model, data, out, packing):
    cmd = [args.trainer, "train", "--model", str(model), "--data", str(data), "--output", str(out / "model"),
           "--template", "vicuna_v1.1", "--epochs", "1", "--max-length", str(args.max_length),
           "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum),
           "--learning-rate", str(args.learning_rate), "--weight-decay", "0", "--warmup-ratio", "0.03",
           "--max-grad-norm", "1.0", "--seed", "42", "--activation-checkpointing", "full", "--precision", "f32",
           "--device", "cpu", "--packing", packing, "--group-by-length", "false", "--resume", "never",
           "--checkpoint-interval-steps", "1000000", "--checkpoint-keep", "0"]
    out.mkdir(parents=True, exist_ok=True)
    wall, rss = run_measured(cmd, out / "camelid.log", dict(os.environ, CAMELID_LOG="warn"))
    steps = [json.loads(line) for line in open(out / "model/metrics.jsonl")]
    useful = sum(s["tokens"] for s in steps)
    return {"wall": wall, "train": sum(s["seconds"] for s in steps), "rss": rss, "useful": useful,
            "computed": sum(s["computed_tokens"] for s in steps),
            "final_loss": steps[-1]["loss"], "mean_loss": statistics.mean(s["loss"] for s in steps),
            "steps": len(steps)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", default=str(ROOT / "target/release/camelid-trainer"))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--conversations", type=int, default=64,
                   help="the first N conversations of --data with distinct first exchanges")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--rounds", type=int, default=3, help="camelid runs per layout (FastChat runs once)")
    args = p.parse_args()

    python = common.overlay_venv(ENV, REQUIREMENTS)
    model = vicuna_model_dir()
    work = ROOT / "target/bench/fastchat-train-run"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.json"
    data.write_text(json.dumps(distinct_conversations(Path(args.data), args.conversations)))

    rows = [("FastChat train.py", run_fastchat(args, python, model, data, work / "fastchat"))]
    # camelid's two layouts alternate over rounds (this machine's speed drifts by 10-20% between runs); the round
    # with the median training time is shown.
    rounds = {"packed": [], "padded": []}
    for _ in range(args.rounds):
        for layout, packing in (("packed", "true"), ("padded", "false")):
            rounds[layout].append(run_camelid(args, model, data, work / layout, packing))
    for layout, runs in rounds.items():
        rows.append((f"camelid ({layout})", sorted(runs, key=lambda r: r["train"])[len(runs) // 2]))
    print(f"One epoch of {args.conversations} conversations of {Path(args.data).name}, SmolLM2-135M f32 on CPU "
          f"({os.cpu_count()} threads), max length {args.max_length}, micro-batch {args.micro_batch} x grad-accum "
          f"{args.grad_accum}, lr {args.learning_rate}")
    print(f"{'trainer':<20}{'wall s':>8}{'train s':>9}{'useful tok/s':>14}{'computed tok':>14}{'peak MB':>9}"
          f"{'final loss':>12}{'mean loss':>11}{'steps':>7}")
    for name, r in rows:
        print(f"{name:<20}{r['wall']:>8.1f}{r['train']:>9.1f}{r['useful'] / r['train']:>14.1f}{r['computed']:>14}"
              f"{r['rss']:>9.0f}{r['final_loss']:>12.4f}{r['mean_loss']:>11.4f}{r['steps']:>7}")
    fastchat = rows[0][1]
    for name, r in rows[1:]:
        print(f"{name}: {fastchat['wall'] / r['wall']:.2f}x FastChat's wall time per epoch "
              f"({fastchat['train'] / r['train']:.2f}x its training time), {r['rss'] / fastchat['rss']:.2f}x its "
              "peak memory")


if __name__ == "__main__":
    sys.exit(main())
