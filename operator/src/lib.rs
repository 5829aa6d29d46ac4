//! camelid's operator: CRD rendering ([`crdgen`]) and the FineTuneJob's desired state ([`finetunejob`]), pure
//! functions from a spec to owned Kubernetes objects.

pub mod crdgen;
pub mod finetunejob;
