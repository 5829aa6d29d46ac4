//! What every reconcile does, whichever controller runs it: the guard around it (an object that cannot be read,
//! the duration metric), the error policy (an invalid spec waits for a change, anything else is retried with a
//! backoff), and the API steps of the pipeline (fetch a fresh copy, apply a child, delete one that may already be
//! gone, write status and record an Event). It exists so that the FineTuneJob and ChatModel controllers guard,
//! count, log and retry the same way, and write with the same field manager.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::core::{DeserializeGuard, NamespaceResourceScope};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::Instrument;

use crate::MANAGER;
use crate::error::Error;
use crate::metrics::Metrics;

/// How long a transient error waits before the reconcile is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What the shared guard and error policy need of a controller's context.
pub trait Controlled: Send + Sync + 'static {
    fn client(&self) -> &Client;
    fn recorder(&self) -> &Recorder;
    fn metrics(&self) -> &Metrics;
}

/// An Event to record on the reconciled object once its status is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub type_: EventType,
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, message: String) -> Self {
        Self {
            type_: EventType::Normal,
            reason,
            message,
        }
    }

    pub fn warning(reason: &'static str, message: String) -> Self {
        Self {
            type_: EventType::Warning,
            reason,
            message,
        }
    }
}

/// The Event recorder of a controller: reported as [`MANAGER`], from this pod (`POD_NAME`) when known.
pub fn recorder(client: &Client) -> Recorder {
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    Recorder::new(client.clone(), reporter)
}

/// An HTTP client that gives up after `timeout`. Building one fails only when its TLS backend cannot start; the
/// caller then fails too, rather than reading with a client that never times out.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder().timeout(timeout).build()
}

/// Runs `steps` on the object the controller was woken for, in a `reconcile` span, counting how long it took. An object that cannot be
/// read (a malformed spec, written before a schema change) gets a Warning Event and waits for a change: it must
/// not break the watch of the others.
pub async fn guarded<'a, K, C, F, Fut>(
    guarded: &'a DeserializeGuard<K>,
    ctx: &C,
    steps: F,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>,
    C: Controlled,
    F: FnOnce(&'a K) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    let started = Instant::now();
    let object = match &guarded.0 {
        Ok(object) => object,
        Err(_) => {
            let kind = K::kind(&());
            crate::events::invalid_spec(ctx.recorder(), ctx.metrics(), &kind, guarded).await;
            return Ok(Action::await_change());
        }
    };
    // One span per reconcile, named by object: every API call and Event it makes is inside it (and exported over
    // OTLP when the operator has an endpoint).
    let span = tracing::info_span!(
        "reconcile",
        kind = %K::kind(&()),
        namespace = object.meta().namespace.as_deref().unwrap_or_default(),
        name = object.meta().name.as_deref().unwrap_or_default(),
    );
    let result = steps(object).instrument(span).await;
    ctx.metrics().reconciled(started.elapsed());
    result
}

/// The error policy of both controllers: the error is counted by category and logged; an invalid spec waits for
/// a change, anything else is retried after [`RETRY_AFTER`].
pub fn error_policy<K, C>(object: Arc<DeserializeGuard<K>>, error: &Error, ctx: Arc<C>) -> Action
where
    K: Resource<DynamicType = ()>,
    C: Controlled,
{
    let kind: &str = &K::kind(&());
    let name = object.name_any();
    ctx.metrics().reconcile_error(error.category());
    tracing::warn!(kind, name, category = error.category(), error = %error, "reconcile failed");
    if error.is_invalid_spec() {
        Action::await_change()
    } else {
        Action::requeue(RETRY_AFTER)
    }
}

/// The Api of `K` in `object`'s namespace.
pub fn namespaced<K, O>(client: &Client, object: &O) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
    O: Resource,
{
    Api::namespaced(client.clone(), &object.namespace().unwrap_or_default())
}

/// Fetch: `cached` as the API server has it now, or `None` once it is gone. The watch cache may not have this
/// controller's own last status write yet, and acting on an older status would repeat what it already did.
pub async fn fetch<K>(client: &Client, cached: &K) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
{
    Ok(namespaced::<K, K>(client, cached)
        .get_opt(&cached.name_any())
        .await?)
}

/// Applies `object` as `name` by server-side apply, as [`MANAGER`], taking over conflicting fields.
pub async fn apply<K, P>(api: &Api<K>, name: &str, object: &P) -> Result<(), Error>
where
    K: Clone + DeserializeOwned + Debug,
    P: Serialize + Debug,
{
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(object))
        .await?;
    Ok(())
}

/// [`apply`] under field manager `manager`: for fields several writers share by list-map key (each keeps its
/// own entries).
pub async fn apply_as<K, P>(api: &Api<K>, name: &str, object: &P, manager: &str) -> Result<(), Error>
where
    K: Clone + DeserializeOwned + Debug,
    P: Serialize + Debug,
{
    api.patch(name, &PatchParams::apply(manager).force(), &Patch::Apply(object))
        .await?;
    Ok(())
}

