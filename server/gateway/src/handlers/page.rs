//! The chat page served at `/`: plain HTML and JavaScript compiled into the binary, no build step.

use axum::http::header;
use axum::response::{Html, IntoResponse};

/// The chat page's HTML.
pub const CHAT_PAGE: &str = include_str!("../chat.html");

/// The chat page; it may not be framed by other sites (the key is typed into it).
pub(super) async fn chat_page() -> impl IntoResponse {
    (
        [
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(CHAT_PAGE),
    )
}
