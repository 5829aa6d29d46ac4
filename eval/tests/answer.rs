//! The answer step against a tiny OpenAI-compatible server that answers deterministically ("answer to: <last
//! user message> (turn n)") and can be told to be busy (429 with Retry-After, 503) on a request's first try or to
//! refuse one for good (400): retries, the conversation of each question, FastChat's file format, resuming, the
//! settings record, and hostile question files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use camelid_eval::answer::{self, AnswerSettings, settings_path};
use camelid_eval::client::{Endpoint, RetryPolicy};
use camelid_eval::questions::{self, QuestionFile, Selection};
use serde_json::{Value, json};

/// How the server treats the requests whose last user message is the key.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// 429 with `Retry-After: 1` on the first try.
    Busy,
    /// 503 on the first try.
    Unavailable,
    /// 400 on every try.
    Refuse,
}

#[derive(Default)]
struct Fake {
    requests: Mutex<Vec<Value>>,
    tries: Mutex<HashMap<String, u32>>,
    faults: Mutex<HashMap<String, Fault>>,
}

impl Fake {
    fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
    fn clear(&self) {
        self.requests.lock().unwrap().clear();
        self.tries.lock().unwrap().clear();
    }
    fn fault(&self, last_user: &str, fault: Option<Fault>) {
        let mut faults = self.faults.lock().unwrap();
        match fault {
            Some(f) => faults.insert(last_user.into(), f),
            None => faults.remove(last_user),
        };
    }
    fn tries(&self, last_user: &str) -> u32 {
        self.tries.lock().unwrap().get(last_user).copied().unwrap_or(0)
    }
}

async fn completions(State(fake): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let users: Vec<&str> = messages
        .iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_str())
        .collect();
    let last = users.last().copied().unwrap_or_default().to_string();
    let turn = users.len();
    fake.requests.lock().unwrap().push(body.clone());
    let tries = {
        let mut t = fake.tries.lock().unwrap();
        let n = t.entry(last.clone()).or_default();
        *n += 1;
        *n
    };
    let fault = fake.faults.lock().unwrap().get(&last).copied();
    let error = |status: StatusCode, message: &str| (status, Json(json!({"error": {"message": message}})));
    match fault {
        Some(Fault::Busy) if tries == 1 => {
            return (
                [("retry-after", "1")],
                error(StatusCode::TOO_MANY_REQUESTS, "slow down"),
            )
                .into_response();
        }
        Some(Fault::Unavailable) if tries == 1 => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "warming up").into_response();
        }
        Some(Fault::Refuse) => return error(StatusCode::BAD_REQUEST, "prompt too long").into_response(),
        _ => {}
    }
    let reply = format!("answer to: {last} (turn {turn})");
    Json(json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
    }))
    .into_response()
}

