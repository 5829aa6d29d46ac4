//! camelid's operator: CRD rendering ([`crdgen`]) and the FineTuneJob controller ([`finetunejob`]), whose
//! desired state is pure functions from a spec to owned Kubernetes objects.

pub mod crdgen;
pub mod error;
pub mod finetunejob;
pub mod lease;
pub mod metrics;
pub mod run;
