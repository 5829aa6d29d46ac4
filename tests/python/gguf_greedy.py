"""transformers' greedy answers on GGUF files (gguf-py reads and dequantizes them to f32), for camelid's quantized
model tests: once as transformers runs them, and once with each projection's input rounded as ggml rounds it
before a quantized product (8-bit blocks of 32 for Q8_0/Q4_0/Q4_1 weights, of 256 for K-quants), which is the
arithmetic llama.cpp and camelid's kernels do; only the order of the sums then differs.

    python gguf_greedy.py REQUEST.json OUT.json

REQUEST: {"files": {key: path}, "prompts": [[{"role", "content"}, ...], ...], "max_new_tokens": N}.
OUT: {key: {"f32": [{"prompt_ids", "greedy_ids", "margins"}, ...], "ggml": [...]}}, `margins` the logit lead of
each greedy token over the runner-up.
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


K_QUANTS = {"Q4_K", "Q5_K", "Q6_K"}
# HF module suffix -> GGUF tensor name of layer 0 (camelid quantize gives every layer the same types).
MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def q8_blocks_of_32(x):
    """ggml's quantize_row_q8_0 (and q8_1's values): d = amax / 127 stored as f16, q rounded ties-to-even."""
    b = x.reshape(-1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    q = torch.round(b * torch.where(d == 0, torch.zeros_like(d), 1 / d))
    return (q * d.half().float()).reshape(x.shape)


def q8_blocks_of_256(x):
    """ggml's quantize_row_q8_K: the signed value of largest magnitude maps to -127, d = 1 / scale in f32."""
    b = x.reshape(-1, 256)
    top = b.gather(-1, b.abs().argmax(-1, keepdim=True))
    iscale = torch.where(top == 0, torch.zeros_like(top), -127 / top)
    q = torch.clamp(torch.round(iscale * b), max=127)
    d = torch.where(top == 0, torch.zeros_like(top), 1 / iscale)
    return (q * d).reshape(x.shape)


def round_inputs_as_ggml(model, path):
    """Each Linear's input rounded to the 8-bit blocks its weight type's product takes."""
    import gguf
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        suffix = name.rsplit(".", 1)[-1]
        if suffix == "lm_head":
            ty = types.get("output.weight", types["token_embd.weight"])
        else:
            ty = types[f"blk.0.{MODULES[suffix]}.weight"]
        if ty in ("F32", "F16", "BF16"):
            continue
        rounding = q8_blocks_of_256 if ty in K_QUANTS else q8_blocks_of_32
        module.forward = (lambda m, f: lambda x: torch.nn.functional.linear(f(x), m.weight, m.bias))(module, rounding)


def main():
    request = json.load(open(sys.argv[1]))
    out = {}
    for key, path in request["files"].items():
        directory, name = os.path.split(path)
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        out[key] = {}
        # Loading a GGUF file through transformers takes about 20 s: load once, run f32, then round the inputs.
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
        for arithmetic in ("f32", "ggml"):
            if arithmetic == "ggml":
                round_inputs_as_ggml(model, path)
            results = []
            for messages in request["prompts"]:
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
                ids = ids["input_ids"] if hasattr(ids, "input_ids") else ids
                with torch.no_grad():
                    generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                               max_new_tokens=request["max_new_tokens"],
                                               pad_token_id=tok.eos_token_id, output_logits=True,
                                               return_dict_in_generate=True)
                # How far each chosen token led the runner-up: where an answer may part from another arithmetic's.
                margins = [float(top[0] - top[1]) for top in (step[0].topk(2).values for step in generated.logits)]
                results.append({"prompt_ids": ids[0].tolist(),
                                "greedy_ids": generated.sequences[0, ids.shape[1]:].tolist(),
                                "margins": margins})
            out[key][arithmetic] = results
        del model  # before the next file's load: one f32 model in memory at a time
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
