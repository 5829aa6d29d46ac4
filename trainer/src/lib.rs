//! camelid's trainer: Vicuna-style data handling and (in later work) the training loop and checkpoints.
//!
//! So far: [`data`] reads ShareGPT and OpenAI-style conversation files, normalizes roles, and drops malformed or
//! duplicate conversations with a count for every reason, never silently.

pub mod data;
