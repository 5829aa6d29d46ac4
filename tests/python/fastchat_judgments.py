"""FastChat's own llm_judge code, run for camelid's interop test (eval/tests/fastchat_interop.rs).

Subcommands, each printing one JSON object on stdout (FastChat's own printing goes to stderr, or is captured and
parsed):

  show-pairwise FILE [--baseline MODEL]
      Runs FastChat's show_result.display_result_pairwise on FILE (mode pairwise-baseline with --baseline,
      pairwise-all without) and parses the table it prints: {"models": {name: {win, loss, tie, win_rate,
      loss_rate, win_rate_adjusted}}, "printed": the text}.

  show-single FILE
      Runs FastChat's show_result.display_result_single on FILE (bench mt_bench, so it prints the first turn, the
      second turn and the average) and parses it: {"turn1": {model: score}, "turn2": {...}, "average": {...}}.

  judge BENCH_DIR --judge-file PROMPTS --judge-model gpt-4 --baseline MODEL --seed N
      Writes BENCH_DIR/model_judgment/<judge>_pair.jsonl and <judge>_single.jsonl with FastChat's own code, as
      its gen_judgment.py does (pairwise-baseline, then single): questions and answers read with
      load_questions / load_model_answers from BENCH_DIR/question.jsonl, model_answer/ and reference_answer/,
      judges from make_judge_pairwise / make_judge_single, matches from make_match / make_match_single (reference
      judges for math, reasoning and coding, multi-turn judges for the second turn), and each match played by
      play_a_match_pair / play_a_match_single, which build the judge prompt, parse the verdict and append the
      record. Prints {"pair": path, "single": path, "calls": n}.

The scripted judge. FastChat calls its judge through common.chat_completion_openai, written for the legacy
openai<1 API (openai.ChatCompletion), which the installed openai no longer has; and no judge model that follows
the verdict format runs here. It is replaced by a function that answers from a fixed script: the verdict is drawn
from random.Random(f"{seed}\\0{prompt}") (Python seeds a Random from a string through SHA-512, so the draw is the
same on every run and machine, and depends on the prompt FastChat built, not on the order of calls):

  pairwise ([[A]] format): "[[A]]" 40%, "[[B]]" 30%, "[[C]]" 15%, no verdict 15% (FastChat records "error");
  single ([[rating]] format): "Rating: [[n]]" 60%, "Rating: [[n.5]]" 15%, "Rating: [n]" 10% (FastChat's
      backup pattern), no rating 15% (FastChat records -1); n from 1 to 10.

What is under test is FastChat's prompt building, verdict parsing and file writing, not a judge's taste.

FastChat's common.py imports anthropic (its Claude judge) at the top; fschat is installed without its
dependencies and anthropic is not there, so an empty module stands in for it: nothing here calls Claude.
"""

import argparse
import contextlib
import io
import json
import os
import random
import sys
import types

try:
    import anthropic  # noqa: F401
except ImportError:
    sys.modules["anthropic"] = types.ModuleType("anthropic")

try:
    import pandas as pd
except ImportError:
    pd = None


def need_pandas():
    if pd is None:
        sys.exit(
            f"pandas is not installed for {sys.executable}: FastChat's show_result.py needs it "
            "(requirements.txt should list it)"
        )
    pd.set_option("display.width", 100000)
    pd.set_option("display.max_columns", None)
    pd.set_option("display.max_rows", None)
    pd.set_option("display.precision", 12)
    pd.set_option("display.multi_sparse", False)


def run_printing(func, args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        func(args)
    text = buf.getvalue()
    sys.stderr.write(text)
    return text


def show_pairwise(file, baseline):
    need_pandas()
    from fastchat.llm_judge import show_result

    args = argparse.Namespace(
        bench_name="mt_bench",
        input_file=file,
        judge_model="gpt-4",
        baseline_model=baseline,
        model_list=None,
        mode="pairwise-baseline" if baseline else "pairwise-all",
    )
    text = run_printing(show_result.display_result_pairwise, args)
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith(("Input file:", "Mode:"))]
    header = next((l.split() for l in lines if "win_rate_adjusted" in l.split()), None)
    if header is None:
        sys.exit(f"no table in FastChat's output:\n{text}")
    models = {}
    rows = lines[lines.index(next(l for l in lines if l.split() == header)) + 1 :]
    for line in rows:
        tokens = line.split()
        if tokens == ["model"]:
            continue
        name, values = " ".join(tokens[: -len(header)]), tokens[-len(header) :]
        models[name] = {h: float(v) for h, v in zip(header, values)}
    return {"models": models, "printed": text}


