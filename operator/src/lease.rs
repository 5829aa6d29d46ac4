//! Leader election with a `coordination.k8s.io` Lease: one replica holds it and reconciles; the others wait and
//! take over when it stops renewing. Writes use the Lease's resourceVersion, so two candidates cannot both win,
//! and a leader that cannot renew steps down before its lease can expire ([`Leadership`]).

use std::time::{Duration, Instant};

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

/// Waits until this replica holds the lease; returns when the request that took it was sent (its renewal time).
pub async fn acquire(
    client: Client,
    namespace: &str,
    name: &str,
    identity: &str,
) -> Result<Instant, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    loop {
        let sent = Instant::now();
        if try_acquire(&api, name, identity).await? {
            tracing::info!(lease = name, identity, "leader");
            return Ok(sent);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// How a leader keeps its lease: it tries to renew every `retry`, and stops leading once `renew_deadline` has
/// passed since its last successful renewal (counted from when that request was sent). As in client-go, the
/// deadline is shorter than the lease, so a leader whose renewals fail has stopped before any standby can see its
/// lease expire and take over: two leaders never reconcile at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

/// 15 s leases, given up after 10 s without a renewal, renewed every 2 s (client-go's proportions).
pub const TIMING: Timing = Timing {
    lease: Duration::from_secs(LEASE_SECONDS as u64),
    renew_deadline: Duration::from_secs(10),
    retry: Duration::from_secs(2),
};

/// A leader's view of its lease (pure; the caller supplies the time).
#[derive(Debug, Clone, Copy)]
pub struct Leadership {
    timing: Timing,
    /// When the last renewal that succeeded was sent.
    renewed: Instant,
}

/// What a leader does after a renewal attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep leading; the next attempt gives up after this long (the time left before the deadline).
    Renew { within: Duration },
    /// Stop reconciling now: the deadline passed without a renewal, or another replica holds the lease.
    Stop,
}

impl Leadership {
    /// Leading since a renewal (or acquisition) sent at `sent`.
    pub fn new(timing: Timing, sent: Instant) -> Self {
        Self {
            timing,
            renewed: sent,
        }
    }

    /// The time left before the deadline at `now` (zero once it passed).
    pub fn left(&self, now: Instant) -> Duration {
        (self.renewed + self.timing.renew_deadline).saturating_duration_since(now)
    }

    /// Records the outcome of a renewal sent at `sent` and answered (or given up on) at `now`: `Some(true)`
    /// renewed, `Some(false)` the lease is another's, `None` the request failed or timed out.
    pub fn after(&mut self, sent: Instant, outcome: Option<bool>, now: Instant) -> Next {
        match outcome {
            Some(false) => return Next::Stop,
            Some(true) => self.renewed = self.renewed.max(sent),
            None => {}
        }
        match self.left(now) {
            left if left.is_zero() => Next::Stop,
            within => Next::Renew { within },
        }
    }
}

/// Renews the lease until it is lost; returns when this replica must stop reconciling: another replica took the
/// lease, or no renewal succeeded within the renew deadline (each attempt is cut off at the deadline, so a hung
/// API server cannot keep a leader that no longer holds its lease).
pub async fn hold(client: Client, namespace: String, name: String, identity: String, since: Instant) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut leader = Leadership::new(TIMING, since);
    loop {
        tokio::time::sleep(TIMING.retry.min(leader.left(Instant::now()))).await;
        let sent = Instant::now();
        let budget = leader.left(sent);
        let outcome = match tokio::time::timeout(budget, try_acquire(&api, &name, &identity)).await {
            Ok(Ok(held)) => Some(held),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "renewing the lease failed; retrying");
                None
            }
            Err(_) => {
                tracing::warn!("renewing the lease timed out");
                None
            }
        };
        match leader.after(sent, outcome, Instant::now()) {
            Next::Renew { .. } => {}
            Next::Stop if outcome == Some(false) => {
                tracing::error!(lease = %name, "lost the lease to another replica");
                return;
            }
            Next::Stop => {
                tracing::error!(lease = %name, "no renewal within the renew deadline: stepping down");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_renew_deadline_ends_leadership_before_the_lease_can_expire() {
        assert!(TIMING.renew_deadline + TIMING.retry < TIMING.lease, "{TIMING:?}");
    }

    /// The attack: the API server stops answering the leader (a partition), so its renewals fail while a
    /// standby that still reaches the API server waits for the lease to expire. The leader must have stopped by
    /// then.
    #[test]
    fn a_leader_whose_renewals_fail_stops_before_its_lease_expires() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut leader = Leadership::new(TIMING, t0);
        // Renewed at 2 s, then every attempt fails (errors, or a request that hangs until its budget runs out).
        assert!(matches!(
            leader.after(at(2), Some(true), at(2)),
            Next::Renew { .. }
        ));
        let mut stopped = None;
        let mut now = 2;
        while stopped.is_none() && now < 60 {
            let sent = now + 2;
            // A hung request is cut off at the deadline: it cannot end later than that.
            let budget = leader.left(at(sent)).as_secs();
            let answered = sent + budget.min(3);
            if leader.after(at(sent), None, at(answered)) == Next::Stop {
                stopped = Some(answered);
            }
            now = answered;
        }
        let stopped = stopped.expect("the leader never stopped");
        // The standby sees the lease expire 15 s after the last renewal (2 s) was written.
        let expires = 2 + TIMING.lease.as_secs();
        assert!(
            stopped <= 2 + TIMING.renew_deadline.as_secs(),
            "stopped at {stopped} s"
        );
        assert!(
            stopped < expires,
            "stopped at {stopped} s, the lease expired at {expires} s"
        );
    }

    #[test]
    fn renewals_keep_leadership_and_a_lease_taken_by_another_stops_it_at_once() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut leader = Leadership::new(TIMING, t0);
        for s in (2..100).step_by(2) {
            assert_eq!(
                leader.after(at(s), Some(true), at(s)),
                Next::Renew {
                    within: TIMING.renew_deadline
                }
            );
        }
        // One failure leaves time to retry; a renewal answered late counts from when it was sent.
        assert!(matches!(leader.after(at(100), None, at(101)), Next::Renew { .. }));
        assert_eq!(leader.left(at(101)), Duration::from_secs(7));
        assert_eq!(leader.after(at(102), Some(false), at(102)), Next::Stop);
    }
}
