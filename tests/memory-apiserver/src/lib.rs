//! An in-memory Kubernetes API server for tests, spoken to over HTTP by unmodified clients (kube-rs): get, list
//! and watch (label selectors, resourceVersions), create, replace (optimistic concurrency), JSON merge and
//! server-side apply patches (field ownership, conflicts, `force`), status subresources, delete with finalizers
//! and owner-reference garbage collection. The test plays the rest of the cluster (kubelet, Job controller,
//! nodes) through [`MemoryApiServer::cluster`].
//!
//! What it does not do: admission, defaulting or validation against schemas, RBAC, field selectors, and list
//! merge keys in apply (lists are atomic). `store.rs` documents the semantics it keeps.

pub mod store;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use store::{ApiError, Key, Part, Resource, Store};
use tokio::sync::watch;

/// A running in-memory API server.
#[derive(Clone)]
pub struct MemoryApiServer {
    inner: Arc<Inner>,
    url: String,
}

struct Inner {
    store: Mutex<Store>,
    /// The latest resourceVersion, for watchers to wake on.
    revision: watch::Sender<u64>,
}

/// The store, locked; dropping it wakes watchers.
pub struct Cluster<'a> {
    guard: MutexGuard<'a, Store>,
    revision: &'a watch::Sender<u64>,
}

impl std::ops::Deref for Cluster<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.guard
    }
}

impl std::ops::DerefMut for Cluster<'_> {
    fn deref_mut(&mut self) -> &mut Store {
        &mut self.guard
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        self.revision.send_replace(self.guard.revision());
    }
}

impl MemoryApiServer {
    /// Starts serving on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            revision: watch::Sender::new(0),
        });
        let state = inner.clone();
        let app = axum::Router::new().fallback(move |method, uri, headers, body| {
            let state = state.clone();
            async move { handle(state, method, uri, headers, body).await }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { inner, url })
    }

    /// `http://127.0.0.1:PORT`, for a client's cluster URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kube-rs client of this server, with `default` as its namespace.
    pub fn client(&self) -> Result<kube::Client, kube::Error> {
        let url = self
            .url
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| kube::Error::Service(e.into()))?;
        let mut config = kube::Config::new(url);
        config.default_namespace = "default".into();
        kube::Client::try_from(config)
    }

    /// The store, for the test's side of the cluster (creating pods, setting their status, removing nodes).
    pub fn cluster(&self) -> Cluster<'_> {
        Cluster {
            guard: self.inner.store.lock().unwrap_or_else(PoisonError::into_inner),
            revision: &self.inner.revision,
        }
    }
}

/// `/api/v1[/namespaces/NS]/PLURAL[/NAME[/status]]` or `/apis/GROUP/VERSION/...`.
fn parse_path(path: &str) -> Option<(Resource, Option<String>, Option<String>, Part)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *segments.first()? {
        "api" => (format!("api/{}", segments.get(1)?), &segments[2..]),
        "apis" => (
            format!("apis/{}/{}", segments.get(1)?, segments.get(2)?),
            &segments[3..],
        ),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns.to_string()), tail),
        _ => (None, rest),
    };
    let plural = rest.first()?;
    let name = rest.get(1).map(|s| s.to_string());
    let part = match rest.get(2) {
        None => Part::Main,
        Some(&"status") => Part::Status,
        Some(_) => return None,
    };
    Some((Resource::new(&prefix, plural), namespace, name, part))
}

