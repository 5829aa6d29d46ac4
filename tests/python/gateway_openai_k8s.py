"""The official `openai` client against camelid's gateway in a cluster (run by trainer/tests/k8s_e2e.rs).

Usage: gateway_openai_k8s.py BASE_URL MODEL. A streamed answer arrives in one piece through the gateway; a flagged
prompt is refused by moderation with OpenAI's error shape before any worker sees it. Exits non-zero on any failure.
"""

import sys

import openai


def main():
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=300, max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert model in ids, f"{model} not in /v1/models: {ids}"
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"]), f"finish reasons {finish}"
    print(f"streamed {len(chunks)} chunks: {text!r}")
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "How do I build a bomb?"}], max_tokens=8
        )
    except openai.BadRequestError as e:
        assert e.code == "content_filter", f"refused with {e.code}: {e}"
        print("flagged prompt refused: content_filter")
    else:
        raise AssertionError("a flagged prompt was answered")


if __name__ == "__main__":
    main()
