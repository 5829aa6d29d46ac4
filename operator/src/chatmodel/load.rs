//! The load the gateways report (`GET /internal/load` on the admin port of each ready gateway pod, found through
//! the EndpointSlices of the gateway Service), summed per model. One read serves every ChatModel's reconcile for a
//! second. The gateways key a ChatModel by `NAMESPACE/NAME`, so two namespaces' ChatModels of one name never add
//! up to each other's replicas. Each gateway also counts the streams it migrated per model; [`Migrations`] adds
//! up their increase for `status.migrations`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use camelid_contracts::load::{self, LoadReport, ModelLoad};
use camelid_contracts::names;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ListParams};

/// What each gateway that answered reported, by its URL; `None` when none did.
type Reports = Option<Vec<(String, LoadReport)>>;

/// Where the gateways are and what they last reported.
#[derive(Debug)]
pub struct Gateways {
    pub namespace: String,
    /// The gateway Service; its EndpointSlices' ready endpoints are the gateways asked.
    pub service: String,
    http: reqwest::Client,
    cache: Mutex<Option<(Instant, Reports)>>,
}

impl Gateways {
    /// Fails only when the HTTP client (with its 2 s timeout per gateway) cannot be built.
    pub fn new(namespace: String, service: String) -> Result<Self, reqwest::Error> {
        Ok(Self {
            namespace,
            service,
            http: crate::reconcile::http_client(Duration::from_secs(2))?,
            cache: Mutex::new(None),
        })
    }

    /// The load of the ChatModel `name` in `namespace`, summed over the gateways that answered; `None` when none
    /// did.
    pub async fn load_of(&self, client: &Client, namespace: &str, name: &str) -> Option<ModelLoad> {
        self.load(client, &format!("{namespace}/{name}")).await
    }

    /// The load of `model` (an id `NAMESPACE/NAME`, or a bare name, see [`lookup`]) summed over the gateways that
    /// answered; `None` when none did.
    pub async fn load(&self, client: &Client, model: &str) -> Option<ModelLoad> {
        let reports = self.reports(client).await?;
        let mut sum = LoadReport::default();
        for (_, report) in &reports {
            sum.add(report);
        }
        lookup(&sum, model)
    }

    /// Each gateway's count of streams it migrated for the ChatModel `name` in `namespace`, by the gateway's URL
    /// (0 from one that has none for it); `None` when no gateway answered.
    pub async fn migrations_of(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Option<BTreeMap<String, u64>> {
        let id = format!("{namespace}/{name}");
        let reports = self.reports(client).await?;
        Some(
            reports
                .into_iter()
                .map(|(url, report)| {
                    let count = report.models.get(&id).map_or(0, |l| l.migrations);
                    (url, count)
                })
                .collect(),
        )
    }

    /// The gateways' reports, read at most once a second for all ChatModels.
    async fn reports(&self, client: &Client) -> Reports {
        let cached = self.cache.lock().ok().and_then(|c| {
            c.as_ref()
                .filter(|(at, _)| at.elapsed() < Duration::from_secs(1))
                .cloned()
        });
        match cached {
            Some((_, reports)) => reports,
            None => {
                let reports = self.read(client).await;
                if let Ok(mut c) = self.cache.lock() {
                    *c = Some((Instant::now(), reports.clone()));
                }
                reports
            }
        }
    }

    async fn read(&self, client: &Client) -> Reports {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &self.namespace);
        let selector = format!("kubernetes.io/service-name={}", self.service);
        let list = slices.list(&ListParams::default().labels(&selector)).await.ok()?;
        let urls = gateway_urls(&list.items);
        let answers = futures_util::future::join_all(urls.iter().map(|url| async move {
            let response = self.http.get(url).send().await.ok()?.error_for_status().ok()?;
            let report = response.json::<LoadReport>().await.ok()?;
            Some((url.clone(), report))
        }))
        .await;
        let reports: Vec<_> = answers.into_iter().flatten().collect();
        if reports.is_empty() && !urls.is_empty() {
            tracing::warn!(service = %self.service, "no gateway answered /internal/load");
        }
        (!reports.is_empty()).then_some(reports)
    }
}

/// How long a gateway that stopped answering is remembered: one that answers again within it continues from its
/// last count instead of being counted whole as a new one.
const FORGET_GATEWAY_SECS: i64 = 600;

/// The migrations of one ChatModel, added up from the gateways' counters (each since its gateway started) the
/// way Prometheus' `increase` adds up a counter: per gateway, what it gained since it was last read; a count
/// lower than last time is a restarted gateway, counted from zero. Kept by the controller between reconciles.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Migrations {
    /// Each gateway's last count and when it was read (seconds).
    last: BTreeMap<String, (u64, i64)>,
    /// Whether the counts were read before. The first read only learns them: what they hold happened before this
    /// operator watched, and is in the status already if another operator counted it.
    started: bool,
}

