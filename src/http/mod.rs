//! The public HTTP surface (`TAKUMO_HTTP_LISTEN`, off unless set; separate
//! from `/metrics`): GitHub's secret scanning partner endpoint. A surface
//! beside [`crate::api`], whose leak intake it shares; it imports nothing of
//! the server.

pub mod github;

use axum::Router;
use std::sync::Arc;

/// Every route of the HTTP surface.
pub fn router(github: Arc<github::GithubScanning>) -> Router {
    Router::new().route("/v1/secret-scanning/github", axum::routing::post(github::report)).with_state(github)
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
