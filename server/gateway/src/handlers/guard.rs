//! Checks on every API request before its handler, against browsers used as weapons:
//!
//! - A body must be JSON (`Content-Type: application/json`). A web page can POST `text/plain` to any address
//!   without a CORS preflight (a "simple" request); requiring JSON forces the preflight, which the gateway never
//!   grants, so a page cannot make a visitor's browser send requests to a local gateway (CSRF).
//! - In anonymous mode on a loopback address (no keys, so the address is the only protection), `Host` must name
//!   a loopback host and `Origin`, when sent, a loopback origin. Otherwise a page on `evil.example` whose name is
//!   re-pointed at 127.0.0.1 (DNS rebinding) would be same-origin with the gateway and read its answers.
//!
//! With keys, a browser has no key to send, so neither attack reaches a model; the JSON rule holds anyway.
//!
//! It also puts the body timeout on every request's body ([`Deadline`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Frame, SizeHint};

use crate::error::ApiError;
use crate::state::AppState;

pub(super) async fn check(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let anonymous_loopback = state.loopback && state.policy.current().keys.is_empty();
    match decide(request.method(), request.headers(), anonymous_loopback) {
        Ok(()) => {
            let timeout = state.limits.body_timeout;
            next.run(request.map(|body| Body::new(Deadline::new(body, timeout))))
                .await
        }
        Err(e) => e.into_response(),
    }
}

/// What a body read past its deadline fails with (and how [`super::request::read_body`] tells it).
pub(super) const BODY_TIMEOUT: &str = "the request body timed out";

/// A request body that fails once `timeout` has passed since the headers arrived: a client dribbling a body
/// (a byte now and then, each resetting any per-read timeout) is cut all the same.
struct Deadline {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(inner: Body, timeout: Duration) -> Self {
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(BODY_TIMEOUT))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The pure decision: `Ok` to let the request through.
pub fn decide(method: &Method, headers: &HeaderMap, anonymous_loopback: bool) -> Result<(), ApiError> {
    if anonymous_loopback {
        if let Some(host) = headers.get(header::HOST) {
            let host = host.to_str().unwrap_or_default();
            if !is_loopback_host(host) {
                return Err(ApiError::forbidden_origin(
                    "Host",
                    "this gateway serves without keys on a loopback address, so it answers only requests for a \
                     loopback host (localhost, 127.0.0.1, [::1])",
                ));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or_default();
            let host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            if !host.is_some_and(is_loopback_host) {
                return Err(ApiError::forbidden_origin(
                    "Origin",
                    "this gateway serves without keys on a loopback address, so it answers only pages served from \
                     a loopback origin",
                ));
            }
        }
    }
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::unsupported_media_type());
        }
    }
    Ok(())
}

/// `localhost`, `*.localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(is_port) => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_port(port: &str) -> bool {
    !port.is_empty() && port.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// The attacks: a cross-site `text/plain` form POST (no preflight), and a DNS-rebound page whose requests
    /// carry its own name as `Host` and `Origin`.
    #[test]
    fn csrf_and_dns_rebinding_are_refused_in_anonymous_loopback_mode() {
        let json = (header::CONTENT_TYPE, "application/json");
        let plain = headers(&[
            (header::CONTENT_TYPE, "text/plain"),
            (header::HOST, "127.0.0.1:8000"),
        ]);
        let e = decide(&Method::POST, &plain, true).unwrap_err();
        assert_eq!(e.status.as_u16(), 415);
        assert!(
            decide(&Method::POST, &headers(&[]), false).is_err(),
            "no type at all"
        );
        for host in [
            "evil.example",
            "evil.example:8000",
            "127.0.0.1.evil.example",
            "[::1]x",
            "localhost:x",
        ] {
            let h = headers(&[json.clone(), (header::HOST, host)]);
            let e = decide(&Method::POST, &h, true).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.param.as_deref()),
                (403, Some("Host")),
                "{host}"
            );
            assert!(
                decide(&Method::POST, &h, false).is_ok(),
                "with keys any Host is fine: {host}"
            );
        }
        for origin in [
            "http://evil.example",
            "null",
            "http://127.0.0.1.nip.io:8000",
            "file://",
        ] {
            let h = headers(&[
                json.clone(),
                (header::HOST, "localhost:8000"),
                (header::ORIGIN, origin),
            ]);
            let e = decide(&Method::POST, &h, true).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("Origin"), "{origin}");
        }
        for (host, origin) in [
            ("localhost:8000", "http://localhost:8000"),
            ("127.0.0.1:8000", "http://127.0.0.1:8000"),
            ("[::1]:8000", "http://[::1]:8000"),
            ("LOCALHOST", "https://app.localhost"),
        ] {
            let h = headers(&[
                (header::CONTENT_TYPE, "application/json; charset=utf-8"),
                (header::HOST, host),
                (header::ORIGIN, origin),
            ]);
            assert!(decide(&Method::POST, &h, true).is_ok(), "{host} {origin}");
        }
        assert!(decide(&Method::GET, &headers(&[(header::HOST, "localhost")]), true).is_ok());
    }
}
