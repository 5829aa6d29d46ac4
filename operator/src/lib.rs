//! camelid's operator: CRD rendering ([`crdgen`]), the FineTuneJob controller ([`finetunejob`]) and the ChatModel
//! controller ([`chatmodel`]), whose desired state is pure functions from a spec to owned Kubernetes objects.
//!
//! What both controllers share lives at the crate root: [`settings`], the pod parts ([`pod`]) and the restricted
//! Pod Security Standard they meet ([`podsecurity`]), the policy over what specs may choose ([`policy`]), spot
//! placement ([`placement`]), the errors ([`error`]), the guarded reconcile and the API steps every reconcile takes
//! ([`reconcile`]), Events ([`events`]), status conditions ([`conditions`]) and [`metrics`].

pub mod chatmodel;
pub mod conditions;
pub mod crdgen;
pub mod error;
pub mod events;
pub mod finetunejob;
pub mod lease;
pub mod metrics;
pub mod placement;
pub mod pod;
pub mod podsecurity;
pub mod policy;
pub mod reconcile;
pub mod run;
pub mod settings;

/// The field manager of everything the operator writes (server-side apply, status, Events).
pub const MANAGER: &str = camelid_contracts::names::MANAGER;