async fn serve() -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, url)
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("camelid-eval-answer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const CATEGORIES: [&str; 5] = ["writing", "math", "stem", "coding", "roleplay"];

/// Five two-turn questions, ids 1..=5, written out of order to show the output is sorted.
fn question_file(dir: &Path) -> QuestionFile {
    let path = dir.join("question.jsonl");
    let lines: Vec<String> = [3, 1, 5, 2, 4]
        .iter()
        .map(|&id: &usize| {
            let turns = [format!("q{id} first"), format!("q{id} second")];
            json!({"question_id": id, "category": CATEGORIES[id - 1], "turns": turns}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&path, lines.concat()).unwrap();
    questions::read(&path).unwrap()
}

fn settings(url: &str, file: &QuestionFile) -> AnswerSettings {
    let endpoint = Endpoint {
        base_url: url.into(),
        model: "vicuna-7b".into(),
        api_key: None,
    };
    let mut s = AnswerSettings::new(endpoint, file, Selection::ALL);
    s.max_tokens = 64;
    s.concurrency = 3;
    s.retry = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
    };
    s
}

fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn without_tstamp(path: &Path) -> Vec<Value> {
    let mut all = lines(path);
    for l in &mut all {
        l.as_object_mut().unwrap().remove("tstamp");
    }
    all
}

/// The last user message of each request received, sorted.
fn asked(fake: &Fake) -> Vec<String> {
    let mut v: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| {
            let m = r["messages"].as_array().unwrap();
            m.last().unwrap()["content"].as_str().unwrap().to_string()
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn answers_every_turn_in_one_conversation_in_fastchat_format() {
    let (fake, url) = serve().await;
    let d = dir("format");
    let file = question_file(&d);
    let out = d.join("model_answer").join("vicuna-7b.jsonl");
    let qs = file.select(&Selection::ALL).unwrap();
    let stats = answer::answer(&settings(&url, &file), &qs, &out, true)
        .await
        .unwrap();
    assert_eq!(
        (stats.selected, stats.resumed, stats.answered, stats.failed),
        (5, 0, 5, 0)
    );
    assert_eq!(stats.completions, 10);

    let answers = lines(&out);
    assert_eq!(answers.len(), 5);
    for (i, a) in answers.iter().enumerate() {
        let id = i + 1;
        let keys: BTreeSet<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["question_id", "answer_id", "model_id", "choices", "tstamp"])
        );
        assert_eq!(a["question_id"], json!(id), "sorted by question id");
        assert_eq!(a["model_id"], "vicuna-7b");
        assert_eq!(a["answer_id"].as_str().unwrap().len(), 22);
        assert!(a["tstamp"].as_f64().unwrap() > 1.6e9);
        let choices = a["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1);
        assert_eq!(choices[0]["index"], 0);
        assert_eq!(
            choices[0]["turns"],
            json!([
                format!("answer to: q{id} first (turn 1)"),
                format!("answer to: q{id} second (turn 2)")
            ])
        );
    }

    let requests = fake.requests();
    assert_eq!(requests.len(), 10);
    for r in &requests {
        assert_eq!(r["model"], "vicuna-7b");
        assert_eq!(r["max_tokens"], 64);
        assert_eq!(r["stream"], false);
        assert!(r["seed"].is_u64());
    }
    let second = requests
        .iter()
        .find(|r| r["messages"].as_array().unwrap().last().unwrap()["content"] == "q2 second")
        .unwrap();
    assert_eq!(
        second["messages"],
        json!([
            {"role": "user", "content": "q2 first"},
            {"role": "assistant", "content": "answer to: q2 first (turn 1)"},
            {"role": "user", "content": "q2 second"},
        ]),
        "the second turn carries the first answer"
    );
    let first = |id: usize| {
        requests
            .iter()
            .find(|r| r["messages"][0]["content"] == format!("q{id} first"))
            .unwrap()
            .clone()
    };
    for (id, temperature) in [(1, 0.7), (2, 0.0), (3, 0.1), (4, 0.0), (5, 0.7)] {
        assert_eq!(
            first(id)["temperature"].as_f64().unwrap(),
            temperature,
            "question {id}"
        );
    }
    assert_eq!(first(2)["seed"], second["seed"], "one seed per question");
    assert_ne!(first(1)["seed"], first(2)["seed"]);
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(settings_path(&out)).unwrap()).unwrap();
    assert_eq!(recorded["max_tokens"], 64);
    assert_eq!(recorded["questions_sha256"], file.sha256.as_str());
}

#[tokio::test]
async fn a_busy_server_is_retried_and_the_answers_are_right() {
    let (fake, url) = serve().await;
    let d = dir("retry");
    let file = question_file(&d);
    let out = d.join("answers.jsonl");
    fake.fault("q1 first", Some(Fault::Busy));
    fake.fault("q3 second", Some(Fault::Unavailable));
    let started = Instant::now();
    let qs = file.select(&Selection::ALL).unwrap();
    let stats = answer::answer(&settings(&url, &file), &qs, &out, false)
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    assert_eq!((stats.answered, stats.failed, stats.completions), (5, 0, 10));
    assert_eq!(fake.tries("q1 first"), 2);
    assert_eq!(fake.tries("q3 second"), 2);
    assert_eq!(fake.tries("q2 first"), 1);
    let answers = lines(&out);
    assert_eq!(
        answers[0]["choices"][0]["turns"][0],
        "answer to: q1 first (turn 1)"
    );
    assert_eq!(
        answers[2]["choices"][0]["turns"][1],
        "answer to: q3 second (turn 2)"
    );
}

#[tokio::test]
async fn a_resumed_run_asks_only_the_missing_questions_and_writes_the_same_file() {
    let (fake, url) = serve().await;
    let d = dir("resume");
    let file = question_file(&d);
    let qs = file.select(&Selection::ALL).unwrap();
    let s = settings(&url, &file);
    let whole = d.join("whole.jsonl");
    answer::answer(&s, &qs, &whole, false).await.unwrap();

    // A run killed while writing its third answer: two whole lines and a torn one.
    let text = std::fs::read_to_string(&whole).unwrap();
    let kept: Vec<&str> = text.lines().collect();
    let partial = d.join("partial.jsonl");
    let torn = &kept[2][..kept[2].len() / 2];
    std::fs::write(&partial, format!("{}\n{}\n{torn}", kept[0], kept[1])).unwrap();
    std::fs::copy(settings_path(&whole), settings_path(&partial)).unwrap();

    fake.clear();
    let stats = answer::answer(&s, &qs, &partial, false).await.unwrap();
    assert_eq!((stats.resumed, stats.answered), (2, 3));
    let expected: Vec<String> = (3..=5)
        .flat_map(|id| [format!("q{id} first"), format!("q{id} second")])
        .collect();
    assert_eq!(asked(&fake), expected, "only the missing questions are asked");
    assert_eq!(without_tstamp(&partial), without_tstamp(&whole));

    fake.clear();
    let stats = answer::answer(&s, &qs, &partial, false).await.unwrap();
    assert_eq!((stats.resumed, stats.answered), (5, 0));
    assert!(fake.requests().is_empty(), "a finished run asks nothing");
}

#[tokio::test]
async fn changed_settings_are_refused_until_forced_to_start_over() {
    let (fake, url) = serve().await;
    let d = dir("changed");
    let file = question_file(&d);
    let qs = file.select(&Selection::ALL).unwrap();
    let out = d.join("answers.jsonl");
    answer::answer(&settings(&url, &file), &qs, &out, false)
        .await
        .unwrap();
    let before = std::fs::read_to_string(&out).unwrap();

    fake.clear();
    let mut changed = settings(&url, &file);
    changed.max_tokens = 128;
    let err = answer::answer(&changed, &qs, &out, false).await.unwrap_err();
    assert_eq!(err.category(), "settings_changed");
    assert!(err.to_string().contains("max_tokens: 64 → 128"), "{err}");
    assert!(fake.requests().is_empty(), "nothing was asked");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        before,
        "nothing was written"
    );

    changed.force_new = true;
    let stats = answer::answer(&changed, &qs, &out, false).await.unwrap();
    assert_eq!((stats.resumed, stats.answered), (0, 5));
    assert_eq!(std::fs::read_to_string(answer::old_path(&out)).unwrap(), before);
    assert!(fake.requests().iter().all(|r| r["max_tokens"] == 128));
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(settings_path(&out)).unwrap()).unwrap();
    assert_eq!(recorded["max_tokens"], 128);
}

