//! The gRPC health status (`grpc.health.v1.Health`), kept true to the store:
//! SERVING only while it answers, so readiness probes take a replica out of
//! rotation during an outage (liveness stays TCP: an outage must not restart
//! every pod).

use crate::{api::service::KeysService, proto::pb::api_key_service_server::ApiKeyServiceServer, store::Store};
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;

/// How often the store is pinged to keep the health status true.
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Sets both the overall ("") and the `ApiKeyService` status, so probes
/// that ask either see the same answer.
pub(crate) async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    health.set_service_status("", status).await;
    health.set_service_status(<ApiKeyServiceServer<KeysService> as tonic::server::NamedService>::NAME, status).await;
}

/// Keeps health true to the store: SERVING only while it answers.
pub(crate) async fn probe_health(
    store: Arc<dyn Store>,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(HEALTH_PROBE_INTERVAL);
    let mut serving = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let ok = tokio::time::timeout(HEALTH_PROBE_INTERVAL, store.ping()).await.is_ok_and(|r| r.is_ok());
        if ok != serving {
            serving = ok;
            if ok {
                tracing::info!("store answers again: SERVING");
                set_health(&health, true).await;
            } else {
                tracing::warn!("store does not answer: NOT_SERVING");
                set_health(&health, false).await;
            }
        }
    }
}
