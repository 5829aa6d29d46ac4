//! The balancing router: per-model backends with in-flight counts, following an [`EndpointSource`], probing
//! workers' health, ejecting failing ones and admitting them back, and choosing the healthy worker with the fewest
//! requests in flight. Holding ([`super::hold`]) and the generate call ([`super::generate`]) build on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use camelid_contracts::load::ModelLoad;
use camelid_proto::v1;
use tokio::sync::watch;

use super::auth::{WorkerClient, WorkerSecret};
use super::endpoints::{EndpointSource, Endpoints};
use super::generation::MigrationLimits;
use crate::error::ApiError;
use crate::metrics::{Metrics, MigrationLabels};

/// [`Router::resolve`] over the `served` model ids.
pub fn resolve_in<'a>(served: impl Iterator<Item = &'a str>, asked: &str) -> Result<String, ApiError> {
    let mut found: Option<&str> = None;
    let mut several = false;
    for id in served {
        if id == asked {
            return Ok(asked.to_string());
        }
        if !asked.contains('/') && id.rsplit_once('/').is_some_and(|(_, bare)| bare == asked) {
            several |= found.is_some();
            found = Some(id);
        }
    }
    match found {
        _ if several => Err(ApiError::model_ambiguous(asked)),
        Some(id) => Ok(id.to_string()),
        None => Ok(asked.to_string()),
    }
}

/// One worker endpoint of one model.
#[derive(Debug)]
pub struct Backend {
    pub model: String,
    pub addr: String,
    pub(super) client: WorkerClient,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    /// Dropped from its model's endpoints: a probe still in flight must not bring its metric series back.
    retired: AtomicBool,
    /// The LoRA adapters the worker said it serves (its `ModelInfo`), and those loaded through it since.
    adapters: Mutex<BTreeSet<String>>,
}

