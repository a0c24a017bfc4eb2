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
//! - anything while this process hears no change notices (before its
//!   listener first connects, and during a listener gap): a change made then
//!   raises no floor, so the primary is asked first, and the standby only
//!   stands in for a primary that cannot answer (as a cached entry would,
//!   fail static);
//! - anything while the standby fails: reads fall back to the primary, with
//!   one log line per transition (and the health probe's `store_standby_up`
//!   gauge), and the standby is tried again after [`RETRY_INTERVAL`].

use super::rest::Rest;
use crate::error::{Error, Result};
use sqlx::PgPool;
use std::{
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// While the standby is down, reads skip it this long before trying again:
/// each verification must not wait out a connection attempt. Likewise the
/// primary, where it is asked first (no notices) and fails.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Where the primary is asked first (no notices), how long a read waits for
/// it before the standby answers: a stopped primary is not refused at once
/// (the pool retries connecting until its acquire timeout, 5 s by default).
pub const PRIMARY_FIRST_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Standby {
    pub(super) pool: PgPool,
    /// The primary's WAL position when this process last (re)started hearing
    /// change notices (`pg_current_wal_insert_lsn()`): a standby that has not replayed
    /// that far may hold records changed before then that no notice will name.
    /// `None`: not known, so the standby is not read.
    barrier: std::sync::Mutex<Option<String>>,
    /// True while change notices arrive (set once the barrier is current):
    /// a standby caught up to the barrier then misses nothing a floor does
    /// not cover. False at start and during a listener gap.
    hearing: AtomicBool,
    rest: Rest,
    /// The primary's rest, where it is asked first and fails.
    primary_rest: Rest,
}

impl Standby {
    pub fn new(pool: PgPool, barrier: Option<String>) -> Self {
        Self {
            pool,
            barrier: std::sync::Mutex::new(barrier),
            hearing: AtomicBool::new(false),
            rest: Rest::new(RETRY_INTERVAL),
            primary_rest: Rest::new(RETRY_INTERVAL),
        }
    }

    pub fn barrier(&self) -> Option<String> {
        self.barrier.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_barrier(&self, lsn: Option<String>) {
        *self.barrier.lock().unwrap_or_else(|p| p.into_inner()) = lsn;
    }

    /// Whether change notices arrive; see `hearing`.
    pub fn set_hearing(&self, hearing: bool) {
        self.hearing.store(hearing, Ordering::Release);
    }

    /// Answers a verification read. `standby`: the standby's answer, `None`
    /// when it cannot be trusted with this read; `primary`: the primary's.
    /// While notices arrive the standby answers what it can be trusted with.
    /// Otherwise the primary is asked first (waited on for at most
    /// [`PRIMARY_FIRST_TIMEOUT`]), and the standby answers only when the
    /// primary is unavailable; after such a failure the primary is asked by
    /// one read per [`RETRY_INTERVAL`] and the others go to the standby, so
    /// an outage does not make every read wait.
    pub async fn route<T>(
        &self,
        standby: impl Future<Output = Option<T>>,
        primary: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        if self.hearing.load(Ordering::Acquire) {
            return match standby.await {
                Some(found) => Ok(found),
                None => primary.await,
            };
        }
        let unavailable = if self.primary_rest.claim() {
            let answer = tokio::time::timeout(PRIMARY_FIRST_TIMEOUT, primary).await.unwrap_or_else(|_| {
                Err(Error::Unavailable {
                    message: format!(
                        "the key store's primary did not answer within {} ms; retry with backoff",
                        PRIMARY_FIRST_TIMEOUT.as_millis()
                    ),
                    source: None,
                })
            });
            match answer {
                // Not logged here: the health probe logs the primary's
                // transitions (store_primary_up).
                Err(e @ Error::Unavailable { .. }) => {
                    self.primary_rest.failed();
                    e
                }
                answered => {
                    self.primary_rest.answered();
                    return answered;
                }
            }
        } else {
            Error::Unavailable {
                message: "the key store's primary is unavailable and its standby cannot answer this read; \
                          retry with backoff"
                    .into(),
                source: None,
            }
        };
        standby.await.ok_or(unavailable)
    }

    /// Runs a read on the standby. `None`: it failed (or is resting after a
    /// failure), and the caller reads the primary instead. Any error counts:
    /// the primary's answer is authoritative, and a standby that has not yet
    /// replayed a migration fails queries it will answer a moment later.
    pub async fn read<T, F>(&self, read: impl FnOnce(PgPool) -> F) -> Option<T>
    where
        F: Future<Output = Result<T>>,
    {
        if self.rest.resting() {
            return None;
        }
        match read(self.pool.clone()).await {
            Err(e) => {
                if self.rest.failed() {
                    tracing::warn!(
                        error = %crate::error::error_chain(&e),
                        "standby (DATABASE_READ_URL) failed: verification reads go to the primary"
                    );
                }
                None
            }
            Ok(r) => {
                if self.rest.answered() {
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
    use tokio::time::Instant;

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

    fn down() -> Error {
        Error::Unavailable { message: "planted outage".into(), source: None }
    }

    /// Routes one read whose standby answer is `standby` and primary answer
    /// `primary`, returning the answer and which of the two were asked.
    async fn route(
        s: &Standby,
        standby: Option<&'static str>,
        primary: Result<&'static str>,
    ) -> (Result<&'static str>, bool, bool) {
        let (asked_standby, asked_primary) = (AtomicBool::new(false), AtomicBool::new(false));
        let r = s
            .route(
                async {
                    asked_standby.store(true, Ordering::Relaxed);
                    standby
                },
                async {
                    asked_primary.store(true, Ordering::Relaxed);
                    primary
                },
            )
            .await;
        (r, asked_standby.into_inner(), asked_primary.into_inner())
    }

    /// While notices arrive, the standby answers what it can be trusted
    /// with and the primary the rest; the primary is then not asked first.
    #[tokio::test]
    async fn while_notices_arrive_the_standby_answers_first() {
        let s = standby();
        s.set_hearing(true);
        let (r, standby_asked, primary_asked) = route(&s, Some("standby"), Ok("primary")).await;
        assert_eq!((r.unwrap(), standby_asked, primary_asked), ("standby", true, false));
        let (r, _, primary_asked) = route(&s, None, Ok("primary")).await;
        assert_eq!((r.unwrap(), primary_asked), ("primary", true));
    }

    /// Without notices (at start, during a listener gap) a change raises no
    /// floor, so the primary answers whenever it can; the standby stands in
    /// only for an unavailable primary, never for one that gave another error.
    #[tokio::test]
    async fn without_notices_the_primary_answers_first_and_the_standby_only_stands_in_for_an_outage() {
        let s = standby();
        let (r, standby_asked, _) = route(&s, Some("standby"), Ok("primary")).await;
        assert_eq!((r.unwrap(), standby_asked), ("primary", false), "a fresh standby hears no notices yet");
        s.set_hearing(true);
        s.set_hearing(false);
        let (r, standby_asked, _) = route(&s, Some("standby"), Ok("primary")).await;
        assert_eq!((r.unwrap(), standby_asked), ("primary", false), "the standby answered during a gap");
        let (r, _, _) = route(&s, Some("standby"), Err(Error::invalid("not an outage"))).await;
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let (r, _, _) = route(&s, Some("standby"), Err(down())).await;
        assert_eq!(r.unwrap(), "standby");
    }

    /// After the primary failed (no notices), reads go straight to the
    /// standby for RETRY_INTERVAL, then the primary is asked again; with
    /// neither able to answer the read is UNAVAILABLE.
    #[tokio::test(start_paused = true)]
    async fn without_notices_a_failed_primary_is_skipped_until_the_retry_interval_has_passed() {
        let s = standby();
        let (r, _, _) = route(&s, None, Err(down())).await;
        assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
        let (r, _, primary_asked) = route(&s, Some("standby"), Ok("primary")).await;
        assert_eq!((r.unwrap(), primary_asked), ("standby", false), "asked the primary while it rests");
        let (r, _, primary_asked) = route(&s, None, Ok("primary")).await;
        assert!(matches!(r, Err(Error::Unavailable { .. })) && !primary_asked, "{r:?}");
        tokio::time::advance(RETRY_INTERVAL - Duration::from_millis(1)).await;
        let (_, _, primary_asked) = route(&s, Some("standby"), Ok("primary")).await;
        assert!(!primary_asked, "asked the primary before the interval ended");
        tokio::time::advance(Duration::from_millis(2)).await;
        let (r, _, _) = route(&s, Some("standby"), Ok("primary")).await;
        assert_eq!(r.unwrap(), "primary", "the primary not asked again after the interval");
        let (_, standby_asked, _) = route(&s, Some("standby"), Ok("primary")).await;
        assert!(!standby_asked, "an answer of the primary ends its rest");
    }

    /// A primary that does not answer (a stopped one is retried by the pool
    /// until its acquire timeout) holds a read for PRIMARY_FIRST_TIMEOUT at
    /// most, then the standby answers; while one read probes a failed
    /// primary, the others go straight to the standby.
    #[tokio::test(start_paused = true)]
    async fn without_notices_a_silent_primary_holds_one_read_at_a_time_for_the_timeout_at_most() {
        let s = standby();
        let started = Instant::now();
        // Bounded here, so that a read waiting for ever fails the test instead of hanging it.
        let r =
            tokio::time::timeout(Duration::from_secs(60), s.route(async { Some("standby") }, std::future::pending()))
                .await
                .expect("the read waited on a silent primary for ever");
        assert_eq!(r.unwrap(), "standby");
        assert_eq!(started.elapsed(), PRIMARY_FIRST_TIMEOUT, "waited on the primary for other than the timeout");
        tokio::time::advance(RETRY_INTERVAL).await;
        let probing = s.route(async { Some("prober") }, std::future::pending());
        let other = async {
            // The probe has claimed the primary by the time this read starts.
            tokio::task::yield_now().await;
            let started = Instant::now();
            let r = s.route(async { Some("standby") }, std::future::pending()).await;
            (r.unwrap(), started.elapsed())
        };
        let (probed, (other, waited)) = tokio::join!(probing, other);
        assert_eq!(probed.unwrap(), "prober");
        assert_eq!((other, waited), ("standby", Duration::ZERO), "a read waited while another probed the primary");
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
