//! Persistence behind one trait, with a backend per database. May import
//! the ground ([`crate::domain`], [`crate::error`], [`crate::metrics`]) and
//! [`crate::proto`]; never the verification engine, the API or the server.
//!
//! The backend is chosen by the DSN's scheme in [`connect`]: `postgres://` for
//! production, `sqlite://` for the embedded default. Each backend owns its
//! migrations (`migrations/<backend>/`, same version numbers), runs them at
//! connect, and classifies its own database errors (`is_retryable`; the one
//! `From<sqlx::Error>` asks both). Lookups return `Ok(None)` for "no such
//! row"; the service decides what that means.
//!
//! Two files, as in IOx's catalog, not one generic over `sqlx::Database`:
//! they share the SQL text wherever the databases agree (`$N` placeholders,
//! row values, the same statements), and the business rules live here once
//! (`check_key_limit`, `created_action`, `ensure_not_revoked`). So
//! `diff src/store/postgres.rs src/store/sqlite.rs` shows what really differs:
//! row locks (`FOR UPDATE`) against SQLite's one writer (`BEGIN IMMEDIATE`),
//! change notices (PostgreSQL only), timestamps (`timestamptz` against
//! microseconds), scope lists (arrays against text), the one-statement usage
//! flush (`unnest`), migration locking and file permissions.

mod postgres;
pub mod rest;
mod sqlite;
mod standby;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::{
    domain::model::{
        ApiKey, AuditAction, AuditContext, AuditEvent, AuditFilter, Cursor, KeyStats, KeyStatus, KeyUpdate, LeakAction,
        ListFilter, Metadata, NewKey, Organization, Plan, StoredHash, UsageDelta,
    },
    domain::secret::SecretString,
    error::{Error, Result},
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `postgres` or `sqlite`, for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Cheap round trip, for health checks.
    async fn ping(&self) -> Result<()>;

    /// Inserts `key` if its organization's plan allows one more counted key,
    /// creating the organization (on Free) at first sight. The count and the
    /// insert are one serialized step, so concurrent creates never overshoot.
    async fn create_key(&self, key: NewKey, audit: &AuditContext) -> Result<ApiKey>;

    async fn get_key(&self, id: &str) -> Result<Option<ApiKey>>;

    /// The key with its hash, for verification only.
    async fn get_key_with_hash(&self, id: &str) -> Result<Option<(ApiKey, StoredHash)>>;

    /// The verification path's read of a key and its hash (a cache miss):
    /// from the standby when one is configured and can be trusted with it,
    /// else from the primary. `floor`: the newest version (`updated_at`) a
    /// change notice announced for the key; an older record is never returned.
    async fn verification_read(&self, id: &str, floor: Option<DateTime<Utc>>) -> Result<Option<(ApiKey, StoredHash)>> {
        let _ = floor;
        self.get_key_with_hash(id).await
    }

    /// The verification path's re-read of a cached key's record (a refresh),
    /// on the same terms as [`Store::verification_read`].
    async fn verification_reread(&self, id: &str, floor: Option<DateTime<Utc>>) -> Result<Option<ApiKey>> {
        let _ = floor;
        self.get_key(id).await
    }

    /// `None` without a standby; else whether it answers a round trip.
    async fn ping_standby(&self) -> Option<Result<()>> {
        None
    }

    /// Replaces key `id`'s stored hash with `new` if it is still `old` (a
    /// rehash with current parameters; a concurrent one by another replica
    /// wins and this returns `false`). The key's record is unchanged, so no
    /// change notice is sent and no audit event is written.
    async fn replace_hash(&self, id: &str, old: &StoredHash, new: &StoredHash) -> Result<bool>;

