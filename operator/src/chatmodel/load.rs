//! The load the gateways report (`GET /internal/load` on the admin port of each ready gateway pod, found through
//! the EndpointSlices of the gateway Service), summed per model. One read serves every ChatModel's reconcile for a
//! second. The gateways key a ChatModel by `NAMESPACE/NAME`, so two namespaces' ChatModels of one name never add
//! up to each other's replicas.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use camelid_contracts::load::{self, LoadReport, ModelLoad};
use camelid_contracts::names;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ListParams};

/// Where the gateways are and the last sum read from them.
#[derive(Debug)]
pub struct Gateways {
    pub namespace: String,
    /// The gateway Service; its EndpointSlices' ready endpoints are the gateways asked.
    pub service: String,
    http: reqwest::Client,
    cache: Mutex<Option<(Instant, Option<LoadReport>)>>,
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
        let cached = self.cache.lock().ok().and_then(|c| {
            c.as_ref()
                .filter(|(at, _)| at.elapsed() < Duration::from_secs(1))
                .cloned()
        });
        let report = match cached {
            Some((_, report)) => report,
            None => {
                let report = self.read(client).await;
                if let Ok(mut c) = self.cache.lock() {
                    *c = Some((Instant::now(), report.clone()));
                }
                report
            }
        };
        report.and_then(|r| lookup(&r, model))
    }

    async fn read(&self, client: &Client) -> Option<LoadReport> {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &self.namespace);
        let selector = format!("kubernetes.io/service-name={}", self.service);
        let list = slices.list(&ListParams::default().labels(&selector)).await.ok()?;
        let urls = gateway_urls(&list.items);
        let answers = futures_util::future::join_all(urls.iter().map(|url| async move {
            let response = self.http.get(url).send().await.ok()?.error_for_status().ok()?;
            response.json::<LoadReport>().await.ok()
        }))
        .await;
        let mut sum = LoadReport::default();
        let mut any = false;
        for report in answers.into_iter().flatten() {
            any = true;
            sum.add(&report);
        }
        if !any && !urls.is_empty() {
            tracing::warn!(service = %self.service, "no gateway answered /internal/load");
        }
        any.then_some(sum)
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
        let load = |in_flight| ModelLoad { in_flight, queued: 0 };
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
}
