//! When a database last failed, so that reads skip it for a while instead of
//! each waiting out a connection attempt: the verifier's outage breaker and
//! the standby's (and the primary's, where it is asked first) share it.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};
// Tokio's clock: the system's monotonic clock, except in paused-time tests.
use tokio::time::Instant;

pub struct Rest {
    start: Instant,
    /// How long a failure rests the database.
    interval_ms: u64,
    /// Milliseconds since `start` of the last failure (0: none since the last
    /// answer; a failure stores at least 1).
    failed_at_ms: AtomicU64,
}

impl Rest {
    pub fn new(interval: Duration) -> Self {
        Self { start: Instant::now(), interval_ms: interval.as_millis() as u64, failed_at_ms: AtomicU64::new(0) }
    }

    fn now_ms(&self) -> u64 {
        (self.start.elapsed().as_millis() as u64).max(1)
    }

    /// Whether `failed_at` (a failure's time, 0: none) is less than an
    /// interval ago. `now_ms` is at least 1, which can be ahead of a failure
    /// stored in the first millisecond: saturate instead of underflowing.
    fn rests_since(&self, failed_at: u64, now: u64) -> bool {
        failed_at != 0 && now.saturating_sub(failed_at) < self.interval_ms
    }

    /// Whether the database failed less than an interval ago.
    pub fn resting(&self) -> bool {
        self.rests_since(self.failed_at_ms.load(Ordering::Relaxed), self.now_ms())
    }

    /// Whether this read may ask: always while the database is not known to
    /// fail; after a failure, once per interval, to one read only (it re-arms
    /// the rest), so the reads meanwhile never wait on it.
    pub fn claim(&self) -> bool {
        let at = self.failed_at_ms.load(Ordering::Relaxed);
        if at == 0 {
            return true;
        }
        let now = self.now_ms();
        !self.rests_since(at, now)
            && self.failed_at_ms.compare_exchange(at, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    /// Records a failure. True when it is the first since the last answer
    /// (a transition worth one log line, not one per read).
    pub fn failed(&self) -> bool {
        self.failed_at_ms.swap(self.now_ms(), Ordering::Relaxed) == 0
    }

    /// Records an answer, ending the rest. True when it ends a failure.
    pub fn answered(&self) -> bool {
        self.failed_at_ms.swap(0, Ordering::Relaxed) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);

    /// One log line when a database starts failing and one when it answers
    /// again, not one per read: during an outage every verification reads.
    #[test]
    fn only_the_first_failure_and_the_first_answer_after_it_are_transitions() {
        let rest = Rest::new(INTERVAL);
        assert!(!rest.answered(), "an answer before any failure");
        assert!(rest.failed(), "the first failure");
        assert!(!rest.failed(), "a second failure");
        assert!(rest.answered(), "the answer after failures");
        assert!(!rest.answered(), "a second answer");
        assert!(rest.failed(), "a failure after recovery");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_rests_the_database_for_its_interval_only() {
        let rest = Rest::new(INTERVAL);
        assert!(!rest.resting(), "a database that never failed");
        tokio::time::advance(Duration::from_secs(10)).await;
        rest.failed();
        tokio::time::advance(INTERVAL / 2).await;
        assert!(rest.resting(), "half an interval after a failure");
        tokio::time::advance(INTERVAL / 2).await;
        assert!(!rest.resting(), "an interval after a failure");
        rest.failed();
        assert!(rest.resting(), "a second failure re-arms it");
        rest.answered();
        assert!(!rest.resting(), "an answer ends it");
    }

    /// After a failure one read per interval may ask again, and only one:
    /// the others meanwhile must not wait on a database that may be dead.
    #[tokio::test(start_paused = true)]
    async fn after_a_failure_one_read_per_interval_may_ask() {
        let rest = Rest::new(INTERVAL);
        assert!(rest.claim() && rest.claim(), "a database that never failed is always asked");
        tokio::time::advance(Duration::from_secs(10)).await;
        rest.failed();
        assert!(!rest.claim(), "asked again at once after a failure");
        tokio::time::advance(INTERVAL - Duration::from_millis(1)).await;
        assert!(!rest.claim(), "asked again before the interval is over");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(rest.claim(), "not asked once the interval is over");
        assert!(!rest.claim(), "a second read asked while the first probes");
        tokio::time::advance(INTERVAL).await;
        assert!(rest.claim(), "the probe's claim re-arms the rest for one interval only");
        rest.answered();
        assert!(rest.claim() && rest.claim(), "an answer did not end the rest");
    }
}
