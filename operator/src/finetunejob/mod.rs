//! The FineTuneJob's desired state, all pure: [`build`] (the children of an attempt), [`spot`] (placement on spot
//! or on-demand nodes) and [`decide`] (the next step from what was observed of an attempt).

pub mod build;
pub mod decide;
pub mod spot;
