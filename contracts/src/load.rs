//! `GET /internal/load` on each gateway: every model's requests in flight and held, which the operator's
//! autoscaler sums over the gateways, and the streams it migrated, which the operator adds to the ChatModel's
//! `status.migrations`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The path the gateways serve the report on.
pub const PATH: &str = "/internal/load";

/// One model's load on one gateway (or summed over gateways).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelLoad {
    /// Requests a worker is generating for.
    pub in_flight: u32,
    /// Requests the gateway holds because no worker is ready (at zero replicas, or while scaling).
    pub queued: u32,
    /// Streams this gateway moved from a worker that was going away or failing to another, where they
    /// continued, since the gateway started: its `camelid_gateway_migrations_total` for the model, all causes
    /// together. A counter: the operator adds up its increase per gateway, and a smaller value than last time
    /// means the gateway restarted. Left out when 0, so the report reads as before to those that predate it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub migrations: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What one gateway answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub models: BTreeMap<String, ModelLoad>,
}

impl LoadReport {
    /// Adds another gateway's report to this one, model by model.
    pub fn add(&mut self, other: &LoadReport) {
        for (model, load) in &other.models {
            let entry = self.models.entry(model.clone()).or_default();
            entry.in_flight = entry.in_flight.saturating_add(load.in_flight);
            entry.queued = entry.queued.saturating_add(load.queued);
            entry.migrations = entry.migrations.saturating_add(load.migrations);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_is_camel_case_and_sums_per_model() {
        let a: LoadReport =
            serde_json::from_str(r#"{"models": {"m": {"inFlight": 3, "queued": 1}}}"#).unwrap();
        let mut sum = LoadReport::default();
        sum.add(&a);
        sum.add(&a);
        assert_eq!(
            sum.models["m"],
            ModelLoad {
                in_flight: 6,
                queued: 2,
                migrations: 0
            }
        );
        let text = serde_json::to_string(&sum).unwrap();
        assert_eq!(
            text, r#"{"models":{"m":{"inFlight":6,"queued":2}}}"#,
            "no migrations: the report reads as before they were counted"
        );
        let b: LoadReport =
            serde_json::from_str(r#"{"models": {"m": {"inFlight": 1, "queued": 0, "migrations": 5}}}"#)
                .unwrap();
        sum.add(&b);
        assert_eq!(sum.models["m"].migrations, 5);
        let text = serde_json::to_string(&sum).unwrap();
        assert_eq!(
            text,
            r#"{"models":{"m":{"inFlight":7,"queued":2,"migrations":5}}}"#
        );
    }

    #[test]
    fn a_hostile_gateway_cannot_overflow_the_sum() {
        let mut sum = LoadReport::default();
        let big = LoadReport {
            models: [(
                "m".to_string(),
                ModelLoad {
                    in_flight: u32::MAX,
                    queued: u32::MAX,
                    migrations: u64::MAX,
                },
            )]
            .into(),
        };
        sum.add(&big);
        sum.add(&big);
        assert_eq!(sum.models["m"].in_flight, u32::MAX);
        assert_eq!(sum.models["m"].migrations, u64::MAX);
    }
}
