//! The FineTuneJob controller ([`controller`]), what it reads of an attempt ([`observe`]) and its pure parts:
//! [`build`] (the children of an attempt), [`decide`] (the next step from what was observed of an attempt) and
//! [`status`] (progress, GPU-hours and cost). Spot placement, the pod parts and the settings it shares with the
//! ChatModel controller are at the crate root.

pub mod build;
pub mod controller;
pub mod decide;
pub mod observe;
pub mod status;
