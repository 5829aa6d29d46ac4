//! Where requests go: endpoint sources (the config's static endpoints and, in a cluster, ChatModels' EndpointSlices
//! from [`crate::discovery`], merged), per-model backends with in-flight counts, least-in-flight choice, ejection
//! of failing workers and probing them back, holding requests for a model with no ready worker (at zero replicas,
//! or while one starts) until one is, and the start of a generation with retries on another worker while nothing
//! has been sent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use camelid_proto::v1::worker_client::WorkerClient;
use camelid_proto::v1::{self, generate_response};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::ApiError;
use crate::metrics::{Metrics, ModelLabels};
use crate::validate::{Input, Validated};

/// Model name → worker addresses (`host:port`).
pub type Endpoints = BTreeMap<String, Vec<String>>;

/// A source of endpoints that may change while the gateway runs.
pub trait EndpointSource: Send + Sync {
    fn subscribe(&self) -> watch::Receiver<Endpoints>;
}

/// Endpoints fixed by flags or a config file.
#[derive(Debug)]
pub struct StaticEndpoints(watch::Sender<Endpoints>);

impl StaticEndpoints {
    pub fn new(endpoints: Endpoints) -> Self {
        Self(watch::Sender::new(endpoints))
    }
}

impl StaticEndpoints {
    /// Replaces the endpoints (a config reload); the router adds and drops backends to match.
    pub fn set(&self, endpoints: Endpoints) {
        self.0.send_if_modified(|current| {
            let changed = *current != endpoints;
            *current = endpoints;
            changed
        });
    }
}

impl EndpointSource for StaticEndpoints {
    fn subscribe(&self) -> watch::Receiver<Endpoints> {
        self.0.subscribe()
    }
}

/// The union of several sources: a model's workers are those every source lists for it.
pub fn merge(sources: &[&dyn EndpointSource]) -> StaticEndpoints {
    let receivers: Vec<_> = sources.iter().map(|s| s.subscribe()).collect();
    let union = |receivers: &[watch::Receiver<Endpoints>]| {
        let mut all = Endpoints::new();
        for rx in receivers {
            for (model, addrs) in rx.borrow().iter() {
                let list = all.entry(model.clone()).or_default();
                for addr in addrs {
                    if !list.contains(addr) {
                        list.push(addr.clone());
                    }
                }
            }
        }
        all
    };
    let merged = StaticEndpoints::new(union(&receivers));
    let sender = merged.0.clone();
    tokio::spawn(async move {
        let mut receivers = receivers;
        loop {
            let changes = receivers.iter_mut().map(|rx| Box::pin(rx.changed()));
            let (result, _, _) = futures_util::future::select_all(changes).await;
            if result.is_err() {
                return;
            }
            let next = union(&receivers);
            sender.send_if_modified(|current| {
                let changed = *current != next;
                *current = next;
                changed
            });
        }
    });
    merged
}

/// How requests wait for a model that has no ready worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Longest a request waits; then 503 with `Retry-After`.
    pub timeout: Duration,
    /// Most requests waiting at once, over all models; more get 503 at once.
    pub max_requests: usize,
    /// How often a waiting stream gets an SSE comment, so proxies and clients keep it open.
    pub keepalive: Duration,
}

impl Default for HoldLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(180),
            max_requests: 1000,
            keepalive: Duration::from_secs(10),
        }
    }
}

/// Counts a request as held for its model while it lives.
#[derive(Debug)]
pub struct Held {
    router: Arc<Router>,
    model: String,
}

impl Held {
    /// Waits, counted as held, until the model has a ready worker; past `timeout`, 503 `model_starting`.
    pub async fn until_ready(self, timeout: Duration) -> Result<(), ApiError> {
        if self.router.wait_ready(&self.model, timeout).await {
            Ok(())
        } else {
            Err(ApiError::model_starting(&self.model, timeout))
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.router.held_total.fetch_sub(1, Ordering::Relaxed);
        self.router
            .metrics
            .held
            .get_or_create(&ModelLabels {
                model: self.model.clone(),
            })
            .dec();
        if let Ok(mut held) = self.router.held.lock()
            && let Some(n) = held.get_mut(&self.model)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.model);
            }
        }
    }
}

