//! Leader election with a `coordination.k8s.io` Lease: one replica holds it and reconciles; the others wait and
//! take over when it stops renewing. Writes use the Lease's resourceVersion, so two candidates cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};

/// How long a lease lasts without renewal.
pub const LEASE_SECONDS: i32 = 15;

fn expired(spec: &LeaseSpec, now: jiff::Timestamp) -> bool {
    let renewed = spec.renew_time.as_ref().map(|t| t.0);
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
    renewed.is_none_or(|r| (now - r).get_seconds() > duration)
}

/// Takes the lease if it is free, expired, or already ours; true when we hold it afterwards.
pub async fn try_acquire(api: &Api<Lease>, name: &str, identity: &str) -> Result<bool, kube::Error> {
    let now = jiff::Timestamp::now();
    let ours = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(ours(0, None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let mine = spec.holder_identity.as_deref() == Some(identity);
            if !mine && !expired(&spec, now) {
                return Ok(false);
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
            lease.spec = Some(ours(transitions, if mine { spec.acquire_time } else { None }));
            match api.replace(name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(client: Client, namespace: &str, name: &str, identity: &str) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    loop {
        if try_acquire(&api, name, identity).await? {
            tracing::info!(lease = name, identity, "leader");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Renews the lease until renewal fails; returns when leadership is lost.
pub async fn hold(client: Client, namespace: String, name: String, identity: String) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let period = Duration::from_secs((LEASE_SECONDS / 3).max(1) as u64);
    loop {
        tokio::time::sleep(period).await;
        match try_acquire(&api, &name, &identity).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(lease = %name, "lost the lease to another replica");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "renewing the lease failed; retrying"),
        }
    }
}
