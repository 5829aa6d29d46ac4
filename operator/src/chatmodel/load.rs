//! The load the gateways report (`GET /internal/load` on each ready gateway pod, found through the EndpointSlices
//! of the gateway Service), summed per model. One read serves every ChatModel's reconcile for a second.

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

    /// The load of `model` summed over the gateways that answered; `None` when none did.
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
        report.map(|r| r.models.get(model).copied().unwrap_or_default())
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

/// `http://ADDR:PORT/internal/load` of every ready endpoint (port `http`) of `slices`.
pub fn gateway_urls(slices: &[EndpointSlice]) -> Vec<String> {
    let mut urls = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(names::GATEWAY_PORT_NAME))
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
