//! The verification engine: shape and checksum, the verified-key cache,
//! else one indexed lookup and one argon2 verify; then a pure decision.
//! `VerifyKey` and the authentication of API-key callers both go through
//! [`Verifier::verify`], so a key that verifies is exactly a key that can
//! call the API, and both are counted in one place.
//!
//! Layout: [`cache`] (the verified-key cache), [`hashing`] (argon2id on
//! dedicated threads), [`usage`] (batched usage counting); may import from
//! [`crate::store`], [`crate::proto`] and the ground, never from
//! [`crate::api`] or [`crate::server`].

pub mod cache;
pub mod changes;
pub mod hashing;
pub mod usage;

use crate::{
    domain::keys,
    domain::model::{ApiKey, KeyStatus, StoredHash},
    domain::scopes,
    domain::secret::SecretString,
    error::{Error, Result},
    metrics::Metrics,
    proto::pb::VerifyCode,
    store::{ChangeSink, Store, rest::Rest},
    verify::cache::{Entry, Fingerprint, VerifyCache},
    verify::changes::ChangeFeed,
    verify::hashing::Hasher,
    verify::usage::Usage,
};
use chrono::{DateTime, Utc};
use std::{sync::Arc, time::Duration};

/// Why a presented key does not pass, in the order the checks run. The one
/// vocabulary of refusals: `VerifyKey` answers with [`Denial::code`], a
/// management call's credential is refused with [`Denial::reason`], metrics
/// count [`Denial::label`], and the Rust client hands the same type to its
/// callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// Not one of our keys: wrong shape or checksum. No I/O was done.
    Malformed,
    /// Well-formed, but no such key or a wrong secret; the two are not told apart.
    NotFound,
    Revoked,
    Disabled,
    Expired,
    WrongOrganization,
    /// The required scopes the key lacks.
    InsufficientScope(Vec<String>),
}

impl Denial {
    /// The wire code of this refusal.
    pub fn code(&self) -> VerifyCode {
        match self {
            Denial::Malformed => VerifyCode::Malformed,
            Denial::NotFound => VerifyCode::NotFound,
            Denial::Revoked => VerifyCode::Revoked,
            Denial::Disabled => VerifyCode::Disabled,
            Denial::Expired => VerifyCode::Expired,
            Denial::WrongOrganization => VerifyCode::WrongOrganization,
            Denial::InsufficientScope(_) => VerifyCode::InsufficientScope,
        }
    }

    /// The refusal a wire code and its missing scopes describe; `None` for
    /// VALID and for codes this build does not know.
    pub fn from_code(code: VerifyCode, missing_scopes: Vec<String>) -> Option<Denial> {
        Some(match code {
            VerifyCode::Valid | VerifyCode::Unspecified => return None,
            VerifyCode::Malformed => Denial::Malformed,
            VerifyCode::NotFound => Denial::NotFound,
            VerifyCode::Revoked => Denial::Revoked,
            VerifyCode::Disabled => Denial::Disabled,
            VerifyCode::Expired => Denial::Expired,
            VerifyCode::WrongOrganization => Denial::WrongOrganization,
            VerifyCode::InsufficientScope => Denial::InsufficientScope(missing_scopes),
        })
    }

    /// What to tell the holder of the key, safe to show: it names no secret
    /// and does not tell an unknown key from a wrong secret.
    pub fn reason(&self) -> String {
        match self {
            Denial::Malformed => "the API key is malformed".into(),
            Denial::NotFound => "the API key is invalid".into(),
            Denial::Revoked => "the API key is revoked".into(),
            Denial::Disabled => "the API key is disabled".into(),
            Denial::Expired => "the API key is expired".into(),
            Denial::WrongOrganization => "the API key is for another organization".into(),
            Denial::InsufficientScope(missing) => {
                format!("the API key lacks the scope(s) this request needs: {}", missing.join(", "))
            }
        }
    }

    /// The metric label: the wire code's name in lower case.
    pub fn label(&self) -> &'static str {
        code_label(self.code())
    }
}

/// A wire code's metric label (`valid`, `not_found`, …).
pub fn code_label(code: VerifyCode) -> &'static str {
    match code {
        VerifyCode::Unspecified => "unspecified",
        VerifyCode::Valid => "valid",
        VerifyCode::Malformed => "malformed",
        VerifyCode::NotFound => "not_found",
        VerifyCode::Disabled => "disabled",
        VerifyCode::Revoked => "revoked",
        VerifyCode::Expired => "expired",
        VerifyCode::InsufficientScope => "insufficient_scope",
        VerifyCode::WrongOrganization => "wrong_organization",
    }
}

