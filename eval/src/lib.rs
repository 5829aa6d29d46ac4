//! `camelid eval`: the evaluation Vicuna's claim rested on, against any OpenAI-compatible endpoint (our gateway,
//! vLLM, OpenAI), in FastChat's `llm_judge` file formats so its scripts and ours read each other's files.
//!
//! - [`format`]: FastChat's question, answer and judgment files; [`jsonl`]: reading them with errors that name
//!   the line, appending to them durably.
//! - [`client`]: the OpenAI-compatible client (retries after `Retry-After`).
//! - [`questions`] and [`answer`]: `camelid eval answer`.
//! - [`judge`]: `camelid eval judge` (FastChat's prompts, both orders, verdict parsing).
//! - [`report`]: `camelid eval report` (win rates with bootstrap intervals, scores; text, markdown, HTML).
//! - [`gate`]: `camelid eval gate`, the FineTuneJob promotion gate.
//! - [`cli`]: the flags of all four, shared by `camelid eval` and `camelid-eval`.
pub mod answer;
pub mod cli;
pub mod client;
mod error;
pub mod format;
pub mod gate;
pub mod jsonl;
pub mod judge;
pub mod questions;
pub mod report;

pub use error::CliError;
