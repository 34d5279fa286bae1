//! The agent's HTTP endpoints: `/healthz` (the process serves), `/readyz` (rules are in
//! place; the reason when not), `/metrics` (OpenMetrics text), `/applied` (per watched kind,
//! the resourceVersion up to which the API's changes are in the kernel).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::agent::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
struct Shared {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    match s.health.not_ready() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// `{"pods": "1234", "namespaces": "1200", "networkpolicies": null}`: every change the watch of
/// that kind delivered up to that resourceVersion is in the kernel (null: nothing yet). A client
/// that writes an object and sees its version here on every node knows the rules hold it.
async fn applied(State(s): State<Shared>) -> impl IntoResponse {
    let doc: serde_json::Map<String, serde_json::Value> = s
        .health
        .cluster
        .applied_versions()
        .into_iter()
        .map(|(kind, version)| (kind.as_str().to_string(), version.into()))
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Object(doc).to_string(),
    )
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>, metrics: Arc<Metrics>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(self::metrics))
        .route("/applied", get(applied))
        .with_state(Shared { health, metrics });
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "the HTTP server stopped");
    }
}