/// What a verification asks, and so what it counts.
#[derive(Debug, Clone, Copy)]
pub enum Purpose<'a> {
    /// A `VerifyKey` question: the key must hold `required` and belong to
    /// `organization` when one is named. Counted as a VerifyKey outcome and,
    /// when valid, as an API call of the key.
    VerifyKey { required: &'a [String], organization: Option<&'a str> },
    /// The credential of a management call: the key must be usable (active,
    /// unexpired). The call counts as the key's API call only once it is
    /// authorized ([`Verifier::accepted`]).
    Credential,
    /// A string reported as leaked: is it one of our keys (whatever its
    /// status)? Counts nothing: the key's holder did not present it.
    Report,
}

/// The whole answer about one presented key. `stale`: served from cache
/// while the store could not confirm it (fail static).
#[derive(Debug, Clone)]
pub enum Verdict {
    Valid {
        key: Arc<ApiKey>,
        stale: bool,
    },
    /// `key`: the key the secret proved, whatever its status; `None` when
    /// malformed or not found.
    Denied {
        denial: Denial,
        key: Option<Arc<ApiKey>>,
        stale: bool,
    },
}

impl Verdict {
    pub fn code(&self) -> VerifyCode {
        match self {
            Verdict::Valid { .. } => VerifyCode::Valid,
            Verdict::Denied { denial, .. } => denial.code(),
        }
    }

    /// The key the presented secret proved, whether or not it passed.
    pub fn key(&self) -> Option<&Arc<ApiKey>> {
        match self {
            Verdict::Valid { key, .. } => Some(key),
            Verdict::Denied { key, .. } => key.as_ref(),
        }
    }
}

/// What the lookup found, before any decision.
enum Lookup {
    Denied(Denial),
    Key { key: Arc<ApiKey>, stale: bool },
}

/// The decision for a found key: status, expiry, organization, scopes.
pub fn decide(
    key: &ApiKey,
    required: &[String],
    organization_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), Denial> {
    match key.status {
        KeyStatus::Revoked => return Err(Denial::Revoked),
        KeyStatus::Disabled => return Err(Denial::Disabled),
        KeyStatus::Active => {}
    }
    if key.is_expired(now) {
        return Err(Denial::Expired);
    }
    if organization_id.is_some_and(|o| o != key.organization_id) {
        return Err(Denial::WrongOrganization);
    }
    let missing = scopes::missing(&key.scopes, required);
    if !missing.is_empty() {
        return Err(Denial::InsufficientScope(missing));
    }
    Ok(())
}

/// After a store failure, how long verifications skip the store and answer
/// from cache (or fail fast) before trying it again: during an outage each
/// call must not wait out a connection attempt.
const STORE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Keys whose first resolution can be coalesced at once; beyond it, misses
/// still work, each on its own.
const INFLIGHT_CAPACITY: u64 = 10_000;

#[derive(Clone)]
pub struct Verifier {
    store: Arc<dyn Store>,
    hasher: Hasher,
    usage: Usage,
    cache: Arc<VerifyCache>,
    metrics: Arc<Metrics>,
    breaker: Arc<Breaker>,
    /// Every change this process hears of, for `WatchKeyChanges`.
    changes: Arc<ChangeFeed>,
    /// A lock per presented key being resolved, so concurrent misses of one
    /// key share a single store read and argon2 verification.
    inflight: Arc<moka::sync::Cache<Fingerprint, Arc<tokio::sync::Mutex<()>>>>,
}

/// The store's outage breaker: while the store rests after a failure,
/// verifications answer from cache (or fail fast) without asking it. Logs
/// the transitions, once per outage.
struct Breaker(Rest);

impl Breaker {
    fn new() -> Self {
        Self(Rest::new(STORE_RETRY_INTERVAL))
    }

    fn open(&self) -> bool {
        self.0.resting()
    }

    /// Records a failure. True (and logged) when it is the first since the
    /// store last answered.
    fn failed(&self, err: &Error) -> bool {
        let first = self.0.failed();
        if first {
            tracing::warn!(error = %crate::error::error_chain(err), "key store unreachable: verifying from cache (fail static)");
        }
        first
    }

    /// Records an answer: closes the breaker. True (and logged) when it was
    /// failing until now.
    fn answered(&self) -> bool {
        let recovered = self.0.answered();
        if recovered {
            tracing::info!("key store answers again");
        }
        recovered
    }
}

