//! Serving the gateway: whether it may serve without keys on an address, and the serve loop with graceful
//! shutdown. What the binaries (`camelid-gateway`, `camelid serve`) share around the [`crate::handlers::app`] router.

use std::net::SocketAddr;

use crate::handlers;
use crate::state::AppState;

/// Whether the gateway may serve on `listen` without keys: on loopback it may (with a warning), elsewhere only
/// when `allow_anonymous` is set. The `Ok` value is the warning to print.
pub fn anonymous_check(
    listen: SocketAddr,
    has_keys: bool,
    allow_anonymous: bool,
) -> Result<Option<String>, String> {
    if has_keys {
        return Ok(None);
    }
    if listen.ip().is_loopback() || allow_anonymous {
        return Ok(Some(format!(
            "no API keys configured: serving anyone who can reach {listen} (configure `keys` to require them)"
        )));
    }
    Err(format!(
        "refusing to serve without API keys on {listen}, which is not a loopback address: configure `keys` (or \
         `keys_file`) or pass --allow-anonymous"
    ))
}

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, handlers::app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
