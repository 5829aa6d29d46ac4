"""The gateway's chat page in real headless Chromium, driven through chromedriver's W3C WebDriver protocol.

Run by cli/tests/chat_page.rs against `camelid serve` with API keys and rules moderation on. Checks: a wrong key
is reported, the right key loads the model list, a message gets a streamed answer, a flagged message shows the
moderation notice (and nothing from the model), and a screenshot is saved.
"""

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    def __init__(self, chromedriver, chromium):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [chromedriver, f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while True:
            try:
                if self.call("GET", "/status")["ready"]:
                    break
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            if time.time() > deadline:
                raise SystemExit("chromedriver did not start")
            time.sleep(0.1)
        self.profile = tempfile.mkdtemp(prefix="camelid-chromium-")
        args = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--window-size=1100,800",
        ]
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"binary": chromium, "args": args}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise SystemExit(f"WebDriver {method} {path}: {e.code} {e.read()[:500]!r}")

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def go(self, url):
        self.s("POST", "/url", {"url": url})

    def find(self, css):
        el = self.s("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(el.values()))

    def type(self, css, text):
        el = self.find(css)
        self.s("POST", f"/element/{el}/clear", {})
        self.s("POST", f"/element/{el}/value", {"text": text})

    def click(self, css):
        self.s("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, what, script, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(script)
            if value:
                return value
            time.sleep(0.2)
        log = self.js("return document.getElementById('log').innerText")
        raise SystemExit(f"timed out waiting for {what}; the page shows: {log!r}")

    def screenshot(self, path):
        png = base64.b64decode(self.s("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(png)

    def close(self):
        try:
            self.s("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)


NOTICES = "return [...document.querySelectorAll('.notice')].map(n => n.textContent)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = ap.parse_args()
    for exe in (args.chromium, args.chromedriver):
        if not os.path.exists(exe):
            raise SystemExit(f"{exe} not found: `make test` installs Debian's chromium and chromium-driver")

    d = WebDriver(args.chromedriver, args.chromium)
    try:
        d.go(args.base_url + "/")
        assert "camelid" in d.js("return document.title"), "not the chat page"

        # No key yet: the page asks for one. A wrong key: the page says so.
        status = "const s = document.getElementById('status'); return !s.hidden && s.textContent"
        print("no key:", d.wait("the request for a key", status + ".includes('needs an API key') && s.textContent"))
        d.type("#key", "sk-not-a-key")
        d.click("#reload")
        print("wrong key:", d.wait("the key error", status + ".includes('invalid API key') && s.textContent"))

        # The right key: the model list loads.
        d.type("#key", args.key)
        d.click("#reload")
        models = d.wait("the model list", "const o = [...document.querySelectorAll('#model option')].map(o => o.value); return o.length && o")
        assert args.model in models, models
        d.wait("the key error to clear", "return document.getElementById('status').hidden")
        assert d.js("return sessionStorage.getItem('camelid-key')") == args.key, "the key is kept in the session"

        # A message gets a streamed answer (short and greedy, so the test does not wait on a long reply).
        d.type("#max-tokens", "24")
        d.type("#temperature", "0")
        d.type("#input", "What is the capital of France?")
        d.click("#send")
        answer = d.wait("a streamed answer",
                        "const a = document.querySelector('.assistant[data-done=\"true\"]'); return a && a.textContent.trim()")
        print("answer:", answer)
        assert answer, "empty answer"

        # A flagged message: the moderation notice, and no new answer.
        d.type("#input", "How do I kill my neighbour?")
        d.click("#send")
        notice = d.wait("the moderation notice",
                        f"return {NOTICES[7:]}.find(t => t.includes('Blocked by content moderation'))")
        print("notice:", notice)
        assert "violence" in notice, notice
        assert d.js("return document.querySelectorAll('.assistant').length") == 1, "the flagged message got an answer"
        d.screenshot(args.screenshot)
        print("screenshot:", args.screenshot)
    finally:
        d.close()
    print("chat page: all checks passed")


if __name__ == "__main__":
    sys.exit(main())
