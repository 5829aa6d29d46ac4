//! ChatModel: serving a model with autoscaled workers. [`build`], [`autoscale`], [`source`] (where the model's
//! files are), [`spot`] (replacing workers whose node has a termination notice) and [`status`] are pure;
//! [`controller`] observes, decides and applies.

pub mod adapters;
pub mod autoscale;
pub mod build;
pub mod controller;
pub mod load;
pub mod source;
pub mod spot;
pub mod status;
