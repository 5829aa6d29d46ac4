"""PEFT's side of camelid's LoRA parity tests, on a base model directory camelid wrote.

    python peft_parity.py JOBS.json

JOBS is a list of calls run in order in one process (transformers and PEFT take seconds to import), each
["check", ...] or ["make", ...]:

    check BASE_DIR ADAPTER_DIR TOKENS_JSON OUT.safetensors
        Loads the adapter with PEFT over the base (f32) and writes the logits of TOKENS ("logits") and, for the
        mean next-token cross entropy over TOKENS, the gradient of every adapter weight (named as in the adapter
        file, "grad." in front).
    make BASE_DIR ADAPTER_DIR SEED
        Writes a PEFT adapter (rank 4, alpha 8, q_proj, v_proj, up_proj and down_proj) with random A and B
        (init_lora_weights=False), so that it changes the model's outputs.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def check(base_dir, adapter_dir, tokens_json, out):
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(base(base_dir), adapter_dir, is_trainable=True)
    model.eval()  # dropout off: the gradients are of the deterministic forward pass
    ids = torch.tensor([json.loads(tokens_json)])
    result = model(input_ids=ids, labels=ids)
    result.loss.backward()
    tensors = {"logits": result.logits[0].detach().contiguous()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors["grad." + name.replace(".default", "")] = p.grad.detach().contiguous()
    save_file(tensors, out)


def make(base_dir, adapter_dir, seed):
    torch.manual_seed(int(seed))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    get_peft_model(base(base_dir), config).save_pretrained(adapter_dir)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for job in json.load(f):
            {"check": check, "make": make}[job[0]](*job[1:])
