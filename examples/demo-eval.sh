#!/usr/bin/env bash
# `make demo`'s evaluation step: the fine-tuned model against the base model on examples/data/eval-questions.jsonl,
# both served by `camelid serve`, judged by the base model itself through `camelid eval gate` (what a FineTuneJob's
# evaluation Job runs). A 135M judge shows the mechanics, not a verdict: a real evaluation names a strong judge.
set -euo pipefail
bin=target/release/camelid
out=target/demo/eval
base_port=${1:-8766}
ft_port=${2:-8767}
rm -rf "$out" && mkdir -p "$out"
CAMELID_LOG=warn "$bin" serve --served-model-name base --port "$base_port" >/dev/null &
base=$!
CAMELID_LOG=warn "$bin" serve --model target/demo/finetuned --served-model-name finetuned --port "$ft_port" >/dev/null &
finetuned=$!
trap 'kill $base $finetuned 2>/dev/null; wait 2>/dev/null || true' EXIT
for port in "$base_port" "$ft_port"; do
  for _ in $(seq 600); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=2)" \
      2>/dev/null && break
    sleep 0.2
  done
done
CAMELID_LOG=warn "$bin" eval gate --questions examples/data/eval-questions.jsonl \
  --candidate-url "http://127.0.0.1:$ft_port/v1" --candidate-model finetuned \
  --baseline-url "http://127.0.0.1:$base_port/v1" --baseline-model base \
  --judge-url "http://127.0.0.1:$base_port/v1" --judge-model base \
  --max-tokens 48 --judge-max-tokens 96 --concurrency 3 --out "$out" --summary "$out/summary.json"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for model in ("base", "finetuned"):
    for line in open(f"{out}/model_answer/{model}.jsonl"):
        a = json.loads(line)
        if a["question_id"] == 1:
            print(f"{model:>9}: {a['choices'][0]['turns'][0].strip()[:100]}")
s = json.load(open(f"{out}/summary.json"))
print(f"summary (what the operator reads): wins {s['wins']}, ties {s['ties']}, losses {s['losses']}, "
      f"unparseable {s['errors']}, win rate {s.get('winRate', 'n/a')}")
PY
echo "report: $out/report.html (and report.md); answers and judgments in FastChat's formats under $out"
