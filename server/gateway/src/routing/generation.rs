//! A generation that outlives its worker. [`Generation::next`] yields the text a worker streams; when the worker
//! drains (`Interrupted`) or its stream breaks, the generation goes on on another ready worker of the model with a
//! `Continuation`: the prompt's token ids from `Started` and every token id received so far, so nothing is
//! re-tokenized, and the worker replays those tokens (their text already reached the client) and streams only what
//! follows. A seeded sampler draws by position, so greedy and seeded answers come out as if nothing happened. With
//! no ready worker the generation waits, as a request for a model at zero replicas does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use camelid_proto::v1::{self, generate_response};

use super::generate::{Opened, is_transport_failure};
use super::router::{Backend, InFlight, Router};
use crate::error::ApiError;

/// How far a generation follows its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationLimits {
    /// Most times one request moves to another worker; then the client gets the error.
    pub max_per_request: u32,
    /// Longest a moving request waits for a ready worker.
    pub wait: Duration,
}

impl Default for MigrationLimits {
    fn default() -> Self {
        Self {
            max_per_request: 5,
            wait: Duration::from_secs(120),
        }
    }
}

/// What a generation yields.
#[derive(Debug)]
pub enum Next {
    /// Final text, and how many tokens it took.
    Text { text: String, tokens: usize },
    /// The end, with the exact usage of the whole generation (on every worker it ran on).
    Finished(v1::Finished),
}

/// Why a generation left its worker (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The worker said it drains.
    Draining,
    /// The stream broke or ended early: the worker died or its connection did.
    WorkerLost,
    /// The worker failed the generation (a model error).
    WorkerError,
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Cause::Draining => "draining",
            Cause::WorkerLost => "worker_lost",
            Cause::WorkerError => "worker_error",
        }
    }
}

/// A generation a worker accepted, with what it takes to continue it elsewhere.
#[derive(Debug)]
pub struct Generation {
    router: Arc<Router>,
    model: String,
    key: u64,
    /// The request as first sent; continuations reuse its sampling, stop strings and limits.
    message: v1::GenerateRequest,
    pub prompt_tokens: usize,
    prompt_ids: Vec<u32>,
    generated: Vec<u32>,
    /// False once a worker sent text without its token ids (an older worker): it cannot be continued exactly.
    resumable: bool,
    stream: tonic::Streaming<v1::GenerateResponse>,
    in_flight: InFlight,
    migrations: u32,
}

impl Generation {
    pub(super) fn new(
        router: Arc<Router>,
        model: String,
        key: u64,
        message: v1::GenerateRequest,
        opened: Opened,
    ) -> Self {
        let resumable = opened.started.prompt_token_ids.len() == opened.started.prompt_tokens as usize;
        Self {
            router,
            model,
            key,
            message,
            prompt_tokens: opened.started.prompt_tokens as usize,
            prompt_ids: opened.started.prompt_token_ids,
            generated: Vec::new(),
            resumable,
            stream: opened.stream,
            in_flight: opened.in_flight,
            migrations: 0,
        }
    }

    /// The worker running the generation now.
    pub fn backend(&self) -> &Arc<Backend> {
        self.in_flight.backend()
    }

    /// The next text or the end, moving to another worker whenever the current one drains or fails.
    pub async fn next(&mut self) -> Result<Next, ApiError> {
        loop {
            let (cause, why) = match self.stream.message().await {
                Ok(Some(v1::GenerateResponse { event: Some(event) })) => match event {
                    generate_response::Event::Chunk(c) => {
                        if c.token_ids.len() == c.tokens as usize {
                            self.generated.extend_from_slice(&c.token_ids);
                        } else {
                            self.resumable = false;
                        }
                        return Ok(Next::Text {
                            text: c.text,
                            tokens: c.tokens as usize,
                        });
                    }
                    generate_response::Event::Finished(f) => return Ok(Next::Finished(f)),
                    generate_response::Event::Interrupted(_) => {
                        (Cause::Draining, "the worker drained".to_string())
                    }
                    generate_response::Event::Started(_) => continue,
                },
                Ok(Some(_)) => continue,
                Ok(None) => (Cause::WorkerLost, "the worker's stream ended early".to_string()),
                Err(status) if is_transport_failure(&status) => {
                    (Cause::WorkerLost, status.message().to_string())
                }
                Err(status) => (Cause::WorkerError, status.message().to_string()),
            };
            self.migrate(cause, &why).await?;
        }
    }

    /// Continues the generation on another worker, waiting up to the limits' `wait` for one to be ready.
    async fn migrate(&mut self, cause: Cause, why: &str) -> Result<(), ApiError> {
        let backend = self.backend().clone();
        tracing::warn!(endpoint = %backend.addr, cause = cause.label(), why, tokens = self.generated.len(),
            "the worker stopped mid-generation");
        if cause != Cause::WorkerError {
            // A draining worker is no longer ready; a lost one is down. The probes bring either back.
            self.router.eject(&backend, why);
        }
        let limits = self.router.migration_limits();
        if !self.resumable || self.migrations >= limits.max_per_request {
            return Err(ApiError::worker_failed(format!(
                "the worker failed while streaming ({why}) after {} migrations",
                self.migrations
            )));
        }
        self.migrations += 1;
        let began = Instant::now();
        let message = self.continuation();
        let deadline = tokio::time::Instant::now() + limits.wait;
        // A worker that failed the generation itself is still up: try the others first.
        let mut skip: Vec<String> = (cause == Cause::WorkerError)
            .then(|| backend.addr.clone())
            .into_iter()
            .collect();
        loop {
            let mut tried = std::mem::take(&mut skip);
            match self
                .router
                .open(&self.model, &message, self.key, &mut tried)
                .await
            {
                Ok(opened) => {
                    self.stream = opened.stream;
                    self.in_flight = opened.in_flight;
                    self.router
                        .count_migration(&self.model, cause.label(), began.elapsed());
                    tracing::info!(endpoint = %self.backend().addr, tokens = self.generated.len(),
                        seconds = began.elapsed().as_secs_f64(), "generation continued");
                    return Ok(());
                }
                Err(e) if e.code.as_deref() == Some("no_ready_worker") => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() || !self.router.wait_ready(&self.model, left).await {
                        return Err(e);
                    }
                }
                Err(e) if e.status.as_u16() == 429 && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The request that continues this generation: the same settings, the prompt and the tokens as ids.
    fn continuation(&self) -> v1::GenerateRequest {
        v1::GenerateRequest {
            input: None,
            continuation: Some(v1::Continuation {
                prompt_token_ids: self.prompt_ids.clone(),
                generated_token_ids: self.generated.clone(),
            }),
            ..self.message.clone()
        }
    }
}