impl Backend {
    fn new(model: &str, addr: &str, secret: &WorkerSecret) -> Result<Self, String> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("worker address {addr:?}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            model: model.to_string(),
            addr: addr.to_string(),
            client: WorkerClient::new(tonic::service::interceptor::InterceptedService::new(
                channel,
                secret.bearer(model),
            )),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            adapters: Mutex::new(BTreeSet::new()),
        })
    }

    /// Whether the worker holds adapter `name`.
    pub fn holds(&self, name: &str) -> bool {
        self.adapters.lock().is_ok_and(|a| a.contains(name))
    }

    pub(super) fn adapters(&self) -> BTreeSet<String> {
        self.adapters.lock().map(|a| a.clone()).unwrap_or_default()
    }

    pub(super) fn set_adapters(&self, names: BTreeSet<String>) {
        if let Ok(mut a) = self.adapters.lock() {
            *a = names;
        }
    }

    pub(super) fn note_adapter(&self, name: &str, held: bool) {
        if let Ok(mut a) = self.adapters.lock() {
            if held {
                a.insert(name.to_string());
            } else {
                a.remove(name);
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(super) fn set_healthy(&self, healthy: bool, metrics: &Metrics, why: &str) -> bool {
        if self.retired.load(Ordering::Relaxed) {
            return false;
        }
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
    pub(super) fn new(backend: Arc<Backend>) -> Self {
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

#[derive(Debug)]
pub struct Router {
    backends: RwLock<BTreeMap<String, Vec<Arc<Backend>>>>,
    pub(super) metrics: Arc<Metrics>,
    probe_interval: Duration,
    /// What calls to each model's workers carry.
    secret: WorkerSecret,
    /// Bumped whenever a worker may have become ready, to wake held requests.
    pub(super) readiness: watch::Sender<u64>,
    /// Requests held per model (see [`super::hold`]).
    pub(super) held: Mutex<BTreeMap<String, u32>>,
    /// Requests held over all models, against [`super::HoldLimits::max_requests`].
    pub(super) held_total: AtomicUsize,
    /// Requests held per key name, against each key's share of the queue.
    pub(super) held_by: Mutex<BTreeMap<String, usize>>,
    /// How far generations follow their workers (see [`super::generation`]).
    migration: RwLock<MigrationLimits>,
    /// Generations continued on another worker, per model, for `/internal/load` (the operator's ChatModel
    /// status counts them).
    migrated: Mutex<BTreeMap<String, u64>>,
    /// Where each model's LoRA adapters can be loaded from (see [`super::adapters`]).
    pub(super) adapter_sources: RwLock<super::adapters::AdapterSources>,
    pub(super) discovered_adapters: std::sync::OnceLock<super::adapters::SourceReader>,
}

impl Router {
    /// Starts following `source` and probing its workers every `probe_interval`, calling them with `secret`'s
    /// tokens.
    pub fn start(
        source: &dyn EndpointSource,
        metrics: Arc<Metrics>,
        probe_interval: Duration,
        secret: WorkerSecret,
    ) -> Arc<Self> {
        let router = Arc::new(Self {
            backends: RwLock::new(BTreeMap::new()),
            metrics,
            probe_interval,
            secret,
            readiness: watch::Sender::new(0),
            held: Mutex::new(BTreeMap::new()),
            held_total: AtomicUsize::new(0),
            held_by: Mutex::new(BTreeMap::new()),
            migration: RwLock::new(MigrationLimits::default()),
            migrated: Mutex::new(BTreeMap::new()),
            adapter_sources: RwLock::new(Default::default()),
            discovered_adapters: std::sync::OnceLock::new(),
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
                    None => match Backend::new(model, addr, &self.secret) {
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
        for (model, list) in backends.iter() {
            for gone in list.iter().filter(|b| {
                !next
                    .get(model)
                    .is_some_and(|l| l.iter().any(|n| Arc::ptr_eq(n, b)))
            }) {
                gone.retired.store(true, Ordering::Relaxed);
                self.metrics.forget_backend(model, &gone.addr);
            }
        }
        *backends = next;
        added
    }

    pub(super) fn backends_of(&self, model: &str) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .ok()
            .and_then(|b| b.get(model).cloned())
            .unwrap_or_default()
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
                Ok(Ok(r)) if r.get_ref().ready => {
                    // Which adapters it holds; a worker that cannot say keeps what is known.
                    let info = tokio::time::timeout(
                        Duration::from_secs(1),
                        client.model_info(v1::ModelInfoRequest {}),
                    );
                    if let Ok(Ok(info)) = info.await {
                        b.set_adapters(info.into_inner().adapters.into_iter().map(|a| a.name).collect());
                    }
                    b.set_healthy(true, &self.metrics, "ready")
                }
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
        if let Ok(migrated) = self.migrated.lock() {
            for (model, n) in migrated.iter() {
                load.entry(model.clone()).or_default().migrations = *n;
            }
        }
        load
    }

    /// Counts a generation of `model` continued on another worker for `cause` after `took`: in the metrics and
    /// in the load report.
    pub(super) fn count_migration(&self, model: &str, cause: &'static str, took: Duration) {
        let labels = MigrationLabels {
            model: model.to_string(),
            cause,
        };
        self.metrics.count_migration(&labels, took.as_secs_f64());
        if let Ok(mut migrated) = self.migrated.lock() {
            *migrated.entry(model.to_string()).or_default() += 1;
        }
    }

    /// The models this gateway serves.
    pub fn models(&self) -> Vec<String> {
        self.backends
            .read()
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The served model a client's `asked` name means: itself when served under that name; else, for a bare name,
    /// the one `NAMESPACE/NAME` served with that name (a ChatModel); 400 `model_ambiguous` when several are; `asked`
    /// itself when none is (routing then answers 404).
    pub fn resolve(&self, asked: &str) -> Result<String, ApiError> {
        let backends = self
            .backends
            .read()
            .map_err(|_| ApiError::model_not_found(asked))?;
        resolve_in(backends.keys().map(String::as_str), asked)
    }

    /// Each served model's id and the name clients see in `/v1/models`: the bare name of a `NAMESPACE/NAME` while
    /// it resolves to it alone, else the id.
    pub fn public_ids(&self) -> Vec<(String, String)> {
        let models = self.models();
        models
            .iter()
            .map(|id| {
                let shown = id
                    .rsplit_once('/')
                    .map(|(_, bare)| bare)
                    .filter(|bare| {
                        resolve_in(models.iter().map(String::as_str), bare).ok().as_ref() == Some(id)
                    })
                    .unwrap_or(id);
                (shown.to_string(), id.clone())
            })
            .collect()
    }

    pub fn knows(&self, model: &str) -> bool {
        self.backends.read().is_ok_and(|b| b.contains_key(model))
    }

    /// Whether some model has a ready worker.
    pub fn any_ready(&self) -> bool {
        self.all().iter().any(|b| b.is_healthy())
    }

    /// The healthy backend of `model` for a request whose prefix has routing key `key`, skipping `tried`: the
    /// one its prefix maps to unless that one is busier than the others ([`super::affinity::choose`]). With an
    /// `adapter`, among the workers that hold it; when none does, any worker if the adapter can be loaded there.
    pub(super) fn pick(
        &self,
        model: &str,
        adapter: &str,
        tried: &[String],
        key: u64,
    ) -> Option<Arc<Backend>> {
        let backends = self.backends.read().ok()?;
        let mut usable: Vec<&Arc<Backend>> = backends
            .get(model)?
            .iter()
            .filter(|b| b.is_healthy() && !tried.contains(&b.addr))
            .collect();
        if !adapter.is_empty() {
            let holders: Vec<&Arc<Backend>> = usable.iter().copied().filter(|b| b.holds(adapter)).collect();
            if !holders.is_empty() {
                usable = holders;
            } else if self.adapter_source(model, adapter).is_none() {
                return None;
            }
        }
        let loads: Vec<(&str, usize)> = usable.iter().map(|b| (b.addr.as_str(), b.in_flight())).collect();
        super::affinity::choose(key, &loads).map(|i| usable[i].clone())
    }

    /// How far generations follow their workers.
    pub fn migration_limits(&self) -> MigrationLimits {
        self.migration.read().map(|m| *m).unwrap_or_default()
    }

    pub fn set_migration_limits(&self, limits: MigrationLimits) {
        if let Ok(mut m) = self.migration.write() {
            *m = limits;
        }
    }

    /// Marks a backend down after its stream broke.
    pub fn eject(&self, backend: &Backend, why: &str) {
        backend.set_healthy(false, &self.metrics, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_resolve_while_one_namespace_serves_them() {
        let one = ["a/smol", "local"];
        let r = |served: &[&str], asked| resolve_in(served.iter().copied(), asked);
        assert_eq!(r(&one, "smol").unwrap(), "a/smol");
        assert_eq!(r(&one, "a/smol").unwrap(), "a/smol");
        assert_eq!(r(&one, "local").unwrap(), "local");
        assert_eq!(r(&one, "other").unwrap(), "other", "unknown: routing answers 404");
        // The attack: a second namespace names its ChatModel alike. The bare name is refused, never guessed.
        let two = ["a/smol", "b/smol"];
        let e = r(&two, "smol").unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.code.as_deref()),
            (400, Some("model_ambiguous"))
        );
        assert!(
            !e.message.contains("a/") && !e.message.contains("b/"),
            "{}",
            e.message
        );
        assert_eq!(r(&two, "b/smol").unwrap(), "b/smol");
        assert_eq!(
            r(&["smol", "b/smol"], "smol").unwrap(),
            "smol",
            "an exact name wins"
        );
    }

    #[tokio::test]
    async fn a_gone_worker_leaves_no_metric_series_behind() {
        let metrics = Arc::new(Metrics::new());
        let endpoint = |addr: &str| Endpoints::from([("m".to_string(), vec![addr.to_string()])]);
        let source = crate::routing::StaticEndpoints::new(endpoint("127.0.0.1:1"));
        let router = Router::start(
            &source,
            metrics.clone(),
            Duration::from_secs(60),
            WorkerSecret::default(),
        );
        router.probe_all().await;
        assert!(metrics.encode().contains("endpoint=\"127.0.0.1:1\""));
        router.apply(&endpoint("127.0.0.1:2"));
        router.probe_all().await;
        let text = metrics.encode();
        assert!(!text.contains("endpoint=\"127.0.0.1:1\""), "{text}");
        assert!(text.contains("endpoint=\"127.0.0.1:2\""), "{text}");
    }

    /// The attack: a tenant names its ChatModel like the configured guard (`guard`, served as `team-b/guard`). The
    /// guard's name is never resolved as a bare name, so the tenant's model never judges anyone's requests.
    #[tokio::test]
    async fn a_guard_is_named_exactly_never_by_a_bare_name() {
        let endpoints = Endpoints::from([("team-b/guard".to_string(), vec!["127.0.0.1:1".to_string()])]);
        let source = crate::routing::StaticEndpoints::new(endpoints);
        let router = Router::start(
            &source,
            Arc::new(Metrics::new()),
            Duration::from_secs(60),
            WorkerSecret::default(),
        );
        let body = br#"{"model": "guard", "messages": [{"role": "user", "content": "is this safe?"}]}"#;
        let request = crate::validate::parse_chat(body).unwrap();
        let request = crate::validate::chat(request, &crate::validate::Limits::default()).unwrap();
        let e = router
            .start_generation(&request, "r", &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(e.status.as_u16(), 404, "{}", e.message);
    }
}
