//! The HTTP listener's own loop, so that a slow or hostile client cannot hold it.
//!
//! `axum::serve` gives hyper no timer, which leaves hyper's header-read timeout off: a client
//! that sends half a request line keeps its connection (and a task) forever, and enough of them
//! exhaust the process's file descriptors. This loop serves HTTP/1.1 connections with hyper
//! directly, with
//! - a header-read timeout (`http.header_read_timeout_ms`): hyper closes a connection whose
//!   request head has not fully arrived in time, idle keep-alive connections included;
//! - a body-read deadline (`http.body_read_timeout_ms`): the whole body must arrive within it,
//!   or the request is answered 408 and the connection closed ([`read_body_within`]);
//! - a connection limit (`http.max_connections`): a connection beyond it is closed as soon as
//!   it is accepted, so the ones being served keep their share;
//! - the graceful shutdown `axum::serve` had: on shutdown no new connection is accepted, the
//!   requests in progress are answered, then the loop returns.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::HttpSettings;

/// The largest request body read: the internal endpoints take a small JSON object.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// What one client may take of the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) header_read_timeout: Duration,
    pub(crate) body_read_timeout: Duration,
    pub(crate) max_connections: usize,
}

impl Limits {
    pub(crate) fn from_settings(settings: &HttpSettings) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(settings.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(settings.body_read_timeout_ms),
            max_connections: settings.max_connections,
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = router.layer(axum::middleware::from_fn_with_state(limits.body_read_timeout, read_body_within));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    // Said once each time the limit is reached, not for every refused connection (a flood of
    // them would otherwise flood the log as well).
    let mut told_full = false;
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "could not accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !told_full {
                tracing::warn!(
                    limit = limits.max_connections,
                    "HTTP connection limit reached; closing new connections"
                );
                told_full = true;
            }
            drop(stream);
            continue;
        };
        told_full = false;
        let (service, shutdown) = (TowerToHyperService::new(router.clone()), shutdown.clone());
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(slot);
        });
        // Reap finished connections so the set does not grow with every connection ever served.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Reads the whole request body within `timeout` before the handler runs: a body still arriving
/// then is answered 408 and its connection closed. A body over [`MAX_BODY_BYTES`] is answered 413.
async fn read_body_within(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(_)) => closing(StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large or broken"),
        Err(_) => closing(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time"),
    }
}

/// A JSON error that also closes the connection: what is left of the request is not read.
fn closing(status: StatusCode, message: &str) -> Response {
    let mut response = super::problem(status, message);
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response.into_response()
}
