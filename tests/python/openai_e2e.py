"""End-to-end checks of `camelid serve` with the official `openai` client (run by cli/tests/serve_openai.rs).

Each check prints one line; any failure raises, so the script exits non-zero and the Rust test shows why.
"""

import argparse
import concurrent.futures
import json
import subprocess
import sys
import urllib.error
import urllib.request

import openai
from transformers import AutoTokenizer

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write one sentence about llamas.",
    "What is 2 + 2?",
    "Give me a synonym for happy.",
    "What do bees make?",
    "Translate 'hello' into Spanish.",
    "Name a planet in the solar system.",
    "What is the opposite of cold?",
    "Say something kind.",
    "Which animal barks?",
    "What color is the sky on a clear day?",
    "How many legs does a spider have?",
    "Name a fruit that is yellow.",
    "What is water made of?",
    "Suggest a name for a cat.",
]


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def raw_post(base, path, body, headers=None):
    """POSTs bytes and returns (status, parsed JSON body), bypassing the client's own validation."""
    req = urllib.request.Request(base + path, data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def greedy(client, model, prompt, max_tokens=24, **kw):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        **kw,
    )
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--camelid", required=True)
    ap.add_argument("--model-path", required=True)
    args = ap.parse_args()
    base = args.base_url.rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)

    models = [m.id for m in client.models.list()]
    check(len(models) == 1, f"one model expected, got {models}")
    model = models[0]
    print(f"ok models.list -> {model}")

    # The same greedy text as `camelid generate`.
    question = PROMPTS[0]
    cli = subprocess.run(
        [args.camelid, "generate", "--model", args.model_path, "--temperature", "0", "--max-tokens", "40",
         "--prompt", question],
        capture_output=True, text=True, check=True,
    ).stdout.rstrip("\n")
    whole = greedy(client, model, question, max_tokens=40)
    text = whole.choices[0].message.content
    check(text == cli, f"chat {text!r} != camelid generate {cli!r}")
    pieces, usage, finish = [], None, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=40,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    check("".join(pieces) == cli, f"stream {''.join(pieces)!r} != {cli!r}")
    check(finish == whole.choices[0].finish_reason, f"stream finish {finish} != {whole.choices[0].finish_reason}")
    check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens, f"stream usage {usage}")
    print(f"ok chat (stream and not) == camelid generate: {cli!r}")

    # Usage counts are the tokenizer's.
    directory, name = args.model_path.rsplit("/", 1)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to twenty."}]
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected_prompt = len(tok.encode(rendered, add_special_tokens=False))
    check(r.usage.prompt_tokens == expected_prompt, f"prompt_tokens {r.usage.prompt_tokens} != {expected_prompt}")
    check(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12, f"usage {r.usage}")
    check(len(tok.encode(r.choices[0].message.content, add_special_tokens=False)) == 12, "completion re-tokenizes to 12")
    check(r.usage.total_tokens == expected_prompt + 12, "total_tokens")
    print(f"ok usage {r.usage.prompt_tokens}+{r.usage.completion_tokens} matches the tokenizer")

    # Stop strings: the text ends before the first occurrence and finish_reason is stop.
    words = cli.split()
    stop_word = words[len(words) // 2]
    stopped = greedy(client, model, question, max_tokens=40, stop=[stop_word])
    check(stopped.choices[0].finish_reason == "stop", f"finish {stopped.choices[0].finish_reason}")
    check(stopped.choices[0].message.content == cli[: cli.index(stop_word)], f"stop cut {stopped.choices[0].message.content!r}")
    print(f"ok stop {stop_word!r}")

    # Completions.
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    check(c.object == "text_completion" and c.choices[0].text.strip() != "", f"completion {c}")
    check(c.usage.completion_tokens <= 8 and c.usage.prompt_tokens == len(tok.encode("The capital of France is", add_special_tokens=False)), f"completion usage {c.usage}")
    streamed = "".join(
        ch.choices[0].text for ch in client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if ch.choices
    )
    check(streamed == c.choices[0].text, f"streamed completion {streamed!r} != {c.choices[0].text!r}")
    print(f"ok completions {c.choices[0].text!r}")

    # Continuous batching: 16 concurrent greedy streams each equal that prompt's solo output.
    solo = [greedy(client, model, p).choices[0].message.content for p in PROMPTS]

    def streamed_reply(prompt):
        out = []
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24, stream=True
        ):
            for choice in chunk.choices:
                out.append(choice.delta.content or "")
        return "".join(out)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(streamed_reply, PROMPTS))
    for p, a, b in zip(PROMPTS, solo, together):
        check(a == b, f"batched reply to {p!r} differs: solo {a!r} vs batched {b!r}")
    print("ok 16 concurrent greedy streams == their solo outputs")

    # Bad input: the right status and OpenAI's error shape, and the gateway stays healthy.
    good = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ("malformed JSON", b'{"model": ', 400, None),
        ("wrong type", json.dumps({**good, "temperature": "hot"}).encode(), 422, "temperature"),
        ("missing messages", json.dumps({"model": model}).encode(), 422, "messages"),
        ("unknown model", json.dumps({**good, "model": "nope"}).encode(), 404, "model"),
        ("empty messages", json.dumps({**good, "messages": []}).encode(), 400, "messages"),
        ("n=2", json.dumps({**good, "n": 2}).encode(), 400, "n"),
        ("body too large", json.dumps({**good, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode(), 413, None),
        ("prompt longer than the context", json.dumps({**good, "messages": [{"role": "user", "content": "hello " * 9000}]}).encode(), 400, "messages"),
    ]
    for label, body, status, param in cases:
        got, payload = raw_post(base, "/v1/chat/completions", body)
        check(got == status, f"{label}: status {got} != {status}: {payload}")
        err = payload.get("error")
        check(isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err), f"{label}: shape {payload}")
        check(err["param"] == param, f"{label}: param {err['param']!r} != {param!r}")
        print(f"ok {label} -> {got} {err['code']}")
    check(raw_post(base, "/v1/chat/completions", json.dumps({**good, "messages": [{"role": "user", "content": "hello " * 9000}]}).encode())[1]["error"]["code"] == "context_length_exceeded", "context code")
    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        check(e.code == "model_not_found", f"client sees code {e.code}")
    with urllib.request.urlopen(base + "/healthz", timeout=10) as r:
        check(r.status == 200, "healthz")
    check(greedy(client, model, question, max_tokens=40).choices[0].message.content == cli, "healthy after bad input")
    print("ok gateway healthy after bad input")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
