//! Issuing a key: generate, hash, store. The one way a key comes to exist,
//! shared by `CreateKey` and the `bootstrap` command; the full key string is
//! returned once and exists nowhere else afterwards.

use crate::{
    domain::{
        keys,
        model::{ApiKey, AuditContext, Environment, Metadata, NewKey},
        secret::SecretString,
    },
    error::{Error, Result},
    store::{Store, truncate_micros},
    verify::hashing::Hasher,
};
use chrono::{DateTime, Utc};

/// A validated request for a new key.
pub struct KeySpec {
    pub organization_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_by: String,
    pub environment: Environment,
    pub expires_at: Option<DateTime<Utc>>,
    /// Validated already (`validate::metadata`).
    pub metadata: Metadata,
}

/// Generates, hashes and stores a key; returns it with the full key string,
/// which exists nowhere else from here on. Shared by `CreateKey` and the
/// `bootstrap` command.
pub async fn issue_key(
    store: &dyn Store,
    hasher: &Hasher,
    spec: KeySpec,
    audit: &AuditContext,
) -> Result<(ApiKey, SecretString)> {
    // Argon2 is the expensive step: a create the plan would refuse must not
    // cost one. The store checks the limit again, atomically, on insert. An
    // unlimited plan needs no count (one primary-key read).
    let plan = store.get_organization(&spec.organization_id).await?.plan;
    if let Some(limit) = plan.key_limit()
        && store.key_stats(&spec.organization_id, Utc::now()).await?.keys_counted >= limit
    {
        return Err(Error::LimitExceeded { plan, limit });
    }
    let generated = keys::generate(spec.environment);
    let secret_hash = hasher.hash(generated.full.clone()).await?;
    let key = store
        .create_key(
            NewKey {
                id: generated.id.clone(),
                prefix: generated.display_prefix(),
                organization_id: spec.organization_id,
                name: spec.name,
                scopes: spec.scopes,
                created_by: spec.created_by,
                created_at: truncate_micros(Utc::now()),
                expires_at: spec.expires_at,
                environment: spec.environment,
                metadata: spec.metadata,
                rotated_from: None,
                secret_hash,
            },
            audit,
        )
        .await?;
    Ok((key, generated.full))
}

/// Rolls key `old` (RollKey): a new id and secret with the old key's name,
/// scopes, environment, metadata, expiry and creator, linked both ways; the
/// old key keeps working for `grace` (none: revoked at once). Returns the new
/// key, its full key string, and the old key as it is now.
pub async fn roll_key(
    store: &dyn Store,
    hasher: &Hasher,
    old: &ApiKey,
    grace: chrono::Duration,
    audit: &AuditContext,
) -> Result<Option<(ApiKey, SecretString, ApiKey)>> {
    // The store checks again inside its transaction; this saves the argon2
    // of a roll that could never succeed.
    crate::store::ensure_can_roll(old, Utc::now())?;
    let generated = keys::generate(old.environment);
    let secret_hash = hasher.hash(generated.full.clone()).await?;
    let new = NewKey {
        id: generated.id.clone(),
        prefix: generated.display_prefix(),
        organization_id: old.organization_id.clone(),
        name: old.name.clone(),
        scopes: old.scopes.clone(),
        created_by: old.created_by.clone(),
        created_at: truncate_micros(Utc::now()),
        expires_at: old.expires_at,
        environment: old.environment,
        metadata: old.metadata.clone(),
        rotated_from: Some(old.id.clone()),
        secret_hash,
    };
    Ok(store.roll_key(&old.id, new, grace, audit).await?.map(|(key, previous)| (key, generated.full, previous)))
}
