"""Streams one chat completion with the official `openai` client and reports it line by line (run by
server/worker/tests/migration.rs, which kills the serving worker while this streams).

stdout: `chunk <n>` as each piece of text arrives (flushed, so the caller can act mid-stream), then one line
`done <json>` with the text, the finish reason, the usage and whether any chunk carried an error. Exits non-zero
if the client raised.
"""

import argparse
import json
import sys

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default="smol")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--ignore-eos", action="store_true", help="camelid's extension: generate max_tokens")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)
    extra = {} if args.seed is None else {"seed": args.seed}
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": args.prompt}],
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        extra_body={"ignore_eos": True} if args.ignore_eos else None,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    text, finish, usage, pieces = [], None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = {"prompt": chunk.usage.prompt_tokens, "completion": chunk.usage.completion_tokens}
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
                pieces += 1
                print(f"chunk {pieces}", flush=True)
            if choice.finish_reason:
                finish = choice.finish_reason
    print("done " + json.dumps({"text": "".join(text), "finish": finish, "usage": usage}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except openai.OpenAIError as e:
        print(f"openai error: {e!r}", file=sys.stderr, flush=True)
        sys.exit(1)
