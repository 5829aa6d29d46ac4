"""Answer-generation benchmark: `camelid eval answer` against FastChat 0.2.36's own `llm_judge/gen_api_answer.py`,
both answering the same questions through ONE `camelid serve` (SmolLM2-135M GGUF) with the same concurrency,
system prompt, max_tokens and greedy sampling, in the same run, on this machine.

Each round runs both tools on the whole question set (the order alternating from round to round, outputs deleted
between runs) and times each command from start to exit. Prints answers/s, completion tokens/s (the server's own
`generated_tokens` counter, read before and after each run) and output characters/s, the ratio camelid / FastChat
(min / median / max over rounds), and how many answers the two tools agree on word for word.

FastChat's script calls the pre-1.0 OpenAI API, so it runs in a small environment of its own,
target/bench/fastchat-legacy: openai 0.28.1 (bench/requirements-fastchat-legacy.txt) in front of the project .venv.

    python bench/eval_answer.py --camelid target/release/camelid [--questions FILE] [--num-questions 40]
        [--max-tokens 64] [--concurrency 8] [--rounds 3]
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from common import PY, ROOT, free_port, log_tail, smollm2_gguf, start, stop, wait_http

MODEL = "gpt-3.5-turbo"  # FastChat picks its `chatgpt` conversation template for this name
SYSTEM = "You are a helpful assistant."  # ... whose system message this is
BENCH = "vicuna_bench"
DEFAULT_QUESTIONS = Path("/work/shared/data/fastchat/vicuna_bench_question.jsonl")
LEGACY = ROOT / "target/bench/fastchat-legacy"
LEGACY_REQUIREMENTS = ROOT / "bench/requirements-fastchat-legacy.txt"
FALLBACK_QUESTIONS = [
    "How can I improve my time management skills?",
    "What are the most effective ways to deal with stress?",
    "Explain how a bicycle works.",
    "Describe the water cycle.",
    "What are the benefits of regular exercise?",
    "Explain why the sky is blue.",
    "Give advice to a new programmer.",
    "How do airplanes fly?",
]

# Run by the legacy environment's Python: the versions it resolves, FastChat's script importable, and the messages
# FastChat's template sends for one turn (compared with what `camelid eval answer --system-prompt` sends).
LEGACY_CHECK = r'''
import json, openai
import fastchat.llm_judge.gen_api_answer
from fastchat.model.model_adapter import get_conversation_template
conv = get_conversation_template(MODEL)
conv.append_message(conv.roles[0], "QUESTION")
conv.append_message(conv.roles[1], None)
print(json.dumps({"openai": openai.__version__, "openai_file": openai.__file__,
                  "messages": conv.to_openai_api_messages()}))
'''


def legacy_python():
    return LEGACY / "bin/python"


def legacy_site_packages():
    out = subprocess.run([str(legacy_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout
    return Path(out.strip())


def check_legacy():
    """The check's output as a dict, or raises with what went wrong."""
    r = subprocess.run([str(legacy_python()), "-c", f"MODEL = {MODEL!r}\n" + LEGACY_CHECK],
                       capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": "EMPTY"})
    if r.returncode != 0:
        raise RuntimeError(f"the FastChat legacy environment does not import:\n{r.stderr[-3000:]}")
    found = json.loads(r.stdout.strip().splitlines()[-1])
    if found["openai"] != "0.28.1":
        raise RuntimeError(f"the legacy environment resolves openai {found['openai']} ({found['openai_file']}), "
                           "not 0.28.1")
    return found


def missing_in_venv(modules):
    """Of `modules`, those the project .venv (the Python running this) cannot import."""
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def bench_pins():
    """bench/requirements.txt as {name: requirement line}."""
    pins = {}
    for line in (ROOT / "bench/requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pins[line.split("==")[0].strip().lower()] = line
    return pins


def ensure_legacy():
    """Makes (once) and checks target/bench/fastchat-legacy: a venv with bench/requirements-fastchat-legacy.txt
    installed without dependencies, then a .pth that appends the project .venv's site-packages, so `openai`
    resolves to 0.28.1 and everything else to .venv. Whatever FastChat's script and openai 0.28.1 need from
    bench/requirements.txt (aiohttp, httpx, shortuuid) but .venv lacks (`make bench-deps` not run) goes into the
    legacy environment, with its dependencies, at its bench/requirements.txt pin."""
    # These come from bench/requirements.txt (`make bench-deps`); the rest openai 0.28.1, anthropic and FastChat
    # import is in .venv after `make setup`.
    extras = missing_in_venv(["aiohttp", "httpx", "shortuuid"])
    pins = bench_pins()
    extra_reqs = [pins[m] for m in extras]
    stamp = LEGACY / ".camelid-stamp"
    want = _hash_file(LEGACY_REQUIREMENTS)
    # The check imports everything FastChat's script needs, so an environment built from the same file that passes
    # it is reused, whatever extras it got then.
    if stamp.exists() and stamp.read_text().split()[:1] == [want] and legacy_python().exists():
        try:
            return check_legacy()
        except RuntimeError as e:
            print(f"rebuilding {LEGACY}: {e}", file=sys.stderr)
    shutil.rmtree(LEGACY, ignore_errors=True)
    LEGACY.parent.mkdir(parents=True, exist_ok=True)
    print(f"making {LEGACY.relative_to(ROOT)} (openai 0.28.1 for FastChat's gen_api_answer.py)", file=sys.stderr)
    subprocess.run([PY, "-m", "venv", str(LEGACY)], check=True)
    # Installed before the .pth exists, so pip sees a bare environment and never touches .venv (and warns about
    # the dependencies it cannot see yet: its output is shown only when it fails).
    pip_install(["--no-deps", "-r", str(LEGACY_REQUIREMENTS)])
    if extra_reqs:
        print(f"  .venv lacks {', '.join(extras)} (run `make bench-deps`); installing {' '.join(extra_reqs)} into "
              "the legacy environment", file=sys.stderr)
        pip_install(extra_reqs)
    venv_site = sysconfig.get_paths()["purelib"]
    # `import site; site.addsitedir(...)` appends .venv's site-packages after the legacy one and runs its .pth files.
    (legacy_site_packages() / "camelid-project-venv.pth").write_text(
        f"import site; site.addsitedir({venv_site!r})\n")
    found = check_legacy()
    stamp.write_text(" ".join([want] + extra_reqs) + "\n")
    return found


def pip_install(args):
    r = subprocess.run([str(legacy_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"] + args,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(args)} into {LEGACY} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")


def import_seconds():
    """How long FastChat's script takes to import (torch, transformers, ...): part of its wall time, not ours."""
    t0 = time.perf_counter()
    subprocess.run([str(legacy_python()), "-c", "import fastchat.llm_judge.gen_api_answer"], check=True,
                   capture_output=True, env={**os.environ, "OPENAI_API_KEY": "EMPTY"})
    return time.perf_counter() - t0


def _hash_file(path):
    return hashlib.sha256(Path(path).read_text().encode()).hexdigest()


def question_file(path, n, work):
    """FastChat's layout under `work`: data/<bench>/question.jsonl with the first `n` questions of `path` (or a
    small made-up set when `path` does not exist). Returns (file, questions, note or None, a description)."""
    note = None
    if path.exists():
        questions = [json.loads(l) for l in path.read_text().splitlines() if l.strip()][:n]
        source = f"the first {len(questions)} of {path.name}"
    else:
        questions = [{"question_id": i + 1, "category": "generic", "turns": [q]}
                     for i, q in enumerate(FALLBACK_QUESTIONS[:n])]
        note = f"{path} not found: using {len(questions)} made-up questions instead"
        source = f"{len(questions)} made-up questions"
    if not questions:
        raise SystemExit(f"no questions in {path}")
    out = work / "data" / BENCH / "question.jsonl"
    out.parent.mkdir(parents=True)
    out.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return out, questions, note, source


def wait_ready(proc, url, timeout=300):
    """`wait_http`, giving up as soon as the server has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"camelid serve exited {proc.returncode} before {url} answered")
        try:
            return wait_http(url, timeout=2)
        except RuntimeError:
            pass
    raise RuntimeError(f"{url} not ready after {timeout} s")


def generated_tokens(admin):
    """The server's `generated_tokens` counter (on its admin port), or None when its metrics are not there."""
    try:
        with urllib.request.urlopen(admin + "/worker/metrics", timeout=10) as r:
            text = r.read().decode()
    except Exception:
        return None
    for line in text.splitlines():
        if line.startswith("camelid_worker_generated_tokens"):
            return float(line.split()[-1])
    return None


def warm_up(base):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                       "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer EMPTY"})
    with urllib.request.urlopen(req, timeout=600) as r:
        json.loads(r.read())


def read_answers(path):
    """{question_id: [turn texts]} of a model_answer file (first choice)."""
    answers = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            a = json.loads(line)
            answers[a["question_id"]] = a["choices"][0]["turns"]
    return answers


def run_tool(name, cmd, cwd, out, admin, log, timeout):
    """Runs one tool over the whole set; returns its measurements."""
    shutil.rmtree(out.parent, ignore_errors=True)
    env = {**os.environ, "OPENAI_API_KEY": "EMPTY", "TQDM_DISABLE": "1"}
    log.write(f"\n=== {name}: {' '.join(cmd)}\n")
    log.flush()
    before = generated_tokens(admin)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{name} did not finish within {timeout} s")
    wall = time.perf_counter() - t0
    after = generated_tokens(admin)
    if r.returncode != 0:
        raise RuntimeError(f"{name} exited {r.returncode}")
    if not out.exists():
        raise RuntimeError(f"{name} wrote no answer file {out}")
    answers = read_answers(out)
    texts = [t for turns in answers.values() for t in turns]
    return {"wall": wall, "answers": answers, "count": len(answers),
            "errors": sum(t == "$ERROR$" for t in texts),
            "chars": sum(len(t) for t in texts),
            "tokens": after - before if before is not None and after is not None else None}


def fmt_range(xs, digits=2):
    return f"{min(xs):.{digits}f} / {statistics.median(xs):.{digits}f} / {max(xs):.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--camelid", default=str(ROOT / "target/release/camelid"))
    ap.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS,
                    help="a FastChat question.jsonl (default: the 80 Vicuna questions in shared/)")
    ap.add_argument("--num-questions", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one tool may take for the whole set")
    args = ap.parse_args()
    camelid = Path(args.camelid).resolve()
    if not camelid.exists():
        sys.exit(f"{camelid} not found: `make build-release` (or pass --camelid)")
    (ROOT / "target/bench").mkdir(parents=True, exist_ok=True)
    # The libtorch-free `camelid-eval` beside it when built (what a CI job runs; it starts in milliseconds where
    # `camelid`, which loads libtorch, takes about a second); else `camelid eval`.
    lean = camelid.parent / "camelid-eval"
    answer_cmd = [str(lean), "answer"] if lean.exists() else [str(camelid), "eval", "answer"]
    try:
        found = ensure_legacy()
        fastchat_import = import_seconds()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        sys.exit(f"FAILED: the FastChat legacy environment: {e}")
    ours = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "QUESTION"}]
    if found["messages"] != ours:
        print(f"warning: FastChat's `{MODEL}` template sends {found['messages']}, camelid sends {ours}",
              file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="eval_answer.", dir=ROOT / "target/bench"))
    log = open(ROOT / "target/bench/eval_answer.log", "w")
    failures = []
    rows = {"camelid": [], "fastchat": []}
    identical = total = 0
    example = None
    try:
        qfile, questions, note, source = question_file(args.questions, args.num_questions, work)
        if note:
            print(f"note: {note}", file=sys.stderr)
        n_turns = sum(len(q["turns"]) for q in questions)
        gguf = smollm2_gguf()
        port, admin_port = free_port(), free_port()
        base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        # f32: the answers FastChat's transformers worker gives (the default would compute on the Q4_1 blocks).
        procs = [start([str(camelid), "serve", "--model", str(gguf), "--dtype", "f32", "--port", str(port),
                        "--admin-port", str(admin_port), "--served-model-name", MODEL], log)]
        try:
            wait_ready(procs[0], base + "/readyz")
            warm_up(base)
            common_flags = dict(max_tokens=str(args.max_tokens), concurrency=str(args.concurrency))
            cam_out = work / "camelid/camelid.jsonl"
            fc_out = work / "fastchat" / f"{MODEL}.jsonl"
            tools = {
                "camelid": ([*answer_cmd, "--questions", str(qfile), "--base-url", base + "/v1",
                             "--model", MODEL, "--model-id", "camelid", "--out", str(cam_out),
                             "--temperature", "0", "--max-tokens", common_flags["max_tokens"],
                             "--concurrency", common_flags["concurrency"], "--system-prompt", SYSTEM], cam_out),
                "fastchat": ([str(legacy_python()), "-m", "fastchat.llm_judge.gen_api_answer",
                              "--bench-name", BENCH, "--model", MODEL, "--force-temperature", "0",
                              "--max-tokens", common_flags["max_tokens"], "--parallel", common_flags["concurrency"],
                              "--openai-api-base", base + "/v1", "--answer-file", str(fc_out)], fc_out),
            }
            for rnd in range(args.rounds):
                order = ["camelid", "fastchat"] if rnd % 2 == 0 else ["fastchat", "camelid"]
                got = {}
                for name in order:
                    cmd, out = tools[name]
                    got[name] = run_tool(name, cmd, work, out, admin, log, args.timeout)
                    rows[name].append(got[name])
                    print(f"round {rnd + 1}: {name:8} {got[name]['wall']:6.1f} s, {got[name]['count']} answers",
                          file=sys.stderr)
                for name in order:
                    g = got[name]
                    if g["count"] != len(questions):
                        failures.append(f"round {rnd + 1}: {name} answered {g['count']} of {len(questions)}")
                    if g["errors"]:
                        failures.append(f"round {rnd + 1}: {name} wrote {g['errors']} $ERROR$ answers")
                a, b = got["camelid"]["answers"], got["fastchat"]["answers"]
                for qid in sorted(set(a) | set(b), key=str):
                    total += 1
                    if a.get(qid) == b.get(qid):
                        identical += 1
                    elif example is None:
                        example = (qid, a.get(qid), b.get(qid))
        finally:
            stop(procs)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"\nFAILED: {e}\n--- {ROOT / 'target/bench/eval_answer.log'} (tail):\n"
              f"{log_tail(ROOT / 'target/bench/eval_answer.log')}", file=sys.stderr)
        sys.exit(1)
    finally:
        log.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nAnswering {source} ({n_turns} turns) through one `camelid serve` (SmolLM2-135M GGUF, "
          f"CPU, {os.cpu_count()} cores): greedy, max_tokens {args.max_tokens}, concurrency {args.concurrency}, "
          f"system prompt {SYSTEM!r}, {args.rounds} round{'s' if args.rounds != 1 else ''} in alternating order; "
          f"wall time of each whole command (process start to exit); min / median / max over rounds\n")
    names = {"camelid": "camelid eval answer", "fastchat": "FastChat gen_api_answer.py"}
    print(f"| {'tool':28} | {'wall s':>23} | {'answers/s':>20} | {'tokens/s':>20} | {'chars/s':>26} |")
    print(f"|{'-' * 30}|{'-' * 24}:|{'-' * 21}:|{'-' * 21}:|{'-' * 27}:|")
    for name, runs in rows.items():
        walls = [r["wall"] for r in runs]
        aps = [r["count"] / r["wall"] for r in runs]
        tps = [r["tokens"] / r["wall"] for r in runs if r["tokens"] is not None]
        cps = [r["chars"] / r["wall"] for r in runs]
        print(f"| {names[name]:28} | {fmt_range(walls):>23} | {fmt_range(aps):>20} | "
              f"{fmt_range(tps, 1) if tps else '-':>20} | {fmt_range(cps, 0):>26} |")
    ratios = [f["wall"] / c["wall"] for c, f in zip(rows["camelid"], rows["fastchat"])]
    print(f"\nanswers/s camelid / FastChat, same round: {fmt_range(ratios)} (min / median / max)")
    net = [max(f["wall"] - fastchat_import, 1e-9) / c["wall"] for c, f in zip(rows["camelid"], rows["fastchat"])]
    print(f"FastChat's script spends {fastchat_import:.1f} s importing torch and transformers (measured once, part of "
          f"its wall time); less that, the ratio would be {fmt_range(net)}")
    toks = {name: [r["tokens"] for r in runs] for name, runs in rows.items()}
    if all(t is not None for ts in toks.values() for t in ts):
        print(f"completion tokens per run: camelid {fmt_range(toks['camelid'], 0)}, "
              f"FastChat {fmt_range(toks['fastchat'], 0)}")
    share = identical / total if total else 0.0
    print(f"identical answers (camelid vs FastChat, same round): {identical}/{total} ({share:.0%})")
    if example:
        qid, a, b = example
        print(f"first difference, question {qid}:\n  camelid:  {json.dumps(a)[:300]}\n"
              f"  FastChat: {json.dumps(b)[:300]}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
