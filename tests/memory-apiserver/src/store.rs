//! The objects and their history, and the write semantics of the real API server that camelid's controllers rely
//! on: resourceVersions (bumped only by a real change), generation (bumped by spec changes), the status
//! subresource, optimistic concurrency, server-side apply with per-manager field ownership and conflicts, JSON
//! merge patch, finalizers, and owner-reference garbage collection.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// A resource type as URLs name it: `api/v1` + `pods`, `apis/camelid.dev/v1alpha1` + `finetunejobs`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource {
    pub prefix: String,
    pub plural: String,
}

impl Resource {
    pub fn new(prefix: &str, plural: &str) -> Self {
        Self {
            prefix: prefix.trim_matches('/').to_string(),
            plural: plural.to_string(),
        }
    }

    /// The Kind of a list of these (`PodList`), for list responses.
    pub fn list_kind(&self) -> String {
        let kind = match self.plural.as_str() {
            "pods" => "Pod",
            "services" => "Service",
            "jobs" => "Job",
            "nodes" => "Node",
            "events" => "Event",
            "leases" => "Lease",
            "configmaps" => "ConfigMap",
            "secrets" => "Secret",
            "deployments" => "Deployment",
            "endpointslices" => "EndpointSlice",
            "poddisruptionbudgets" => "PodDisruptionBudget",
            "finetunejobs" => "FineTuneJob",
            "chatmodels" => "ChatModel",
            other => return format!("{}List", other.trim_end_matches('s')),
        };
        format!("{kind}List")
    }

    pub fn api_version(&self) -> String {
        self.prefix.strip_prefix("apis/").unwrap_or("v1").to_string()
    }
}

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub resource: Resource,
    pub namespace: Option<String>,
    pub name: String,
}

impl Key {
    /// `name` (in `namespace`, for a namespaced resource) of the resource served at `prefix`/`plural`, e.g.
    /// `Key::new("apis/apps/v1", "deployments", Some("default"), "web")`.
    pub fn new(prefix: &str, plural: &str, namespace: Option<&str>, name: &str) -> Self {
        Self {
            resource: Resource::new(prefix, plural),
            namespace: namespace.map(str::to_string),
            name: name.into(),
        }
    }
}

/// A watch event as the API server streams it.
#[derive(Debug, Clone)]
pub struct Change {
    pub resource_version: u64,
    pub resource: Resource,
    pub kind: &'static str,
    pub object: Value,
}

/// An API error: HTTP status, the Status `reason`, and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

#[derive(Debug, Clone, Default)]
struct Stored {
    object: Value,
    /// Leaf path → the field manager that owns it.
    owners: BTreeMap<String, String>,
}

/// How a write addresses the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

#[derive(Debug, Default)]
pub struct Store {
    objects: BTreeMap<Key, Stored>,
    pub history: Vec<Change>,
    revision: u64,
    /// Writes that changed an object, by resource plural and verb (`create`, `update`, `patch`, `apply`,
    /// `delete`).
    pub writes: BTreeMap<(String, &'static str), u64>,
    /// Writes that changed nothing (a no-op apply or patch).
    pub noop_writes: u64,
}

fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Leaf paths of `v` (objects descend; arrays and scalars are leaves), as `a.b.c`.
fn leaves(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(child, &path, out);
            }
        }
        _ => {
            if !prefix.is_empty() {
                out.insert(prefix.to_string());
            }
        }
    }
}

fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn remove_path(v: &mut Value, path: &str) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut cur = v;
    for p in parts {
        match cur.get_mut(p) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(map) = cur.as_object_mut() {
        map.remove(last);
    }
}

/// RFC 7386 JSON merge patch (also used to merge applied configuration: `null` removes).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(map) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in map {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Whether `labels` match a Kubernetes label selector (`a=b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`).
pub fn selector_matches(selector: &str, labels: &Map<String, Value>) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            let set = |rest: &str| -> Vec<String> {
                rest.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect()
            };
            if let Some((k, v)) = term.split_once("!=") {
                get(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                get(k.trim()) == Some(v.trim())
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                get(k.trim()).is_none_or(|v| !set(rest).iter().any(|s| s == v))
            } else if let Some((k, rest)) = term.split_once(" in ") {
                get(k.trim()).is_some_and(|v| set(rest).iter().any(|s| s == v))
            } else if let Some(k) = term.strip_prefix('!') {
                get(k.trim()).is_none()
            } else {
                get(term).is_some()
            }
        })
}

impl Store {
    fn count(&mut self, resource: &Resource, verb: &'static str) {
        *self.writes.entry((resource.plural.clone(), verb)).or_default() += 1;
    }

    /// Writes that changed objects of `plural`.
    pub fn writes_to(&self, plural: &str) -> u64 {
        self.writes
            .iter()
            .filter(|((p, _), _)| p == plural)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn record(&mut self, resource: &Resource, kind: &'static str, object: &Value) {
        self.history.push(Change {
            resource_version: self.revision,
            resource: resource.clone(),
            kind,
            object: object.clone(),
        });
    }

    fn bump(&mut self, object: &mut Value) {
        self.revision += 1;
        object["metadata"]["resourceVersion"] = Value::String(self.revision.to_string());
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key).map(|s| &s.object)
    }