def show_single(file):
    need_pandas()
    from fastchat.llm_judge import show_result

    args = argparse.Namespace(
        bench_name="mt_bench", input_file=file, judge_model="gpt-4", model_list=None, mode="single"
    )
    text = run_printing(show_result.display_result_single, args)
    sections = {"First turn": "turn1", "Second turn": "turn2", "Average": "average"}
    out = {v: {} for v in sections.values()}
    current = None
    for line in text.splitlines():
        tokens = line.split()
        if line.startswith("##########"):
            current = sections[line.strip("# ").strip()]
        elif current is None or not tokens or tokens in (["score"], ["model"], ["model", "turn"]):
            continue
        elif current == "average":
            out[current][" ".join(tokens[:-1])] = float(tokens[-1])
        else:
            out[current][" ".join(tokens[:-2])] = float(tokens[-1])
    out["printed"] = text
    return out


STATE = {"format": None, "calls": 0}


def scripted_judge(seed):
    def chat_completion_openai(model, conv, temperature, max_tokens, api_dict=None):
        messages = conv.to_openai_api_messages()
        prompt = "\n".join(m["content"] for m in messages)
        rng = random.Random(f"{seed}\0{prompt}")
        STATE["calls"] += 1
        draw, n = rng.random(), rng.randint(1, 10)
        if STATE["format"] == "[[A]]":
            verdict = "[[A]]" if draw < 0.40 else "[[B]]" if draw < 0.70 else "[[C]]" if draw < 0.85 else None
            if verdict is None:
                return "Both answers have merits and I cannot decide."
            return f"Comparing the two answers for helpfulness and accuracy. Final verdict: {verdict}"
        if STATE["format"] == "[[rating]]":
            if draw < 0.60:
                return f"The answer is reasonable. Rating: [[{n}]]"
            if draw < 0.75:
                return f"The answer is reasonable. Rating: [[{min(n, 9)}.5]]"
            if draw < 0.85:
                return f"The answer is reasonable. Rating: [{n}]"
            return "The answer is reasonable, but I give no rating."
        raise ValueError(f"unexpected output format {STATE['format']!r}")

    return chat_completion_openai


def judge(bench, judge_file, judge_model, baseline, seed):
    from fastchat.llm_judge import common, gen_judgment

    common.chat_completion_openai = scripted_judge(seed)
    questions = common.load_questions(os.path.join(bench, "question.jsonl"), None, None)
    model_answers = common.load_model_answers(os.path.join(bench, "model_answer"))
    ref_answers = common.load_model_answers(os.path.join(bench, "reference_answer"))
    judge_prompts = common.load_judge_prompts(judge_file)
    models = common.get_model_list(os.path.join(bench, "model_answer"))
    out = {"calls": 0}
    for mode in ("pairwise-baseline", "single"):
        if mode == "single":
            judges = gen_judgment.make_judge_single(judge_model, judge_prompts)
            play, make, base = common.play_a_match_single, gen_judgment.make_match_single, None
            output_file = os.path.join(bench, "model_judgment", f"{judge_model}_single.jsonl")
        else:
            judges = gen_judgment.make_judge_pairwise(judge_model, judge_prompts)
            play, make, base = common.play_a_match_pair, gen_judgment.make_match, baseline
            output_file = os.path.join(bench, "model_judgment", f"{judge_model}_pair.jsonl")
        common.check_data(questions, model_answers, ref_answers, models, judges)
        math = [q for q in questions if q["category"] in common.NEED_REF_CATS]
        default = [q for q in questions if q["category"] not in common.NEED_REF_CATS]
        matches = []
        matches += make(default, models, model_answers, judges["default"], base)
        matches += make(math, models, model_answers, judges["math"], base, ref_answers)
        matches += make(default, models, model_answers, judges["default-mt"], base, multi_turn=True)
        matches += make(math, models, model_answers, judges["math-mt"], base, ref_answers, multi_turn=True)
        if os.path.exists(output_file):
            os.remove(output_file)
        with contextlib.redirect_stdout(sys.stderr):
            for match in matches:
                STATE["format"] = match.judge.prompt_template["output_format"]
                play(match, output_file=output_file)
        out["pair" if mode != "single" else "single"] = output_file
    out["calls"] = STATE["calls"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show-pairwise")
    p.add_argument("file")
    p.add_argument("--baseline")
    p = sub.add_parser("show-single")
    p.add_argument("file")
    p = sub.add_parser("judge")
    p.add_argument("bench")
    p.add_argument("--judge-file", required=True)
    p.add_argument("--judge-model", default="gpt-4")
    p.add_argument("--baseline", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "show-pairwise":
        result = show_pairwise(args.file, args.baseline)
    elif args.command == "show-single":
        result = show_single(args.file)
    else:
        result = judge(args.bench, args.judge_file, args.judge_model, args.baseline, args.seed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
