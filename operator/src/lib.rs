//! camelid's operator: CRD rendering ([`crdgen`]), the FineTuneJob controller ([`finetunejob`]) and the ChatModel
//! controller ([`chatmodel`]), whose desired state is pure functions from a spec to owned Kubernetes objects.

pub mod chatmodel;
pub mod conditions;
pub mod crdgen;
pub mod error;
pub mod events;
pub mod finetunejob;
pub mod lease;
pub mod metrics;
pub mod run;