    /// Newest first: `(created_at, id)` descending, strictly after `after`.
    async fn list_keys(
        &self,
        organization_id: &str,
        filter: &ListFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<ApiKey>>;

    /// Sets ACTIVE or DISABLED. A revoked key is `FailedPrecondition`.
    async fn set_status(&self, id: &str, status: KeyStatus, audit: &AuditContext) -> Result<Option<ApiKey>>;

    /// Applies `update` (name, metadata, expiry) in one transaction, audited
    /// with the changed field names and announced to every replica.
    async fn update_key(&self, id: &str, update: &KeyUpdate, audit: &AuditContext) -> Result<Option<ApiKey>>;

    /// Replaces key `old_id` with `new` (RollKey) in one transaction, never
    /// blocked by the plan limit: inserts it linked to the old key, then
    /// revokes the old key (no grace) or sets it to expire at
    /// `min(now + grace, its own expiry)`; audited and announced. Returns the
    /// new key and the old one as it is now.
    async fn roll_key(
        &self,
        old_id: &str,
        new: NewKey,
        grace: chrono::Duration,
        audit: &AuditContext,
    ) -> Result<Option<(ApiKey, ApiKey)>>;

    /// Records a leak of `key` found at `source_url`: the first report of a
    /// key and URL applies `action` and is audited (KEY_LEAKED, with what
    /// was done), in one transaction; repeats change nothing. True when this
    /// report was the first.
    async fn record_leak(
        &self,
        key_id: &str,
        source_url: &str,
        source: &str,
        action: LeakAction,
        audit: &AuditContext,
    ) -> Result<bool>;

    /// Moves the key to REVOKED (terminal). Revoking twice is not an error.
    async fn revoke_key(&self, id: &str, audit: &AuditContext) -> Result<Option<ApiKey>>;

    /// Removes the key row. `false` when there was none.
    async fn delete_key(&self, id: &str, audit: &AuditContext) -> Result<bool>;

    /// The organization, or a Free one if it has never been seen.
    async fn get_organization(&self, id: &str) -> Result<Organization>;

    async fn set_plan(&self, id: &str, plan: Plan, audit: &AuditContext) -> Result<Organization>;

    /// Audit events of an organization, newest first, strictly older than
    /// `before_id`. Every mutation above appends one in its own transaction.
    async fn list_audit_events(
        &self,
        organization_id: &str,
        filter: &AuditFilter,
        before_id: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>>;

    async fn key_stats(&self, organization_id: &str, now: DateTime<Utc>) -> Result<KeyStats>;

    /// Adds a batch of per-key, per-minute call counts (upsert-add, so
    /// replicas add up) and moves `last_used_at` forward, never back.
    async fn record_usage(&self, batch: &[UsageDelta]) -> Result<()>;

    /// Drops usage buckets older than `before`. Returns rows removed.
    async fn prune_usage(&self, before: DateTime<Utc>) -> Result<u64>;

    /// Connections open and idle in this process's pool, for the metrics.
    fn pool_stats(&self) -> PoolStats;

    /// Delivers notices of key changes made by other processes sharing this
    /// store, until `stop` turns true. A backend with no other writers (the
    /// embedded one) has nothing to deliver and just waits.
    async fn watch_changes(&self, sink: Arc<dyn ChangeSink>, mut stop: watch::Receiver<bool>) {
        let _ = sink;
        let _ = stop.wait_for(|s| *s).await;
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub size: u32,
    pub idle: u32,
}

/// Receives change notices from [`Store::watch_changes`].
pub trait ChangeSink: Send + Sync {
    /// Key `id` (of `organization_id`, when the notice says) changed
    /// somewhere, its record now at `version` (its `updated_at`) when the
    /// notice says: forget what is known about it, and never trust an older
    /// record of it again.
    fn key_changed(&self, id: &str, organization_id: Option<&str>, version: Option<DateTime<Utc>>);
    /// Notices flow again after a gap: anything may have changed meanwhile.
    fn resync(&self);
    /// Notices stopped flowing: nothing cached can be trusted without a re-read.
    fn notices_lost(&self);
}

/// Connection settings shared by both backends.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Server-side statement timeout (PostgreSQL), so a hung query frees its
    /// connection instead of piling requests up behind it.
    pub statement_timeout: Duration,
    /// `DATABASE_READ_URL`: a hot standby for the verification path's reads
    /// (PostgreSQL only).
    pub read_url: Option<SecretString>,
    /// `DATABASE_LISTEN_URL`: where the change listener connects, when the
    /// primary's URL goes through a pooler that cannot hold a LISTEN.
    pub listen_url: Option<SecretString>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            read_url: None,
            listen_url: None,
        }
    }
}

