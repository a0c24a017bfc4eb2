//! A PostgreSQL hot standby for the verification path's reads
//! (`DATABASE_READ_URL`): cache misses and refreshes read it, so a cold
//! start, a deploy or a resync does not land on the primary that takes every
//! write. Everything else (management, writes, the notice listener) stays on
//! the primary.
//!
//! What the standby cannot be trusted with, the primary answers:
//! - a key the standby does not have, since it may have been created a moment
//!   ago and not replayed yet (read-your-writes for new keys);
//! - a record older than the version a change notice announced (its
//!   `updated_at`): a lagging standby must never resurrect a revoked key;
//! - anything while the standby fails: reads fall back to the primary, with
//!   one log line per transition (and the health probe's `store_standby_up`
//!   gauge), and the standby is tried again after [`RETRY_INTERVAL`].

use crate::error::Result;
use sqlx::PgPool;
use std::{
    future::Future,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};
// Tokio's clock (the system's monotonic clock outside paused-time tests).
use tokio::time::Instant;

/// While the standby is down, reads skip it this long before trying again:
/// each verification must not wait out a connection attempt.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

pub struct Standby {
    pub(super) pool: PgPool,
    /// The primary's WAL position when this process last (re)started hearing
    /// change notices (`pg_current_wal_lsn()`): a standby that has not replayed
    /// that far may hold records changed before then that no notice will name.
    /// `None`: not known, so the standby is not read.
    barrier: std::sync::Mutex<Option<String>>,
    up: AtomicBool,
    start: Instant,
    /// Milliseconds since `start` of the last failure (0: none since the last answer).
    failed_at_ms: AtomicU64,
}

impl Standby {
    pub fn new(pool: PgPool, barrier: Option<String>) -> Self {
        Self {
            pool,
            barrier: std::sync::Mutex::new(barrier),
            up: AtomicBool::new(true),
            start: Instant::now(),
            failed_at_ms: AtomicU64::new(0),
        }
    }

    pub fn barrier(&self) -> Option<String> {
        self.barrier.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_barrier(&self, lsn: Option<String>) {
        *self.barrier.lock().unwrap_or_else(|p| p.into_inner()) = lsn;
    }

    fn resting(&self) -> bool {
        let at = self.failed_at_ms.load(Ordering::Relaxed);
        at != 0 && (self.start.elapsed().as_millis() as u64).saturating_sub(at) < RETRY_INTERVAL.as_millis() as u64
    }

    /// Runs a read on the standby. `None`: it failed (or is resting after a
    /// failure), and the caller reads the primary instead. Any error counts:
    /// the primary's answer is authoritative, and a standby that has not yet
    /// replayed a migration fails queries it will answer a moment later.
    pub async fn read<T, F>(&self, read: impl FnOnce(PgPool) -> F) -> Option<T>
    where
        F: Future<Output = Result<T>>,
    {
        if self.resting() {
            return None;
        }
        match read(self.pool.clone()).await {
            Err(e) => {
                self.failed_at_ms.store((self.start.elapsed().as_millis() as u64).max(1), Ordering::Relaxed);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %crate::error::error_chain(&e),
                        "standby (DATABASE_READ_URL) failed: verification reads go to the primary"
                    );
                }
                None
            }
            Ok(r) => {
                self.failed_at_ms.store(0, Ordering::Relaxed);
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("standby (DATABASE_READ_URL) answers again: verification reads go to it");
                }
                Some(r)
            }
        }
    }

    /// One round trip, for health.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A standby whose pool is never used: the reads below bring their own outcome.
    fn standby() -> Standby {
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        Standby::new(pool, Some("0/0".into()))
    }

    /// Runs a read that ends with `ok`, counting whether the standby was asked at all.
    async fn read(s: &Standby, asked: &AtomicUsize, ok: bool) -> Option<()> {
        s.read(|_| async move {
            asked.fetch_add(1, Ordering::Relaxed);
            if ok { Ok(()) } else { Err(crate::Error::invalid("planted failure")) }
        })
        .await
    }

    /// After a failure the standby rests for RETRY_INTERVAL (reads go
    /// straight to the primary instead of each waiting on a dead standby),
    /// then is asked again; a standby that never failed is always asked.
    #[tokio::test(start_paused = true)]
    async fn a_failed_standby_is_skipped_until_the_retry_interval_has_passed() {
        let s = standby();
        let asked = AtomicUsize::new(0);
        assert_eq!(read(&s, &asked, true).await, Some(()), "a fresh standby is asked");
        assert_eq!(read(&s, &asked, false).await, None);
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        assert_eq!(read(&s, &asked, true).await, None, "asked while resting");
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        tokio::time::advance(RETRY_INTERVAL - Duration::from_millis(1)).await;
        assert_eq!(read(&s, &asked, true).await, None, "asked before the interval ended");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(read(&s, &asked, true).await, Some(()), "not asked again after the interval");
        assert_eq!(read(&s, &asked, true).await, Some(()), "an answer ends the rest");
        assert_eq!(asked.load(Ordering::Relaxed), 4);
    }
}
