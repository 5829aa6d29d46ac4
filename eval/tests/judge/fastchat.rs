//! FastChat's own code, run on the same inputs with the same judging rule, builds the same judgments and sends the
//! same messages as ours.

use std::sync::Arc;

use camelid_eval::format::Question;
use camelid_eval::jsonl;
use camelid_eval::judge::{JudgeInputs, Pairing, judge_pairwise, judge_single};
use serde_json::{Value, json};

use crate::fake::{Fake, data, models, number, options, start};

/// FastChat's `gen_judgment.py` pipeline (its `make_match_all_pairs` / `make_match_single` and `play_a_match_*`),
/// with its OpenAI call replaced by the same judging rule as the fake's; writes `{"results", "calls"}`.
const FASTCHAT: &str = r#"
import json, sys, types
sys.modules.setdefault("anthropic", types.ModuleType("anthropic"))
from fastchat.llm_judge import common
from fastchat.llm_judge.common import NEED_REF_CATS, load_judge_prompts, play_a_match_pair, play_a_match_single
from fastchat.llm_judge.gen_judgment import make_judge_pairwise, make_judge_single, make_match_all_pairs, make_match_single

spec = json.load(open(sys.argv[1]))
calls = []
def judge(model, conv, temperature, max_tokens, api_dict=None):
    messages = conv.to_openai_api_messages()
    calls.append({"messages": messages, "temperature": temperature, "max_tokens": max_tokens})
    user = messages[-1]["content"]
    if "Start of Assistant B" in user:
        a = user[user.find("Start of Assistant A"):user.find("Start of Assistant B")]
        return "A is better. [[A]]" if "good" in a else "B is better. [[B]]"
    return "Rating: [[8]]" if "good" in user else "Rating: [[3]]"
common.chat_completion_openai = judge

questions, models = spec["questions"], spec["models"]
answers = {m: {a["question_id"]: a for a in lst} for m, lst in spec["answers"].items()}
refs = {"gpt-4": {a["question_id"]: a for a in spec["references"]}}
prompts = load_judge_prompts(spec["prompts"])
if spec["mode"] == "single":
    judges, make, play = make_judge_single("gpt-4", prompts), make_match_single, play_a_match_single
else:
    judges, make, play = make_judge_pairwise("gpt-4", prompts), make_match_all_pairs, play_a_match_pair
qm = [q for q in questions if q["category"] in NEED_REF_CATS]
qd = [q for q in questions if q["category"] not in NEED_REF_CATS]
matches = (make(qd, models, answers, judges["default"], None)
    + make(qm, models, answers, judges["math"], None, refs)
    + make(qd, models, answers, judges["default-mt"], None, multi_turn=True)
    + make(qm, models, answers, judges["math-mt"], None, refs, multi_turn=True))
results = [play(m, output_file=None) for m in matches]
json.dump({"results": results, "calls": calls}, open(spec["out"], "w"))
"#;

/// A judgment without its timestamp, with its score as a float (Python writes `8`, we write `8.0`).
fn normalize(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    o.remove("tstamp");
    if let Some(s) = o.get("score").and_then(Value::as_f64) {
        o.insert("score".into(), json!(s));
    }
    v
}

fn same_multiset(ours: &[Value], theirs: &[Value], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: counts differ");
    let mut left: Vec<&Value> = theirs.iter().collect();
    for v in ours {
        let i = left
            .iter()
            .position(|t| *t == v)
            .unwrap_or_else(|| panic!("{what}: FastChat has no {v:#}"));
        left.swap_remove(i);
    }
}

#[tokio::test]
async fn fastchat_builds_the_same_judgments_and_sends_the_same_messages() {
    let fake = Arc::new(Fake::default());
    let client = start(fake.clone()).await;
    // FastChat needs every answer and, for math and coding, the file's reference: questions 1, 2 and 4.
    let d = data("fastchat", &[("m1", "good"), ("m2", "bad"), ("m3", "good")], &[]);
    let questions: Vec<Question> = d.questions.iter().filter(|q| number(q) != 3).cloned().collect();
    let inputs = JudgeInputs {
        questions: &questions,
        answers: &d.answers,
        references: Some(&d.references),
    };
    let names = models(&["m1", "m2", "m3"]);
    for mode in ["pairwise", "single"] {
        fake.clear();
        let out = d.dir.join(format!("ours-{mode}.jsonl"));
        let stats = if mode == "single" {
            judge_single(&client, &inputs, &names, &options(&out))
                .await
                .unwrap()
        } else {
            judge_pairwise(&client, &inputs, &Pairing::All(names.clone()), &options(&out))
                .await
                .unwrap()
        };
        assert!(stats.reference_fallbacks.is_empty() && stats.missing_answers.is_empty());

        let read = |m: &str| -> Vec<Value> {
            jsonl::read::<Value>(&d.dir.join(format!("{m}.jsonl")), false)
                .unwrap()
                .into_iter()
                .map(|l| l.record)
                .collect()
        };
        let spec = json!({
            "mode": mode,
            "questions": questions,
            "models": names,
            "answers": {"m1": read("m1"), "m2": read("m2"), "m3": read("m3")},
            "references": read("gpt-4"),
            "prompts": camelid_test_support::workspace().join("eval/prompts/judge_prompts.jsonl"),
            "out": d.dir.join(format!("fastchat-{mode}.json")),
        });
        let spec_path = d.dir.join(format!("spec-{mode}.json"));
        std::fs::write(&spec_path, spec.to_string()).unwrap();
        let run = std::process::Command::new(camelid_test_support::python())
            .args(["-c", FASTCHAT])
            .arg(&spec_path)
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let theirs: Value = serde_json::from_str(
            &std::fs::read_to_string(d.dir.join(format!("fastchat-{mode}.json"))).unwrap(),
        )
        .unwrap();

        let our_records: Vec<Value> = jsonl::read::<Value>(&out, false)
            .unwrap()
            .into_iter()
            .map(|l| normalize(l.record))
            .collect();
        let their_records: Vec<Value> = theirs["results"]
            .as_array()
            .unwrap()
            .iter()
            .cloned()
            .map(normalize)
            .collect();
        // Turn 1: 3 questions x 3 pairs (or models); turn 2: 2 questions x 3.
        assert_eq!(our_records.len(), 15, "{mode}");
        same_multiset(&our_records, &their_records, mode);

        let our_messages: Vec<Value> = fake.requests().iter().map(|r| r["messages"].clone()).collect();
        let their_messages: Vec<Value> = theirs["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["messages"].clone())
            .collect();
        assert_eq!(our_messages.len(), if mode == "single" { 15 } else { 30 });
        same_multiset(&our_messages, &their_messages, mode);
        assert!(
            theirs["calls"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["temperature"] == 0 && c["max_tokens"] == 2048)
        );
    }
}
