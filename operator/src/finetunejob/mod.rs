//! The FineTuneJob controller ([`controller`]), what it reads of an attempt ([`observe`]), the promotion gate's
//! steps ([`evaluate`]) and its pure parts: [`build`] (the children of an attempt), [`decide`] (the next step from
//! what was observed of an attempt), [`status`] (progress, GPU-hours and cost), [`evaljob`] (the evaluation Job)
//! [`gate`] (the evaluation's verdict) and [`publish`] (which ChatModel a job may point at its model). Spot placement, the pod parts and the settings it shares with the
//! ChatModel controller are at the crate root.

pub mod build;
pub mod controller;
pub mod decide;
pub mod evaljob;
pub mod evaluate;
pub mod gate;
pub mod observe;
pub mod publish;
pub mod status;
