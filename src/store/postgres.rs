//! PostgreSQL backend: the production store, shared by every replica.

use super::{
    AuditColumns, AuditRecord, ChangeSink, PoolStats, Store, StoreOptions, check_key_limit, created_action,
    ensure_can_roll, ensure_not_revoked, leak_outcome, merge_usage, metadata_from, metadata_json, plan_from, roll_end,
    standby::Standby, stored,
};
use crate::{
    domain::model::{
        ApiKey, AuditAction, AuditContext, AuditEvent, AuditFilter, Cursor, Environment, KeyStats, KeyStatus,
        KeyUpdate, LeakAction, ListFilter, NewKey, Organization, Plan, StoredHash, UsageDelta,
    },
    domain::secret::SecretString,
    error::{Error, Result},
};
use async_trait::async_trait;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use sqlx::{
    FromRow, PgPool, Row,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow},
};
use std::{str::FromStr, sync::Arc, time::Duration};
use tokio::sync::watch;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Columns of a key row, as a macro so queries stay `&'static str` (sqlx
/// refuses dynamic SQL).
macro_rules! key_columns {
    () => {
        "id, organization_id, name, prefix, status, scopes, created_by, \
         created_at, last_used_at, expires_at, environment, metadata, rotated_from, rotated_to, updated_at"
    };
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// `DATABASE_READ_URL`, for the verification path's reads.
    standby: Option<Arc<Standby>>,
    /// `DATABASE_LISTEN_URL`, for the change listener.
    listen_url: Option<SecretString>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("standby", &self.standby.is_some()).finish_non_exhaustive()
    }
}

impl PostgresStore {
    pub async fn connect(dsn: &str, opts: &StoreOptions) -> Result<Self> {
        let conn = PgConnectOptions::from_str(dsn)
            .map_err(|_| Error::invalid("DATABASE_URL is not a valid postgres:// URL"))?
            .application_name("takumo-keys")
            .options([("statement_timeout", format!("{}", opts.statement_timeout.as_millis()))]);
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(conn)
            .await?;
        // sqlx holds a PostgreSQL advisory lock while migrating, so replicas
        // starting together on an empty database migrate exactly once.
        MIGRATOR.run(&pool).await.map_err(Error::internal)?;
        let standby = match &opts.read_url {
            None => None,
            Some(url) => {
                let conn = PgConnectOptions::from_str(url.expose())
                    .map_err(|_| Error::invalid("DATABASE_READ_URL is not a valid postgres:// URL"))?
                    .application_name("takumo-keys-reads")
                    .options([("statement_timeout", format!("{}", opts.statement_timeout.as_millis()))]);
                // Lazy: a standby that is down at startup must not stop the
                // replica, whose reads then go to the primary.
                let reads = PgPoolOptions::new()
                    .max_connections(opts.max_connections)
                    .acquire_timeout(opts.acquire_timeout.min(STANDBY_ACQUIRE_TIMEOUT))
                    .connect_lazy_with(conn);
                Some(Arc::new(Standby::new(reads, primary_wal_position(&pool).await)))
            }
        };
        Ok(Self { pool, standby, listen_url: opts.listen_url.clone() })
    }
}

/// A key row as PostgreSQL returns it: native timestamps and a text array.
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    organization_id: String,
    name: String,
    prefix: String,
    status: String,
    scopes: Vec<String>,
    created_by: String,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    environment: String,
    metadata: String,
    rotated_from: Option<String>,
    rotated_to: Option<String>,
    updated_at: DateTime<Utc>,
}

/// An audit row: the shared text columns plus this backend's id and time.
#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    occurred_at: DateTime<Utc>,
    #[sqlx(flatten)]
    columns: AuditColumns,
}

fn key_from_row(row: &PgRow) -> Result<ApiKey> {
    let r = KeyRow::from_row(row)?;
    Ok(ApiKey {
        id: r.id,
        organization_id: r.organization_id,
        name: r.name,
        prefix: r.prefix,
        status: stored("status", &r.status, KeyStatus::parse)?,
        scopes: r.scopes,
        created_by: r.created_by,
        created_at: r.created_at,
        last_used_at: r.last_used_at,
        expires_at: r.expires_at,
        environment: stored("environment", &r.environment, Environment::parse)?,
        metadata: metadata_from(&r.metadata)?,
        rotated_from: r.rotated_from,
        rotated_to: r.rotated_to,
        updated_at: r.updated_at,
    })
}

