//! Serving the gateway: whether it may serve without keys on an address, and the serve loop with its connection
//! limits and graceful shutdown. What the binaries (`camelid-gateway`, `camelid serve`) share around the
//! [`crate::handlers::app`] (the API) and [`crate::handlers::admin_app`] (metrics and load) routers.
//!
//! The loop is hyper's HTTP/1.1 server rather than `axum::serve`, which has no timeouts: a client that opens a
//! connection and dribbles its headers (or sends none) would hold it, and a file descriptor, for ever. Here the
//! headers must arrive within [`ServerLimits::header_timeout`] (which, HTTP/1.1 being what it is, is also how long
//! a keep-alive connection may sit idle waiting for its next request), bodies within the `body_timeout` of
//! [`crate::validate::Limits`] (enforced where handlers read them), and at most
//! [`ServerLimits::max_connections`] connections are open at once: one more is answered 503 and closed at once,
//! rather than left in the kernel's backlog where it would starve the probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, watch};

use crate::handlers;
use crate::state::AppState;

/// Limits on the HTTP connections themselves, before any request is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// A request's headers must be complete within this of the connection opening or of the previous response
    /// ending; it is also the keep-alive idle timeout.
    pub header_timeout: Duration,
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// Connections the admin port takes at once (Prometheus, the operator, probes).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

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

/// Serves the gateway's API on `listener` until `shutdown` resolves, under `state.server`'s limits.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.server;
    serve_app(handlers::app(state), listener, limits, shutdown).await
}

/// Serves the admin endpoints (`/metrics`, `/internal/load`, `/healthz`, `/readyz`) on `listener` until
/// `shutdown` resolves.
pub async fn serve_admin(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = ServerLimits {
        max_connections: ADMIN_MAX_CONNECTIONS,
        ..state.server
    };
    serve_app(handlers::admin_app(state), listener, limits, shutdown).await
}

/// Serves `api` and `admin` (the admin endpoints, under [`ADMIN_MAX_CONNECTIONS`]) on their listeners until
/// `shutdown` resolves, which stops both; returns once both have finished their open requests.
pub async fn serve_api_and_admin(
    (api, api_listener): (axum::Router, tokio::net::TcpListener),
    (admin, admin_listener): (axum::Router, tokio::net::TcpListener),
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop, stopping) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let until = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin_limits = ServerLimits {
        max_connections: ADMIN_MAX_CONNECTIONS,
        ..limits
    };
    let admin_task = tokio::spawn(serve_app(
        admin,
        admin_listener,
        admin_limits,
        until(stopping.clone()),
    ));
    let served = serve_app(api, api_listener, limits, until(stopping)).await;
    let _ = admin_task.await;
    served
}

/// The reply to a connection over the limit (written without waiting: the client gets it or nothing).
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 120\r\n\r\n\
{\"error\":{\"message\":\"too many open connections\",\"type\":\"service_unavailable\",\"param\":null,\
\"code\":\"too_many_connections\"}}";

/// Serves `app` on `listener` under `limits` until `shutdown` resolves; then stops accepting and waits for the
/// open connections to finish their requests.
pub async fn serve_app(
    app: axum::Router,
    listener: tokio::net::TcpListener,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max));
    let (stop, stopping) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted: wait and go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, max, "connection refused: too many open");
            let _ = stream.try_write(TOO_MANY_CONNECTIONS);
            let mut stream = stream;
            let _ = tokio::time::timeout(Duration::from_millis(10), stream.shutdown()).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = async { drop(stopping.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let _ = permits.acquire_many(u32::try_from(max).unwrap_or(u32::MAX)).await;
    Ok(())
}
