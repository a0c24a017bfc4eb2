//! Usage counting without a database write per verification.
//!
//! Each verification that resolves to a key adds one call to an in-memory
//! per-key, per-minute counter; a background task flushes all counters in one
//! batched store call every interval and once more at shutdown. A failed flush
//! puts its counts back, so a database outage delays counts instead of losing
//! them (up to a bound, past which the oldest are dropped and logged).

use crate::{
    model::{ApiKey, UsageDelta},
    store::Store,
};
use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::watch;

/// Buckets held in memory at most while the store is unreachable.
const MAX_PENDING_BUCKETS: usize = 1_000_000;
/// Usage older than this is pruned; stats look back 24 h.
const RETENTION: ChronoDuration = ChronoDuration::hours(48);

#[derive(Debug, Clone, Copy)]
struct Pending {
    calls: i64,
    last_used_at: DateTime<Utc>,
}

/// A usage bucket: key id, organization id, start of the minute.
type Bucket = (String, String, DateTime<Utc>);

#[derive(Clone)]
pub struct Usage {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    pending: Mutex<HashMap<Bucket, Pending>>,
}

impl Usage {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                pending: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Counts one call of `key` at `at`. Never blocks on I/O.
    pub fn record(&self, key: &ApiKey, at: DateTime<Utc>) {
        let minute = at.duration_trunc(ChronoDuration::minutes(1)).unwrap_or(at);
        let mut pending = self.inner.pending.lock().expect("usage lock poisoned");
        pending
            .entry((key.id.clone(), key.organization_id.clone(), minute))
            .and_modify(|p| {
                p.calls += 1;
                p.last_used_at = p.last_used_at.max(at);
            })
            .or_insert(Pending {
                calls: 1,
                last_used_at: at,
            });
    }

    /// Writes every pending count in one batch. On failure the counts go back
    /// into the pending set, to be retried by the next flush.
    pub async fn flush(&self) -> crate::error::Result<usize> {
        let taken: Vec<_> = {
            let mut pending = self.inner.pending.lock().expect("usage lock poisoned");
            pending.drain().collect()
        };
        if taken.is_empty() {
            return Ok(0);
        }
        let batch: Vec<UsageDelta> = taken
            .iter()
            .map(|((key_id, org, minute), p)| UsageDelta {
                key_id: key_id.clone(),
                organization_id: org.clone(),
                minute: *minute,
                calls: p.calls,
                last_used_at: p.last_used_at,
            })
            .collect();
        match self.inner.store.record_usage(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                self.restore(taken);
                Err(e)
            }
        }
    }

    fn restore(&self, taken: Vec<(Bucket, Pending)>) {
        let mut pending = self.inner.pending.lock().expect("usage lock poisoned");
        for (k, p) in taken {
            if pending.len() >= MAX_PENDING_BUCKETS && !pending.contains_key(&k) {
                tracing::error!(key_id = %k.0, calls = p.calls, "usage buffer full: dropping counts");
                continue;
            }
            pending
                .entry(k)
                .and_modify(|q| {
                    q.calls += p.calls;
                    q.last_used_at = q.last_used_at.max(p.last_used_at);
                })
                .or_insert(p);
        }
    }

    /// Flushes every `interval` until `shutdown` turns true, then flushes once
    /// more so counts of completed verifications are not lost on exit.
    pub fn spawn_flusher(
        &self,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_prune = Utc::now() - ChronoDuration::hours(1);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => break,
                }
                if let Err(e) = me.flush().await {
                    tracing::warn!(error = %e, "usage flush failed; counts kept for the next try");
                }
                if Utc::now() - last_prune > ChronoDuration::minutes(10) {
                    last_prune = Utc::now();
                    if let Err(e) = me.inner.store.prune_usage(last_prune - RETENTION).await {
                        tracing::warn!(error = %e, "usage prune failed");
                    }
                }
            }
            if let Err(e) = me.flush().await {
                tracing::error!(error = %e, "final usage flush failed; counts lost");
            }
        })
    }
}
