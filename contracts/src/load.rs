//! `GET /internal/load` on each gateway: every model's requests in flight and held, which the operator's
//! autoscaler sums over the gateways.

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
                queued: 2
            }
        );
        let text = serde_json::to_string(&sum).unwrap();
        assert_eq!(text, r#"{"models":{"m":{"inFlight":6,"queued":2}}}"#);
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
                },
            )]
            .into(),
        };
        sum.add(&big);
        sum.add(&big);
        assert_eq!(sum.models["m"].in_flight, u32::MAX);
    }
}
