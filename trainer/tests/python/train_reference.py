"""PyTorch reference for the trainer's golden tests: loads an exported camelid model with transformers and reports
what the Rust side must match.

    python train_reference.py REQUEST.json RESPONSE.json

REQUEST: {"model": DIR, "input": [[ids]], "targets": [[ids or -100]], "loss_scale": float, "grads": PATH,
          "messages": [[{"role","content"}]]}
RESPONSE: {"loss_sum": float, "logits_last": [[float]], "rendered": [str], "token_ids": [[int]]}; the gradient of
every parameter is written to the safetensors file REQUEST["grads"].
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    req = json.load(open(sys.argv[1]))
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(req["model"])
    model.train()
    ids = torch.tensor(req["input"])
    targets = torch.tensor(req["targets"])
    logits = model(input_ids=ids).logits
    loss_sum = torch.nn.functional.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100, reduction="sum")
    (loss_sum * req["loss_scale"]).backward()
    grads = {name: p.grad.detach().contiguous() for name, p in model.named_parameters() if p.grad is not None}
    save_file(grads, req["grads"])
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in req["messages"]]
    resp = {
        "loss_sum": loss_sum.item(),
        "logits_last": logits[:, -1, :].detach().tolist(),
        "rendered": rendered,
        "token_ids": [tok(r, add_special_tokens=False)["input_ids"] for r in rendered],
    }
    json.dump(resp, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
