//! ChatModel: serving a model with autoscaled workers. [`build`] and [`autoscale`] are pure; [`controller`]
//! observes, decides and applies.

pub mod autoscale;
pub mod build;
pub mod controller;
pub mod load;
pub mod status;