/// Opens the store named by `dsn` and brings its schema up to date.
pub async fn connect(dsn: &str, opts: &StoreOptions) -> Result<Arc<dyn Store>> {
    let scheme = dsn.split_once(':').map(|(s, _)| s).unwrap_or_default();
    match scheme {
        "postgres" | "postgresql" => Ok(Arc::new(PostgresStore::connect(dsn, opts).await?)),
        "sqlite" if opts.read_url.is_some() || opts.listen_url.is_some() => Err(Error::invalid(
            "DATABASE_READ_URL and DATABASE_LISTEN_URL are for PostgreSQL: the embedded SQLite store has no standby \
             and no change listener",
        )),
        "sqlite" => Ok(Arc::new(SqliteStore::connect(dsn, opts).await?)),
        _ => Err(Error::invalid(
            "DATABASE_URL must start with postgres:// or sqlite:// (the DSN itself is not shown, it may hold a password)",
        )),
    }
}

/// Connection trouble is a retryable UNAVAILABLE, anything else internal.
/// What counts as trouble for a database error is each backend's call
/// (`postgres::is_retryable`, `sqlite::is_retryable`): SQLSTATEs mean
/// nothing to SQLite, and `SQLITE_BUSY` nothing to PostgreSQL.
impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        let retryable = match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => postgres::is_retryable(db.as_ref()) || sqlite::is_retryable(db.as_ref()),
            _ => false,
        };
        if retryable { Error::unavailable(err) } else { Error::internal(err) }
    }
}

/// A text column decoded into a domain enum; an unknown value is a corrupt
/// (or newer) database, INTERNAL.
pub(crate) fn stored<T>(what: &str, value: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
    parse(value).ok_or_else(|| Error::internal(anyhow::anyhow!("unknown {what} {value:?} in store")))
}

/// A key's metadata as both backends store it: a JSON object of strings.
pub(crate) fn metadata_json(m: &Metadata) -> String {
    serde_json::to_string(m).expect("a map of strings serializes")
}

pub(crate) fn metadata_from(stored: &str) -> Result<Metadata> {
    serde_json::from_str(stored)
        .map_err(|e| Error::internal(anyhow::anyhow!("key metadata in store is not a JSON object of strings: {e}")))
}

pub(crate) fn plan_from(value: &str) -> Result<Plan> {
    stored("plan", value, Plan::parse)
}

// The business rules both backends apply, written once.

/// A plan's key limit, checked against the keys that count (active and
/// disabled) inside the creating transaction.
pub(crate) fn check_key_limit(plan: Plan, counted: i64) -> Result<()> {
    match plan.key_limit() {
        Some(limit) if counted >= limit => Err(Error::LimitExceeded { plan, limit }),
        _ => Ok(()),
    }
}

/// The audit action of a new key: the operator's `bootstrap` command is
/// told apart from CreateKey calls.
pub(crate) fn created_action(audit: &AuditContext) -> AuditAction {
    if audit.is_operator() { AuditAction::Bootstrap } else { AuditAction::KeyCreated }
}

/// What a leak report does to a key of `status`: the status to set (if it
/// changes) and the words for the audit log.
pub(crate) fn leak_outcome(action: LeakAction, status: KeyStatus) -> (Option<KeyStatus>, &'static str) {
    match (action, status) {
        (_, KeyStatus::Revoked) => (None, "already revoked"),
        (LeakAction::Revoke, _) => (Some(KeyStatus::Revoked), "revoked"),
        (LeakAction::Disable, KeyStatus::Active) => (Some(KeyStatus::Disabled), "disabled"),
        (LeakAction::Disable, KeyStatus::Disabled) => (None, "already disabled"),
        (LeakAction::Report, _) => (None, "reported only (TAKUMO_LEAK_ACTION=report)"),
    }
}

