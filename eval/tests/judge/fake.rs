//! The fake judge and the test data the judge tests share.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use camelid_eval::client::{ChatClient, Endpoint, RetryPolicy};
use camelid_eval::format::{Choice, ModelAnswer, PairJudgment, Question, QuestionId};
use camelid_eval::jsonl;
use camelid_eval::judge::{AnswerSet, JudgeOptions, References};
use serde_json::{Value, json};

#[derive(Default)]
pub(crate) struct Fake {
    pub(crate) requests: Mutex<Vec<Value>>,
    /// Requests whose user prompt contains this are refused (400).
    pub(crate) refuse: Mutex<Option<String>>,
}

impl Fake {
    pub(crate) fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
    pub(crate) fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }
}

/// The judge's rule, the same as the Python fake's in `fastchat.rs`.
fn judgment(user: &str) -> String {
    let pairwise = user.contains("Start of Assistant B");
    if user.contains("MUMBLE") {
        return if pairwise {
            "I cannot decide."
        } else {
            "Rating: [[11]]"
        }
        .into();
    }
    if user.contains("ECHO") {
        return if pairwise {
            "Output \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better. Verdict: [[B]]"
        } else {
            "Rating: [[7]], or rather [[8]]"
        }
        .into();
    }
    if pairwise {
        let a = user.find("Start of Assistant A").unwrap_or(0);
        let b = user.find("Start of Assistant B").unwrap_or(user.len());
        if user[a..b].contains("good") {
            "A is better. [[A]]"
        } else {
            "B is better. [[B]]"
        }
        .into()
    } else if user.contains("good") {
        "Rating: [[8]]".into()
    } else {
        "Rating: [[3]]".into()
    }
}

async fn completions(
    State(fake): State<Arc<Fake>>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    fake.requests.lock().unwrap().push(body.clone());
    let user = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    if let Some(r) = fake.refuse.lock().unwrap().as_deref()
        && user.contains(r)
    {
        return Err((
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "refused"}})),
        ));
    }
    Ok(Json(
        json!({"choices": [{"message": {"role": "assistant", "content": judgment(&user)}}]}),
    ))
}

pub(crate) async fn start(fake: Arc<Fake>) -> ChatClient {
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", camelid_test_support::free_port()))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let endpoint = Endpoint {
        base_url: format!("http://{addr}/v1"),
        model: "judge-model".into(),
        api_key: None,
    };
    let retry = RetryPolicy {
        max_attempts: 2,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        request_timeout: Duration::from_secs(30),
    };
    ChatClient::new(endpoint, retry).unwrap()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("camelid-judge-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn question(id: i64, category: &str, turns: &[&str], reference: Option<&[&str]>) -> Question {
    Question {
        question_id: QuestionId::Number(id),
        category: category.into(),
        turns: turns.iter().map(|t| t.to_string()).collect(),
        reference: reference.map(|r| r.iter().map(|t| t.to_string()).collect()),
        required_temperature: None,
    }
}

pub(crate) fn answer(model: &str, id: i64, turns: &[String]) -> ModelAnswer {
    ModelAnswer {
        question_id: QuestionId::Number(id),
        answer_id: format!("{model}-{id}"),
        model_id: model.into(),
        choices: vec![Choice {
            index: 0,
            turns: turns.to_vec(),
        }],
        tstamp: 1.0,
    }
}

/// Four questions, one per kind of prompt choice: writing (two turns, braces in the text), math (two turns, its
/// own reference and one in the file), reasoning (no reference anywhere: the fallback), coding (the file's
/// reference only). Each model answers every turn with `<word>: <model> on <question>.<turn>`; `skip` leaves a
/// model's answer to a question out.
pub(crate) struct Data {
    pub(crate) questions: Vec<Question>,
    pub(crate) answers: AnswerSet,
    pub(crate) references: References,
    pub(crate) dir: PathBuf,
}

pub(crate) fn data(name: &str, models: &[(&str, &str)], skip: &[(&str, i64)]) -> Data {
    let dir = temp(name);
    let questions = vec![
        question(
            1,
            "writing",
            &[
                "Write a haiku about {braces} and “quotes”.",
                "Now make it rhyme, {{keep}} it.",
            ],
            None,
        ),
        question(
            2,
            "math",
            &["What is 2+2?", "And times 3?"],
            Some(&["own: 4", "own: 12"]),
        ),
        question(3, "reasoning", &["Why is the sky blue?"], None),
        question(4, "coding", &["Print hello in Rust."], None),
    ];
    let mut paths = Vec::new();
    for (model, word) in models {
        let answers: Vec<ModelAnswer> = questions
            .iter()
            .filter(|q| !skip.contains(&(*model, number(q))))
            .map(|q| {
                let n = number(q);
                let turns: Vec<String> = (1..=q.turns.len())
                    .map(|t| format!("{word}: {model} on {n}.{t} {{x}}"))
                    .collect();
                answer(model, n, &turns)
            })
            .collect();
        let path = dir.join(format!("{model}.jsonl"));
        jsonl::write_all(&path, &answers).unwrap();
        paths.push(path);
    }
    let refs = dir.join("gpt-4.jsonl");
    let file_refs = [
        answer("gpt-4", 2, &["file: 4".into(), "file: 12".into()]),
        answer("gpt-4", 4, &["fn main() { println!(\"hello\"); }".into()]),
    ];
    jsonl::write_all(&refs, &file_refs).unwrap();
    Data {
        questions,
        answers: AnswerSet::load_files(&paths).unwrap(),
        references: References::load(&refs).unwrap(),
        dir,
    }
}

pub(crate) fn number(q: &Question) -> i64 {
    match q.question_id {
        QuestionId::Number(n) => n,
        QuestionId::Text(_) => 0,
    }
}

pub(crate) fn models(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

pub(crate) fn options(out: &Path) -> JudgeOptions {
    let mut o = JudgeOptions::new("gpt-4", out).unwrap();
    o.concurrency = 4;
    o
}

pub(crate) fn pairs(path: &Path) -> Vec<PairJudgment> {
    jsonl::read(path, false)
        .unwrap()
        .into_iter()
        .map(|l| l.record)
        .collect()
}

pub(crate) fn find(all: &[PairJudgment], q: i64, m1: &str, m2: &str, turn: u32) -> PairJudgment {
    all.iter()
        .find(|j| {
            j.question_id == QuestionId::Number(q) && j.model_1 == m1 && j.model_2 == m2 && j.turn == turn
        })
        .cloned()
        .unwrap_or_else(|| panic!("no judgment of {q} {m1} {m2} {turn}"))
}

/// A judgment file's lines without their timestamps.
pub(crate) fn without_tstamp(path: &Path) -> Vec<Value> {
    let lines: Vec<Value> = jsonl::read::<Value>(path, false)
        .unwrap()
        .into_iter()
        .map(|l| l.record)
        .collect();
    lines
        .into_iter()
        .map(|mut v| {
            v.as_object_mut().unwrap().remove("tstamp");
            v
        })
        .collect()
}
