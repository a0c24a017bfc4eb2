//! The verified-key cache: what makes a warm `VerifyKey` cost about as much
//! as an empty RPC.
//!
//! Entries are keyed by HMAC-SHA256 of the presented key under a random
//! per-process key, never by the key itself: a heap dump yields no usable key
//! and no offline-checkable hash. A positive entry exists only after argon2
//! proved that exact string, so re-reading the record later (freshness)
//! needs no rehash. A negative entry remembers a well-formed key that named
//! no key or carried a wrong secret, so repeats cost no database or argon2
//! work.
//!
//! Invalidation is by key id: an index maps each id to the fingerprint of its
//! one positive entry. Every invalidation bumps an epoch for that id's stripe
//! (and a resync the global one); a miss that started before an invalidation
//! of its key does not insert what it read, so a racing reader can never put
//! back a record the invalidation just removed. Epochs are striped by id so
//! that steady changes to other keys never keep a new key out of the cache.
//!
//! A resync (notices flow again after a gap) drops nothing: it bumps the
//! global epoch, and every entry read before it needs a re-read. The re-read
//! costs one indexed lookup and no argon2, and if the store fails again the
//! entry can still be served within the stale window: a listener reconnect
//! never turns a warm cache cold.

use crate::domain::model::{ApiKey, StoredHash};
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use moka::sync::Cache;
use rand::{TryRngCore, rngs::OsRng};
use sha2::Sha256;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

pub type Fingerprint = [u8; 32];

/// How long an announced version is remembered (see `VerifyCache::floors`).
const FLOOR_TTL: Duration = Duration::from_secs(600);

/// Stripes of per-key epochs: enough that unrelated keys rarely share one.
const EPOCH_STRIPES: usize = 1024;

/// Where invalidations stood when a store read began; see [`VerifyCache::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    global: u64,
    stripe: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Most positive entries (and as many negative ones).
    pub capacity: u64,
    /// After this, a hit re-reads the key's record from the store.
    pub freshness: Duration,
    /// While the store cannot confirm an entry, it may still be served up
    /// to this age (fail static); older ones fail with UNAVAILABLE.
    pub stale_window: Duration,
    /// How long a NOT_FOUND is remembered.
    pub negative_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            freshness: Duration::from_secs(30),
            stale_window: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
        }
    }
}

/// A cached, proven key and when its record was last read from the store.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: Arc<ApiKey>,
    pub fetched_at: Instant,
    /// A change notice named this key: its record must be re-read before it
    /// is trusted again, and it is never served stale.
    pub changed: bool,
    /// The global epoch when the record was read: an entry older than the
    /// last resync must be re-read (but, unlike `changed`, may be served
    /// stale while the store cannot answer).
    global_epoch: u64,
}

/// What the store said about a key id: its record and stored hash, or that
/// there is no such key. Lets a wrong secret for a known id, or any secret
/// for an unknown one, be refuted with one hash and no store read.
pub type Record = Option<Arc<(ApiKey, StoredHash)>>;

#[derive(Clone)]
struct IdEntry {
    record: Record,
    epoch: Epoch,
    fetched_at: Instant,
}

pub struct VerifyCache {
    mac: Hmac<Sha256>,
    /// Key id → its record as last read, valid only while the id's epoch
    /// is unchanged (so the same invalidations that reach positive entries
    /// void it), notices flow, and it is younger than the freshness bound.
    records: Cache<Arc<str>, IdEntry>,
    positive: Cache<Fingerprint, Entry>,
    /// Key id → fingerprint of its positive entry, for invalidation by id.
    by_id: Cache<Arc<str>, Fingerprint>,
    negative: Cache<Fingerprint, ()>,
    /// Key id → the newest version (`updated_at`) a change notice announced:
    /// reads of an older record (a lagging standby's) are not trusted. Kept
    /// far longer than any replication lag worth serving reads from.
    floors: Cache<Arc<str>, DateTime<Utc>>,
    /// Bumped by `mark_all_for_reread`.
    global_epoch: AtomicU64,
    /// Bumped by invalidations, one counter per stripe of key ids.
    stripes: Box<[AtomicU64]>,
    /// False while change notices cannot arrive (listener down): every hit
    /// then re-reads its record, so a missed notice is never trusted away.
    notices_flowing: AtomicBool,
    settings: CacheSettings,
}