/// Only an ACTIVE, unexpired key without a successor can be rolled.
pub fn ensure_can_roll(key: &ApiKey, now: DateTime<Utc>) -> Result<()> {
    if let Some(next) = &key.rotated_to {
        return Err(Error::FailedPrecondition(format!(
            "key {} was already rolled to {next}: roll that key instead",
            key.id
        )));
    }
    if key.status != KeyStatus::Active {
        return Err(Error::FailedPrecondition(format!(
            "key {} is {}: only an active key can be rolled",
            key.id,
            key.status.as_str()
        )));
    }
    if key.is_expired(now) {
        return Err(Error::FailedPrecondition(format!(
            "key {} has expired: only an unexpired key can be rolled",
            key.id
        )));
    }
    Ok(())
}

/// When a rolled key stops working: `None` (revoked now) for no grace,
/// else `min(now + grace, its own expiry)`.
pub(crate) fn roll_end(old: &ApiKey, now: DateTime<Utc>, grace: chrono::Duration) -> Option<DateTime<Utc>> {
    if grace <= chrono::Duration::zero() {
        return None;
    }
    let end = truncate_micros(now + grace);
    Some(old.expires_at.map_or(end, |own| own.min(end)))
}

/// Revocation is permanent: a revoked key's status cannot change.
pub(crate) fn ensure_not_revoked(key: &ApiKey) -> Result<()> {
    if key.status == KeyStatus::Revoked { Err(revoked_precondition(&key.id)) } else { Ok(()) }
}

fn revoked_precondition(id: &str) -> Error {
    Error::FailedPrecondition(format!(
        "key {id} is revoked: revocation is permanent, so its status cannot change; create a new key instead"
    ))
}

/// Truncates to whole microseconds, the resolution both backends store, so a
/// timestamp read back equals the one written (keyset cursors rely on it).
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).expect("in range")
}

/// Sums deltas that share a `(key_id, minute)` bucket, so one batch touches
/// each bucket once (PostgreSQL's upsert cannot touch a row twice in one statement).
pub(crate) fn merge_usage(batch: &[UsageDelta]) -> Vec<UsageDelta> {
    let mut merged: Vec<UsageDelta> = Vec::with_capacity(batch.len());
    let mut index = std::collections::HashMap::with_capacity(batch.len());
    for d in batch {
        match index.get(&(d.key_id.as_str(), d.minute)) {
            Some(&i) => {
                let m: &mut UsageDelta = &mut merged[i];
                m.calls += d.calls;
                m.last_used_at = m.last_used_at.max(d.last_used_at);
            }
            None => {
                index.insert((d.key_id.as_str(), d.minute), merged.len());
                merged.push(d.clone());
            }
        }
    }
    merged
}

/// One audit event to append, borrowed from the change it records.
pub(crate) struct AuditRecord<'a> {
    pub organization_id: &'a str,
    pub action: AuditAction,
    pub key_id: Option<&'a str>,
    pub key_prefix: Option<&'a str>,
    pub status_before: Option<KeyStatus>,
    pub status_after: Option<KeyStatus>,
    pub detail: Option<String>,
    pub ctx: &'a AuditContext,
}

impl<'a> AuditRecord<'a> {
    pub fn for_key(
        action: AuditAction,
        key: &'a ApiKey,
        status_before: Option<KeyStatus>,
        status_after: Option<KeyStatus>,
        ctx: &'a AuditContext,
    ) -> Self {
        Self {
            organization_id: &key.organization_id,
            action,
            key_id: Some(&key.id),
            key_prefix: Some(&key.prefix),
            status_before,
            status_after,
            detail: None,
            ctx,
        }
    }

