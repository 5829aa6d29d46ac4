//! `camelid eval`: the evaluation Vicuna's claim rested on, against any OpenAI-compatible endpoint (our gateway,
//! vLLM, OpenAI), in FastChat's `llm_judge` file formats so its scripts and ours read each other's files.
//!
//! - [`format`]: the question, answer and judgment files.
pub mod answer;
pub mod client;
pub mod format;
pub mod jsonl;
pub mod judge;
pub mod questions;
pub mod report;
