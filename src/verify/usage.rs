//! Usage counting without a database write per verification.
//!
//! Each verification that resolves to a key adds one call to an in-memory
//! per-key, per-minute counter; a background task flushes all counters in one
//! batched store call every interval and once more at shutdown. A failed flush
//! puts its counts back, so a database outage delays counts instead of losing
//! them (up to a bound, past which the oldest are dropped and logged).

use crate::{
    domain::model::{ApiKey, UsageDelta},
    metrics::Metrics,
    store::Store,
};
use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// Keys whose counts are held in memory at most while the store is unreachable.
const MAX_PENDING_KEYS: usize = 1_000_000;
/// Usage older than this is pruned; stats look back 24 h.
const RETENTION: ChronoDuration = ChronoDuration::hours(48);

#[derive(Debug, Clone, Copy)]
struct Pending {
    minute: DateTime<Utc>,
    calls: i64,
    last_used_at: DateTime<Utc>,
}

/// Pending counts of one key: its organization and a few minute buckets
/// (usually one; more only when a flush is late).
#[derive(Debug)]
struct KeyUsage {
    organization_id: String,
    buckets: Vec<Pending>,
}

impl KeyUsage {
    fn add(&mut self, p: Pending) {
        match self.buckets.iter_mut().rev().find(|b| b.minute == p.minute) {
            Some(b) => {
                b.calls += p.calls;
                b.last_used_at = b.last_used_at.max(p.last_used_at);
            }
            None => self.buckets.push(p),
        }
    }
}

#[derive(Clone)]
pub struct Usage {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    pending: Mutex<PendingSet>,
}

#[derive(Default)]
struct PendingSet {
    /// Keyed by key id; looked up by `&str`, so counting a known key allocates nothing.
    keys: HashMap<String, KeyUsage>,
    /// When the oldest count still in `keys` was made: the flush lag.
    since: Option<Instant>,
}

impl Usage {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner: Arc::new(Inner { store, metrics, pending: Mutex::default() }) }
    }

    /// Counts one call of `key` at `at`. Never blocks on I/O.
    pub fn record(&self, key: &ApiKey, at: DateTime<Utc>) {
        let minute = at.duration_trunc(ChronoDuration::minutes(1)).unwrap_or(at);
        let one = Pending { minute, calls: 1, last_used_at: at };
        let mut pending = self.inner.pending.lock().expect("usage lock poisoned");
        pending.since.get_or_insert_with(Instant::now);
        match pending.keys.get_mut(key.id.as_str()) {
            Some(u) => u.add(one),
            None => {
                pending.keys.insert(
                    key.id.clone(),
                    KeyUsage { organization_id: key.organization_id.clone(), buckets: vec![one] },
                );
            }
        }
    }

    /// Writes every pending count in one batch. On failure the counts go back
    /// into the pending set, to be retried by the next flush.
    pub async fn flush(&self) -> crate::error::Result<usize> {
        let taken = std::mem::take(&mut *self.inner.pending.lock().expect("usage lock poisoned"));
        if taken.keys.is_empty() {
            return Ok(0);
        }
        let batch: Vec<UsageDelta> = taken
            .keys
            .iter()
            .flat_map(|(id, u)| {
                u.buckets.iter().map(move |p| UsageDelta {
                    key_id: id.clone(),
                    organization_id: u.organization_id.clone(),
                    minute: p.minute,
                    calls: p.calls,
                    last_used_at: p.last_used_at,
                })
            })
            .collect();
        match self.inner.store.record_usage(&batch).await {
            Ok(()) => {
                self.inner.metrics.usage_flush_batches.inc();
                self.inner.metrics.usage_flush_rows.inc_by(batch.len() as u64);
                Ok(batch.len())
            }
            Err(e) => {
                self.inner.metrics.usage_flush_failures.inc();
                self.restore(taken);
                Err(e)
            }
        }
    }

    fn restore(&self, taken: PendingSet) {
        let mut pending = self.inner.pending.lock().expect("usage lock poisoned");
        pending.since = match (pending.since, taken.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for (id, u) in taken.keys {
            let full = pending.keys.len() >= MAX_PENDING_KEYS;
            match pending.keys.get_mut(&id) {
                Some(existing) => u.buckets.into_iter().for_each(|p| existing.add(p)),
                None if full => {
                    let calls: i64 = u.buckets.iter().map(|p| p.calls).sum();
                    tracing::error!(key_id = %id, calls, "usage buffer full: dropping counts");
                }
                None => {
                    pending.keys.insert(id, u);
                }
            }
        }
    }

    /// How long the oldest unwritten count has waited, and how many keys have
    /// counts pending; for the metrics.
    pub fn lag(&self) -> (Duration, usize) {
        let pending = self.inner.pending.lock().expect("usage lock poisoned");
        (pending.since.map(|t| t.elapsed()).unwrap_or_default(), pending.keys.len())
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
