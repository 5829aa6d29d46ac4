//! camelid's custom resources, `camelid.dev/v1alpha1`: [`FineTuneJob`] and [`ChatModel`]. Types and schemas only;
//! the operator renders the CRD YAML (`camelid-operator crds`) and holds all logic.

pub mod chatmodel;
pub mod common;
pub mod evaluation;
pub mod finetunejob;

pub use chatmodel::{ChatModel, ChatModelSpec, ChatModelStatus};
pub use finetunejob::{FineTuneJob, FineTuneJobSpec, FineTuneJobStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group.
pub const GROUP: &str = "camelid.dev";

/// Every CRD, in the order they are installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![FineTuneJob::crd(), ChatModel::crd()]
}
