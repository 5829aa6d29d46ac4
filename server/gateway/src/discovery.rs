//! In a cluster: the models to serve are the ChatModels, their workers the ready endpoints of each one's Service
//! (its EndpointSlices, which Kubernetes fills from the workers' `/readyz`: ready only with the weights loaded).
//! An endpoint that is terminating, or on a node with a spot termination notice, gets no new requests. A ChatModel
//! with no ready endpoint (scaled to zero, or starting) is still served: its requests are held until one is ready.
//!
//! A ChatModel's id is `NAMESPACE/NAME` ([`model_id`]) everywhere inside the gateway: routing, its rule (allowed
//! keys, moderation), metrics and the load report. Two namespaces may name their ChatModels alike, and a tenant
//! who does must not get the other's prompts, nor replace its moderation or allowed keys. Clients may still send
//! the bare name while only one namespace serves a model of that name ([`crate::routing::Router::resolve`]); once
//! two do, the bare name is refused as ambiguous rather than guessed.
//!
//! [`endpoints_from`] is the pure part; [`spawn`] keeps reflectors of the three resources and recomputes on every
//! change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use camelid_contracts::names::{CHATMODEL_LABEL, TERMINATION_TAINTS, WORKER_GRPC_PORT_NAME};
use camelid_crds::ChatModel;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};

use crate::routing::{Endpoints, StaticEndpoints};

/// The label Kubernetes puts on an EndpointSlice: its Service's name (a ChatModel's Service has its name).
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What a ChatModel asks of the gateway besides routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRule {
    /// The moderation profile (a name in the gateway's config).
    pub moderation: Option<String>,
    /// Names of the keys that may use the model (all when empty).
    pub allowed_keys: Vec<String>,
    /// Its LoRA adapters: name → directory on its workers (the operator's `status.adapters`).
    pub adapters: BTreeMap<String, String>,
}

/// The id of the ChatModel `name` in `namespace`: `NAMESPACE/NAME` (a `/` is in neither, so it is unambiguous).
pub fn model_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn id_of(model: &ChatModel) -> String {
    model_id(&model.namespace().unwrap_or_default(), &model.name_any())
}

/// ChatModel id (`NAMESPACE/NAME`) → its rule, as the ChatModels say.
pub type ModelRules = Arc<RwLock<BTreeMap<String, ModelRule>>>;

/// Whether `node` carries a termination notice.
pub fn terminating(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| {
            taints
                .iter()
                .any(|t| TERMINATION_TAINTS.contains(&t.key.as_str()))
        })
}

/// The endpoints of every ChatModel: `addr:port` of each endpoint that is ready, not terminating and not on a
/// node in `leaving`. Models without such endpoints map to an empty list (known, so their requests are held).
pub fn endpoints_from(
    models: &[ChatModel],
    slices: &[EndpointSlice],
    leaving: &BTreeSet<String>,
) -> Endpoints {
    let mut endpoints = Endpoints::new();
    for model in models {
        if model.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = model.name_any();
        let namespace = model.namespace();
        let list: &mut Vec<String> = endpoints.entry(id_of(model)).or_default();
        for slice in slices {
            if slice.namespace() != namespace || slice.labels().get(SERVICE_NAME_LABEL) != Some(&name) {
                continue;
            }
            let Some(port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(WORKER_GRPC_PORT_NAME))
                .and_then(|p| p.port)
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let conditions = endpoint.conditions.clone().unwrap_or_default();
                // Kubernetes: an unknown readiness is read as ready; terminating endpoints are never ready.
                let usable = conditions.ready.unwrap_or(true)
                    && !conditions.terminating.unwrap_or(false)
                    && endpoint.node_name.as_ref().is_none_or(|n| !leaving.contains(n));
                if usable {
                    for addr in &endpoint.addresses {
                        let host = if addr.contains(':') {
                            format!("[{addr}]")
                        } else {
                            addr.clone()
                        };
                        let addr = format!("{host}:{port}");
                        if !list.contains(&addr) {
                            list.push(addr);
                        }
                    }
                }
            }
        }
        list.sort();
    }
    endpoints
}

