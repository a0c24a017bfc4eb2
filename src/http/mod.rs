//! The public HTTP surface (`TAKUMO_HTTP_LISTEN`, off unless set; separate
//! from `/metrics`): GitHub's secret scanning partner endpoint and HTTP
//! forward-auth for proxies (`/v1/authz`, [`crate::gateway::forward_auth`]).
//! A surface beside [`crate::api`], whose leak intake it shares; it imports
//! nothing of the server.

pub mod github;

use crate::gateway::forward_auth::{self, ForwardAuth};
use axum::{Router, routing::any};
use std::sync::Arc;

/// Every route of the HTTP surface.
pub fn router(github: Arc<github::GithubScanning>, forward_auth: Arc<ForwardAuth>) -> Router {
    let scanning =
        Router::new().route("/v1/secret-scanning/github", axum::routing::post(github::report)).with_state(github);
    // `/v1/authz` and everything below it, any method: proxies forward the
    // original path and method, which change nothing.
    let authz = Router::new()
        .route("/v1/authz", any(forward_auth::check))
        .route("/v1/authz/{*rest}", any(forward_auth::check))
        .with_state(forward_auth);
    scanning.merge(authz)
}

/// Serves `router` on `listener` until `stop` turns true.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, mut stop: tokio::sync::watch::Receiver<bool>) {
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "HTTP listener failed");
    }
}