/// One model's load, as the operator's autoscaler reads it from `/internal/load`.
pub use camelid_contracts::load::ModelLoad;

/// One worker endpoint of one model.
#[derive(Debug)]
pub struct Backend {
    pub model: String,
    pub addr: String,
    client: WorkerClient<Channel>,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
}

impl Backend {
    fn new(model: &str, addr: &str) -> Result<Self, String> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("worker address {addr:?}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            model: model.to_string(),
            addr: addr.to_string(),
            client: WorkerClient::new(channel),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn set_healthy(&self, healthy: bool, metrics: &Metrics, why: &str) -> bool {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        metrics.set_backend_health(&self.model, &self.addr, healthy);
        if was != healthy {
            if healthy {
                tracing::info!(model = %self.model, endpoint = %self.addr, "worker admitted");
            } else {
                tracing::warn!(model = %self.model, endpoint = %self.addr, why, "worker ejected");
            }
        }
        healthy && !was
    }
}

/// Counts a request against a backend while it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    fn new(backend: Arc<Backend>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(backend)
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A generation a worker has accepted (tokenized and queued).
#[derive(Debug)]
pub struct Started {
    pub prompt_tokens: usize,
    pub stream: tonic::Streaming<v1::GenerateResponse>,
    pub in_flight: InFlight,
}

#[derive(Debug)]
pub struct Router {
    backends: RwLock<BTreeMap<String, Vec<Arc<Backend>>>>,
    metrics: Arc<Metrics>,
    probe_interval: Duration,
    rotation: AtomicUsize,
    /// Bumped whenever a worker may have become ready, to wake held requests.
    readiness: watch::Sender<u64>,
    held: Mutex<BTreeMap<String, u32>>,
    held_total: AtomicUsize,
}

/// Whether a status means the worker itself is gone or broken (eject it and try another).
pub fn is_transport_failure(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
    )
}