impl Verifier {
    pub fn new(
        store: Arc<dyn Store>,
        hasher: Hasher,
        usage: Usage,
        cache: Arc<VerifyCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let breaker = Arc::new(Breaker::new());
        let inflight = Arc::new(
            moka::sync::Cache::builder().max_capacity(INFLIGHT_CAPACITY).time_to_idle(Duration::from_secs(10)).build(),
        );
        Self { store, hasher, usage, cache, metrics, breaker, changes: Arc::default(), inflight }
    }

    /// Runs a key read, recording outages for the breaker. While the breaker
    /// is open the read is not even tried (and not counted in
    /// `store_key_reads`): during an outage a call must not wait on a dead store.
    async fn store_call<T>(&self, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        if self.breaker.open() {
            return Err(Error::Unavailable {
                message: "the key store is unavailable; retry with backoff".into(),
                source: None,
            });
        }
        self.metrics.store_key_reads.inc();
        let r = call.await;
        match &r {
            Err(e @ Error::Unavailable { .. }) => {
                self.breaker.failed(e);
            }
            _ => {
                self.breaker.answered();
            }
        }
        r
    }

    /// The one verification entry: finds the key `presented` proves, decides
    /// it for `purpose`, and counts the outcome (see [`Purpose`]). Store
    /// trouble is an error, never a denial.
    ///
    /// Warm path (cached, fresh): parse, one HMAC, one cache read, no I/O.
    pub async fn verify(&self, presented: &str, purpose: Purpose<'_>) -> Result<Verdict> {
        let verdict = match self.lookup(presented).await? {
            Lookup::Denied(denial) => Verdict::Denied { denial, key: None, stale: false },
            Lookup::Key { key, stale } => {
                let (required, organization): (&[String], _) = match purpose {
                    Purpose::VerifyKey { required, organization } => (required, organization),
                    Purpose::Credential | Purpose::Report => (&[], None),
                };
                match decide(&key, required, organization, Utc::now()) {
                    Ok(()) => {
                        if let Purpose::VerifyKey { .. } = purpose {
                            self.accepted(&key);
                        }
                        Verdict::Valid { key, stale }
                    }
                    Err(denial) => {
                        if !matches!(purpose, Purpose::Report) {
                            self.metrics.refused(denial.label());
                        }
                        Verdict::Denied { denial, key: Some(key), stale }
                    }
                }
            }
        };
        if let Purpose::VerifyKey { .. } = purpose {
            self.metrics.verify_outcome(code_label(verdict.code()));
        }
        Ok(verdict)
    }

    /// Finds the stored key a presented key proves (whatever its status).
    async fn lookup(&self, presented: &str) -> Result<Lookup> {
        let Some(parsed) = keys::parse(presented) else {
            return Ok(Lookup::Denied(Denial::Malformed));
        };
        let fp = self.cache.fingerprint(presented);
        if let Some(entry) = self.cache.get(&fp) {
            let (key, stale) = if self.cache.needs_refresh(&entry) {
                match self.refresh(fp, entry).await? {
                    Some(found) => found,
                    None => return Ok(Lookup::Denied(Denial::NotFound)),
                }
            } else {
                self.metrics.cache_hits.inc();
                (entry.key, false)
            };
            return Ok(Lookup::Key { key, stale });
        }
        if self.cache.is_negative(&fp) {
            self.metrics.negative_hits.inc();
            return Ok(Lookup::Denied(Denial::NotFound));
        }
        // One miss per presented key at a time: concurrent first sights wait
        // for the first one's answer instead of each running argon2.
        let gate = self.inflight.get_with(fp, || Arc::new(tokio::sync::Mutex::new(())));
        let _turn = gate.lock().await;
        if let Some(entry) = self.cache.get(&fp).filter(|e| !self.cache.needs_refresh(e)) {
            self.metrics.cache_hits.inc();
            return Ok(Lookup::Key { key: entry.key, stale: false });
        }
        if self.cache.is_negative(&fp) {
            self.metrics.negative_hits.inc();
            return Ok(Lookup::Denied(Denial::NotFound));
        }
        self.metrics.cache_misses.inc();
        let epoch = self.cache.epoch(parsed.id);
        let record = match self.cache.record(parsed.id) {
            Some(record) => {
                self.metrics.id_cache_hits.inc();
                record
            }
            None => {
                let floor = self.cache.floor(parsed.id);
                let record = self.store_call(self.store.verification_read(parsed.id, floor)).await?.map(Arc::new);
                self.cache.insert_record(parsed.id, record.clone(), epoch);
                record
            }
        };
        let Some(record) = record else {
            self.cache.insert_negative(fp);
            return Ok(Lookup::Denied(Denial::NotFound));
        };
        let (key, stored) = &*record;
        // A key of the wrong environment with the right secret cannot exist,
        // but the check is free and keeps the prefix honest.
        if key.environment != parsed.environment
            || !self.hasher.verify(SecretString::new(presented), stored.clone()).await?
        {
            self.cache.insert_negative(fp);
            return Ok(Lookup::Denied(Denial::NotFound));
        }
        if self.hasher.needs_rehash(stored) {
            self.rehash(&key.id, SecretString::new(presented), stored.clone());
        }
        let key = Arc::new(key.clone());
        self.cache.insert(fp, key.clone(), epoch);
        Ok(Lookup::Key { key, stale: false })
    }

