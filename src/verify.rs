//! The verification pipeline: shape and checksum, one indexed lookup, one
//! argon2 verify, then a pure decision. `VerifyKey` and the authentication of
//! API-key callers both go through [`Verifier::resolve`], so a key that
//! verifies is exactly a key that can call the API.

use crate::{
    error::Result,
    hashing::Hasher,
    keys,
    model::{ApiKey, KeyStatus},
    scopes,
    secret::SecretString,
    store::Store,
    usage::Usage,
};
use chrono::{DateTime, Utc};
use std::sync::Arc;

/// What a presented key turned out to be.
#[derive(Debug)]
pub enum Resolution {
    /// Not one of our keys: wrong shape or checksum. No I/O was done.
    Malformed,
    /// Well-formed, but no such key or a wrong secret; the two are not told apart.
    NotFound,
    /// The secret was proven for this key (whatever its status).
    Key(Box<ApiKey>),
}

/// Why a resolved key does not pass, in the order they are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Revoked,
    Disabled,
    Expired,
    WrongOrganization,
    InsufficientScope(Vec<String>),
}

/// The decision for a resolved key: status, expiry, organization, scopes.
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

#[derive(Clone)]
pub struct Verifier {
    store: Arc<dyn Store>,
    hasher: Hasher,
    usage: Usage,
}

impl Verifier {
    pub fn new(store: Arc<dyn Store>, hasher: Hasher, usage: Usage) -> Self {
        Self {
            store,
            hasher,
            usage,
        }
    }

    /// Resolves a presented key to the stored key it proves, counting one
    /// call for it. Store trouble is an error, never a "not found".
    pub async fn resolve(&self, presented: &str) -> Result<Resolution> {
        let Some(parsed) = keys::parse(presented) else {
            return Ok(Resolution::Malformed);
        };
        let Some((key, phc)) = self.store.get_key_with_hash(parsed.id).await? else {
            return Ok(Resolution::NotFound);
        };
        // A key of the wrong environment with the right secret cannot exist,
        // but the check is free and keeps the prefix honest.
        if key.environment != parsed.environment {
            return Ok(Resolution::NotFound);
        }
        let ok = self
            .hasher
            .verify(SecretString::new(presented), phc)
            .await?;
        if !ok {
            return Ok(Resolution::NotFound);
        }
        self.usage.record(&key, Utc::now());
        Ok(Resolution::Key(Box::new(key)))
    }
}