impl Migrations {
    /// Takes the gateways' counts now (`counts`, by gateway, at `now` in seconds); returns the migrations since
    /// the last call. A gateway first seen after the first call counts whole: it started since (or had not
    /// answered until now, a small overcount).
    pub fn advance(&mut self, counts: &BTreeMap<String, u64>, now: i64) -> u64 {
        let mut new = 0u64;
        for (gateway, &count) in counts {
            let gained = match self.last.get(gateway) {
                _ if !self.started => 0,
                Some(&(last, _)) if count >= last => count - last,
                Some(_) | None => count,
            };
            new = new.saturating_add(gained);
            self.last.insert(gateway.clone(), (count, now));
        }
        self.started = true;
        self.last
            .retain(|_, (_, seen)| now.saturating_sub(*seen) <= FORGET_GATEWAY_SECS);
        new
    }
}

/// `model`'s load in `report`: by its id; a bare name (no namespace) matches the one `NAMESPACE/NAME` that has it,
/// and when several do it is ambiguous: `None`, as if no gateway had answered, so that nothing is scaled on
/// another namespace's load. A model the report lacks has no load.
pub fn lookup(report: &LoadReport, model: &str) -> Option<ModelLoad> {
    if let Some(load) = report.models.get(model) {
        return Some(*load);
    }
    if model.contains('/') {
        return Some(ModelLoad::default());
    }
    let mut matches = report
        .models
        .iter()
        .filter(|(id, _)| id.rsplit_once('/').is_some_and(|(_, bare)| bare == model));
    match (matches.next(), matches.next()) {
        (Some((_, load)), None) => Some(*load),
        (Some(_), Some(_)) => {
            tracing::warn!(
                model,
                "load: several namespaces have a model of this name; not scaling on it"
            );
            None
        }
        (None, _) => Some(ModelLoad::default()),
    }
}

/// `http://ADDR:PORT/internal/load` of every ready endpoint (port `admin`) of `slices`.
pub fn gateway_urls(slices: &[EndpointSlice]) -> Vec<String> {
    let mut urls = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(names::GATEWAY_ADMIN_PORT_NAME))
            .and_then(|p| p.port)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if ready {
                for addr in &endpoint.addresses {
                    let host = if addr.contains(':') {
                        format!("[{addr}]")
                    } else {
                        addr.clone()
                    };
                    urls.push(format!("http://{host}:{port}{}", load::PATH));
                }
            }
        }
    }
    urls
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_load_is_read_from_the_admin_port_only() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "gw-1"}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000}, {"name": "admin", "port": 9091}],
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                          {"addresses": ["10.0.0.2"], "conditions": {"ready": false}}]}))
        .unwrap();
        assert_eq!(gateway_urls(&[slice]), ["http://10.0.0.1:9091/internal/load"]);
    }

    /// The attack: a tenant names a ChatModel like another namespace's and loads it, hoping the operator scales
    /// the other's (paid) workers on that load, or hides its own among them.
    #[test]
    fn another_namespaces_model_of_the_same_name_is_never_counted() {
        let load = |in_flight| ModelLoad {
            in_flight,
            queued: 0,
            migrations: 0,
        };
        let report = LoadReport {
            models: [("a/smol".to_string(), load(1)), ("b/smol".to_string(), load(50))].into(),
        };
        assert_eq!(lookup(&report, "a/smol"), Some(load(1)));
        assert_eq!(lookup(&report, "b/smol"), Some(load(50)));
        assert_eq!(lookup(&report, "smol"), None, "ambiguous: scale on nothing");
        assert_eq!(lookup(&report, "c/smol"), Some(ModelLoad::default()));
        let one = LoadReport {
            models: [("a/smol".to_string(), load(3))].into(),
        };
        assert_eq!(
            lookup(&one, "smol"),
            Some(load(3)),
            "a bare name still finds the only one"
        );
    }

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(g, n)| (g.to_string(), *n)).collect()
    }

    #[test]
    fn migrations_add_up_each_gateways_increase_and_survive_its_restart() {
        let mut m = Migrations::default();
        assert_eq!(
            m.advance(&counts(&[("a", 7), ("b", 3)]), 0),
            0,
            "the first read only learns the counts"
        );
        assert_eq!(m.advance(&counts(&[("a", 9), ("b", 3)]), 5), 2);
        // b restarted (its count fell) and c started: both counted from zero.
        assert_eq!(m.advance(&counts(&[("a", 9), ("b", 1), ("c", 4)]), 10), 5);
        // a misses one read (a timeout) and answers again: only its increase counts.
        assert_eq!(m.advance(&counts(&[("b", 1), ("c", 4)]), 15), 0);
        assert_eq!(m.advance(&counts(&[("a", 10), ("b", 1), ("c", 4)]), 20), 1);
    }

    #[test]
    fn a_gateway_gone_long_is_forgotten() {
        let mut m = Migrations::default();
        m.advance(&counts(&[("a", 5)]), 0);
        m.advance(&counts(&[("b", 0)]), FORGET_GATEWAY_SECS + 1);
        assert_eq!(m.last.len(), 1, "a is forgotten");
        // A new gateway at a's address counts whole.
        assert_eq!(
            m.advance(&counts(&[("a", 6), ("b", 0)]), FORGET_GATEWAY_SECS + 2),
            6
        );
    }
}
