//! LoRA adapters through the gateway: a request naming an adapter goes to a worker of its base model with the
//! adapter in the call, preferring workers that hold it; an adapter with a known source is loaded on a worker
//! that lacks it (and again when the worker evicted it); `/v1/models` lists adapters with their parent; an
//! adapter name never shadows a model, and a bare name two models' adapters share is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use camelid_gateway::discovery::ModelRule;
use camelid_proto::v1::{self, generate_response};
use common::*;

/// A worker that holds some adapters, loads more when told, forgets them when told, and answers with its name.
#[derive(Clone, Default)]
struct Worker {
    name: &'static str,
    holds: Arc<Mutex<BTreeSet<String>>>,
    asked: Arc<Mutex<Vec<v1::GenerateRequest>>>,
    loads: Arc<Mutex<Vec<v1::LoadAdapterRequest>>>,
}

impl Worker {
    fn new(name: &'static str, holds: &[&str]) -> Self {
        Self {
            name,
            holds: Arc::new(Mutex::new(holds.iter().map(|s| s.to_string()).collect())),
            ..Self::default()
        }
    }
}

#[tonic::async_trait]
impl v1::worker_server::Worker for Worker {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: tonic::Request<v1::GenerateRequest>,
    ) -> Result<tonic::Response<EventStream>, tonic::Status> {
        let request = request.into_inner();
        if !request.adapter.is_empty() && !self.holds.lock().unwrap().contains(&request.adapter) {
            let mut status = tonic::Status::invalid_argument("no such adapter");
            status
                .metadata_mut()
                .insert(camelid_proto::ERROR_CODE_KEY, "model_not_found".parse().unwrap());
            return Err(status);
        }
        let text = format!("{}:{}", self.name, request.adapter);
        self.asked.lock().unwrap().push(request);
        let event = |e| Ok(v1::GenerateResponse { event: Some(e) });
        let events = vec![
            event(generate_response::Event::Started(v1::Started {
                prompt_tokens: 3,
                prompt_token_ids: vec![1, 2, 3],
            })),
            event(generate_response::Event::Chunk(v1::Chunk {
                text,
                tokens: 1,
                token_ids: vec![4],
            })),
            event(generate_response::Event::Finished(v1::Finished {
                reason: v1::FinishReason::Stop as i32,
                prompt_tokens: 3,
                completion_tokens: 1,
            })),
        ];
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn health(
        &self,
        _: tonic::Request<v1::HealthRequest>,
    ) -> Result<tonic::Response<v1::HealthResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::HealthResponse {
            ready: true,
            running: 0,
            waiting: 0,
        }))
    }

    async fn model_info(
        &self,
        _: tonic::Request<v1::ModelInfoRequest>,
    ) -> Result<tonic::Response<v1::ModelInfoResponse>, tonic::Status> {
        let adapters: Vec<v1::AdapterInfo> = self
            .holds
            .lock()
            .unwrap()
            .iter()
            .map(|n| v1::AdapterInfo {
                name: n.clone(),
                source: format!("/adapters/{n}"),
            })
            .collect();
        Ok(tonic::Response::new(v1::ModelInfoResponse {
            name: "base".into(),
            adapters,
            ..Default::default()
        }))
    }

    async fn load_adapter(
        &self,
        request: tonic::Request<v1::LoadAdapterRequest>,
    ) -> Result<tonic::Response<v1::LoadAdapterResponse>, tonic::Status> {
        let request = request.into_inner();
        if request.path.contains("broken") {
            return Err(tonic::Status::invalid_argument("adapter_config.json: malformed"));
        }
        self.holds.lock().unwrap().insert(request.name.clone());
        self.loads.lock().unwrap().push(request);
        Ok(tonic::Response::new(v1::LoadAdapterResponse {}))
    }

    async fn unload_adapter(
        &self,
        _: tonic::Request<v1::UnloadAdapterRequest>,
    ) -> Result<tonic::Response<v1::UnloadAdapterResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
}

