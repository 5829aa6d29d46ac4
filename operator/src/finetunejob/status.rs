//! Status arithmetic, pure: the trainer's `/progress` document into status fields, GPU-hours on spot and on
//! on-demand capacity, lost GPU-hours, and the cost from the GPU prices ConfigMap.

use std::collections::BTreeMap;

use camelid_crds::finetunejob::{CheckpointRef, FineTuneJobStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::placement::Capacity;

pub use camelid_contracts::progress::Progress;

/// Copies what the trainer reports into `status`.
pub fn apply_progress(status: &mut FineTuneJobStatus, p: &Progress) {
    let step = i64::try_from(p.step).unwrap_or(i64::MAX);
    let total = i64::try_from(p.total_steps).unwrap_or(i64::MAX);
    status.step = Some(step);
    status.total_steps = Some(total);
    status.progress = Some(if total > 0 {
        format!("{step}/{total} ({}%)", step * 100 / total)
    } else {
        format!("{step}")
    });
    status.epoch = Some(round(p.epoch, 3));
    status.loss = p.loss.map(|l| round(l, 4));
    status.tokens_per_second = Some(round(p.tokens_per_second, 1));
    status.eta_seconds = p.eta_seconds.map(|s| s.round() as i64);
    if let Some(c) = &p.last_checkpoint
        && let Ok(time) = c.time.parse::<jiff::Timestamp>()
    {
        status.last_checkpoint = Some(CheckpointRef {
            step: i64::try_from(c.step).unwrap_or(i64::MAX),
            time: Time(time),
        });
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Adds the GPU time since the last accounting to the attempt's capacity while its pods run, in whole minutes,
/// so that reconciles within the same minute write nothing.
pub fn account(
    status: &mut FineTuneJobStatus,
    now: jiff::Timestamp,
    running: bool,
    capacity: Capacity,
    gpus: i32,
) {
    if !running {
        status.accounted_until = None;
        return;
    }
    let Some(since) = status.accounted_until.as_ref().map(|t| t.0) else {
        status.accounted_until = Some(Time(now));
        return;
    };
    let minutes = (now - since).get_seconds().max(0) / 60;
    if minutes == 0 {
        return;
    }
    let hours = f64::from(gpus) * minutes as f64 / 60.0;
    match capacity {
        Capacity::Spot => status.gpu_hours_spot = round(status.gpu_hours_spot + hours, 6),
        Capacity::OnDemand => status.gpu_hours_on_demand = round(status.gpu_hours_on_demand + hours, 6),
    }
    status.accounted_until = Some(Time(since + jiff::SignedDuration::from_secs(minutes * 60)));
}

/// GPU-hours thrown away by a preemption at `now`: every GPU since the last checkpoint or the attempt's start,
/// whichever is later.
pub fn lost_gpu_hours(status: &FineTuneJobStatus, now: jiff::Timestamp, gpus: i32) -> f64 {
    let checkpoint = status.last_checkpoint.as_ref().map(|c| c.time.0);
    let start = status.attempt_start_time.as_ref().map(|t| t.0);
    let since = match (checkpoint, start) {
        (Some(c), Some(s)) => c.max(s),
        (c, s) => c.or(s).unwrap_or(now),
    };
    let secs = (now - since).get_seconds().max(0) as u64;
    super::decide::lost_gpu_hours(gpus, secs)
}

/// Prices from the ConfigMap's data (`<gpuType>.spot`, `<gpuType>.on-demand`, dollars per GPU-hour) → the cost
/// so far, e.g. `$12.40`; none without a GPU type or its prices.
pub fn estimated_cost(
    status: &FineTuneJobStatus,
    gpu_type: Option<&str>,
    prices: &BTreeMap<String, String>,
) -> Option<String> {
    let gpu = gpu_type?;
    let price = |kind: &str| {
        prices
            .get(&format!("{gpu}.{kind}"))
            .and_then(|p| p.trim().parse::<f64>().ok())
    };
    let cost = status.gpu_hours_spot * price("spot")? + status.gpu_hours_on_demand * price("on-demand")?;
    Some(format!("${cost:.2}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn progress_becomes_status() {
        let p: Progress = serde_json::from_str(
            r#"{"phase": "training", "step": 120, "total_steps": 400, "epoch": 0.91234, "loss": 1.234567,
                "learning_rate": 2e-5, "tokens_per_second": 5321.77, "eta_seconds": 3600.4,
                "last_checkpoint": {"step": 100, "time": "2026-11-26T10:00:00Z"}}"#,
        )
        .unwrap();
        let mut s = FineTuneJobStatus::default();
        apply_progress(&mut s, &p);
        assert_eq!(s.progress.as_deref(), Some("120/400 (30%)"));
        assert_eq!(
            (s.loss, s.epoch, s.eta_seconds),
            (Some(1.2346), Some(0.912), Some(3600))
        );
        assert_eq!(s.last_checkpoint.as_ref().unwrap().step, 100);
    }

    #[test]
    fn gpu_hours_accrue_on_the_attempts_capacity_and_cost_follows_prices() {
        let mut s = FineTuneJobStatus::default();
        account(&mut s, ts("2026-11-26T10:00:00Z"), true, Capacity::Spot, 8);
        account(&mut s, ts("2026-11-26T10:30:00Z"), true, Capacity::Spot, 8);
        assert!((s.gpu_hours_spot - 4.0).abs() < 1e-9);
        account(&mut s, ts("2026-11-26T10:30:59Z"), true, Capacity::Spot, 8);
        assert!(
            (s.gpu_hours_spot - 4.0).abs() < 1e-9,
            "whole minutes only: a reconcile within the minute writes nothing"
        );
        account(&mut s, ts("2026-11-26T11:00:00Z"), false, Capacity::Spot, 8);
        assert!(s.accounted_until.is_none(), "nothing accrues while no pod runs");
        account(&mut s, ts("2026-11-26T12:00:00Z"), true, Capacity::OnDemand, 8);
        account(&mut s, ts("2026-11-26T12:15:00Z"), true, Capacity::OnDemand, 8);
        assert!((s.gpu_hours_on_demand - 2.0).abs() < 1e-9);
        let prices = BTreeMap::from([
            ("nvidia-l4.spot".to_string(), "0.25".to_string()),
            ("nvidia-l4.on-demand".to_string(), "1".to_string()),
        ]);
        assert_eq!(
            estimated_cost(&s, Some("nvidia-l4"), &prices).as_deref(),
            Some("$3.00")
        );
        assert_eq!(estimated_cost(&s, Some("nvidia-a100"), &prices), None);
    }

    #[test]
    fn lost_work_counts_from_the_later_of_checkpoint_and_attempt_start() {
        let mut s = FineTuneJobStatus {
            attempt_start_time: Some(Time(ts("2026-11-26T10:00:00Z"))),
            ..FineTuneJobStatus::default()
        };
        let now = ts("2026-11-26T11:00:00Z");
        assert!((lost_gpu_hours(&s, now, 8) - 8.0).abs() < 1e-9);
        s.last_checkpoint = Some(CheckpointRef {
            step: 10,
            time: Time(ts("2026-11-26T10:45:00Z")),
        });
        assert!((lost_gpu_hours(&s, now, 8) - 2.0).abs() < 1e-9);
    }
}
