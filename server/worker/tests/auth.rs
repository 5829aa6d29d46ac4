//! Worker authentication and the worker's own limits, against a real `camelid-worker`: with a token it answers
//! only callers that present it (not an anonymous caller, not one with another model's token), the gateway that
//! holds the install's secret reaches it, and a request over the worker's limits is refused whoever sends it.
//! Without a token the worker will not listen beyond loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use camelid_contracts::worker_auth::{self, InstallSecret};
use camelid_contracts::worker_limits;
use camelid_gateway::GatewayConfig;
use camelid_gateway::routing::WorkerSecret;
use camelid_proto::v1;
use camelid_proto::v1::worker_client::WorkerClient;
use common::{Worker, body_json, fetch, free_port};

const SECRET: &str = "a-test-install-secret-of-enough-bytes";

async fn health(grpc: u16, bearer: Option<String>) -> Result<bool, tonic::Status> {
    let mut client = WorkerClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(v1::HealthRequest {});
    if let Some(b) = bearer {
        request
            .metadata_mut()
            .insert(worker_auth::METADATA_KEY, b.parse().unwrap());
    }
    client.health(request).await.map(|r| r.into_inner().ready)
}

#[test]
fn a_worker_with_a_token_serves_only_callers_with_that_token() {
    let secret = InstallSecret::new(SECRET).unwrap();
    let token = secret.token_for("smol");
    let worker = Worker::start_with_token(free_port(), free_port(), Some(&token));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let refused = health(worker.grpc, None).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        // The attack: a tenant who read its own model's token calls another model's worker with it.
        let theirs = worker_auth::bearer(&secret.token_for("team-b/smol"));
        let refused = health(worker.grpc, Some(theirs)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(
            health(worker.grpc, Some(worker_auth::bearer(&token)))
                .await
                .unwrap()
        );

        // The worker's own limits, for a caller with the token: more stop strings than it takes.
        let mut client = WorkerClient::connect(format!("http://127.0.0.1:{}", worker.grpc))
            .await
            .unwrap();
        let mut request = tonic::Request::new(v1::GenerateRequest {
            request_id: "too-many-stops".into(),
            input: Some(v1::generate_request::Input::Prompt("Hello".into())),
            stop: vec!["x".into(); worker_limits::MAX_STOP_SEQUENCES + 1],
            max_tokens: 4,
            ..Default::default()
        });
        request.metadata_mut().insert(
            worker_auth::METADATA_KEY,
            worker_auth::bearer(&token).parse().unwrap(),
        );
        let refused = client.generate(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert_eq!(
            refused.metadata().get(camelid_proto::ERROR_PARAM_KEY).unwrap(),
            "stop"
        );
    });

    // Gateways: one with the install's secret answers; one without it never gets the worker ready.
    let gateway = |secret: WorkerSecret| {
        let mut config = GatewayConfig {
            probe_interval: Duration::from_millis(200),
            worker_secret: secret,
            ..GatewayConfig::default()
        };
        config.hold.timeout = Duration::from_secs(2);
        config
            .add_backend_flag(&format!("smol=127.0.0.1:{}", worker.grpc))
            .unwrap();
        runtime.block_on(async {
            let state = camelid_gateway::state(&config).unwrap();
            state.router.probe_all().await;
            common::Gateway::spawn(state).await
        })
    };
    let chat = r#"{"model": "smol", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                   "temperature": 0}"#;
    let with = gateway(WorkerSecret::new(SECRET).unwrap());
    let (status, raw) = fetch(with.api, "POST", "/v1/chat/completions", chat).unwrap();
    assert_eq!(status, 200, "{raw}");
    let without = gateway(WorkerSecret::default());
    let (status, raw) = fetch(without.api, "POST", "/v1/chat/completions", chat).unwrap();
    assert_eq!(status, 503, "{raw}");
    assert!(body_json(&raw)["error"].is_object(), "{raw}");
    assert_eq!(
        worker.finished_requests(),
        1,
        "only the gateway with the secret reached the worker"
    );
}

#[test]
fn without_a_token_a_worker_refuses_to_listen_beyond_loopback() {
    // A model that does not exist: the refusal must come first, before the worker looks for (or loads) a model.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camelid-worker"))
        .args(["--model", "/nonexistent/camelid-auth-test.gguf"])
        .args(["--listen", &format!("0.0.0.0:{}", free_port())])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .env_remove(worker_auth::TOKEN_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(worker_auth::TOKEN_ENV) && stderr.contains("--allow-unauthenticated"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("camelid-auth-test.gguf"),
        "it looked at the model first: {stderr}"
    );
}
