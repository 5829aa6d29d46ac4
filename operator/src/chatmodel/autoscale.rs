//! Request-driven autoscaling as a pure function: the gateways' in-flight and queued requests for a model in,
//! desired replicas and the reason out. Up is immediate (a queue means users wait); down takes the highest
//! recommendation of the last `scaleDownDelay` (Kubernetes HPA's stabilization window), so a brief lull or a
//! flapping load never removes a replica that is needed again a moment later; zero needs `scaleToZero` and a
//! whole idle window; from zero one queued request is enough. With `autoscaling.enabled` off the replicas are
//! `replicas.desired` (what `kubectl scale`, an HPA or KEDA wrote through `/scale`) within `[min, max]`.

use std::collections::VecDeque;

use camelid_contracts::load::ModelLoad;
use camelid_crds::ChatModel;
use camelid_crds::common::parse_duration;

/// The scaling bounds and targets of one ChatModel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The built-in autoscaler decides; false: `desired` does.
    pub enabled: bool,
    /// `replicas.desired`: what to run while the autoscaler is off.
    pub desired: i32,
    pub min: i32,
    pub max: i32,
    pub target_in_flight: i32,
    pub scale_down_delay_secs: i64,
    pub scale_to_zero: bool,
}

impl Policy {
    /// The policy of `model`; `None` when its `scaleDownDelay` is not a duration.
    pub fn of(model: &ChatModel) -> Option<Self> {
        let s = &model.spec;
        Some(Self {
            enabled: s.autoscaling.enabled,
            desired: s.replicas.desired,
            min: s.replicas.min.max(0),
            max: s.replicas.max.max(1),
            target_in_flight: s.autoscaling.target_in_flight.max(1),
            scale_down_delay_secs: i64::try_from(parse_duration(&s.autoscaling.scale_down_delay)?).ok()?,
            scale_to_zero: s.autoscaling.scale_to_zero,
        })
    }

    /// The fewest replicas while requests are in flight or queued.
    fn busy_floor(&self) -> i32 {
        self.min.max(1).min(self.max)
    }

    /// The fewest replicas when idle.
    fn idle_floor(&self) -> i32 {
        if self.scale_to_zero && self.min == 0 {
            0
        } else {
            self.busy_floor()
        }
    }
}

/// Recent recommendations of one model (kept by the controller between reconciles, lost on restart: a restarted
/// operator waits one whole window before scaling down).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// When the history began (seconds since the epoch).
    since: Option<i64>,
    samples: VecDeque<(i64, i32)>,
}

/// The replicas to run and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub replicas: i32,
    pub reason: String,
}

/// The replicas `policy` wants given `load` (`None` when no gateway reported), the `current` replicas and the
/// recent `history`, at `now` (seconds).
pub fn decide(
    policy: &Policy,
    current: i32,
    load: Option<ModelLoad>,
    history: &mut History,
    now: i64,
) -> Decision {
    if !policy.enabled {
        // Forgotten: were the autoscaler turned back on, it would otherwise scale down on recommendations made
        // before it was off. It waits one whole window instead, as after a restart.
        *history = History::default();
        return fixed(policy);
    }
    let since = *history.since.get_or_insert(now);
    let Some(load) = load else {
        let replicas = current.clamp(policy.idle_floor(), policy.max);
        return Decision {
            replicas,
            reason: if replicas == current {
                format!("no load reports from the gateways: keeping {current}")
            } else {
                format!(
                    "no load reports from the gateways: {current} is outside [{}, {}]",
                    policy.min, policy.max
                )
            },
        };
    };
    let demand = i64::from(load.in_flight) + i64::from(load.queued);
    let wanted = if demand == 0 {
        policy.idle_floor()
    } else {
        let raw = (demand + i64::from(policy.target_in_flight) - 1) / i64::from(policy.target_in_flight);
        i32::try_from(raw)
            .unwrap_or(i32::MAX)
            .clamp(policy.busy_floor(), policy.max)
    };
    history.samples.push_back((now, wanted));
    while history
        .samples
        .front()
        .is_some_and(|(t, _)| *t < now - policy.scale_down_delay_secs)
    {
        history.samples.pop_front();
    }
    let load_text = format!(
        "{} in flight, {} queued, target {} per replica",
        load.in_flight, load.queued, policy.target_in_flight
    );
    if wanted >= current {
        let reason = if wanted == current {
            format!("{load_text}: {current} is right")
        } else if current == 0 {
            format!(
                "{} requests waiting at zero replicas: starting {wanted}",
                load.queued + load.in_flight
            )
        } else {
            format!("{load_text}: up from {current} to {wanted}")
        };
        return Decision {
            replicas: wanted,
            reason,
        };
    }
    if current > policy.max {
        return Decision {
            replicas: policy.max,
            reason: format!("replicas.max is {}: down from {current}", policy.max),
        };
    }
    // Down only to the highest recommendation of a window the history covers whole.
    if now - since < policy.scale_down_delay_secs {
        return Decision {
            replicas: current,
            reason: format!(
                "{load_text}: {wanted} would do, but the load has not been watched for the whole scale-down delay"
            ),
        };
    }
    let stable = history.samples.iter().map(|(_, r)| *r).max().unwrap_or(current);
    if stable >= current {
        return Decision {
            replicas: current,
            reason: format!(
                "{load_text}: {wanted} would do now, but {stable} were needed within the scale-down delay"
            ),
        };
    }
    Decision {
        replicas: stable,
        reason: if stable == 0 {
            format!("idle for {}s: scaled to zero", policy.scale_down_delay_secs)
        } else {
            format!(
                "{load_text}: {stable} have been enough for {}s: down from {current}",
                policy.scale_down_delay_secs
            )
        },
    }
}