/// Each ChatModel's rule.
pub fn rules_from(models: &[ChatModel]) -> BTreeMap<String, ModelRule> {
    models
        .iter()
        .map(|m| {
            (
                id_of(m),
                ModelRule {
                    moderation: m.spec.moderation.clone(),
                    allowed_keys: m.spec.allowed_keys.clone(),
                    adapters: m
                        .status
                        .iter()
                        .flat_map(|s| &s.adapters)
                        .map(|a| (a.name.clone(), a.path.clone()))
                        .collect(),
                },
            )
        })
        .collect()
}

/// A failed watch is retried with backoff; saying so is what tells an operator that, say, the gateway's RBAC lacks
/// a verb, instead of a gateway that silently knows no models.
fn log_watch_error<T>(kind: &str, event: Result<T, watcher::Error>) {
    if let Err(e) = event {
        tracing::warn!(kind, error = %e, "ChatModel discovery: watching failed; retrying");
    }
}

/// Follows the ChatModels (in `namespace`, or all), their EndpointSlices and the nodes, and keeps `sink` and
/// `rules` current until the process ends.
pub fn spawn(client: Client, namespace: Option<String>, sink: Arc<StaticEndpoints>, rules: ModelRules) {
    // A malformed ChatModel must not break the watch of the others: it is read guarded and left out.
    let (models_api, slices_api): (Api<DeserializeGuard<ChatModel>>, Api<EndpointSlice>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let nodes_api: Api<Node> = Api::all(client);
    let (models_store, models_writer) = reflector::store();
    let (slices, slices_writer) = reflector::store();
    let (nodes, nodes_writer) = reflector::store();
    let cfg = watcher::Config::default().any_semantic();
    let model_events = watcher(models_api, cfg.clone())
        .default_backoff()
        .reflect(models_writer)
        .map(|event| log_watch_error("ChatModel", event));
    let slice_events = watcher(slices_api, cfg.clone().labels(CHATMODEL_LABEL))
        .default_backoff()
        .reflect(slices_writer)
        .map(|event| log_watch_error("EndpointSlice", event));
    let node_events = watcher(nodes_api, cfg)
        .default_backoff()
        .reflect(nodes_writer)
        .map(|event| log_watch_error("Node", event));
    let mut events = Box::pin(futures_util::stream::select(
        model_events,
        futures_util::stream::select(slice_events, node_events),
    ));
    tokio::spawn(async move {
        let mut malformed = BTreeSet::new();
        while events.next().await.is_some() {
            let mut models = Vec::new();
            let mut bad = BTreeSet::new();
            for m in models_store.state().iter() {
                match &m.0 {
                    Ok(model) => models.push(model.clone()),
                    Err(e) => {
                        let name = format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any());
                        if !malformed.contains(&name) {
                            tracing::warn!(chatmodel = %name, error = %e, "ChatModel discovery: malformed ChatModel left out");
                        }
                        bad.insert(name);
                    }
                }
            }
            malformed = bad;
            let slices: Vec<EndpointSlice> = slices.state().iter().map(|s| (**s).clone()).collect();
            let leaving: BTreeSet<String> = nodes
                .state()
                .iter()
                .filter(|n| terminating(n))
                .map(|n| n.name_any())
                .collect();
            sink.set(endpoints_from(&models, &slices, &leaving));
            if let Ok(mut r) = rules.write() {
                *r = rules_from(&models);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model(name: &str, ns: &str) -> ChatModel {
        serde_json::from_value(json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"model": {"path": "/m"}, "moderation": "strict", "allowedKeys": ["alice"]}}))
        .unwrap()
    }

    fn slice(service: &str, ns: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-abc"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service, "camelid.dev/chatmodel": service}},
            "addressType": "IPv4", "ports": [{"name": "grpc", "port": 50051}], "endpoints": endpoints}),
        )
        .unwrap()
    }

    #[test]
    fn only_ready_endpoints_off_leaving_nodes_are_routed_and_models_without_any_stay_known() {
        let models = [model("smol", "a"), model("idle", "a")];
        let slices = [
            slice(
                "smol",
                "a",
                json!([
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "nodeName": "n1"},
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": false}, "nodeName": "n1"},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": true, "terminating": true}},
                    {"addresses": ["10.0.0.4"], "conditions": {"ready": true}, "nodeName": "spot-1"},
                    {"addresses": ["10.0.0.5"], "nodeName": "n2"},
                    {"addresses": ["fd00::6"], "conditions": {"ready": true}}
                ]),
            ),
            // Another namespace's Service of the same name is not this model's.
            slice(
                "smol",
                "b",
                json!([{"addresses": ["10.9.9.9"], "conditions": {"ready": true}}]),
            ),
        ];
        let leaving = BTreeSet::from(["spot-1".to_string()]);
        let endpoints = endpoints_from(&models, &slices, &leaving);
        assert_eq!(
            endpoints["a/smol"],
            ["10.0.0.1:50051", "10.0.0.5:50051", "[fd00::6]:50051"],
            "unready, terminating and leaving endpoints are out; unknown readiness counts as ready"
        );
        assert_eq!(
            endpoints["a/idle"],
            Vec::<String>::new(),
            "a model at zero is still served (held)"
        );
        let rules = rules_from(&models);
        assert_eq!(rules["a/smol"].moderation.as_deref(), Some("strict"));
        assert_eq!(rules["a/smol"].allowed_keys, ["alice"]);
    }

    /// The adapters the gateway may load come from the operator's status (resolved, checked paths), never from
    /// the spec a tenant writes.
    #[test]
    fn adapter_sources_come_from_the_status_only() {
        let cm: ChatModel = serde_json::from_value(json!({"apiVersion": "camelid.dev/v1alpha1",
            "kind": "ChatModel", "metadata": {"name": "smol", "namespace": "a"},
            "spec": {"model": {"path": "/m"}, "adapters": [{"name": "evil", "path": "x"}]},
            "status": {"adapters": [{"name": "sql", "path": "/camelid/volumes/models/adapters/sql"}],
                       "adapterCount": 1}}))
        .unwrap();
        let rules = rules_from(&[cm]);
        assert_eq!(
            rules["a/smol"].adapters,
            BTreeMap::from([(
                "sql".to_string(),
                "/camelid/volumes/models/adapters/sql".to_string()
            )])
        );
    }

    /// The attack: a tenant in namespace `b` creates a ChatModel named like namespace `a`'s, with its own
    /// workers, no moderation and its own allowed keys, hoping to receive `a`'s prompts or loosen its rules.
    #[test]
    fn a_same_named_chatmodel_in_another_namespace_gets_nothing_of_the_first() {
        let victim = model("smol", "a");
        let attacker: ChatModel = serde_json::from_value(json!({"apiVersion": "camelid.dev/v1alpha1",
            "kind": "ChatModel", "metadata": {"name": "smol", "namespace": "b"},
            "spec": {"model": {"path": "/m"}, "allowedKeys": ["mallory"]}}))
        .unwrap();
        let slices = [
            slice(
                "smol",
                "a",
                json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}]),
            ),
            slice(
                "smol",
                "b",
                json!([{"addresses": ["10.6.6.6"], "conditions": {"ready": true}}]),
            ),
        ];
        let endpoints = endpoints_from(&[victim.clone(), attacker.clone()], &slices, &BTreeSet::new());
        assert_eq!(
            endpoints["a/smol"],
            ["10.0.0.1:50051"],
            "a's prompts go to a's workers only"
        );
        assert_eq!(endpoints["b/smol"], ["10.6.6.6:50051"]);
        assert!(!endpoints.contains_key("smol"));
        let rules = rules_from(&[victim, attacker]);
        assert_eq!(
            rules["a/smol"].moderation.as_deref(),
            Some("strict"),
            "a's moderation stays"
        );
        assert_eq!(rules["a/smol"].allowed_keys, ["alice"], "a's allowed keys stay");
        assert_eq!(rules["b/smol"].allowed_keys, ["mallory"]);
    }

    #[test]
    fn a_node_is_leaving_when_it_carries_a_termination_taint() {
        let node = |taint: &str| -> Node {
            serde_json::from_value(json!({"metadata": {"name": "n"},
                "spec": {"taints": [{"key": taint, "effect": "NoSchedule"}]}}))
            .unwrap()
        };
        assert!(terminating(&node("aws-node-termination-handler/spot-itn")));
        assert!(!terminating(&node("nvidia.com/gpu")));
    }
}
