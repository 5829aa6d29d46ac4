//! The FineTuneJob controller ([`controller`]) and its pure parts: [`build`] (the children of an attempt),
//! [`spot`] (placement on spot or on-demand nodes), [`decide`] (the next step from what was observed of an
//! attempt) and [`status`] (progress, GPU-hours and cost).

pub mod build;
pub mod controller;
pub mod decide;
pub mod spot;
pub mod status;