impl VerifyCache {
    pub fn new(settings: CacheSettings) -> Self {
        let mut hmac_key = [0u8; 32];
        OsRng.try_fill_bytes(&mut hmac_key).expect("OS random source");
        let capacity = settings.capacity.max(1);
        Self {
            mac: Hmac::<Sha256>::new_from_slice(&hmac_key).expect("any key length"),
            records: Cache::builder().max_capacity(capacity).build(),
            positive: Cache::builder().max_capacity(capacity).build(),
            by_id: Cache::builder().max_capacity(capacity).build(),
            negative: Cache::builder().max_capacity(capacity).time_to_live(settings.negative_ttl).build(),
            floors: Cache::builder().max_capacity(capacity).time_to_live(FLOOR_TTL).build(),
            global_epoch: AtomicU64::new(0),
            stripes: (0..EPOCH_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            notices_flowing: AtomicBool::new(true),
            settings,
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn fingerprint(&self, presented: &str) -> Fingerprint {
        let mut mac = self.mac.clone();
        mac.update(presented.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn get(&self, fp: &Fingerprint) -> Option<Entry> {
        self.positive.get(fp)
    }

    /// True when the entry must be re-read before it is trusted.
    pub fn needs_refresh(&self, e: &Entry) -> bool {
        e.changed
            || !self.notices_flowing.load(Ordering::Acquire)
            || e.global_epoch != self.global_epoch.load(Ordering::Acquire)
            || e.fetched_at.elapsed() > self.settings.freshness
    }

    /// Remembers that key `id`'s record is at `version` or newer.
    pub fn raise_floor(&self, id: &str, version: DateTime<Utc>) {
        let id: Arc<str> = Arc::from(id);
        let newest = self.floors.get(&id).map_or(version, |v| v.max(version));
        self.floors.insert(id, newest);
    }

    /// The newest version announced for key `id`, if any.
    pub fn floor(&self, id: &str) -> Option<DateTime<Utc>> {
        self.floors.get(id)
    }

    pub fn is_negative(&self, fp: &Fingerprint) -> bool {
        self.negative.contains_key(fp)
    }

    pub fn insert_negative(&self, fp: Fingerprint) {
        self.negative.insert(fp, ());
    }

    fn stripe(&self, id: &str) -> &AtomicU64 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(id);
        &self.stripes[(h % EPOCH_STRIPES as u64) as usize]
    }

    /// The epoch of key `id`, to pass to [`Self::insert`] after reading the store.
    pub fn epoch(&self, id: &str) -> Epoch {
        Epoch { global: self.global_epoch.load(Ordering::Acquire), stripe: self.stripe(id).load(Ordering::Acquire) }
    }

    /// Caches a proven key, unless it (or everything) was invalidated since `epoch`.
    pub fn insert(&self, fp: Fingerprint, key: Arc<ApiKey>, epoch: Epoch) {
        let id: Arc<str> = Arc::from(key.id.as_str());
        if self.epoch(&id) != epoch {
            return;
        }
        self.positive.insert(fp, Entry { key, fetched_at: Instant::now(), changed: false, global_epoch: epoch.global });
        self.by_id.insert(id.clone(), fp);
        // An invalidation that slipped in between is applied again.
        if self.epoch(&id) != epoch {
            self.positive.invalidate(&fp);
        }
    }

    /// The record of key `id` as last read, if it can still be trusted.
    /// `Some(None)`: the store had no such key.
    pub fn record(&self, id: &str) -> Option<Record> {
        let e = self.records.get(id)?;
        let ttl = if e.record.is_some() { self.settings.freshness } else { self.settings.negative_ttl };
        let trusted =
            e.epoch == self.epoch(id) && self.notices_flowing.load(Ordering::Acquire) && e.fetched_at.elapsed() <= ttl;
        trusted.then_some(e.record)
    }

    /// Remembers what the store said about key `id`, read at `epoch`.
    pub fn insert_record(&self, id: &str, record: Record, epoch: Epoch) {
        if self.epoch(id) == epoch {
            self.records.insert(Arc::from(id), IdEntry { record, epoch, fetched_at: Instant::now() });
        }
    }

    /// Forgets the record of key `id` (its stored hash was replaced).
    pub fn forget_record(&self, id: &str) {
        self.records.invalidate(id);
    }

    /// Marks the entry of key `id`, if any, as changed: the next hit re-reads
    /// its record (one indexed read, no argon2: the secret was proven for
    /// that exact string and a change never touches it). A read already in
    /// flight cannot put the old record back (see `epoch`).
    pub fn invalidate(&self, id: &str) {
        self.stripe(id).fetch_add(1, Ordering::AcqRel);
        if let Some(fp) = self.by_id.get(id)
            && let Some(mut e) = self.positive.get(&fp)
        {
            e.changed = true;
            self.positive.insert(fp, e);
        }
    }

    /// Forgets key `id` entirely (it no longer exists).
    pub fn remove(&self, id: &str) {
        self.stripe(id).fetch_add(1, Ordering::AcqRel);
        if let Some(fp) = self.by_id.remove(id) {
            self.positive.invalidate(&fp);
        }
    }

    /// After a gap in change notices anything may have changed: every entry
    /// read before now needs a re-read, and reads still in flight are not
    /// cached. Entries are kept, so the re-read needs no argon2 and a store
    /// that fails again can still be ridden out (fail static). Negative
    /// entries stay: a wrong secret cannot turn valid.
    pub fn mark_all_for_reread(&self) {
        self.global_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Records whether change notices are arriving; see `notices_flowing`.
    pub fn set_notices_flowing(&self, flowing: bool) {
        self.notices_flowing.store(flowing, Ordering::Release);
    }

    /// Verified keys cached (the `cache_entries` gauge), with moka's pending
    /// bookkeeping applied first so the figure is current.
    pub fn entry_count(&self) -> u64 {
        self.positive.run_pending_tasks();
        self.positive.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> Arc<ApiKey> {
        Arc::new(ApiKey::for_test(id))
    }

    #[test]
    fn fingerprints_are_keyed_per_process() {
        let a = VerifyCache::new(CacheSettings::default());
        let b = VerifyCache::new(CacheSettings::default());
        assert_eq!(a.fingerprint("tk_live_x"), a.fingerprint("tk_live_x"));
        assert_ne!(a.fingerprint("tk_live_x"), b.fingerprint("tk_live_x"));
    }

    #[test]
    fn invalidation_by_id_forces_a_reread_and_removal_forgets() {
        let c = VerifyCache::new(CacheSettings::default());
        let fp = c.fingerprint("k1");
        c.insert(fp, key("id1"), c.epoch("id1"));
        assert!(!c.needs_refresh(&c.get(&fp).unwrap()));
        c.invalidate("id1");
        assert!(c.needs_refresh(&c.get(&fp).unwrap()));
        c.remove("id1");
        assert!(c.get(&fp).is_none());
    }

    #[test]
    fn the_newest_announced_version_is_the_floor_and_it_never_falls() {
        let c = VerifyCache::new(CacheSettings::default());
        let at = |s: i64| DateTime::<Utc>::from_timestamp(s, 0).unwrap();
        assert_eq!(c.floor("id1"), None);
        c.raise_floor("id1", at(200));
        assert_eq!(c.floor("id1"), Some(at(200)));
        c.raise_floor("id1", at(100));
        assert_eq!(c.floor("id1"), Some(at(200)), "an older notice lowered the floor");
        c.raise_floor("id1", at(300));
        assert_eq!(c.floor("id1"), Some(at(300)));
        assert_eq!(c.floor("id2"), None, "a floor is per key");
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_cached() {
        let c = VerifyCache::new(CacheSettings::default());
        let fp = c.fingerprint("k1");
        let epoch = c.epoch("id1");
        c.remove("id1");
        c.insert(fp, key("id1"), epoch);
        assert!(c.get(&fp).is_none());
        // Steady changes to other keys do not keep this one out.
        let epoch = c.epoch("id1");
        let others = (0..500).map(|i| format!("other-{i}")).filter(|o| !std::ptr::eq(c.stripe(o), c.stripe("id1")));
        for other in others {
            c.invalidate(&other);
        }
        c.insert(fp, key("id1"), epoch);
        assert!(c.get(&fp).is_some());
    }

    #[test]
    fn a_resync_keeps_entries_but_makes_each_one_re_read_once() {
        let c = VerifyCache::new(CacheSettings::default());
        let fp = c.fingerprint("k1");
        c.insert(fp, key("id1"), c.epoch("id1"));
        let in_flight = c.epoch("id1");
        c.mark_all_for_reread();
        let e = c.get(&fp).expect("a resync keeps the entry");
        assert!(c.needs_refresh(&e));
        assert!(!e.changed, "a resync is no change notice: the entry may still be served stale");
        // A read that began before the resync does not count as the re-read.
        c.insert(fp, key("id1"), in_flight);
        assert!(c.needs_refresh(&c.get(&fp).unwrap()));
        // A re-read after it does.
        c.insert(fp, key("id1"), c.epoch("id1"));
        assert!(!c.needs_refresh(&c.get(&fp).unwrap()));
    }

    #[test]
    fn an_id_record_is_void_after_any_invalidation_of_its_id() {
        let c = VerifyCache::new(CacheSettings::default());
        let stored = StoredHash { phc: "$argon2id$".into(), pepper_id: "00000000".into() };
        let rec = || Some(Arc::new(((*key("id1")).clone(), stored.clone())));
        c.insert_record("id1", rec(), c.epoch("id1"));
        assert!(c.record("id1").unwrap().is_some());
        c.invalidate("id1");
        assert!(c.record("id1").is_none(), "a change notice voids it");
        c.insert_record("id1", rec(), c.epoch("id1"));
        c.mark_all_for_reread();
        assert!(c.record("id1").is_none(), "a resync voids it");
        c.insert_record("id1", rec(), c.epoch("id1"));
        c.set_notices_flowing(false);
        assert!(c.record("id1").is_none(), "not trusted while notices cannot arrive");
        c.set_notices_flowing(true);
        c.insert_record("id1", rec(), c.epoch("id1"));
        c.forget_record("id1");
        assert!(c.record("id1").is_none(), "a replaced hash voids it");
        // A read that raced an invalidation is not remembered.
        let epoch = c.epoch("id2");
        c.remove("id2");
        c.insert_record("id2", None, epoch);
        assert!(c.record("id2").is_none());
    }

    #[test]
    fn entry_count_counts_verified_keys() {
        let c = VerifyCache::new(CacheSettings::default());
        assert_eq!(c.entry_count(), 0);
        for k in ["k1", "k2", "k3"] {
            c.insert(c.fingerprint(k), key(k), c.epoch(k));
        }
        assert_eq!(c.entry_count(), 3);
    }

    #[test]
    fn entries_need_refresh_while_notices_are_not_flowing() {
        let c = VerifyCache::new(CacheSettings::default());
        let fp = c.fingerprint("k1");
        c.insert(fp, key("id1"), c.epoch("id1"));
        let e = c.get(&fp).unwrap();
        assert!(!c.needs_refresh(&e));
        c.set_notices_flowing(false);
        assert!(c.needs_refresh(&e));
    }
}
