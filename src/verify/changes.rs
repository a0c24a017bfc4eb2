//! The change feed: every key change this process hears of, for
//! `WatchKeyChanges` subscribers (gateways and the Rust `VerifyLayer`, which
//! cache verdicts and drop a key's verdict the moment it changes).
//!
//! Fed from two places, through [`crate::verify::Verifier`]: changes made by
//! this process (its handlers) and change notices from other replicas (the
//! store's listener). On PostgreSQL a change made here is therefore
//! delivered twice, at once and again when its own notice comes back:
//! delivery is at least once, which costs a subscriber one extra removal.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::broadcast;

/// What subscribers are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Key `id` changed. `organization_id` is `None` when the notice named the
    /// key only (a replica of an older version announced it).
    Key { id: Arc<str>, organization_id: Option<Arc<str>> },
    /// Changes may have been missed (the notice listener reconnected, or a
    /// subscriber fell behind): forget everything.
    Resync,
    /// Notices have not flowed for longer than the grace: streams end, so
    /// their callers fall back to short-lived verdicts instead of trusting a
    /// stream that hears nothing.
    Lost,
    /// This process is shutting down: streams end so that draining does not
    /// wait on them, and their callers reconnect to another replica.
    Stopping,
}

/// Changes held for a slow subscriber before it is told to resync. Changes
/// are management operations, so this is minutes of a busy organization.
const BACKLOG: usize = 4096;

/// How long a gap in notices streams stay open through. A listener
/// reconnect takes 100 ms to a few seconds, and ends in a resync that voids
/// whatever a subscriber cached meanwhile; a longer gap means the database is
/// out of reach from here, and subscribers must not trust this stream then.
pub const LOST_GRACE: Duration = Duration::from_secs(10);

pub struct ChangeFeed {
    tx: broadcast::Sender<Change>,
    grace: Duration,
    /// When the current gap in notices began; `None` while they flow.
    gap_since: Mutex<Option<Instant>>,
    /// False once a gap outlasted the grace, until notices flow again.
    flowing: AtomicBool,
    stopping: AtomicBool,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self::with_grace(LOST_GRACE)
    }
}

impl ChangeFeed {
    pub fn with_grace(grace: Duration) -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
            grace,
            gap_since: Mutex::new(None),
            flowing: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
        }
    }

    pub fn key_changed(&self, id: &str, organization_id: Option<&str>) {
        // No subscribers is the common case and not an error.
        let _ = self.tx.send(Change::Key { id: id.into(), organization_id: organization_id.map(Arc::from) });
    }

    /// Notices flow again after a gap (or for the first time).
    pub fn resync(&self) {
        *self.gap_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.flowing.store(true, Ordering::Release);
        let _ = self.tx.send(Change::Resync);
    }

    /// Notices cannot arrive right now. The listener reports this at the loss
    /// and again at every failed reconnect, so a gap that outlasts the grace
    /// is seen at the first report after it.
    pub fn lost(&self) {
        let mut gap = self.gap_since.lock().unwrap_or_else(|p| p.into_inner());
        let since = *gap.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.grace {
            self.flowing.store(false, Ordering::Release);
            let _ = self.tx.send(Change::Lost);
        }
    }

    /// Ends every subscription; none is taken from now on.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.tx.send(Change::Stopping);
    }

    /// A new subscription, or why there is none: notices have not flowed for
    /// longer than the grace, or the process is stopping. Subscribing before
    /// reading the flags means a loss racing this call is seen here or delivered.
    pub fn subscribe(&self) -> Result<broadcast::Receiver<Change>, Change> {
        let rx = self.tx.subscribe();
        if self.stopping.load(Ordering::Acquire) {
            Err(Change::Stopping)
        } else if !self.flowing.load(Ordering::Acquire) {
            Err(Change::Lost)
        } else {
            Ok(rx)
        }
    }

    /// Current subscribers, for the metrics.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next change, failing (not hanging) when none comes within 5 s.
    async fn next(rx: &mut broadcast::Receiver<Change>) -> Change {
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a change within 5 s").unwrap()
    }

    fn key(id: &str, org: Option<&str>) -> Change {
        Change::Key { id: id.into(), organization_id: org.map(Arc::from) }
    }

    #[test]
    fn the_subscriber_count_follows_streams_opening_and_closing() {
        let feed = ChangeFeed::default();
        assert_eq!(feed.subscribers(), 0);
        let (a, b) = (feed.subscribe().unwrap(), feed.subscribe().unwrap());
        assert_eq!(feed.subscribers(), 2);
        drop((a, b));
        assert_eq!(feed.subscribers(), 0);
    }

    #[tokio::test]
    async fn subscribers_hear_changes_and_resyncs_in_order() {
        let feed = ChangeFeed::default();
        let mut rx = feed.subscribe().expect("changes flow from the start");
        feed.key_changed("k1", Some("acme"));
        feed.key_changed("k2", None);
        feed.resync();
        assert_eq!(next(&mut rx).await, key("k1", Some("acme")));
        assert_eq!(next(&mut rx).await, key("k2", None));
        assert_eq!(next(&mut rx).await, Change::Resync);
        assert_eq!(feed.subscribers(), 1);
    }

    #[tokio::test]
    async fn a_short_gap_keeps_streams_open_until_the_resync_and_a_long_one_ends_them() {
        let feed = ChangeFeed::with_grace(Duration::from_millis(50));
        let mut rx = feed.subscribe().unwrap();
        feed.lost();
        feed.lost();
        let _during_the_gap = feed.subscribe().expect("a short gap takes subscriptions");
        feed.resync();
        assert_eq!(next(&mut rx).await, Change::Resync, "a short gap ends in a resync, nothing else");

        feed.lost();
        std::thread::sleep(Duration::from_millis(60));
        feed.lost();
        assert_eq!(next(&mut rx).await, Change::Lost, "a gap past the grace ends the stream");
        assert_eq!(feed.subscribe().err(), Some(Change::Lost), "no subscription while nothing is heard");
        feed.resync();
        assert!(feed.subscribe().is_ok(), "subscriptions resume once notices flow");
        feed.lost();
        assert!(feed.subscribe().is_ok(), "a new gap starts its own grace");
    }

    #[tokio::test]
    async fn stopping_ends_every_stream_and_takes_no_new_one() {
        let feed = ChangeFeed::default();
        let mut rx = feed.subscribe().unwrap();
        feed.stop();
        assert_eq!(next(&mut rx).await, Change::Stopping);
        assert_eq!(feed.subscribe().err(), Some(Change::Stopping));
        feed.resync();
        assert_eq!(feed.subscribe().err(), Some(Change::Stopping), "a late resync does not undo a stop");
    }
}
