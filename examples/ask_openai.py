"""Asks a running camelid gateway one question through the official `openai` client and prints the streamed answer.

    python examples/ask_openai.py --base-url http://127.0.0.1:8000/v1 "Why is the sky blue?"
"""

import argparse
import sys
import time

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("question")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--wait", type=float, default=0, help="seconds to wait for the server to come up")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    deadline = time.time() + args.wait
    while True:
        try:
            model = client.models.list().data[0].id
            break
        except openai.APIConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.question}],
        temperature=0,
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            sys.stdout.write(choice.delta.content or "")
            sys.stdout.flush()
    print()
    if usage:
        print(f"(model {model}: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens)")


if __name__ == "__main__":
    main()
