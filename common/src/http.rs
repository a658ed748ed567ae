//! The daemons' HTTP endpoints, on `--http-addr` / `ROTA_HTTP_ADDR` (off unless set): `/healthz` (the process
//! answers), `/readyz` (connected to RabbitMQ, and the daemon says it has started: store open,
//! topology declared, consuming) and `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::amqp::Broker;
use crate::metrics::Metrics;

/// What `/readyz` looks at. Cheap to clone; the daemon fills it in as it starts.
#[derive(Clone, Default)]
pub struct Health(Arc<HealthInner>);

#[derive(Default)]
struct HealthInner {
    broker: OnceLock<Broker>,
    started: AtomicBool,
    /// Why the daemon is not ready though connected and started, by what says so (e.g. its
    /// store when it cannot write).
    unready: Mutex<BTreeMap<&'static str, String>>,
}

impl Health {
    /// The connection whose state `/readyz` reports (and `/metrics` counts the reconnects of).
    pub fn broker(&self, broker: &Broker) {
        let _ = self.0.broker.set(broker.clone());
    }

    /// Says whether the daemon has started (store open, consuming) or is stopping.
    pub fn started(&self, started: bool) {
        self.0.started.store(started, Ordering::Relaxed);
    }

    /// Marks the daemon not ready because of `what` (`Some(reason)`), or no longer because of
    /// it (`None`).
    pub fn unready(&self, what: &'static str, reason: Option<String>) {
        let mut unready = self
            .0
            .unready
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match reason {
            Some(reason) => unready.insert(what, reason),
            None => unready.remove(what),
        };
    }

    /// Ready, or what is missing.
    pub fn check(&self) -> Result<(), String> {
        match self.0.broker.get() {
            None => return Err("not connected to RabbitMQ yet".into()),
            Some(b) if !b.is_connected() => {
                return Err("the connection to RabbitMQ is down; reconnecting".into());
            }
            Some(_) if !self.0.started.load(Ordering::Relaxed) => {
                return Err("starting or stopping".into());
            }
            Some(_) => {}
        }
        let unready = self
            .0
            .unready
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match unready.iter().next() {
            Some((what, reason)) => Err(format!("{what}: {reason}")),
            None => Ok(()),
        }
    }
}

/// Serves the endpoints on `addr` until `stop`. Fails at once when `addr` cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on --http-addr {addr}; is another process using it?")
    })?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot accept an HTTP connection");
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let (health, metrics) = (health.clone(), metrics.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let reply = respond(&req, &health, &metrics);
                    async move { Ok::<_, std::convert::Infallible>(reply) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

fn respond<B>(req: &Request<B>, health: &Health, metrics: &Metrics) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match health.check() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let mut body = String::new();
            match metrics.encode(&mut body, health.0.broker.get()) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}
