//! The gRPC health status (`grpc.health.v1.Health`), kept true to the store:
//! SERVING only while it answers, so readiness probes take a replica out of
//! rotation during an outage (liveness stays TCP: an outage must not restart
//! every pod).
//!
//! With a standby (`DATABASE_READ_URL`), a replica whose primary is down but
//! whose standby answers stays SERVING: it still verifies keys, which is
//! what its callers need during a failover, and management calls answer
//! UNAVAILABLE on their own. The degradation shows in the metrics
//! (`store_primary_up` 0) and in one log line per transition.

use crate::{
    api::service::KeysService, metrics::Metrics, proto::pb::api_key_service_server::ApiKeyServiceServer, store::Store,
};
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

/// Keeps health true to the store: SERVING while the primary answers, or
/// while the standby does (verification still works).
pub(crate) async fn probe_health(
    store: Arc<dyn Store>,
    health: tonic_health::server::HealthReporter,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(HEALTH_PROBE_INTERVAL);
    let (mut serving, mut primary_was) = (true, true);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let answers = |r: Result<crate::Result<()>, _>| r.is_ok_and(|r: crate::Result<()>| r.is_ok());
        let primary = answers(tokio::time::timeout(HEALTH_PROBE_INTERVAL, store.ping()).await);
        let standby = match tokio::time::timeout(HEALTH_PROBE_INTERVAL, store.ping_standby()).await {
            Ok(None) => None,
            Ok(Some(r)) => Some(r.is_ok()),
            Err(_) => Some(false),
        };
        metrics.store_primary_up.set(i64::from(primary));
        metrics.store_standby_up.set(i64::from(standby == Some(true)));
        if primary != primary_was && standby.is_some() {
            if primary {
                tracing::info!("primary answers again");
            } else {
                tracing::warn!(
                    standby_up = standby == Some(true),
                    "primary does not answer: management calls are UNAVAILABLE; verification reads go to the standby"
                );
            }
        }
        // The standby's own transitions are logged once, by the read path
        // that falls back (store/standby.rs); here only the gauge moves.
        primary_was = primary;
        let ok = primary || standby == Some(true);
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
