//! The plain-HTTP listener for operators and their probes: `/metrics`
//! (Prometheus text format 0.0.4), `/healthz` (the process and its event
//! loop answer) and `/readyz` (200 when ready, else 503 and why; see
//! [`crate::metrics::readiness`]). It carries no tenant data and takes no
//! token: bind it where only the operator's scrapers and probes reach.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::metrics::{readiness_of, Metrics};
use crate::node::Node;

#[derive(Clone)]
struct Http {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
}

/// Serves until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Http { node, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

async fn metrics_text(State(h): State<Http>) -> impl IntoResponse {
    // The collector reads RocksDB properties and statvfs: quick, but not
    // for the async threads.
    let text = tokio::task::spawn_blocking(move || h.metrics.encode())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        text,
    )
}

async fn ready(State(h): State<Http>) -> impl IntoResponse {
    let r = readiness_of(&h.node);
    if r.ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let mut body = "not ready:\n".to_string();
        for why in &r.reasons {
            body += &format!("- {why}\n");
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