/// Whether `meta` names `owner_uid` as its controller.
pub fn controlled_by(meta: &ObjectMeta, owner_uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == owner_uid)
}

/// Applies `object`, a child of `owner`, as `name` (see [`apply`]), but only over an object `owner` controls: an
/// object of that name that something else made (a user, another controller) is left alone and
/// [`Error::NotOwned`] returned. The apply carries the resourceVersion that was checked, so an object replaced in
/// between fails with a conflict instead of being taken over.
pub async fn apply_owned<K, O>(api: &Api<K>, name: &str, object: &K, owner: &O) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
    O: Resource<DynamicType = ()>,
{
    let owner_uid = owner.meta().uid.clone().unwrap_or_default();
    match api.get_opt(name).await? {
        None => apply(api, name, object).await,
        Some(existing) if controlled_by(existing.meta(), &owner_uid) => {
            let mut patch = serde_json::to_value(object).map_err(|e| Error::Invalid(e.to_string()))?;
            patch["metadata"]["resourceVersion"] = json!(existing.meta().resource_version);
            apply(api, name, &patch).await
        }
        Some(_) => Err(not_owned::<K, O>(name, owner)),
    }
}

/// [`Error::NotOwned`] for `name`, a `K` in the place of a child of `owner`.
pub fn not_owned<K, O>(name: &str, owner: &O) -> Error
where
    K: Resource<DynamicType = ()>,
    O: Resource<DynamicType = ()>,
{
    Error::NotOwned {
        kind: K::kind(&()).into_owned(),
        name: name.into(),
        owner: format!(
            "{} {}",
            O::kind(&()),
            owner.meta().name.as_deref().unwrap_or_default()
        ),
    }
}

/// Deletes `name` if `owner_uid` controls it (with that object's uid as a precondition); one that is gone, or
/// that something else made under the name, is left as it is.
pub async fn delete_owned<K>(
    api: &Api<K>,
    name: &str,
    owner_uid: &str,
    params: &DeleteParams,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let Some(existing) = api.get_opt(name).await? else {
        return Ok(());
    };
    if !controlled_by(existing.meta(), owner_uid) {
        tracing::warn!(kind = %K::kind(&()), name, "not deleting an object this resource does not control");
        return Ok(());
    }
    let mut params = params.clone();
    params.preconditions = Some(Preconditions {
        uid: existing.meta().uid.clone(),
        resource_version: None,
    });
    delete(api, name, &params).await
}

/// Deletes `name`, which may be gone already: a 404 is success, any other error is returned.
pub async fn delete<K>(api: &Api<K>, name: &str, params: &DeleteParams) -> Result<(), Error>
where
    K: Clone + DeserializeOwned + Debug,
{
    match api.delete(name, params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Status: writes `status` to `object` when it differs from `old` (so steady reconciles write nothing), then
/// records `note`, if any.
pub async fn write_status<K, S>(
    ctx: &impl Controlled,
    object: &K,
    old: &S,
    status: &S,
    note: Option<Note>,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if status != old {
        let patch = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
        namespaced::<K, K>(ctx.client(), object)
            .patch_status(
                &object.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
    }
    if let Some(note) = note {
        crate::events::publish(
            ctx.recorder(),
            &object.object_ref(&()),
            note.type_,
            note.reason,
            note.message,
        )
        .await;
    }
    Ok(())
}

/// A status the operator can record a refusal in. Both CRs' statuses are, so that [`refuse`] writes, counts and
/// tells of a refusal the same way for either.
pub trait Refusable: Serialize + PartialEq + Clone {
    /// The conditions the `Admitted` one is kept in.
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;

    /// Shows `message` wherever else the status says what is wrong; by default nowhere.
    fn show_refusal(&mut self, _message: &str) {}
}

/// The operator will not act on `object` (`reason`: `PolicyDenied` or `NameConflict`): the `Admitted` condition
/// says why, with a Warning Event when that is new; nothing else in the status changes but what
/// [`Refusable::show_refusal`] adds.
pub async fn refuse<K, S>(
    ctx: &impl Controlled,
    object: &K,
    old: &S,
    reason: &'static str,
    message: &str,
    now: jiff::Timestamp,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    S: Refusable,
{
    let mut status = old.clone();
    let new = crate::conditions::refuse(
        status.conditions_mut(),
        reason,
        message,
        &Time(now),
        object.meta().generation,
    );
    status.show_refusal(message);
    ctx.metrics().reconcile_error(if reason == "PolicyDenied" {
        "policy_denied"
    } else {
        "not_owned"
    });
    tracing::warn!(name = %object.name_any(), reason, message, "refused");
    let note = new.then(|| Note::warning(reason, message.to_string()));
    write_status(ctx, object, old, &status, note).await
}
