//! Counters of the verification path, in one place. Plain atomics: the hot
//! path pays one relaxed increment per event. One `Metrics` per server,
//! shared by `Arc`, so servers side by side (tests, benchmarks) count apart.
//! The metrics endpoint (added by the operations work) reads them from here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Verify outcomes, indexed like `VerifyCode` (0 unused).
pub const VERIFY_CODES: [&str; 9] = [
    "unspecified",
    "valid",
    "malformed",
    "not_found",
    "disabled",
    "revoked",
    "expired",
    "insufficient_scope",
    "wrong_organization",
];

#[derive(Debug, Default)]
pub struct Metrics {
    pub verify_outcomes: [AtomicU64; 9],
    /// Presented key found in the verified-key cache and fresh.
    pub cache_hits: AtomicU64,
    /// Cached but past the freshness bound: re-read from the store.
    pub cache_refreshes: AtomicU64,
    /// Served from cache although the store could not confirm it (fail static).
    pub cache_stale_served: AtomicU64,
    /// Not cached: store lookup and, if found, argon2.
    pub cache_misses: AtomicU64,
    /// Answered NOT_FOUND from the negative cache.
    pub negative_hits: AtomicU64,
    /// Key rows read by the verification path (lookups and refreshes).
    pub store_key_reads: AtomicU64,
    pub argon2_verifications: AtomicU64,
    /// Argon2 jobs refused because the queue was full.
    pub argon2_rejected: AtomicU64,
    pub usage_flush_batches: AtomicU64,
    pub usage_flush_rows: AtomicU64,
    pub usage_flush_failures: AtomicU64,
    /// Cache entries dropped by invalidations (one per notice or local change).
    pub invalidations: AtomicU64,
    /// Times the whole cache was emptied (listener reconnects).
    pub cache_resets: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
