//! Leaked-key intake, shared by `ReportLeakedKeys` and GitHub's secret
//! scanning endpoint: a reported string is ours only if the verification
//! path proves its secret (a report counts no usage), and a real key is
//! handled by `TAKUMO_LEAK_ACTION` once per key and source URL.

use crate::{
    domain::{
        model::{ApiKey, AuditContext, LeakAction},
        validate,
    },
    error::{Error, Result},
    store::Store,
    verify::{Purpose, Verifier},
};
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;

/// Most leaks one report may carry.
pub const MAX_LEAKS_PER_REPORT: usize = 1_000;
/// Longest source URL of a reported leak.
const MAX_SOURCE_URL_LEN: usize = 2_048;
/// Leaks of one report checked at once.
const CONCURRENCY: usize = 8;

/// A string found somewhere public, and where.
pub struct Leak {
    pub key: String,
    pub source_url: String,
    pub source: String,
}

/// The intake: what checks a reported string and acts on it.
#[derive(Clone)]
pub struct LeakIntake {
    pub verifier: Verifier,
    pub store: Arc<dyn Store>,
    pub action: LeakAction,
}

impl LeakIntake {
    /// Checks the report's size and its source fields (they reach the audit
    /// log); `field` names the list in error messages.
    pub fn validate(field: &str, leaks: &[Leak]) -> Result<()> {
        if leaks.len() > MAX_LEAKS_PER_REPORT {
            return Err(Error::invalid(format!(
                "{field} holds {} entries; at most {MAX_LEAKS_PER_REPORT} are allowed per report",
                leaks.len()
            )));
        }
        for (i, leak) in leaks.iter().enumerate() {
            validate::leak_source(&format!("{field}[{i}].source_url"), &leak.source_url, MAX_SOURCE_URL_LEN)?;
            validate::leak_source(&format!("{field}[{i}].source"), &leak.source, validate::MAX_LEN)?;
        }
        Ok(())
    }

    /// For each leak, in order: the key it is (any status), or `None` for a
    /// false positive, which changes nothing.
    pub async fn report(&self, leaks: Vec<Leak>, audit: &AuditContext) -> Result<Vec<Option<ApiKey>>> {
        futures::stream::iter(leaks)
            .map(|leak| async move {
                let Some(key) = self.verifier.verify(&leak.key, Purpose::Report).await?.key().map(|k| (**k).clone())
                else {
                    return Ok::<_, Error>(None);
                };
                if self.store.record_leak(&key.id, &leak.source_url, &leak.source, self.action, audit).await? {
                    // The record's new version is not returned: a floor of now
                    // is at least as new (reads of it then go to the primary).
                    self.verifier.invalidate(&key.id, &key.organization_id, chrono::Utc::now());
                    tracing::warn!(key_id = %key.id, action = self.action.as_str(), "leaked key reported");
                }
                Ok(Some(key))
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await
    }
}