    /// Rehashes a just-verified key whose stored hash has other parameters or
    /// another pepper than new hashes get, off the request path: one hash and
    /// one conditional UPDATE (a replica that got there first wins). A
    /// failure changes nothing: the old hash keeps verifying.
    fn rehash(&self, id: &str, material: SecretString, old: StoredHash) {
        let (store, hasher, cache, metrics) =
            (self.store.clone(), self.hasher.clone(), self.cache.clone(), self.metrics.clone());
        let id = id.to_owned();
        tokio::spawn(async move {
            let replaced = match hasher.hash(material).await {
                Ok(new) => store.replace_hash(&id, &old, &new).await,
                Err(e) => Err(e),
            };
            match replaced {
                Ok(true) => {
                    metrics.argon2_rehashes.inc();
                    cache.forget_record(&id);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(key_id = %id, error = %e, "rehash failed; the old hash keeps verifying"),
            }
        });
    }

    /// Re-reads a cached key's record (no rehash: the secret was proven for
    /// this exact string). If the store cannot answer, the entry is served
    /// while younger than the stale window: verifications fail static.
    async fn refresh(&self, fp: Fingerprint, entry: Entry) -> Result<Option<(Arc<ApiKey>, bool)>> {
        self.metrics.cache_refreshes.inc();
        let epoch = self.cache.epoch(&entry.key.id);
        let floor = self.cache.floor(&entry.key.id);
        match self.store_call(self.store.verification_reread(&entry.key.id, floor)).await {
            Ok(Some(k)) => {
                let k = Arc::new(k);
                self.cache.insert(fp, k.clone(), epoch);
                Ok(Some((k, false)))
            }
            Ok(None) => {
                self.cache.remove(&entry.key.id);
                Ok(None)
            }
            // Only an unreachable store is ridden out, and only for a key no
            // notice said changed; anything else is a real error.
            Err(Error::Unavailable { .. })
                if !entry.changed && entry.fetched_at.elapsed() <= self.cache.settings().stale_window =>
            {
                self.metrics.cache_stale_served.inc();
                Ok(Some((entry.key, true)))
            }
            Err(Error::Unavailable { source, .. }) => Err(Error::Unavailable {
                message: "the key store is unavailable and this key's cached record cannot stand in for it \
                          (older than the stale window, or changed since); retry with backoff"
                    .into(),
                source,
            }),
            Err(e) => Err(e),
        }
    }

    /// Counts one API call of `key`: a VALID verification, or a management
    /// call it authenticated and was authorized for. Refusals are not calls
    /// (the product page's "API calls made with a key"); they go to
    /// [`Self::refused`].
    pub fn accepted(&self, key: &ApiKey) {
        self.usage.record(key, Utc::now());
    }

    /// Counts a refused presentation of a proven key, by reason: for a
    /// credential that verified but was not authorized for the RPC.
    pub fn refused(&self, denial: &Denial) {
        self.metrics.refused(denial.label());
    }

    /// Drops what this process cached about key `id` after a change made
    /// here that left its record at `version` (its `updated_at`; the time of
    /// the change for a deletion), and tells this process's change subscribers.
    pub fn invalidate(&self, id: &str, organization_id: &str, version: DateTime<Utc>) {
        self.forget(id, Some(organization_id), Some(version));
    }

    fn forget(&self, id: &str, organization_id: Option<&str>, version: Option<DateTime<Utc>>) {
        self.metrics.invalidations.inc();
        // The floor first: a read racing this invalidation must already
        // refuse an older record.
        if let Some(v) = version {
            self.cache.raise_floor(id, v);
        }
        self.cache.invalidate(id);
        self.changes.key_changed(id, organization_id);
    }

    /// The changes this process hears of, for `WatchKeyChanges`.
    pub fn changes(&self) -> &Arc<ChangeFeed> {
        &self.changes
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

impl ChangeSink for Verifier {
    fn key_changed(&self, id: &str, organization_id: Option<&str>, version: Option<DateTime<Utc>>) {
        self.forget(id, organization_id, version);
    }

    /// The listener reconnected, which proves the store answers: close the
    /// breaker, so cached keys are re-read now instead of failing fast for the
    /// rest of its interval, and mark every entry for that re-read.
    fn resync(&self) {
        self.metrics.cache_resets.inc();
        self.breaker.answered();
        self.cache.mark_all_for_reread();
        self.metrics.change_notices_flowing.set(1);
        self.cache.set_notices_flowing(true);
        self.changes.resync();
    }

    fn notices_lost(&self) {
        self.metrics.change_notices_flowing.set(0);
        self.cache.set_notices_flowing(false);
        self.changes.lost();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outage() -> Error {
        Error::Unavailable { message: "down".into(), source: None }
    }

    #[test]
    fn the_breaker_opens_on_a_failure_and_closes_on_an_answer() {
        let b = Breaker::new();
        assert!(!b.open(), "a new breaker is closed");
        assert!(b.failed(&outage()), "the first failure opens it");
        assert!(b.open());
        assert!(!b.failed(&outage()), "later failures of the same outage are not news");
        assert!(b.answered(), "an answer closes it");
        assert!(!b.open());
        assert!(!b.answered(), "an answer while closed changes nothing");
    }

    fn key(status: KeyStatus, expires_at: Option<DateTime<Utc>>) -> ApiKey {
        ApiKey {
            scopes: vec!["api_keys.read".into(), "fleet.read".into()],
            status,
            expires_at,
            ..ApiKey::for_test("0123456789ABCDEF")
        }
    }

    #[test]
    fn decide_checks_status_then_expiry_then_organization_then_scopes() {
        let now = Utc::now();
        let past = Some(now - chrono::Duration::seconds(1));
        let need = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let active = key(KeyStatus::Active, None);
        assert_eq!(decide(&active, &need(&["fleet.read"]), Some("acme"), now), Ok(()));
        assert_eq!(decide(&active, &[], None, now), Ok(()));
        assert_eq!(decide(&active, &[], Some("other"), now), Err(Denial::WrongOrganization));
        assert_eq!(
            decide(&active, &need(&["fleet.read", "audit.export"]), Some("acme"), now),
            Err(Denial::InsufficientScope(need(&["audit.export"])))
        );
        // Earlier checks win over later ones.
        assert_eq!(
            decide(&key(KeyStatus::Active, past), &need(&["audit.export"]), Some("x"), now),
            Err(Denial::Expired)
        );
        assert_eq!(decide(&key(KeyStatus::Disabled, past), &[], None, now), Err(Denial::Disabled));
        assert_eq!(decide(&key(KeyStatus::Revoked, past), &[], None, now), Err(Denial::Revoked));
        // Expiry is inclusive: at the instant itself the key is expired.
        assert_eq!(decide(&key(KeyStatus::Active, Some(now)), &[], None, now), Err(Denial::Expired));
    }

    #[test]
    fn every_denial_round_trips_through_its_wire_code_and_is_labelled_by_its_name() {
        let all = [
            Denial::Malformed,
            Denial::NotFound,
            Denial::Revoked,
            Denial::Disabled,
            Denial::Expired,
            Denial::WrongOrganization,
            Denial::InsufficientScope(vec!["audit.export".into()]),
        ];
        for d in all {
            let missing = match &d {
                Denial::InsufficientScope(m) => m.clone(),
                _ => vec![],
            };
            assert_eq!(Denial::from_code(d.code(), missing).as_ref(), Some(&d));
            let wire = d.code().as_str_name().trim_start_matches("VERIFY_CODE_").to_lowercase();
            assert_eq!(d.label(), wire);
            assert!(d.reason().starts_with("the API key "), "{}", d.reason());
        }
        assert_eq!(Denial::from_code(VerifyCode::Valid, vec![]), None);
        assert_eq!(code_label(VerifyCode::Valid), "valid");
        assert!(Denial::InsufficientScope(vec!["a.b".into()]).reason().ends_with("a.b"));
    }
}
