"""Reference results from HF transformers / tokenizers / FastChat, computed at test time.

camelid's Rust tests write a request JSON, run this script with the project's .venv python, and compare what it
writes with their own results. Nothing here is cached in the repository.

    python hf_reference.py REQUEST.json OUT_DIR

REQUEST has: gguf (path), hf_dir (where to write the HF export), prompts (lists of chat messages), max_new_tokens,
corpus (strings to tokenize), conversations (for template parity: {system|null, turns}).
Writes OUT_DIR/result.json and OUT_DIR/logits_{gguf,hf}.safetensors.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))


def load_gguf_tokenizer(gguf):
    directory, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # transformers' GGUF converter does not know llama.cpp's `smollm` pre-tokenizer and falls back to plain GPT-2
    # splitting. The published SmolLM2 tokenizer.json (and llama.cpp) split every digit first: use that.
    from gguf import GGUFReader

    pre = GGUFReader(gguf).fields.get("tokenizer.ggml.pre")
    if pre is not None and pre.contents() == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    return tok


def export_hf(model, out_dir, tok):
    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        return
    # The weights are already dequantized to f32; drop the GGUF marker so transformers agrees to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def model_results(model, tok, prompts, max_new_tokens):
    logits, out = {}, []
    for i, messages in enumerate(prompts):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            logits[f"prompt{i}"] = model(input_ids).logits[0, -1].float().contiguous()
            gen = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            )
        new = gen[0, len(ids):].tolist()
        out.append({"prompt_ids": ids, "greedy_ids": new})
    return logits, out


def fastchat_vicuna(conv_spec):
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    if conv_spec.get("system") is not None:
        conv.set_system_message(conv_spec["system"])
    for i, turn in enumerate(conv_spec["turns"]):
        conv.append_message(conv.roles[i % 2], turn)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def quant_references(out_dir):
    """Blocks of each GGML type and gguf-py's dequantization of them, for the Rust dequantizers."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    values = (rng.standard_normal((4, 512)) * 0.1).astype(np.float32)
    written = []
    k_quants = {"Q4_K": (144, [0, 2]), "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}  # block size, f16 offsets
    for name in ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"):
        qtype = T[name]
        if name == "F16":
            raw = values.astype(np.float16).view(np.uint8)
        elif name in k_quants:  # gguf-py has no K-quant quantizers: random quants with sane f16 super-scales
            size, offsets = k_quants[name]
            raw = rng.integers(0, 256, size=(4, 2 * size), dtype=np.uint8)
            for i, off in enumerate(offsets):
                scale = np.float16(0.01 * (i + 1)).tobytes()
                raw.reshape(-1, size)[:, off:off + 2] = np.frombuffer(scale, dtype=np.uint8)
        else:
            raw = quantize(values, qtype)
        deq = dequantize(raw, qtype).astype(np.float32)
        raw.tofile(os.path.join(out_dir, f"quant_{name}.bin"))
        deq.tofile(os.path.join(out_dir, f"quant_{name}.f32"))
        written.append(name)
    return written


def main():
    request = json.load(open(sys.argv[1]))
    out_dir = sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    gguf = request["gguf"]
    tok = load_gguf_tokenizer(gguf)
    directory, name = os.path.split(gguf)
    # Loading a GGUF file through transformers takes about 20 s: the one load serves the export and the "gguf" run.
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    export_hf(gguf_model, request["hf_dir"], tok)
    hf_tok = AutoTokenizer.from_pretrained(request["hf_dir"])
    result = {"eos_token_id": tok.eos_token_id}

    sources = {
        "gguf": (lambda: gguf_model, tok),
        "hf": (lambda: AutoModelForCausalLM.from_pretrained(request["hf_dir"], dtype=torch.float32), hf_tok),
    }
    for key, (loader, tokenizer) in sources.items():
        model = loader().eval()
        logits, res = model_results(model, tokenizer, request["prompts"], request["max_new_tokens"])
        save_file(logits, os.path.join(out_dir, f"logits_{key}.safetensors"))
        result[f"model_{key}"] = res
        # One f32 model in memory at a time: the GGUF one goes before the HF directory's loads.
        model = gguf_model = None

    for key, tokenizer in (("gguf", tok), ("hf", hf_tok)):
        encoded = [tokenizer.backend_tokenizer.encode(t, add_special_tokens=False).ids for t in request["corpus"]]
        decoded = [tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=False) for ids in encoded]
        result[f"tokens_{key}"] = {"ids": encoded, "decoded": decoded}

    if request.get("sp_gguf"):
        d, n = os.path.split(request["sp_gguf"])
        sp = AutoTokenizer.from_pretrained(d, gguf_file=n)
        encoded = [sp.backend_tokenizer.encode(t, add_special_tokens=False).ids for t in request["corpus"]]
        decoded = [sp.backend_tokenizer.decode(ids, skip_special_tokens=False) for ids in encoded]
        result["tokens_sp"] = {"ids": encoded, "decoded": decoded}

    result["quant_types"] = quant_references(out_dir)
    result["vicuna"] = [fastchat_vicuna(c) for c in request["conversations"]]
    result["jinja"] = []
    for c in request["conversations"]:
        messages = ([{"role": "system", "content": c["system"]}] if c.get("system") is not None else []) + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(c["turns"])
        ]
        result["jinja"].append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    json.dump(result, open(os.path.join(out_dir, "result.json"), "w"))


if __name__ == "__main__":
    main()