/// PostgreSQL's retryable errors, by SQLSTATE: 57014 query_canceled (the
/// statement timeout), 57P01..03 shutdown, 53300 too many connections, 08xxx
/// connection exceptions, 55000 object not in prerequisite state (not
/// accepting connections).
pub(super) fn is_retryable(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some_and(|e| {
        let c = e.code();
        c == "57014" || c.starts_with("57P") || c == "53300" || c.starts_with("08") || c == "55000"
    })
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn pool_stats(&self) -> PoolStats {
        PoolStats { size: self.pool.size(), idle: self.pool.num_idle() as u32 }
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_key(&self, key: NewKey, audit: &AuditContext) -> Result<ApiKey> {
        let mut tx = self.pool.begin().await?;
        let plan = lock_organization(&mut tx, &key.organization_id).await?;
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
        let created = insert_key(&mut tx, &key).await?;
        let action = created_action(audit);
        append_audit(&mut tx, &AuditRecord::for_key(action, &created, None, Some(KeyStatus::Active), audit)).await?;
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

    async fn verification_read(&self, id: &str, floor: Option<DateTime<Utc>>) -> Result<Option<(ApiKey, StoredHash)>> {
        match &self.standby {
            None => self.get_key_with_hash(id).await,
            Some(standby) => {
                let from_standby = async { self.trusted_standby_read(standby, id, floor).await.map(Some) };
                standby.route(from_standby, self.get_key_with_hash(id)).await
            }
        }
    }

    async fn verification_reread(&self, id: &str, floor: Option<DateTime<Utc>>) -> Result<Option<ApiKey>> {
        match &self.standby {
            None => self.get_key(id).await,
            Some(standby) => {
                let from_standby = async { self.trusted_standby_read(standby, id, floor).await.map(|(k, _)| Some(k)) };
                standby.route(from_standby, self.get_key(id)).await
            }
        }
    }

    async fn ping_standby(&self) -> Option<Result<()>> {
        Some(self.standby.as_ref()?.ping().await)
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
               AND ($2::text IS NULL OR status = $2) \
               AND ($3::text IS NULL OR created_by = $3) \
               AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5)) \
               AND ($7::text IS NULL OR environment = $7) \
             ORDER BY created_at DESC, id DESC LIMIT $6"
        ))
        .bind(organization_id)
        .bind(filter.status.map(KeyStatus::as_str))
        .bind(filter.created_by.as_deref())
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id.as_str()).unwrap_or(""))
        .bind(limit as i64)
        .bind(filter.environment.map(Environment::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn set_status(&self, id: &str, status: KeyStatus, audit: &AuditContext) -> Result<Option<ApiKey>> {
        let mut tx = self.pool.begin().await?;
        let Some(before) = lock_key(&mut tx, id).await? else {
            return Ok(None);
        };
        ensure_not_revoked(&before)?;
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET status = $2, updated_at = $3 WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(status.as_str())
        .bind(Utc::now())
        .fetch_one(&mut *tx)
        .await?;
        let key = key_from_row(&row)?;
        let record =
            AuditRecord::for_key(AuditAction::KeyStatusChanged, &key, Some(before.status), Some(status), audit);
        append_audit(&mut tx, &record).await?;
        notify_change(&mut tx, &key, key.updated_at).await?;
        tx.commit().await?;
        Ok(Some(key))
    }

    async fn update_key(&self, id: &str, update: &KeyUpdate, audit: &AuditContext) -> Result<Option<ApiKey>> {
        let mut tx = self.pool.begin().await?;
        if lock_key(&mut tx, id).await?.is_none() {
            return Ok(None);
        }
        let now = Utc::now();
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET name = coalesce($2, name), metadata = coalesce($3, metadata), \
             expires_at = CASE WHEN $4 THEN $5 ELSE expires_at END, updated_at = $6 WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(update.name.as_deref())
        .bind(update.metadata.as_ref().map(metadata_json))
        .bind(update.expires_at.is_some())
        .bind(update.expires_at.flatten())
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let key = key_from_row(&row)?;
        let record = AuditRecord::for_update(&key, update, audit);
        append_audit(&mut tx, &record).await?;
        notify_change(&mut tx, &key, key.updated_at).await?;
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
        let mut tx = self.pool.begin().await?;
        lock_organization(&mut tx, &new.organization_id).await?;
        let Some(old) = lock_key(&mut tx, old_id).await? else {
            return Ok(None);
        };
        let now = Utc::now();
        ensure_can_roll(&old, now)?;
        let created = insert_key(&mut tx, &new).await?;
        let end = roll_end(&old, now, grace);
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET rotated_to = $2, status = CASE WHEN $3 THEN 'revoked' ELSE status END, \
             expires_at = CASE WHEN $3 THEN expires_at ELSE $4 END, updated_at = $5 WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(old_id)
        .bind(&created.id)
        .bind(end.is_none())
        .bind(end)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let previous = key_from_row(&row)?;
        let record = AuditRecord::for_roll(&created, &previous, audit);
        append_audit(&mut tx, &record).await?;
        notify_change(&mut tx, &previous, previous.updated_at).await?;
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
        let mut tx = self.pool.begin().await?;
        let Some(before) = lock_key(&mut tx, key_id).await? else {
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
        let now = Utc::now();
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
        append_audit(&mut tx, &record).await?;
        if status.is_some() {
            notify_change(&mut tx, &key, key.updated_at).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn revoke_key(&self, id: &str, audit: &AuditContext) -> Result<Option<ApiKey>> {
        let mut tx = self.pool.begin().await?;
        let Some(before) = lock_key(&mut tx, id).await? else {
            return Ok(None);
        };
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET status = 'revoked', updated_at = $2 WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(Utc::now())
        .fetch_one(&mut *tx)
        .await?;
        let key = key_from_row(&row)?;
        let record =
            AuditRecord::for_key(AuditAction::KeyRevoked, &key, Some(before.status), Some(KeyStatus::Revoked), audit);
        append_audit(&mut tx, &record).await?;
        notify_change(&mut tx, &key, key.updated_at).await?;
        tx.commit().await?;
        Ok(Some(key))
    }

    async fn delete_key(&self, id: &str, audit: &AuditContext) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let Some(before) = lock_key(&mut tx, id).await? else {
            return Ok(false);
        };
        sqlx::query("DELETE FROM api_keys WHERE id = $1").bind(id).execute(&mut *tx).await?;
        let record = AuditRecord::for_key(AuditAction::KeyDeleted, &before, Some(before.status), None, audit);
        append_audit(&mut tx, &record).await?;
        notify_change(&mut tx, &before, Utc::now()).await?;
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
        let mut tx = self.pool.begin().await?;
        let before = lock_organization(&mut tx, id).await?;
        sqlx::query("UPDATE organizations SET plan = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(plan.as_str())
            .bind(Utc::now())
            .execute(&mut *tx)
            .await?;
        append_audit(&mut tx, &AuditRecord::for_plan(id, before, plan, audit)).await?;
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
               AND ($2::timestamptz IS NULL OR occurred_at >= $2) \
               AND ($3::timestamptz IS NULL OR occurred_at < $3) \
               AND ($4::text IS NULL OR action = $4) \
               AND ($5::bigint IS NULL OR id < $5) \
             ORDER BY id DESC LIMIT $6",
        )
        .bind(organization_id)
        .bind(filter.since)
        .bind(filter.until)
        .bind(filter.action.map(AuditAction::as_str))
        .bind(before_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let r = AuditRow::from_row(row)?;
                r.columns.into_event(r.id, r.occurred_at)
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
               (SELECT coalesce(sum(u.calls), 0)::bigint FROM usage_minutes u \
                  WHERE u.organization_id = o.id AND u.minute > $3) AS calls \
             FROM organizations o WHERE o.id = $1",
        )
        .bind(organization_id)
        .bind(now)
        // Buckets are minute-aligned: a bucket counts when any of it lies in the window.
        .bind(now - ChronoDuration::hours(24) - ChronoDuration::minutes(1))
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
            last_call_at: row.try_get("last_call_at")?,
            plan: plan_from(&plan)?,
        })
    }

    async fn record_usage(&self, batch: &[UsageDelta]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let batch = merge_usage(batch);
        let key_ids: Vec<&str> = batch.iter().map(|d| d.key_id.as_str()).collect();
        let orgs: Vec<&str> = batch.iter().map(|d| d.organization_id.as_str()).collect();
        let minutes: Vec<DateTime<Utc>> = batch.iter().map(|d| d.minute).collect();
        let calls: Vec<i64> = batch.iter().map(|d| d.calls).collect();
        let last: Vec<DateTime<Utc>> = batch.iter().map(|d| d.last_used_at).collect();
        // One statement per flush, whatever the batch size: buckets, keys'
        // last_used_at and organizations' last_call_at move together.
        sqlx::query(
            "WITH d AS ( \
               SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[], $5::timestamptz[]) \
                 AS t(key_id, organization_id, minute, calls, last_used_at)), \
             buckets AS ( \
               INSERT INTO usage_minutes AS u (key_id, organization_id, minute, calls, last_used_at) \
               SELECT key_id, organization_id, minute, calls, last_used_at FROM d \
               ON CONFLICT (key_id, minute) DO UPDATE \
                 SET calls = u.calls + EXCLUDED.calls, \
                     last_used_at = greatest(u.last_used_at, EXCLUDED.last_used_at)), \
             keys AS ( \
               UPDATE api_keys k SET last_used_at = greatest(k.last_used_at, m.t) \
               FROM (SELECT key_id, max(last_used_at) AS t FROM d GROUP BY key_id) m \
               WHERE k.id = m.key_id) \
             UPDATE organizations o SET last_call_at = greatest(o.last_call_at, m.t) \
             FROM (SELECT organization_id, max(last_used_at) AS t FROM d GROUP BY organization_id) m \
             WHERE o.id = m.organization_id",
        )
        .bind(&key_ids)
        .bind(&orgs)
        .bind(&minutes)
        .bind(&calls)
        .bind(&last)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn prune_usage(&self, before: DateTime<Utc>) -> Result<u64> {
        let done = sqlx::query("DELETE FROM usage_minutes WHERE minute < $1").bind(before).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn watch_changes(&self, sink: Arc<dyn ChangeSink>, mut stop: watch::Receiver<bool>) {
        let mut backoff = LISTEN_BACKOFF_MIN;
        loop {
            let connect = async {
                let mut l = match &self.listen_url {
                    Some(url) => PgListener::connect(url.expose()).await?,
                    None => PgListener::connect_with(&self.pool).await?,
                };
                // Report a lost connection at once instead of reconnecting
                // inside try_recv: the gap must reach the cache right away.
                l.eager_reconnect(false);
                l.listen(CHANGE_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let listener = tokio::select! {
                r = connect => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let mut listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "change listener cannot connect");
                    self.hearing(false);
                    sink.notices_lost();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    backoff = next_backoff(backoff);
                    continue;
                }
            };
            // Listening again: whatever changed during the gap was missed.
            backoff = LISTEN_BACKOFF_MIN;
            self.reset_barrier().await;
            self.hearing(true);
            sink.resync();
            tracing::info!("change listener connected");
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    r = listener.try_recv() => match r {
                        Ok(Some(n)) => {
                            let (id, organization_id, version) = parse_notice(n.payload());
                            sink.key_changed(id, organization_id, version);
                        }
                        Ok(None) => {
                            tracing::warn!("change listener connection lost");
                            self.hearing(false);
                            sink.notices_lost();
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "change listener failed");
                            self.hearing(false);
                            sink.notices_lost();
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// The standby is a fallback's fallback: waiting long on it would only
/// delay the read from the primary.
const STANDBY_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// The primary's current WAL position, or `None` if it cannot say. The
/// insert position, not `pg_current_wal_lsn()` (the write position): with
/// `synchronous_commit = off` a commit returns before its record is written,
/// so the write position can stand before a revocation that already
/// returned, and a standby replayed that far would still hold the old row.
/// (At a page boundary the insert position is past the next page's header,
/// which a standby reaches only with the next record: reads stay on the
/// primary until then, which on a replica with traffic is seconds at most.)
async fn primary_wal_position(pool: &PgPool) -> Option<String> {
    sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text").fetch_one(pool).await.ok()
}

/// A key and its hash from the standby, if it has replayed the primary up to
/// `barrier`. `(false, _)`: not caught up; `(true, None)`: no such key there.
/// A server not in recovery counts as caught up (`pg_last_wal_replay_lsn()`
/// is NULL there); a promoted standby keeps its last replayed position, so
/// it never does and reads go to the primary.
///
/// Two statements on one connection, the check first: a statement's
/// snapshot is taken before it runs, so a row read in the checking statement
/// itself could predate the position the check then sees replayed.
async fn standby_read(pool: PgPool, id: String, barrier: String) -> Result<(bool, Option<(ApiKey, StoredHash)>)> {
    let mut conn = pool.acquire().await?;
    let caught_up: bool = sqlx::query_scalar("SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, true)")
        .bind(&barrier)
        .fetch_one(&mut *conn)
        .await?;
    if !caught_up {
        return Ok((false, None));
    }
    let row = sqlx::query(concat!("SELECT ", key_columns!(), ", secret_hash, pepper_id FROM api_keys WHERE id = $1"))
        .bind(&id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else { return Ok((true, None)) };
    let stored = StoredHash { phc: row.try_get("secret_hash")?, pepper_id: row.try_get("pepper_id")? };
    Ok((true, Some((key_from_row(&row)?, stored))))
}

impl PostgresStore {
    /// The verification read from the standby when it can be trusted with
    /// it: caught up to the barrier, has the key (else it may be too new for
    /// the standby), and not older than `floor`. `None`: ask the primary.
    async fn trusted_standby_read(
        &self,
        standby: &Standby,
        id: &str,
        floor: Option<DateTime<Utc>>,
    ) -> Option<(ApiKey, StoredHash)> {
        let barrier = standby.barrier()?;
        match standby.read(|pool| standby_read(pool, id.to_owned(), barrier)).await {
            Some((true, Some(found))) if floor.is_none_or(|f| found.0.updated_at >= f) => Some(found),
            _ => None,
        }
    }

    /// After the listener (re)connects: the changes of the gap reach no
    /// cache by notice, so the standby is trusted only once it has replayed
    /// as far as the primary is now.
    async fn reset_barrier(&self) {
        if let Some(standby) = &self.standby {
            let at = primary_wal_position(&self.pool).await;
            if at.is_none() {
                // Safe (no barrier, no standby reads) but costly: say so.
                tracing::warn!(
                    "the primary's WAL position is unknown: verification reads stay on the primary until the \
                     change listener reconnects"
                );
            }
            standby.set_barrier(at);
        }
    }

    /// Tells the standby whether change notices arrive (see [`Standby`]):
    /// false from the moment the listener loses its connection, true only
    /// after [`Self::reset_barrier`].
    fn hearing(&self, hearing: bool) {
        if let Some(standby) = &self.standby {
            standby.set_hearing(hearing);
        }
    }
}

/// Channel of key-change notices; the payload is `<key id> <organization id>
/// <version>` (no part holds whitespace; the version is the changed record's
/// `updated_at` in microseconds, the time of the change for a deletion).
/// Earlier versions sent the key id alone, or id and organization, which are
/// still understood.
pub const CHANGE_CHANNEL: &str = "takumo_keys_changed";

/// What a change notice names: the key id, and where given its organization
/// and the version of the record after the change.
fn parse_notice(payload: &str) -> (&str, Option<&str>, Option<DateTime<Utc>>) {
    let mut parts = payload.split(' ');
    let id = parts.next().unwrap_or_default();
    let organization = parts.next();
    let version = parts.next().and_then(|v| v.parse().ok()).and_then(DateTime::from_timestamp_micros);
    (id, organization, version)
}
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The listener's wait before its next attempt: doubling, so a database
/// that is down is not hammered by every replica, up to a cap, so notices
/// resume within seconds of its return.
fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(LISTEN_BACKOFF_MAX)
}

/// Inserts a new ACTIVE key and counts it in `keys_created` (CreateKey and
/// RollKey; the caller holds the transaction and has checked the plan).
async fn insert_key(tx: &mut sqlx::PgConnection, key: &NewKey) -> Result<ApiKey> {
    let row = sqlx::query(concat!(
        "INSERT INTO api_keys (id, organization_id, name, prefix, status, scopes, created_by, \
         created_at, expires_at, environment, secret_hash, pepper_id, metadata, rotated_from) \
         VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING ",
        key_columns!()
    ))
    .bind(&key.id)
    .bind(&key.organization_id)
    .bind(&key.name)
    .bind(&key.prefix)
    .bind(&key.scopes)
    .bind(&key.created_by)
    .bind(key.created_at)
    .bind(key.expires_at)
    .bind(key.environment.as_str())
    .bind(&key.secret_hash.phc)
    .bind(&key.secret_hash.pepper_id)
    .bind(metadata_json(&key.metadata))
    .bind(key.rotated_from.as_deref())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE organizations SET keys_created = keys_created + 1, updated_at = $2 WHERE id = $1")
        .bind(&key.organization_id)
        .bind(Utc::now())
        .execute(&mut *tx)
        .await?;
    key_from_row(&row)
}

/// Creates the organization (on Free) at first sight and locks its row:
/// creates and plan changes of one organization run one at a time, so the
/// count of keys cannot change between the limit check and the insert.
async fn lock_organization(tx: &mut sqlx::PgConnection, id: &str) -> Result<Plan> {
    sqlx::query(
        "INSERT INTO organizations (id, created_at, updated_at) VALUES ($1, $2, $2) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(Utc::now())
    .execute(&mut *tx)
    .await?;
    let plan: String = sqlx::query_scalar("SELECT plan FROM organizations WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    plan_from(&plan)
}

/// Reads and locks a key row, for a change that must know what it replaced.
async fn lock_key(tx: &mut sqlx::PgConnection, id: &str) -> Result<Option<ApiKey>> {
    let row = sqlx::query(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1 FOR UPDATE"))
        .bind(id)
        .fetch_optional(tx)
        .await?;
    row.as_ref().map(key_from_row).transpose()
}

async fn append_audit(tx: &mut sqlx::PgConnection, r: &AuditRecord<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (occurred_at, organization_id, actor, principal, action, key_id, \
           key_prefix, status_before, status_after, request_id, peer, detail) \
         VALUES (now(), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
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

/// Queues a change notice in `tx`: PostgreSQL delivers it on commit only,
/// so replicas hear of exactly the changes that happened.
async fn notify_change(tx: &mut sqlx::PgConnection, key: &ApiKey, version: DateTime<Utc>) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGE_CHANNEL)
        .bind(format!("{} {} {}", key.id, key.organization_id, version.timestamp_micros()))
        .execute(tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_url() -> String {
        std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    /// The error PostgreSQL returns for a statement failing with `sqlstate`.
    async fn failing_with(pool: &PgPool, sqlstate: &str) -> Error {
        let raise = format!("DO $$ BEGIN RAISE EXCEPTION 'planted' USING ERRCODE = '{sqlstate}'; END $$");
        Error::from(sqlx::query(sqlx::AssertSqlSafe(raise)).execute(pool).await.unwrap_err())
    }

    /// Which SQLSTATEs clients may retry: the statement timeout, a server
    /// shutting down or full, a broken connection, a server not yet
    /// accepting connections; a constraint or a bad query is not retryable.
    #[tokio::test]
    async fn sqlstates_of_an_unreachable_or_overloaded_server_are_unavailable() {
        let pool = PgPoolOptions::new().max_connections(1).connect(&server_url()).await.unwrap();
        for code in ["57014", "57P01", "57P02", "57P03", "53300", "08000", "08006", "55000"] {
            let err = failing_with(&pool, code).await;
            assert!(matches!(err, Error::Unavailable { .. }), "{code}: {err:?}");
        }
        for code in ["23505", "42P01", "40001", "P0001", "58000", "53200"] {
            let err = failing_with(&pool, code).await;
            assert!(matches!(err, Error::Internal(_)), "{code}: {err:?}");
        }
    }

    #[test]
    fn the_listener_backs_off_doubling_up_to_its_cap() {
        let waits: Vec<_> =
            std::iter::successors(Some(LISTEN_BACKOFF_MIN), |d| Some(next_backoff(*d))).take(8).collect();
        let ms: Vec<_> = waits.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    /// The store's Debug form (in a panic or a `?` log) says whether a
    /// standby is set, never a connection URL: those hold passwords.
    #[tokio::test]
    async fn the_debug_form_shows_no_connection_url() {
        let store = PostgresStore {
            pool: PgPool::connect_lazy(&server_url()).unwrap(),
            standby: None,
            listen_url: Some(SecretString::new("postgres://listener:hunter2@db/keys")),
        };
        assert_eq!(format!("{store:?}"), "PostgresStore { standby: false, .. }");
    }
}