fn answer(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn adapters_route_to_their_holders_load_where_missing_and_are_listed() {
    let (w1, w2) = (Worker::new("w1", &[]), Worker::new("w2", &["sql"]));
    let (a1, a2) = (
        serve_fake_worker(w1.clone()).await,
        serve_fake_worker(w2.clone()).await,
    );
    let dir = test_dir("adapters");
    let yaml = format!(
        "models:\n  team/base: [\"{a1}\", \"{a2}\"]\n  other/base: [\"{a1}\"]\nprobe_interval_ms: 100\n\
         adapters:\n  team/base: {{poet: /adapters/poet, broken: /adapters/broken}}\n"
    );
    let (state, app, _) = gateway(&dir, &yaml);
    state.router.probe_all().await;

    // Held by w2 only: every request goes there, naming the adapter; the base model itself goes anywhere.
    for i in 0..6 {
        let reply = post_chat(&app, None, &chat("sql", &format!("q{i}"), 5)).await;
        assert_eq!(answer(&reply), "w2:sql");
        assert_eq!(
            reply.json()["model"],
            "sql",
            "the response names the adapter asked for"
        );
    }
    assert_eq!(
        answer(&post_chat(&app, None, &chat("team/base", "hi", 5)).await)
            .split(':')
            .nth(1),
        Some("")
    );
    // Held by none but with a known source: loaded on the worker chosen, once, then routed there.
    let first = answer(&post_chat(&app, None, &chat("poet", "q", 5)).await);
    let holder = first.split(':').next().unwrap().to_string();
    for i in 0..4 {
        assert_eq!(
            answer(&post_chat(&app, None, &chat("poet", &format!("q{i}"), 5)).await),
            first
        );
    }
    let loads: Vec<String> = [&w1, &w2]
        .iter()
        .flat_map(|w| w.loads.lock().unwrap().clone())
        .map(|l| l.path)
        .collect();
    assert_eq!(loads, ["/adapters/poet"], "loaded once, on {holder}");
    // The worker evicted it (LRU): the gateway sees `model_not_found`, loads it again and the request succeeds.
    let worker = if holder == "w1" { &w1 } else { &w2 };
    worker.holds.lock().unwrap().remove("poet");
    assert_eq!(
        answer(&post_chat(&app, None, &chat("poet", "again", 5)).await)
            .split(':')
            .nth(1),
        Some("poet")
    );
    // An adapter the workers refuse is an error that says why, not a retry storm.
    let broken = post_chat(&app, None, &chat("broken", "q", 5)).await;
    assert_eq!(broken.outcome(), (502, "adapter_unavailable".into()));
    assert!(
        !broken.text.contains("/adapters/"),
        "no worker path reaches the client: {}",
        broken.text
    );
    // An unknown name is 404 as before.
    assert_eq!(
        post_chat(&app, None, &chat("nope", "q", 5)).await.outcome().0,
        404
    );

    // /v1/models: the models, then each adapter under its base.
    let models = call(&app, "GET", "/v1/models", None, "").await.json();
    let cards: Vec<(String, Option<String>)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["parent"].as_str().map(str::to_string),
            )
        })
        .collect();
    for adapter in ["sql", "poet", "broken"] {
        assert!(
            cards.contains(&(adapter.to_string(), Some("team/base".into()))),
            "{adapter}: {cards:?}"
        );
    }
    assert!(cards.contains(&("team/base".into(), None)), "{cards:?}");
}

#[tokio::test]
async fn an_adapter_never_shadows_a_model_and_a_shared_bare_name_is_ambiguous() {
    // Two tenants' workers both report an adapter `sql`, and one reports an adapter named like a's model.
    let (wa, wb) = (Worker::new("wa", &["sql"]), Worker::new("wb", &["sql", "smol"]));
    let (aa, ab) = (
        serve_fake_worker(wa.clone()).await,
        serve_fake_worker(wb.clone()).await,
    );
    let dir = test_dir("adapter-names");
    let yaml = format!("models:\n  a/smol: [\"{aa}\"]\n  b/base: [\"{ab}\"]\nprobe_interval_ms: 100\n");
    let (state, app, _) = gateway(&dir, &yaml);
    state.router.probe_all().await;
    {
        let mut rules = state.rules.write().unwrap();
        rules.insert("a/smol".into(), ModelRule::default());
        rules.insert("b/base".into(), ModelRule::default());
    }
    // `smol` is a's model, whatever b's worker reports.
    assert_eq!(answer(&post_chat(&app, None, &chat("smol", "q", 5)).await), "wa:");
    // `sql` belongs to two bases: refused by name; each namespace's id reaches its own.
    assert_eq!(
        post_chat(&app, None, &chat("sql", "q", 5)).await.outcome(),
        (400, "model_ambiguous".into())
    );
    assert_eq!(
        answer(&post_chat(&app, None, &chat("a/sql", "q", 5)).await),
        "wa:sql"
    );
    assert_eq!(
        answer(&post_chat(&app, None, &chat("b/sql", "q", 5)).await),
        "wb:sql"
    );
}
