"""transformers' greedy answers on GGUF files (gguf-py reads and dequantizes them to f32), for camelid's quantized
model tests.

    python gguf_greedy.py REQUEST.json OUT.json

REQUEST: {"files": {key: path}, "prompts": [[{"role", "content"}, ...], ...], "max_new_tokens": N}.
OUT: {key: [{"prompt_ids": [...], "greedy_ids": [...]}, ...]}.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    request = json.load(open(sys.argv[1]))
    out = {}
    for key, path in request["files"].items():
        directory, name = os.path.split(path)
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
        results = []
        for messages in request["prompts"]:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "input_ids") else ids
            with torch.no_grad():
                generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=request["max_new_tokens"], pad_token_id=tok.eos_token_id)
            results.append({"prompt_ids": ids[0].tolist(), "greedy_ids": generated[0, ids.shape[1]:].tolist()})
        out[key] = results
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