#[tokio::test]
async fn a_refused_question_fails_alone_and_a_rerun_asks_only_it() {
    let (fake, url) = serve().await;
    let d = dir("refused");
    let file = question_file(&d);
    let qs = file.select(&Selection::ALL).unwrap();
    let out = d.join("answers.jsonl");
    let s = settings(&url, &file);
    fake.fault("q2 first", Some(Fault::Refuse));
    let err = answer::answer(&s, &qs, &out, false).await.unwrap_err();
    assert_eq!(err.category(), "failed_questions");
    let msg = err.to_string();
    assert!(
        msg.contains("1 of 5 questions") && msg.contains("prompt too long"),
        "{msg}"
    );
    assert_eq!(fake.tries("q2 first"), 1, "a 400 is not retried");
    let ids: Vec<Value> = lines(&out).iter().map(|a| a["question_id"].clone()).collect();
    assert_eq!(ids, [json!(1), json!(3), json!(4), json!(5)]);

    fake.fault("q2 first", None);
    fake.clear();
    let stats = answer::answer(&s, &qs, &out, false).await.unwrap();
    assert_eq!((stats.resumed, stats.answered), (4, 1));
    assert_eq!(asked(&fake), ["q2 first", "q2 second"]);
    assert_eq!(lines(&out).len(), 5);
}

#[tokio::test]
async fn a_selection_answers_only_its_questions() {
    let (fake, url) = serve().await;
    let d = dir("selection");
    let file = question_file(&d);
    let selection = Selection {
        begin: Some(1),
        end: Some(4),
        max_questions: Some(2),
    };
    let qs = file.select(&selection).unwrap();
    let mut s = settings(&url, &file);
    s.selection = selection;
    s.model_id = Some("mine".into());
    let out = d.join("answers.jsonl");
    answer::answer(&s, &qs, &out, false).await.unwrap();
    // File order is 3, 1, 5, 2, 4: [1:4] is 1, 5, 2, and its first two are 1 and 5.
    let got: Vec<(Value, Value)> = lines(&out)
        .iter()
        .map(|a| (a["question_id"].clone(), a["model_id"].clone()))
        .collect();
    assert_eq!(got, [(json!(1), json!("mine")), (json!(5), json!("mine"))]);
    assert!(fake.requests().iter().all(|r| r["model"] == "vicuna-7b"));
}

#[test]
fn hostile_question_files_are_named_by_file_and_line() {
    let d = dir("hostile");
    let ok = r#"{"question_id": 1, "category": "writing", "turns": ["hi"]}"#;
    for (name, bad, needle) in [
        (
            "dup",
            r#"{"question_id": 1, "turns": ["again"]}"#,
            "`question_id`",
        ),
        ("empty", r#"{"question_id": 2, "turns": []}"#, "`turns` is empty"),
        ("junk", "this is not json", ""),
    ] {
        let path = d.join(format!("{name}.jsonl"));
        std::fs::write(&path, format!("{ok}\n{bad}\n{ok}\n")).unwrap();
        let msg = questions::read(&path).unwrap_err().to_string();
        assert!(msg.contains(&format!("{name}.jsonl:2:")), "{name}: {msg}");
        assert!(msg.contains(needle), "{name}: {msg}");
    }
}
