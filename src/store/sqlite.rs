//! SQLite backend: the embedded default, so one command runs the service with
//! no setup. One process owns the file; writes that must be serialized (the
//! plan-limit check) take SQLite's write lock up front with `BEGIN IMMEDIATE`.

use super::{
    AuditColumns, AuditRecord, PoolStats, Store, StoreOptions, check_key_limit, created_action, ensure_can_roll,
    ensure_not_revoked, leak_outcome, merge_usage, metadata_from, metadata_json, plan_from, roll_end, stored,
};
use crate::{
    domain::model::{
        ApiKey, AuditAction, AuditContext, AuditEvent, AuditFilter, Cursor, Environment, KeyStats, KeyStatus,
        KeyUpdate, LeakAction, ListFilter, NewKey, Organization, Plan, StoredHash, UsageDelta,
    },
    error::{Error, Result},
};
use async_trait::async_trait;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use sqlx::{
    FromRow, Row, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous},
};
use std::{str::FromStr, time::Duration};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Columns of a key row, as a macro so queries stay `&'static str` (sqlx
/// refuses dynamic SQL).
macro_rules! key_columns {
    () => {
        "id, organization_id, name, prefix, status, scopes, created_by, \
         created_at, last_used_at, expires_at, environment, metadata, rotated_from, rotated_to, updated_at"
    };
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(v)
        .ok_or_else(|| Error::internal(anyhow::anyhow!("timestamp {v} out of range in store")))
}

fn opt_from_micros(v: Option<i64>) -> Result<Option<DateTime<Utc>>> {
    v.map(from_micros).transpose()
}

fn now_micros() -> i64 {
    micros(Utc::now())
}

impl SqliteStore {
    pub async fn connect(dsn: &str, opts: &StoreOptions) -> Result<Self> {
        let conn = SqliteConnectOptions::from_str(dsn)
            .map_err(|_| Error::invalid("DATABASE_URL is not a valid sqlite:// URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(opts.acquire_timeout.max(Duration::from_secs(5)));
        let path = conn.get_filename().to_path_buf();
        if !dsn.contains("mode=memory") {
            create_private(&path)?;
        }
        // Processes opening a new file at once race: the connection's
        // `journal_mode = WAL` needs a lock another opener may hold (SQLITE_BUSY,
        // which the busy timeout does not cover), and SQLite's migrator takes
        // no lock, so a loser fails on "already exists". Trying again finds
        // the winner's work done.
        let mut attempt = 0;
        let pool = loop {
            match Self::open_and_migrate(conn.clone(), opts).await {
                Ok(pool) => break pool,
                Err(e) if attempt < OPEN_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "opening the SQLite database raced another opener; retrying");
                    tokio::time::sleep(open_retry_pause(attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Self { pool })
    }

    async fn open_and_migrate(conn: SqliteConnectOptions, opts: &StoreOptions) -> Result<SqlitePool> {
        let pool = SqlitePoolOptions::new()
            .max_connections(opts.max_connections.min(8))
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(conn)
            .await?;
        MIGRATOR.run(&pool).await.map_err(Error::internal)?;
        Ok(pool)
    }
}

/// Opening a new database file races other processes opening it (see
/// `connect`); this many retries, 50 ms apart and growing, ride it out.
const OPEN_ATTEMPTS: u32 = 10;

/// Creates the database file owner-only (0600) before SQLite opens it: SQLite
/// gives its `-wal` and `-shm` files the mode of the database file, so all
/// three hold key hashes readable by this user only. An existing file is
/// left as it is, with a warning if others may read it.
fn create_private(path: &std::path::Path) -> Result<()> {
    let name = path.as_os_str();
    if name.is_empty() || name == ":memory:" {
        return Ok(());
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            #[cfg(unix)]
            if let Some(mode) = std::fs::metadata(path).ok().and_then(|m| exposed_mode(&m)) {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:04o}"),
                    "the database file is readable by group or others; chmod 600 it and its -wal and -shm files"
                );
            }
            Ok(())
        }
        Err(e) => Err(Error::invalid(format!("DATABASE_URL: cannot create the SQLite file {}: {e}", path.display()))),
    }
}

/// The permission bits of a file that group or others may access, `None`
/// for an owner-only file.
#[cfg(unix)]
fn exposed_mode(meta: &std::fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// The pause before the `attempt`th retry of opening the database: short,
/// as the race it rides out lasts one migration, and growing.
fn open_retry_pause(attempt: u32) -> Duration {
    Duration::from_millis(50 * u64::from(attempt))
}

/// A key row as SQLite stores it: timestamps as microseconds since the
/// epoch, scopes space-separated (no arrays in SQLite).
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    organization_id: String,
    name: String,
    prefix: String,
    status: String,
    scopes: String,
    created_by: String,
    created_at: i64,
    last_used_at: Option<i64>,
    expires_at: Option<i64>,
    environment: String,
    metadata: String,
    rotated_from: Option<String>,
    rotated_to: Option<String>,
    updated_at: i64,
}

/// An audit row: the shared text columns plus this backend's id and time.
#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    occurred_at: i64,
    #[sqlx(flatten)]
    columns: AuditColumns,
}

fn key_from_row(row: &SqliteRow) -> Result<ApiKey> {
    let r = KeyRow::from_row(row)?;
    Ok(ApiKey {
        id: r.id,
        organization_id: r.organization_id,
        name: r.name,
        prefix: r.prefix,
        status: stored("status", &r.status, KeyStatus::parse)?,
        scopes: r.scopes.split_whitespace().map(str::to_owned).collect(),
        created_by: r.created_by,
        created_at: from_micros(r.created_at)?,
        last_used_at: opt_from_micros(r.last_used_at)?,
        expires_at: opt_from_micros(r.expires_at)?,
        environment: stored("environment", &r.environment, Environment::parse)?,
        metadata: metadata_from(&r.metadata)?,
        rotated_from: r.rotated_from,
        rotated_to: r.rotated_to,
        updated_at: from_micros(r.updated_at)?,
    })
}

/// SQLite's retryable errors: SQLITE_BUSY (5) and SQLITE_LOCKED (6), with
/// their extended codes (the primary code is the low byte), when another
/// connection holds the lock past the busy timeout.
pub(super) fn is_retryable(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
        && db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| matches!(c & 0xff, 5 | 6))
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn pool_stats(&self) -> PoolStats {
        PoolStats { size: self.pool.size(), idle: self.pool.num_idle() as u32 }
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_key(&self, key: NewKey, audit: &AuditContext) -> Result<ApiKey> {
        // IMMEDIATE takes the write lock now, so the count and the insert
        // below see no concurrent create in between.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_micros();
        let plan = ensure_organization(&mut tx, &key.organization_id, now).await?;
        // An unlimited plan needs no count.
        if plan.key_limit().is_some() {
            let counted: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM api_keys WHERE organization_id = $1 AND status IN ('active', 'disabled')",
            )
            .bind(&key.organization_id)
            .fetch_one(&mut *tx)
            .await?;
            check_key_limit(plan, counted)?;
        }
        let created = insert_key(&mut tx, &key, now).await?;
        let action = created_action(audit);
        append_audit(&mut tx, &AuditRecord::for_key(action, &created, None, Some(KeyStatus::Active), audit), now)
            .await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn get_key(&self, id: &str) -> Result<Option<ApiKey>> {
        let row = sqlx::query(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn get_key_with_hash(&self, id: &str) -> Result<Option<(ApiKey, StoredHash)>> {
        let row =
            sqlx::query(concat!("SELECT ", key_columns!(), ", secret_hash, pepper_id FROM api_keys WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((
                key_from_row(&r)?,
                StoredHash { phc: r.try_get("secret_hash")?, pepper_id: r.try_get("pepper_id")? },
            ))),
        }
    }

    async fn replace_hash(&self, id: &str, old: &StoredHash, new: &StoredHash) -> Result<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET secret_hash = $3, pepper_id = $4 WHERE id = $1 AND secret_hash = $2")
                .bind(id)
                .bind(&old.phc)
                .bind(&new.phc)
                .bind(&new.pepper_id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_keys(
        &self,
        organization_id: &str,
        filter: &ListFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys \
             WHERE organization_id = $1 \
               AND ($2 IS NULL OR status = $2) \
               AND ($3 IS NULL OR created_by = $3) \
               AND ($4 IS NULL OR created_at < $4 OR (created_at = $4 AND id < $5)) \
               AND ($7 IS NULL OR environment = $7) \
             ORDER BY created_at DESC, id DESC LIMIT $6"
        ))
        .bind(organization_id)
        .bind(filter.status.map(KeyStatus::as_str))
        .bind(filter.created_by.as_deref())
        .bind(after.map(|c| micros(c.created_at)))
        .bind(after.map(|c| c.id.as_str()).unwrap_or(""))
        .bind(limit as i64)
        .bind(filter.environment.map(Environment::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn set_status(&self, id: &str, status: KeyStatus, audit: &AuditContext) -> Result<Option<ApiKey>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let Some(before) = read_key(&mut tx, id).await? else {
            return Ok(None);
        };
        ensure_not_revoked(&before)?;
        let now = now_micros();
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET status = $2, updated_at = $3 WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(status.as_str())
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let key = key_from_row(&row)?;
        let record =
            AuditRecord::for_key(AuditAction::KeyStatusChanged, &key, Some(before.status), Some(status), audit);
        append_audit(&mut tx, &record, now).await?;
        tx.commit().await?;
        Ok(Some(key))
    }

    async fn update_key(&self, id: &str, update: &KeyUpdate, audit: &AuditContext) -> Result<Option<ApiKey>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if read_key(&mut tx, id).await?.is_none() {
            return Ok(None);
        }
        let now = now_micros();
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET name = coalesce($2, name), metadata = coalesce($3, metadata), \
             expires_at = CASE WHEN $4 THEN $5 ELSE expires_at END, updated_at = $6 WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(update.name.as_deref())
        .bind(update.metadata.as_ref().map(metadata_json))
        .bind(update.expires_at.is_some())
        .bind(update.expires_at.flatten().map(micros))
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let key = key_from_row(&row)?;
        let record = AuditRecord::for_update(&key, update, audit);
        append_audit(&mut tx, &record, now).await?;
        tx.commit().await?;
        Ok(Some(key))
    }

    async fn roll_key(
        &self,
        old_id: &str,
        new: NewKey,
        grace: ChronoDuration,
        audit: &AuditContext,
    ) -> Result<Option<(ApiKey, ApiKey)>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let Some(old) = read_key(&mut tx, old_id).await? else {
            return Ok(None);
        };
        let now = Utc::now();
        ensure_can_roll(&old, now)?;
        let created = insert_key(&mut tx, &new, micros(now)).await?;
        let end = roll_end(&old, now, grace);
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET rotated_to = $2, status = CASE WHEN $3 THEN 'revoked' ELSE status END, \
             expires_at = CASE WHEN $3 THEN expires_at ELSE $4 END, updated_at = $5 WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(old_id)
        .bind(&created.id)
        .bind(end.is_none())
        .bind(end.map(micros))
        .bind(micros(now))
        .fetch_one(&mut *tx)
        .await?;
        let previous = key_from_row(&row)?;
        let record = AuditRecord::for_roll(&created, &previous, audit);
        append_audit(&mut tx, &record, micros(now)).await?;
        tx.commit().await?;
        Ok(Some((created, previous)))
    }

    async fn record_leak(
        &self,
        key_id: &str,
        source_url: &str,
        source: &str,
        action: LeakAction,
        audit: &AuditContext,
    ) -> Result<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let Some(before) = read_key(&mut tx, key_id).await? else {
            return Ok(false);
        };
        let first = sqlx::query("INSERT INTO leak_reports (key_id, source_url) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(key_id)
            .bind(source_url)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !first {
            return Ok(false);
        }
        let now = now_micros();
        let (status, done) = leak_outcome(action, before.status);
        let key = match status {
            Some(status) => {
                let row = sqlx::query(concat!(
                    "UPDATE api_keys SET status = $2, updated_at = $3 WHERE id = $1 RETURNING ",
                    key_columns!()
                ))
                .bind(key_id)
                .bind(status.as_str())
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                key_from_row(&row)?
            }
            None => before.clone(),
        };
        let record = AuditRecord::for_leak(&key, before.status, source_url, source, done, audit);
        append_audit(&mut tx, &record, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn revoke_key(&self, id: &str, audit: &AuditContext) -> Result<Option<ApiKey>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let Some(before) = read_key(&mut tx, id).await? else {
            return Ok(None);
        };
        let now = now_micros();
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET status = 'revoked', updated_at = $2 WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let key = key_from_row(&row)?;
        let record =
            AuditRecord::for_key(AuditAction::KeyRevoked, &key, Some(before.status), Some(KeyStatus::Revoked), audit);
        append_audit(&mut tx, &record, now).await?;
        tx.commit().await?;
        Ok(Some(key))
    }

    async fn delete_key(&self, id: &str, audit: &AuditContext) -> Result<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let Some(before) = read_key(&mut tx, id).await? else {
            return Ok(false);
        };
        sqlx::query("DELETE FROM api_keys WHERE id = $1").bind(id).execute(&mut *tx).await?;
        let record = AuditRecord::for_key(AuditAction::KeyDeleted, &before, Some(before.status), None, audit);
        append_audit(&mut tx, &record, now_micros()).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn get_organization(&self, id: &str) -> Result<Organization> {
        let plan: Option<String> = sqlx::query_scalar("SELECT plan FROM organizations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(Organization { id: id.to_owned(), plan: plan.as_deref().map(plan_from).transpose()?.unwrap_or_default() })
    }

    async fn set_plan(&self, id: &str, plan: Plan, audit: &AuditContext) -> Result<Organization> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_micros();
        let before = ensure_organization(&mut tx, id, now).await?;
        sqlx::query("UPDATE organizations SET plan = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(plan.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        append_audit(&mut tx, &AuditRecord::for_plan(id, before, plan, audit), now).await?;
        tx.commit().await?;
        Ok(Organization { id: id.to_owned(), plan })
    }

    async fn list_audit_events(
        &self,
        organization_id: &str,
        filter: &AuditFilter,
        before_id: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>> {
        let rows = sqlx::query(
            "SELECT id, occurred_at, organization_id, actor, principal, action, key_id, key_prefix, \
               status_before, status_after, request_id, peer, detail \
             FROM audit_events \
             WHERE organization_id = $1 \
               AND ($2 IS NULL OR occurred_at >= $2) \
               AND ($3 IS NULL OR occurred_at < $3) \
               AND ($4 IS NULL OR action = $4) \
               AND ($5 IS NULL OR id < $5) \
             ORDER BY id DESC LIMIT $6",
        )
        .bind(organization_id)
        .bind(filter.since.map(micros))
        .bind(filter.until.map(micros))
        .bind(filter.action.map(AuditAction::as_str))
        .bind(before_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let r = AuditRow::from_row(row)?;
                r.columns.into_event(r.id, from_micros(r.occurred_at)?)
            })
            .collect()
    }

    async fn key_stats(&self, organization_id: &str, now: DateTime<Utc>) -> Result<KeyStats> {
        let row = sqlx::query(
            "SELECT \
               o.plan, o.keys_created, o.last_call_at, \
               (SELECT count(*) FROM api_keys k WHERE k.organization_id = o.id AND k.status = 'active' \
                  AND (k.expires_at IS NULL OR k.expires_at > $2)) AS active_keys, \
               (SELECT count(*) FROM api_keys k WHERE k.organization_id = o.id \
                  AND k.status IN ('active', 'disabled')) AS keys_counted, \
               (SELECT coalesce(sum(u.calls), 0) FROM usage_minutes u \
                  WHERE u.organization_id = o.id AND u.minute > $3) AS calls \
             FROM organizations o WHERE o.id = $1",
        )
        .bind(organization_id)
        .bind(micros(now))
        .bind(micros(now - ChronoDuration::hours(24) - ChronoDuration::minutes(1)))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(KeyStats::unseen());
        };
        let plan: String = row.try_get("plan")?;
        Ok(KeyStats {
            total_keys: row.try_get("keys_created")?,
            active_keys: row.try_get("active_keys")?,
            keys_counted: row.try_get("keys_counted")?,
            api_calls_24h: row.try_get("calls")?,
            last_call_at: opt_from_micros(row.try_get("last_call_at")?)?,
            plan: plan_from(&plan)?,
        })
    }

    async fn record_usage(&self, batch: &[UsageDelta]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let batch = merge_usage(batch);
        // One transaction per flush: an embedded file has no network round
        // trips to save, only fsyncs.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for d in &batch {
            sqlx::query(
                "INSERT INTO usage_minutes (key_id, organization_id, minute, calls, last_used_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (key_id, minute) DO UPDATE \
                   SET calls = calls + excluded.calls, \
                       last_used_at = max(last_used_at, excluded.last_used_at)",
            )
            .bind(&d.key_id)
            .bind(&d.organization_id)
            .bind(micros(d.minute))
            .bind(d.calls)
            .bind(micros(d.last_used_at))
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE api_keys SET last_used_at = max(coalesce(last_used_at, 0), $2) WHERE id = $1")
                .bind(&d.key_id)
                .bind(micros(d.last_used_at))
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE organizations SET last_call_at = max(coalesce(last_call_at, 0), $2) WHERE id = $1")
                .bind(&d.organization_id)
                .bind(micros(d.last_used_at))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn prune_usage(&self, before: DateTime<Utc>) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM usage_minutes WHERE minute < $1").bind(micros(before)).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }
}

/// Inserts a new ACTIVE key and counts it in `keys_created` (CreateKey and
/// RollKey; the caller holds the transaction and has checked the plan).
async fn insert_key(tx: &mut sqlx::SqliteConnection, key: &NewKey, now: i64) -> Result<ApiKey> {
    let row = sqlx::query(concat!(
        "INSERT INTO api_keys (id, organization_id, name, prefix, status, scopes, created_by, \
         created_at, expires_at, environment, secret_hash, pepper_id, updated_at, metadata, rotated_from) \
         VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING ",
        key_columns!()
    ))
    .bind(&key.id)
    .bind(&key.organization_id)
    .bind(&key.name)
    .bind(&key.prefix)
    .bind(key.scopes.join(" "))
    .bind(&key.created_by)
    .bind(micros(key.created_at))
    .bind(key.expires_at.map(micros))
    .bind(key.environment.as_str())
    .bind(&key.secret_hash.phc)
    .bind(&key.secret_hash.pepper_id)
    .bind(now)
    .bind(metadata_json(&key.metadata))
    .bind(key.rotated_from.as_deref())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE organizations SET keys_created = keys_created + 1, updated_at = $2 WHERE id = $1")
        .bind(&key.organization_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    key_from_row(&row)
}

/// Creates the organization (on Free) at first sight; returns its plan.
/// Callers hold the write lock (`BEGIN IMMEDIATE`).
async fn ensure_organization(tx: &mut sqlx::SqliteConnection, id: &str, now: i64) -> Result<Plan> {
    sqlx::query(
        "INSERT INTO organizations (id, created_at, updated_at) VALUES ($1, $2, $2) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let plan: String =
        sqlx::query_scalar("SELECT plan FROM organizations WHERE id = $1").bind(id).fetch_one(&mut *tx).await?;
    plan_from(&plan)
}

async fn read_key(tx: &mut sqlx::SqliteConnection, id: &str) -> Result<Option<ApiKey>> {
    let row = sqlx::query(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1"))
        .bind(id)
        .fetch_optional(tx)
        .await?;
    row.as_ref().map(key_from_row).transpose()
}

async fn append_audit(tx: &mut sqlx::SqliteConnection, r: &AuditRecord<'_>, now: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (occurred_at, organization_id, actor, principal, action, key_id, \
           key_prefix, status_before, status_after, request_id, peer, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(now)
    .bind(r.organization_id)
    .bind(&r.ctx.actor)
    .bind(&r.ctx.principal)
    .bind(r.action.as_str())
    .bind(r.key_id)
    .bind(r.key_prefix)
    .bind(r.status_before.map(KeyStatus::as_str))
    .bind(r.status_after.map(KeyStatus::as_str))
    .bind(&r.ctx.request_id)
    .bind(r.ctx.peer.as_deref())
    .bind(r.detail.as_deref())
    .execute(tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The database and its -wal and -shm files hold key hashes: a new
    /// database is readable by its owner only, whatever the umask.
    #[tokio::test]
    async fn a_new_database_file_and_its_journal_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keys.db");
        let store =
            SqliteStore::connect(&format!("sqlite://{}", db.display()), &StoreOptions::default()).await.unwrap();
        store.ping().await.unwrap();
        for name in ["keys.db", "keys.db-wal", "keys.db-shm"] {
            assert_eq!(mode_of(&dir.path().join(name)), 0o600, "{name}");
        }
    }

    #[test]
    fn only_an_owner_only_file_is_not_reported_as_exposed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        std::fs::write(&path, b"").unwrap();
        for (mode, exposed) in [(0o600, None), (0o400, None), (0o640, Some(0o640)), (0o604, Some(0o604))] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(exposed_mode(&std::fs::metadata(&path).unwrap()), exposed, "{mode:o}");
        }
    }

    /// `:memory:` and an empty name (a temporary database) are no files: none is created.
    #[test]
    fn a_database_without_a_file_creates_none() {
        create_private(std::path::Path::new(":memory:")).unwrap();
        create_private(std::path::Path::new("")).unwrap();
        assert!(!std::path::Path::new(":memory:").exists());
    }

    #[test]
    fn a_database_in_a_missing_directory_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("keys.db");
        match create_private(&path) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("missing/keys.db"), "{m}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    /// Retrying covers a race with another opener, not a file that is no
    /// database: that fails after the last attempt instead of retrying forever.
    #[tokio::test]
    async fn a_file_that_is_no_database_fails_after_the_retries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let (url, opts) = (format!("sqlite://{}", path.display()), StoreOptions::default());
        let result = tokio::time::timeout(Duration::from_secs(30), SqliteStore::connect(&url, &opts))
            .await
            .expect("connect gives up");
        assert!(result.is_err());
    }

    #[test]
    fn retries_of_opening_pause_longer_each_time() {
        let pauses: Vec<_> = (1..=3).map(|a| open_retry_pause(a).as_millis()).collect();
        assert_eq!(pauses, [50, 100, 150]);
    }

    /// A write that finds the database locked past the busy timeout is
    /// SQLITE_BUSY: retryable UNAVAILABLE, not INTERNAL.
    #[tokio::test]
    async fn a_locked_database_is_unavailable_not_internal() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("busy.db").display());
        let opts =
            |busy: Duration| SqliteConnectOptions::from_str(&url).unwrap().create_if_missing(true).busy_timeout(busy);
        let holder =
            SqlitePoolOptions::new().max_connections(1).connect_with(opts(Duration::from_secs(5))).await.unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER)").execute(&holder).await.unwrap();
        let mut lock = holder.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)").execute(&mut *lock).await.unwrap();

        let other = SqlitePoolOptions::new().max_connections(1).connect_with(opts(Duration::ZERO)).await.unwrap();
        let err = sqlx::query("INSERT INTO t VALUES (2)").execute(&other).await.unwrap_err();
        assert!(matches!(Error::from(err), Error::Unavailable { .. }));
        lock.rollback().await.unwrap();

        let not_retryable = sqlx::query("INSERT INTO missing VALUES (1)").execute(&other).await.unwrap_err();
        assert!(matches!(Error::from(not_retryable), Error::Internal(_)));
    }
}