impl Router {
    /// Starts following `source` and probing its workers every `probe_interval`.
    pub fn start(source: &dyn EndpointSource, metrics: Arc<Metrics>, probe_interval: Duration) -> Arc<Self> {
        let router = Arc::new(Self {
            backends: RwLock::new(BTreeMap::new()),
            metrics,
            probe_interval,
            rotation: AtomicUsize::new(0),
            readiness: watch::Sender::new(0),
            held: Mutex::new(BTreeMap::new()),
            held_total: AtomicUsize::new(0),
        });
        let mut rx = source.subscribe();
        router.apply(&rx.borrow_and_update());
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(router) = weak.upgrade() else { return };
                let endpoints = rx.borrow_and_update().clone();
                let added = router.apply(&endpoints);
                // A new worker (an EndpointSlice just marked it ready) is asked at once, not at the next probe.
                if !added.is_empty() {
                    let router = router.clone();
                    tokio::spawn(async move { router.probe(added).await });
                }
            }
        });
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            loop {
                let Some(router) = weak.upgrade() else { return };
                router.probe_all().await;
                let interval = router.probe_interval;
                drop(router);
                tokio::time::sleep(interval).await;
            }
        });
        router
    }

    /// Brings the backend set in line with `endpoints`, keeping existing backends (and their state). Returns the
    /// backends added.
    fn apply(&self, endpoints: &Endpoints) -> Vec<Arc<Backend>> {
        let mut added = Vec::new();
        let Ok(mut backends) = self.backends.write() else {
            return added;
        };
        let mut next = BTreeMap::new();
        for (model, addrs) in endpoints {
            let existing = backends.get(model).cloned().unwrap_or_default();
            let mut list = Vec::new();
            for addr in addrs {
                match existing.iter().find(|b| &b.addr == addr) {
                    Some(b) => list.push(b.clone()),
                    None => match Backend::new(model, addr) {
                        Ok(b) => {
                            let b = Arc::new(b);
                            added.push(b.clone());
                            list.push(b);
                        }
                        Err(e) => tracing::error!(model, error = e, "ignoring endpoint"),
                    },
                }
            }
            next.insert(model.clone(), list);
        }
        *backends = next;
        added
    }

    fn all(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .map(|b| b.values().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// Asks every worker whether it is ready; ejects those that are not, admits those that are.
    pub async fn probe_all(&self) {
        self.probe(self.all()).await;
    }

    async fn probe(&self, backends: Vec<Arc<Backend>>) {
        let probes = backends.into_iter().map(|b| async move {
            let mut client = b.client.clone();
            let answer =
                tokio::time::timeout(Duration::from_secs(1), client.health(v1::HealthRequest {})).await;
            match answer {
                Ok(Ok(r)) if r.get_ref().ready => b.set_healthy(true, &self.metrics, "ready"),
                Ok(Ok(_)) => b.set_healthy(false, &self.metrics, "not ready"),
                Ok(Err(status)) => b.set_healthy(false, &self.metrics, status.message()),
                Err(_) => b.set_healthy(false, &self.metrics, "health check timed out"),
            }
        });
        let admitted = futures_util::future::join_all(probes).await;
        if admitted.contains(&true) {
            self.readiness.send_modify(|n| *n += 1);
        }
    }

    /// Whether `model` has a worker ready for a request.
    pub fn has_ready(&self, model: &str) -> bool {
        self.backends.read().is_ok_and(|b| {
            b.get(model)
                .is_some_and(|list| list.iter().any(|b| b.is_healthy()))
        })
    }

    /// Counts a request as waiting for `model`; 503 `too_many_waiting` when `limit` requests already wait.
    pub fn hold(self: &Arc<Self>, model: &str, limit: usize) -> Result<Held, ApiError> {
        if self.held_total.fetch_add(1, Ordering::Relaxed) >= limit {
            self.held_total.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::too_many_waiting(model));
        }
        if let Ok(mut held) = self.held.lock() {
            *held.entry(model.to_string()).or_default() += 1;
        }
        self.metrics
            .held
            .get_or_create(&ModelLabels { model: model.into() })
            .inc();
        Ok(Held {
            router: self.clone(),
            model: model.to_string(),
        })
    }

    /// Waits until `model` has a ready worker, or `timeout` passes (then `false`).
    pub async fn wait_ready(&self, model: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.readiness.subscribe();
        loop {
            if self.has_ready(model) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.has_ready(model),
            }
        }
    }

    /// Each model's requests in flight at its workers and held for want of one.
    pub fn load(&self) -> BTreeMap<String, ModelLoad> {
        let mut load: BTreeMap<String, ModelLoad> = BTreeMap::new();
        if let Ok(backends) = self.backends.read() {
            for (model, list) in backends.iter() {
                let in_flight: usize = list.iter().map(|b| b.in_flight()).sum();
                load.entry(model.clone()).or_default().in_flight =
                    u32::try_from(in_flight).unwrap_or(u32::MAX);
            }
        }
        if let Ok(held) = self.held.lock() {
            for (model, n) in held.iter() {
                load.entry(model.clone()).or_default().queued = *n;
            }
        }
        load
    }

    /// The models this gateway serves.
    pub fn models(&self) -> Vec<String> {
        self.backends
            .read()
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn knows(&self, model: &str) -> bool {
        self.backends.read().is_ok_and(|b| b.contains_key(model))
    }

    /// Whether some model has a ready worker.
    pub fn any_ready(&self) -> bool {
        self.all().iter().any(|b| b.is_healthy())
    }

    /// The healthy backend of `model` with the fewest requests in flight, skipping `tried`.
    fn pick(&self, model: &str, tried: &[String]) -> Option<Arc<Backend>> {
        let backends = self.backends.read().ok()?;
        let list = backends.get(model)?;
        let n = list.len().max(1);
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
        (0..list.len())
            .map(|i| &list[(start + i) % n])
            .filter(|b| b.is_healthy() && !tried.contains(&b.addr))
            .min_by_key(|b| b.in_flight())
            .cloned()
    }

    /// Sends `request` to a worker of its model and waits until one accepts it. A worker that is down or
    /// overloaded is skipped for another; `tried` collects the workers used (so a caller can retry elsewhere).
    pub async fn start_generation(
        &self,
        request: &Validated,
        request_id: &str,
        tried: &mut Vec<String>,
    ) -> Result<Started, ApiError> {
        if !self.knows(&request.model) {
            return Err(ApiError::model_not_found(&request.model));
        }
        let message = to_proto(request, request_id);
        let mut overloaded = false;
        loop {
            let Some(backend) = self.pick(&request.model, tried) else {
                return Err(if overloaded {
                    ApiError::overloaded(&request.model)
                } else {
                    ApiError::no_ready_worker(&request.model)
                });
            };
            tried.push(backend.addr.clone());
            let in_flight = InFlight::new(backend.clone());
            let mut client = backend.client.clone();
            let first = match client.generate(message.clone()).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    stream.message().await.map(|m| (m, stream))
                }
                Err(status) => Err(status),
            };
            match first {
                Ok((
                    Some(v1::GenerateResponse {
                        event: Some(generate_response::Event::Started(s)),
                    }),
                    stream,
                )) => {
                    return Ok(Started {
                        prompt_tokens: s.prompt_tokens as usize,
                        stream,
                        in_flight,
                    });
                }
                Ok(_) => {
                    return Err(ApiError::worker_failed(
                        "the worker's stream did not start with `Started`",
                    ));
                }
                Err(status) => match status.code() {
                    Code::InvalidArgument => return Err(invalid_from_status(&status)),
                    Code::ResourceExhausted => overloaded = true,
                    _ if is_transport_failure(&status) => {
                        backend.set_healthy(false, &self.metrics, status.message());
                    }
                    _ => return Err(ApiError::worker_failed(status.message().to_string())),
                },
            }
        }
    }

    /// Runs `request` to the end and returns its text (for the guard-model provider), with the same worker
    /// choice and retries as clients get.
    pub async fn complete_text(&self, request: &Validated) -> Result<String, ApiError> {
        let id = format!("guard-{}", uuid::Uuid::new_v4().simple());
        let mut tried = Vec::new();
        let mut started = self.start_generation(request, &id, &mut tried).await?;
        let mut text = String::new();
        loop {
            match started.stream.message().await {
                Ok(Some(v1::GenerateResponse {
                    event: Some(generate_response::Event::Chunk(c)),
                })) => text.push_str(&c.text),
                Ok(Some(v1::GenerateResponse {
                    event: Some(generate_response::Event::Finished(_)),
                })) => return Ok(text),
                Ok(Some(_)) => {}
                Ok(None) => return Err(ApiError::worker_failed("the worker's stream ended early")),
                Err(status) => return Err(ApiError::worker_failed(status.message().to_string())),
            }
        }
    }

    /// Marks a backend down after its stream broke.
    pub fn eject(&self, backend: &Backend, why: &str) {
        backend.set_healthy(false, &self.metrics, why);
    }
}

fn invalid_from_status(status: &Status) -> ApiError {
    let meta = |key| {
        status
            .metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut e = ApiError::invalid(
        &meta(camelid_proto::ERROR_PARAM_KEY).unwrap_or_default(),
        status.message(),
    );
    if let Some(code) = meta(camelid_proto::ERROR_CODE_KEY) {
        e.code = Some(code);
    }
    e
}

fn to_proto(v: &Validated, request_id: &str) -> v1::GenerateRequest {
    let p = &v.params;
    let input = match &v.input {
        Input::Chat(messages) => v1::generate_request::Input::Chat(v1::Conversation {
            messages: messages
                .iter()
                .map(|(role, content)| v1::ChatMessage {
                    role: role.clone(),
                    content: content.clone(),
                })
                .collect(),
        }),
        Input::Prompt(prompt) => v1::generate_request::Input::Prompt(prompt.clone()),
    };
    v1::GenerateRequest {
        request_id: request_id.to_string(),
        input: Some(input),
        max_tokens: p.max_tokens.unwrap_or(0),
        sampling: Some(v1::Sampling {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
        }),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
    }
}