    /// Objects of `resource` in `namespace` (all namespaces when `None`) matching `selector`.
    pub fn list(&self, resource: &Resource, namespace: Option<&str>, selector: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| {
                k.resource == *resource && namespace.is_none_or(|ns| k.namespace.as_deref() == Some(ns))
            })
            .map(|(_, s)| &s.object)
            .filter(|o| {
                selector.is_none_or(|sel| {
                    let empty = Map::new();
                    selector_matches(sel, o["metadata"]["labels"].as_object().unwrap_or(&empty))
                })
            })
            .cloned()
            .collect()
    }

    /// Creates `object` at `key`; 409 if it exists.
    pub fn create(&mut self, key: &Key, mut object: Value, manager: &str) -> Result<Value, ApiError> {
        if self.objects.contains_key(key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", key.resource.plural, key.name),
            ));
        }
        if !object.is_object() {
            return Err(ApiError::new(400, "BadRequest", "the body is not an object"));
        }
        // The manager owns what it sent, not what the server adds.
        let mut owned = BTreeSet::new();
        leaves(&object, "", &mut owned);
        owned.retain(|p| {
            !matches!(
                p.as_str(),
                "apiVersion" | "kind" | "metadata.name" | "metadata.namespace"
            )
        });
        let meta = &mut object["metadata"];
        meta["name"] = Value::String(key.name.clone());
        if let Some(ns) = &key.namespace {
            meta["namespace"] = Value::String(ns.clone());
        }
        meta["uid"] = Value::String(uuid::Uuid::new_v4().to_string());
        meta["creationTimestamp"] = Value::String(now());
        meta["generation"] = json!(1);
        self.bump(&mut object);
        let owners = owned.into_iter().map(|p| (p, manager.to_string())).collect();
        self.objects.insert(
            key.clone(),
            Stored {
                object: object.clone(),
                owners,
            },
        );
        self.record(&key.resource, "ADDED", &object);
        self.count(&key.resource, "create");
        Ok(object)
    }

    /// Stores `next` as the new state of `key` if it differs: bumps resourceVersion (and generation when the spec
    /// changed) and records MODIFIED. Returns the stored object.
    fn commit(
        &mut self,
        key: &Key,
        mut next: Value,
        owners: BTreeMap<String, String>,
        verb: &'static str,
    ) -> Value {
        let Some(stored) = self.objects.get(key) else {
            return next;
        };
        let before = stored.object.clone();
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("resourceVersion");
                m.remove("generation");
            }
            v
        };
        if strip(&before) == strip(&next) {
            self.noop_writes += 1;
            if let Some(s) = self.objects.get_mut(key) {
                s.owners = owners;
            }
            return before;
        }
        let generation = before["metadata"]["generation"].as_i64().unwrap_or(1);
        let spec_changed = before.get("spec") != next.get("spec");
        next["metadata"]["generation"] = json!(if spec_changed { generation + 1 } else { generation });
        self.bump(&mut next);
        self.objects.insert(
            key.clone(),
            Stored {
                object: next.clone(),
                owners,
            },
        );
        self.record(&key.resource, "MODIFIED", &next);
        self.count(&key.resource, verb);
        next
    }

    fn existing(&self, key: &Key) -> Result<&Stored, ApiError> {
        self.objects.get(key).ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("{} \"{}\" not found", key.resource.plural, key.name),
            )
        })
    }

    /// PUT: replaces the object (or its status) if `resourceVersion` matches; 409 Conflict otherwise.
    pub fn replace(&mut self, key: &Key, body: Value, part: Part, manager: &str) -> Result<Value, ApiError> {
        let stored = self.existing(key)?.clone();
        let current = &stored.object;
        let sent_rv = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !sent_rv.is_empty() && sent_rv != current["metadata"]["resourceVersion"].as_str().unwrap_or("") {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    key.resource.plural, key.name
                ),
            ));
        }
        let mut next = current.clone();
        match part {
            Part::Status => next["status"] = body.get("status").cloned().unwrap_or(Value::Null),
            Part::Main => {
                // The body's metadata wins except for what the server manages; status only via /status.
                next = body;
                if !next["metadata"].is_object() {
                    next["metadata"] = json!({});
                }
                for field in [
                    "name",
                    "namespace",
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "resourceVersion",
                    "deletionTimestamp",
                ] {
                    match current["metadata"].get(field) {
                        Some(v) => next["metadata"][field] = v.clone(),
                        None => remove_path(&mut next, &format!("metadata.{field}")),
                    }
                }
                match current.get("status") {
                    Some(status) => next["status"] = status.clone(),
                    None => remove_path(&mut next, "status"),
                }
            }
        }
        let owners = self.owners_after(&stored, &next, manager);
        Ok(self.commit(key, next, owners, "update"))
    }

    fn owners_after(&self, stored: &Stored, next: &Value, manager: &str) -> BTreeMap<String, String> {
        let mut owners = stored.owners.clone();
        let mut now_leaves = BTreeSet::new();
        leaves(next, "", &mut now_leaves);
        owners.retain(|p, _| now_leaves.contains(p));
        for p in now_leaves {
            if get_path(&stored.object, &p) != get_path(next, &p) {
                owners.insert(p, manager.to_string());
            }
        }
        owners
    }

    /// A JSON merge patch (strategic merge patches are treated the same: lists are replaced whole).
    pub fn merge(&mut self, key: &Key, patch: &Value, part: Part, manager: &str) -> Result<Value, ApiError> {
        let stored = self.existing(key)?.clone();
        let mut next = stored.object.clone();
        match part {
            Part::Status => {
                if let Some(status) = patch.get("status") {
                    merge_patch(&mut next["status"], status);
                }
            }
            Part::Main => {
                let mut p = patch.clone();
                if let Some(m) = p.as_object_mut() {
                    m.remove("status");
                }
                merge_patch(&mut next, &p);
            }
        }
        let owners = self.owners_after(&stored, &next, manager);
        Ok(self.commit(key, next, owners, "patch"))
    }

    /// Server-side apply by `manager`: creates the object if missing; otherwise fields the manager applied before
    /// and no longer applies are removed (unless another manager owns them), fields another manager owns with a
    /// different value are a 409 conflict unless `force`, and the applied fields become the manager's.
    /// Lists are atomic (owned and replaced whole).
    pub fn apply(
        &mut self,
        key: &Key,
        config: &Value,
        part: Part,
        manager: &str,
        force: bool,
    ) -> Result<Value, ApiError> {
        if manager.is_empty() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "fieldManager is required for apply patch",
            ));
        }
        // Only the addressed part: the status for /status, everything else otherwise.
        let config = match part {
            Part::Status => json!({"status": config.get("status").cloned().unwrap_or(Value::Null)}),
            Part::Main => {
                let mut v = config.clone();
                if let Some(m) = v.as_object_mut() {
                    m.remove("status");
                }
                v
            }
        };
        if !self.objects.contains_key(key) {
            let mut fresh = config.clone();
            if part == Part::Status {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("{} \"{}\" not found", key.resource.plural, key.name),
                ));
            }
            for (k, v) in [("apiVersion", json!(key.resource.api_version()))] {
                if fresh.get(k).is_none() {
                    fresh[k] = v;
                }
            }
            return self.create(key, fresh, manager);
        }
        let stored = self.existing(key)?.clone();
        let mut applied = BTreeSet::new();
        leaves(&config, "", &mut applied);
        applied.retain(|p| {
            !matches!(
                p.as_str(),
                "apiVersion" | "kind" | "metadata.name" | "metadata.namespace"
            )
        });
        let conflicts: Vec<String> = applied
            .iter()
            .filter(|p| {
                stored.owners.get(*p).is_some_and(|m| m != manager)
                    && get_path(&stored.object, p).is_some()
                    && get_path(&stored.object, p) != get_path(&config, p)
            })
            .map(|p| format!(".{p} (owned by {})", stored.owners[p]))
            .collect();
        if !conflicts.is_empty() && !force {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflicts: {}",
                    conflicts.len(),
                    conflicts.join(", ")
                ),
            ));
        }
        let mut next = stored.object.clone();
        let mut owners = stored.owners.clone();
        // Ownership is per subresource (as managedFields entries are): applying the status never takes back what
        // the same manager applied to the main resource, nor the other way round.
        let in_part = |p: &str| (p == "status" || p.starts_with("status.")) == (part == Part::Status);
        let previously: Vec<String> = owners
            .iter()
            .filter(|(p, m)| *m == manager && in_part(p))
            .map(|(p, _)| p.clone())
            .collect();
        for p in previously {
            if !applied.contains(&p) {
                remove_path(&mut next, &p);
                owners.remove(&p);
            }
        }
        merge_patch(&mut next, &config);
        for p in applied {
            owners.insert(p, manager.to_string());
        }
        Ok(self.commit(key, next, owners, "apply"))
    }

    /// Deletes `key`: with finalizers it only gets a deletionTimestamp; otherwise it is removed, and so (as the
    /// garbage collector would) is everything that names it in ownerReferences.
    pub fn delete(&mut self, key: &Key) -> Result<Value, ApiError> {
        let stored = self.existing(key)?.clone();
        let mut object = stored.object.clone();
        let has_finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if object["metadata"].get("deletionTimestamp").is_none() {
                object["metadata"]["deletionTimestamp"] = Value::String(now());
                return Ok(self.commit(key, object, stored.owners, "delete"));
            }
            return Ok(object);
        }
        self.objects.remove(key);
        self.bump(&mut object);
        self.record(&key.resource, "DELETED", &object);
        self.count(&key.resource, "delete");
        if let Some(uid) = object["metadata"]["uid"].as_str() {
            let dependents: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, s)| {
                    s.object["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for dependent in dependents {
                let _ = self.delete(&dependent);
            }
        }
        Ok(object)
    }
}