fn query(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(code: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(e: ApiError) -> Response {
    json_response(e.code, &e.status())
}

async fn handle(inner: Arc<Inner>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let Some((resource, namespace, name, part)) = parse_path(uri.path()) else {
        return error(ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                uri.path()
            ),
        ));
    };
    let q = query(&uri);
    let param = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let manager = param("fieldManager").unwrap_or("unknown").to_string();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let parse_body = || -> Result<Value, ApiError> {
        if content_type.starts_with("application/apply-patch+yaml") {
            serde_yaml_ng::from_slice(&body).map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))
        } else {
            serde_json::from_slice(&body).map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))
        }
    };
    let lock = || Cluster {
        guard: inner.store.lock().unwrap_or_else(PoisonError::into_inner),
        revision: &inner.revision,
    };
    let Some(name) = name else {
        return match method {
            Method::GET if param("watch") == Some("true") || param("watch") == Some("1") => {
                let since = param("resourceVersion")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                let timeout = param("timeoutSeconds")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(290u64);
                watch_stream(
                    inner.clone(),
                    resource,
                    namespace,
                    param("labelSelector").map(str::to_string),
                    since,
                    timeout,
                )
            }
            Method::GET => {
                let store = lock();
                let items = store.list(&resource, namespace.as_deref(), param("labelSelector"));
                json_response(
                    200,
                    &json!({
                    "apiVersion": resource.api_version(), "kind": resource.list_kind(),
                    "metadata": {"resourceVersion": store.revision().to_string()}, "items": items}),
                )
            }
            Method::POST => match parse_body() {
                Ok(mut object) => {
                    let generated = object["metadata"]["generateName"]
                        .as_str()
                        .map(|prefix| format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..5]));
                    if let (None, Some(name)) = (object["metadata"]["name"].as_str(), generated) {
                        object["metadata"]["name"] = Value::String(name);
                    }
                    let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                        return error(ApiError::new(422, "Invalid", "metadata.name: Required value"));
                    };
                    let key = Key {
                        resource,
                        namespace,
                        name,
                    };
                    match lock().create(&key, object, &manager) {
                        Ok(o) => json_response(201, &o),
                        Err(e) => error(e),
                    }
                }
                Err(e) => error(e),
            },
            _ => error(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
        };
    };
    let key = Key {
        resource,
        namespace,
        name,
    };
    let result = match method {
        Method::GET => lock().get(&key).cloned().ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("{} \"{}\" not found", key.resource.plural, key.name),
            )
        }),
        Method::PUT => parse_body().and_then(|b| lock().replace(&key, b, part, &manager)),
        Method::PATCH => parse_body().and_then(|b| {
            if content_type.starts_with("application/apply-patch+yaml") {
                let force = param("force") == Some("true");
                lock().apply(&key, &b, part, &manager, force)
            } else if content_type.starts_with("application/merge-patch+json")
                || content_type.starts_with("application/strategic-merge-patch+json")
            {
                lock().merge(&key, &b, part, &manager)
            } else {
                Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("unsupported patch type {content_type:?}"),
                ))
            }
        }),
        Method::DELETE => lock().delete(&key),
        _ => Err(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
    };
    match result {
        Ok(object) => json_response(200, &object),
        Err(e) => error(e),
    }
}

/// A watch: events after `since` (all current objects as ADDED when `since` is 0), then live ones, one JSON
/// object per line, until `timeout` seconds pass.
fn watch_stream(
    inner: Arc<Inner>,
    resource: Resource,
    namespace: Option<String>,
    selector: Option<String>,
    since: u64,
    timeout: u64,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    tokio::spawn(async move {
        let mut wake = inner.revision.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut seen = since;
        let matches = |object: &Value| {
            let in_ns = namespace
                .as_deref()
                .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns));
            let empty = serde_json::Map::new();
            let labels = object["metadata"]["labels"].as_object().unwrap_or(&empty);
            in_ns
                && selector
                    .as_deref()
                    .is_none_or(|s| store::selector_matches(s, labels))
        };
        if since == 0 {
            let (items, revision) = {
                let store = inner.store.lock().unwrap_or_else(PoisonError::into_inner);
                (
                    store.list(&resource, namespace.as_deref(), selector.as_deref()),
                    store.revision(),
                )
            };
            for object in items {
                let line = format!("{}\n", json!({"type": "ADDED", "object": object}));
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
            }
            seen = revision;
        }
        loop {
            let lines: Vec<String> = {
                let store = inner.store.lock().unwrap_or_else(PoisonError::into_inner);
                let start = store.history.partition_point(|c| c.resource_version <= seen);
                let lines = store.history[start..]
                    .iter()
                    .filter(|c| c.resource == resource && matches(&c.object))
                    .map(|c| format!("{}\n", json!({"type": c.kind, "object": c.object})))
                    .collect();
                seen = store.revision();
                lines
            };
            for line in lines {
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
                () = tx.closed() => return,
            }
        }
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}