    /// A reported leak: where it was found and what was done.
    pub fn for_leak(
        key: &'a ApiKey,
        before: KeyStatus,
        source_url: &str,
        source: &str,
        done: &str,
        ctx: &'a AuditContext,
    ) -> Self {
        Self {
            detail: Some(format!("found at {source_url} (source: {source}); {done}")),
            ..Self::for_key(AuditAction::KeyLeaked, key, Some(before), Some(key.status), ctx)
        }
    }

    /// A RollKey, on the new key: the detail names the previous key and its fate.
    pub fn for_roll(new: &'a ApiKey, previous: &ApiKey, ctx: &'a AuditContext) -> Self {
        let fate = match (previous.status, previous.expires_at) {
            (KeyStatus::Revoked, _) => "revoked at once".to_owned(),
            (_, Some(t)) => format!("works until {}", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            (_, None) => "still active".to_owned(),
        };
        Self {
            detail: Some(format!("rolled from {}; the previous key {fate}", previous.id)),
            ..Self::for_key(AuditAction::KeyRolled, new, None, Some(KeyStatus::Active), ctx)
        }
    }

    /// An UpdateKey: the detail names the changed fields, never their values.
    pub fn for_update(key: &'a ApiKey, update: &KeyUpdate, ctx: &'a AuditContext) -> Self {
        Self {
            detail: Some(format!("changed: {}", update.fields().join(", "))),
            ..Self::for_key(AuditAction::KeyUpdated, key, Some(key.status), Some(key.status), ctx)
        }
    }

    pub fn for_plan(organization_id: &'a str, before: Plan, after: Plan, ctx: &'a AuditContext) -> Self {
        Self {
            organization_id,
            action: AuditAction::PlanChanged,
            key_id: None,
            key_prefix: None,
            status_before: None,
            status_after: None,
            detail: Some(format!("plan {} -> {}", before.as_str(), after.as_str())),
            ctx,
        }
    }
}

/// The text columns of an audit row: the same types on both backends, so one
/// `FromRow` serves both (each backend adds its `id` and `occurred_at`).
#[derive(sqlx::FromRow)]
pub(crate) struct AuditColumns {
    organization_id: String,
    actor: String,
    principal: String,
    action: String,
    key_id: Option<String>,
    key_prefix: Option<String>,
    status_before: Option<String>,
    status_after: Option<String>,
    request_id: String,
    peer: Option<String>,
    detail: Option<String>,
}

impl AuditColumns {
    pub(crate) fn into_event(self, id: i64, occurred_at: DateTime<Utc>) -> Result<AuditEvent> {
        let status = |s: Option<String>| s.map(|s| stored("status", &s, KeyStatus::parse)).transpose();
        Ok(AuditEvent {
            id,
            occurred_at,
            organization_id: self.organization_id,
            actor: self.actor,
            principal: self.principal,
            action: stored("audit action", &self.action, AuditAction::parse)?,
            key_id: self.key_id,
            key_prefix: self.key_prefix,
            status_before: status(self.status_before)?,
            status_after: status(self.status_after)?,
            request_id: self.request_id,
            peer: self.peer,
            detail: self.detail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connection trouble is worth a retry (UNAVAILABLE); a query the store
    /// got wrong is not (INTERNAL): clients back off on the one, page on the other.
    #[test]
    fn connection_trouble_is_unavailable_and_anything_else_internal() {
        let trouble = [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            sqlx::Error::Tls("handshake failed".into()),
            sqlx::Error::Protocol("unexpected message".into()),
            sqlx::Error::WorkerCrashed,
        ];
        for err in trouble {
            let shown = err.to_string();
            assert!(matches!(Error::from(err), Error::Unavailable { .. }), "{shown}");
        }
        for err in [sqlx::Error::RowNotFound, sqlx::Error::ColumnNotFound("phc".into())] {
            let shown = err.to_string();
            assert!(matches!(Error::from(err), Error::Internal(_)), "{shown}");
        }
    }
}
