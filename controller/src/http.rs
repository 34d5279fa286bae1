//! The agent's HTTP endpoints: `/healthz` (the process serves), `/readyz` (rules are in
//! place; the reason when not), `/metrics` (OpenMetrics text, or the Prometheus text format
//! 0.0.4 to a client that asks only for `text/plain`), `/applied` (per watched kind,
//! the resourceVersion up to which the API's changes are in the kernel).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
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

/// A client that accepts `text/plain` but not OpenMetrics (`promtool check metrics`, older
/// scrapers, `curl -H 'Accept: text/plain'`) gets the text format 0.0.4; everyone else, and
/// Prometheus (it lists OpenMetrics first), gets OpenMetrics.
fn wants_text_format(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        let a = a.to_ascii_lowercase();
        a.contains("text/plain") && !a.contains("application/openmetrics-text")
    })
}

async fn metrics(State(s): State<Shared>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let openmetrics = s.metrics.encode();
    if wants_text_format(accept) {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::prometheus_text(&openmetrics),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            openmetrics,
        )
    }
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

#[cfg(test)]
mod tests {
    use super::wants_text_format;

    #[test]
    fn the_text_format_only_for_clients_that_do_not_take_openmetrics() {
        assert!(wants_text_format(Some("text/plain")));
        assert!(wants_text_format(Some("text/plain;version=0.0.4;q=0.5")));
        assert!(!wants_text_format(None));
        assert!(!wants_text_format(Some("*/*")));
        // what Prometheus sends
        assert!(!wants_text_format(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
    }
}