/// With the autoscaler off: `replicas.desired` within `[min, max]`. A value outside is not refused (an HPA or
/// KEDA with wider bounds of their own would fail to write it): the nearest bound is run, and the reason says so.
fn fixed(policy: &Policy) -> Decision {
    let replicas = policy.desired.clamp(policy.min.min(policy.max), policy.max);
    let reason = if replicas == policy.desired {
        format!("autoscaling is off: replicas.desired is {replicas}")
    } else {
        format!(
            "autoscaling is off: replicas.desired {} is outside [{}, {}], running {replicas}",
            policy.desired, policy.min, policy.max
        )
    };
    Decision { replicas, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        enabled: true,
        desired: 1,
        min: 1,
        max: 4,
        target_in_flight: 8,
        scale_down_delay_secs: 300,
        scale_to_zero: false,
    };

    const TO_ZERO: Policy = Policy {
        min: 0,
        scale_to_zero: true,
        ..POLICY
    };

    fn load(in_flight: u32, queued: u32) -> Option<ModelLoad> {
        Some(ModelLoad {
            in_flight,
            queued,
            migrations: 0,
        })
    }

    /// Runs a load trace (second, load) from `start` replicas; returns the replicas after each step.
    fn trace(policy: &Policy, start: i32, steps: &[(i64, Option<ModelLoad>)]) -> Vec<i32> {
        let mut history = History::default();
        let mut current = start;
        steps
            .iter()
            .map(|(t, l)| {
                current = decide(policy, current, *l, &mut history, *t).replicas;
                current
            })
            .collect()
    }

    #[test]
    fn a_burst_scales_up_at_once_and_down_only_after_the_delay() {
        let steps = [
            (0, load(2, 0)),
            (10, load(30, 0)),   // 30 / 8 → 4
            (20, load(100, 20)), // capped at max
            (30, load(3, 0)),    // needs 1, but 4 were needed 10 s ago
            (200, load(3, 0)),
            (331, load(3, 0)), // the burst at 20 s has left the window: down to 1
        ];
        assert_eq!(trace(&POLICY, 1, &steps), [1, 4, 4, 4, 4, 1]);
    }

    #[test]
    fn a_flapping_load_keeps_the_replicas_it_needs_at_its_peaks() {
        let steps: Vec<_> = (0..40)
            .map(|i| (i * 30, if i % 2 == 0 { load(24, 0) } else { load(0, 0) }))
            .collect();
        let replicas = trace(&POLICY, 1, &steps);
        assert!(replicas.iter().skip(1).all(|r| *r == 3), "{replicas:?}");
    }

    #[test]
    fn idle_scales_to_zero_only_when_allowed_and_only_after_a_whole_idle_window() {
        let idle: Vec<_> = (0..=7).map(|i| (i * 60, load(0, 0))).collect();
        assert_eq!(trace(&TO_ZERO, 1, &idle), [1, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(
            trace(&POLICY, 1, &idle),
            [1; 8],
            "min 1 without scaleToZero never reaches zero"
        );
    }

    #[test]
    fn one_queued_request_brings_a_model_back_from_zero() {
        let mut history = History::default();
        let d = decide(&TO_ZERO, 0, load(0, 1), &mut history, 1000);
        assert_eq!(d.replicas, 1);
        assert!(d.reason.contains("waiting at zero replicas"), "{}", d.reason);
        let d = decide(&TO_ZERO, 0, load(0, 40), &mut history, 1001);
        assert_eq!(
            d.replicas, 4,
            "a large queue at zero starts enough replicas at once"
        );
    }

    #[test]
    fn without_load_reports_nothing_changes_but_bounds_still_hold() {
        let mut history = History::default();
        assert_eq!(decide(&POLICY, 3, None, &mut history, 0).replicas, 3);
        assert_eq!(decide(&POLICY, 9, None, &mut history, 1).replicas, 4);
        assert_eq!(decide(&POLICY, 0, None, &mut history, 2).replicas, 1);
    }

    #[test]
    fn a_restarted_operator_waits_a_whole_window_before_scaling_down() {
        let mut history = History::default();
        let d = decide(&POLICY, 4, load(1, 0), &mut history, 5000);
        assert_eq!(d.replicas, 4);
        assert!(d.reason.contains("whole scale-down delay"), "{}", d.reason);
        assert_eq!(decide(&POLICY, 4, load(1, 0), &mut history, 5301).replicas, 1);
    }

    #[test]
    fn lowering_max_takes_effect_at_once() {
        let mut history = History::default();
        let d = decide(&POLICY, 7, load(100, 0), &mut history, 0);
        assert_eq!(d.replicas, 4);
    }

    #[test]
    fn policy_reads_the_spec() {
        let model: ChatModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel", "metadata": {"name": "m"},
            "spec": {"model": {"path": "/m"}, "replicas": {"min": 0, "max": 3},
                     "autoscaling": {"scaleDownDelay": "1m30s", "scaleToZero": true, "targetInFlight": 4}}
        }))
        .unwrap();
        let p = Policy::of(&model).unwrap();
        assert_eq!(
            (p.min, p.max, p.target_in_flight, p.scale_down_delay_secs),
            (0, 3, 4, 90)
        );
        assert!(p.scale_to_zero);
    }

    const FIXED: Policy = Policy {
        enabled: false,
        desired: 3,
        ..POLICY
    };

    #[test]
    fn with_autoscaling_off_the_desired_replicas_run_whatever_the_load() {
        let mut history = History::default();
        for (current, l) in [(1, load(100, 50)), (4, load(0, 0)), (0, None)] {
            let d = decide(&FIXED, current, l, &mut history, 0);
            assert_eq!(d.replicas, 3, "from {current} with {l:?}");
            assert_eq!(d.reason, "autoscaling is off: replicas.desired is 3");
        }
    }

    #[test]
    fn with_autoscaling_off_desired_is_clamped_to_the_bounds() {
        let mut history = History::default();
        let high = Policy { desired: 9, ..FIXED };
        let d = decide(&high, 3, None, &mut history, 0);
        assert_eq!(d.replicas, 4);
        assert!(d.reason.contains("outside [1, 4], running 4"), "{}", d.reason);
        let low = Policy { desired: 0, ..FIXED };
        assert_eq!(decide(&low, 3, None, &mut history, 0).replicas, 1);
        let to_zero = Policy {
            desired: 0,
            min: 0,
            ..FIXED
        };
        assert_eq!(
            decide(&to_zero, 3, None, &mut history, 0).replicas,
            0,
            "min 0 lets an HPA or KEDA scale to zero without scaleToZero"
        );
    }

    #[test]
    fn turning_the_autoscaler_back_on_waits_a_whole_window_before_scaling_down() {
        let mut history = History::default();
        assert_eq!(decide(&POLICY, 1, load(32, 0), &mut history, 0).replicas, 4);
        assert_eq!(decide(&FIXED, 4, load(0, 0), &mut history, 400).replicas, 3);
        // Back on at 1000, idle: the old samples and start are gone, so nothing is removed until 1300.
        assert_eq!(decide(&POLICY, 3, load(1, 0), &mut history, 1000).replicas, 3);
        assert_eq!(decide(&POLICY, 3, load(1, 0), &mut history, 1299).replicas, 3);
        assert_eq!(decide(&POLICY, 3, load(1, 0), &mut history, 1300).replicas, 1);
    }

    #[test]
    fn policy_reads_the_switch_and_the_desired_replicas() {
        let model: ChatModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel", "metadata": {"name": "m"},
            "spec": {"model": {"path": "/m"}, "replicas": {"min": 0, "max": 3, "desired": 2},
                     "autoscaling": {"enabled": false}}
        }))
        .unwrap();
        let p = Policy::of(&model).unwrap();
        assert_eq!((p.enabled, p.desired), (false, 2));
        let model: ChatModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel", "metadata": {"name": "m"},
            "spec": {"model": {"path": "/m"}}
        }))
        .unwrap();
        let p = Policy::of(&model).unwrap();
        assert_eq!((p.enabled, p.desired), (true, 1), "the defaults");
    }
}
