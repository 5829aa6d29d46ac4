//! camelid's OpenAI-compatible gateway (no libtorch): `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! `/v1/moderations`, a chat page at `/`, health and metrics, routing each request to the least-busy ready worker
//! of its model over gRPC.
//!
//! The request pipeline ([`handlers`]): authenticate ([`keys`]) → read the body (size-limited) → parse ([`openai`]
//! wire types) → validate ([`validate::Validated`], errors naming the field) → model permission and rate limits →
//! input moderation ([`moderation`]) → route ([`routing`]) → respond or stream ([`handlers::respond`], with output
//! moderation). [`error::ApiError`] is the one place errors become OpenAI-shaped responses. The handlers share an
//! [`AppState`] ([`state`]); the keys and moderation in force ([`policy`]) are reloaded when the config file
//! changes ([`reload`]). [`serve`] runs it all.
//!
//! This file only declares the modules and re-exports what the binaries use.

pub mod config;
pub mod discovery;
pub mod error;
pub mod handlers;
pub mod keys;
pub mod metrics;
pub mod moderation;
pub mod openai;
pub mod policy;
pub mod reload;
pub mod routing;
pub mod serve;
pub mod state;
pub mod tokens;
pub mod validate;

pub use config::{ConfigError, GatewayConfig};
pub use handlers::app;
pub use handlers::page::CHAT_PAGE;
pub use serve::{anonymous_check, serve};
pub use state::{AppState, state, state_with};
