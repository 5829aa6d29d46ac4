//! Endpoint sources: where the router learns which workers serve which model. The config's static endpoints
//! (replaced on a reload) and, in a cluster, ChatModels' EndpointSlices from [`crate::discovery`], merged into one
//! stream the [`super::Router`] follows. Kept apart from the router so a source knows nothing of balancing.

use std::collections::BTreeMap;

use tokio::sync::watch;

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
