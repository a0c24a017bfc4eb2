//! The `ApiKeyService` handlers: authenticate, authorize, validate, call the
//! store, convert. Every handler returns the domain `Error`, mapped to a
//! `tonic::Status` in one place (`error.rs`).

use crate::{
    api::auth::{Authenticator, Caller, Principal, Rpc, authorize},
    api::issue::{KeySpec, issue_key, roll_key},
    api::leaks::{Leak, LeakIntake},
    api::page_token,
    api::spans,
    domain::keys,
    domain::model::{ApiKey, AuditFilter, KeyStatus, KeyUpdate, LeakAction, ListFilter},
    domain::scopes,
    domain::validate,
    error::{Error, Result},
    metrics,
    proto::{self, pb},
    store::{Store, truncate_micros},
    verify::hashing::Hasher,
    verify::{Denial, Purpose, Verdict, Verifier, changes::Change},
};
use chrono::Utc;
use futures::TryStreamExt;
use pb::api_key_service_server::ApiKeyService;
use std::sync::Arc;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 500;

#[derive(Clone)]
pub struct KeysService {
    store: Arc<dyn Store>,
    hasher: Hasher,
    verifier: Verifier,
    auth: Authenticator,
    leak_action: LeakAction,
}

impl KeysService {
    pub fn new(store: Arc<dyn Store>, hasher: Hasher, verifier: Verifier, auth: Authenticator) -> Self {
        Self { store, hasher, verifier, auth, leak_action: LeakAction::default() }
    }

    /// What a reported leak of one of our keys does (`TAKUMO_LEAK_ACTION`).
    pub fn with_leak_action(self, leak_action: LeakAction) -> Self {
        Self { leak_action, ..self }
    }

    /// Authenticates and authorizes; an API key whose call is accepted here
    /// counts one API call, a refused one counts as a refusal.
    async fn caller<T>(&self, req: &Request<T>, rpc: Rpc) -> Result<Caller> {
        let caller = self.auth.authenticate(req).await?;
        let authorized = authorize(&caller, rpc);
        if let Principal::Key(key) = &caller.principal {
            match &authorized {
                Ok(()) => self.verifier.accepted(key),
                Err(_) => self.verifier.refused(&Denial::InsufficientScope(vec![])),
            }
        }
        authorized?;
        Ok(caller)
    }

    /// Loads a key the caller may see; anything else is the same NOT_FOUND,
    /// so key ids of other organizations cannot be probed.
    async fn visible_key(&self, caller: &Caller, id: &str) -> Result<ApiKey> {
        if id.is_empty() {
            return Err(Error::invalid("id is required"));
        }
        let not_found = || Error::not_found(format!("key {} not found", printable_id(id)));
        if !keys::is_valid_id(id) {
            return Err(not_found());
        }
        match self.store.get_key(id).await? {
            Some(k) if caller.can_see(&k) => {
                spans::record("organization_id", &k.organization_id);
                spans::record("key_id", &k.id);
                Ok(k)
            }
            _ => Err(not_found()),
        }
    }

    async fn managed_key(&self, caller: &Caller, id: &str) -> Result<ApiKey> {
        let key = self.visible_key(caller, id).await?;
        caller.ensure_can_manage(&key)?;
        Ok(key)
    }

    async fn create_key(&self, req: Request<pb::CreateKeyRequest>) -> Result<pb::CreateKeyResponse> {
        let caller = self.caller(&req, Rpc::CreateKey).await?;
        let r = req.into_inner();
        let organization_id = caller.organization(&r.organization_id)?;
        spans::record("organization_id", &organization_id);
        validate::name("name", &r.name)?;
        let scope_set = match &r.scopes {
            None => {
                return Err(Error::invalid("scopes are required: set `preset` or `custom`"));
            }
            Some(pb::create_key_request::Scopes::Preset(p)) => scopes::expand_preset(proto::preset(*p)?),
            Some(pb::create_key_request::Scopes::Custom(list)) => scopes::custom(&list.scopes)?,
        };
        caller.ensure_can_grant(&scope_set)?;
        let created_by = caller.actor()?;
        let environment = caller.new_key_environment(proto::environment(r.environment)?)?;
        let now = truncate_micros(Utc::now());
        let requested =
            r.expires_at.as_ref().map(|t| proto::from_timestamp("expires_at", t)).transpose()?.map(truncate_micros);
        if requested.is_some_and(|t| t <= now) {
            return Err(Error::invalid("expires_at must be in the future"));
        }
        let expires_at = caller.new_key_expiry(requested)?;
        validate::metadata("metadata", &r.metadata)?;
        let metadata = r.metadata.into_iter().collect();

        let (key, secret) = issue_key(
            &*self.store,
            &self.hasher,
            KeySpec { organization_id, name: r.name, scopes: scope_set, created_by, environment, expires_at, metadata },
            &caller.audit(),
        )
        .await?;
        spans::record("key_id", &key.id);
        tracing::info!(key_id = %key.id, organization_id = %spans::Escaped(&key.organization_id), "key created");
        Ok(pb::CreateKeyResponse { key: Some(key.into()), secret: secret.into_exposed() })
    }

    async fn get_key(&self, req: Request<pb::GetKeyRequest>) -> Result<pb::ApiKey> {
        let caller = self.caller(&req, Rpc::GetKey).await?;
        Ok(self.visible_key(&caller, &req.get_ref().id).await?.into())
    }

    async fn list_keys(&self, req: Request<pb::ListKeysRequest>) -> Result<pb::ListKeysResponse> {
        let caller = self.caller(&req, Rpc::ListKeys).await?;
        let r = req.into_inner();
        let organization_id = caller.organization(&r.organization_id)?;
        spans::record("organization_id", &organization_id);
        let page_size = page_size(r.page_size)?;
        let after = (!r.page_token.is_empty()).then(|| page_token::decode_key_cursor(&r.page_token)).transpose()?;
        let filter = ListFilter {
            status: r.status.map(|s| proto::key_status("status", s)).transpose()?.flatten(),
            created_by: r.created_by.filter(|c| !c.is_empty()),
            environment: caller.environment(),
        };
        let mut keys = self.store.list_keys(&organization_id, &filter, after.as_ref(), page_size + 1).await?;
        let next_page_token = if keys.len() > page_size {
            keys.truncate(page_size);
            keys.last().map(|k| page_token::encode_key_cursor(&k.cursor())).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListKeysResponse { keys: keys.into_iter().map(Into::into).collect(), next_page_token })
    }

    async fn set_key_status(&self, req: Request<pb::SetKeyStatusRequest>) -> Result<pb::ApiKey> {
        let caller = self.caller(&req, Rpc::SetKeyStatus).await?;
        let r = req.into_inner();
        let status = match proto::key_status("status", r.status)? {
            Some(s @ (KeyStatus::Active | KeyStatus::Disabled)) => s,
            Some(KeyStatus::Revoked) => {
                return Err(Error::invalid("status: use RevokeKey to revoke a key"));
            }
            None => {
                return Err(Error::invalid("status is required: KEY_STATUS_ACTIVE or KEY_STATUS_DISABLED"));
            }
        };
        let target = self.managed_key(&caller, &r.id).await?;
        if status == KeyStatus::Active {
            caller.ensure_can_enable(&target)?;
        }
        let key = self
            .store
            .set_status(&r.id, status, &caller.audit())
            .await?
            .ok_or_else(|| Error::not_found(format!("key {} not found", r.id)))?;
        self.verifier.invalidate(&key.id, &key.organization_id, key.updated_at);
        tracing::info!(key_id = %key.id, status = key.status.as_str(), "key status set");
        Ok(key.into())
    }

    async fn update_key(&self, req: Request<pb::UpdateKeyRequest>) -> Result<pb::ApiKey> {
        let caller = self.caller(&req, Rpc::UpdateKey).await?;
        let r = req.into_inner();
        let Some(key) = r.key else {
            return Err(Error::invalid("key is required: name the key to change in `key.id`"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask is required: name the fields to change (`name`, `metadata`, `expires_at`)",
            ));
        }
        let target = self.managed_key(&caller, &key.id).await?;
        caller.ensure_can_grant(&target.scopes)?;
        let mut update = KeyUpdate::default();
        for path in &paths {
            match path.as_str() {
                "name" => {
                    validate::name("key.name", &key.name)?;
                    update.name = Some(key.name.clone());
                }
                "metadata" => {
                    validate::metadata("key.metadata", &key.metadata)?;
                    update.metadata = Some(key.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
                }
                "expires_at" => {
                    let requested = key
                        .expires_at
                        .as_ref()
                        .map(|t| proto::from_timestamp("key.expires_at", t))
                        .transpose()?
                        .map(truncate_micros);
                    if requested.is_some_and(|t| t <= Utc::now()) {
                        return Err(Error::invalid(
                            "key.expires_at must be in the future (omit it to clear the expiry)",
                        ));
                    }
                    // A key cannot outlive the key that changes it: an API-key
                    // caller that expires cannot clear or extend past its own expiry.
                    update.expires_at = Some(caller.new_key_expiry(requested)?);
                }
                other => {
                    return Err(Error::invalid(format!(
                        "update_mask path {:?} cannot be updated: use `name`, `metadata` or `expires_at`",
                        other.chars().take(64).collect::<String>()
                    )));
                }
            }
        }
        let key = self
            .store
            .update_key(&target.id, &update, &caller.audit())
            .await?
            .ok_or_else(|| Error::not_found(format!("key {} not found", target.id)))?;
        self.verifier.invalidate(&key.id, &key.organization_id, key.updated_at);
        tracing::info!(key_id = %key.id, fields = ?update.fields(), "key updated");
        Ok(key.into())
    }

    async fn roll_key(&self, req: Request<pb::RollKeyRequest>) -> Result<pb::RollKeyResponse> {
        let caller = self.caller(&req, Rpc::RollKey).await?;
        let r = req.into_inner();
        let grace = grace_period(r.grace_period.as_ref())?;
        let old = self.managed_key(&caller, &r.id).await?;
        // The new key carries the old one's scopes: the caller must hold them,
        // as if it created the new key itself.
        caller.ensure_can_grant(&old.scopes)?;
        let (key, secret, previous) = roll_key(&*self.store, &self.hasher, &old, grace, &caller.audit())
            .await?
            .ok_or_else(|| Error::not_found(format!("key {} not found", old.id)))?;
        self.verifier.invalidate(&previous.id, &previous.organization_id, previous.updated_at);
        spans::record("key_id", &key.id);
        tracing::info!(key_id = %key.id, previous = %previous.id, "key rolled");
        Ok(pb::RollKeyResponse {
            key: Some(key.into()),
            secret: secret.into_exposed(),
            previous: Some(previous.into()),
        })
    }

    async fn report_leaked_keys(
        &self,
        req: Request<pb::ReportLeakedKeysRequest>,
    ) -> Result<pb::ReportLeakedKeysResponse> {
        let caller = self.caller(&req, Rpc::ReportLeakedKeys).await?;
        let r = req.into_inner();
        let leaks: Vec<Leak> =
            r.leaks.into_iter().map(|l| Leak { key: l.key, source_url: l.source_url, source: l.source }).collect();
        LeakIntake::validate("leaks", &leaks)?;
        let intake =
            LeakIntake { verifier: self.verifier.clone(), store: self.store.clone(), action: self.leak_action };
        let verdicts = intake
            .report(leaks, &caller.audit())
            .await?
            .into_iter()
            .map(|found| match found {
                Some(key) => pb::LeakVerdict { true_positive: true, key_id: key.id, prefix: key.prefix },
                None => pb::LeakVerdict::default(),
            })
            .collect();
        Ok(pb::ReportLeakedKeysResponse { verdicts })
    }

    async fn revoke_key(&self, req: Request<pb::RevokeKeyRequest>) -> Result<pb::ApiKey> {
        let caller = self.caller(&req, Rpc::RevokeKey).await?;
        let id = &req.get_ref().id;
        self.managed_key(&caller, id).await?;
        let key = self
            .store
            .revoke_key(id, &caller.audit())
            .await?
            .ok_or_else(|| Error::not_found(format!("key {id} not found")))?;
        self.verifier.invalidate(&key.id, &key.organization_id, key.updated_at);
        tracing::info!(key_id = %key.id, "key revoked");
        Ok(key.into())
    }

    async fn delete_key(&self, req: Request<pb::DeleteKeyRequest>) -> Result<pb::DeleteKeyResponse> {
        let caller = self.caller(&req, Rpc::DeleteKey).await?;
        let id = &req.get_ref().id;
        let target = self.managed_key(&caller, id).await?;
        if !self.store.delete_key(id, &caller.audit()).await? {
            return Err(Error::not_found(format!("key {id} not found")));
        }
        self.verifier.invalidate(id, &target.organization_id, Utc::now());
        tracing::info!(key_id = %id, "key deleted");
        Ok(pb::DeleteKeyResponse {})
    }

    async fn verify_key(&self, req: Request<pb::VerifyKeyRequest>) -> Result<pb::VerifyKeyResponse> {
        self.caller(&req, Rpc::VerifyKey).await?;
        let r = req.into_inner();
        scopes::validate(&r.required_scopes, "required_scopes")?;
        let organization = match r.organization_id.as_deref() {
            // Present but empty is a caller bug, not "any organization".
            Some("") => {
                return Err(Error::invalid(
                    "organization_id is present but empty: omit it, or name the organization the key must belong to",
                ));
            }
            Some(o) => {
                validate::ident("organization_id", o)?;
                Some(o)
            }
            None => None,
        };
        let verdict =
            self.verifier.verify(&r.key, Purpose::VerifyKey { required: &r.required_scopes, organization }).await?;
        if let Some(key) = verdict.key() {
            spans::record("organization_id", &key.organization_id);
            spans::record("key_id", &key.id);
        }
        Ok(verify_response(verdict))
    }

    async fn get_key_stats(&self, req: Request<pb::GetKeyStatsRequest>) -> Result<pb::KeyStats> {
        let caller = self.caller(&req, Rpc::GetKeyStats).await?;
        let organization_id = caller.organization(&req.get_ref().organization_id)?;
        spans::record("organization_id", &organization_id);
        let s = self.store.key_stats(&organization_id, Utc::now()).await?;
        Ok(pb::KeyStats {
            total_keys: s.total_keys,
            active_keys: s.active_keys,
            api_calls_24h: s.api_calls_24h,
            last_call_at: s.last_call_at.map(proto::timestamp),
            plan: pb::Plan::from(s.plan) as i32,
            key_limit: s.plan.key_limit().unwrap_or(0),
            keys_counted: s.keys_counted,
        })
    }

    async fn list_scopes(&self, req: Request<pb::ListScopesRequest>) -> Result<pb::ListScopesResponse> {
        self.caller(&req, Rpc::ListScopes).await?;
        Ok(scope_catalog())
    }

    async fn list_audit_events(&self, req: Request<pb::ListAuditEventsRequest>) -> Result<pb::ListAuditEventsResponse> {
        let caller = self.caller(&req, Rpc::ListAuditEvents).await?;
        let r = req.into_inner();
        let organization_id = caller.organization(&r.organization_id)?;
        spans::record("organization_id", &organization_id);
        let page_size = page_size(r.page_size)?;
        let before_id =
            (!r.page_token.is_empty()).then(|| page_token::decode_audit_cursor(&r.page_token)).transpose()?;
        let filter = AuditFilter {
            since: r.since.as_ref().map(|t| proto::from_timestamp("since", t)).transpose()?,
            until: r.until.as_ref().map(|t| proto::from_timestamp("until", t)).transpose()?,
            action: r.action.map(proto::audit_action).transpose()?.flatten(),
        };
        let mut events = self.store.list_audit_events(&organization_id, &filter, before_id, page_size + 1).await?;
        let next_page_token = if events.len() > page_size {
            events.truncate(page_size);
            events.last().map(|e| page_token::encode_audit_cursor(e.id)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListAuditEventsResponse { events: events.into_iter().map(Into::into).collect(), next_page_token })
    }

    async fn export_audit_events(&self, req: Request<pb::ExportAuditEventsRequest>) -> Result<AuditStream> {
        let caller = self.caller(&req, Rpc::ExportAuditEvents).await?;
        let r = req.into_inner();
        let organization_id = caller.organization(&r.organization_id)?;
        spans::record("organization_id", &organization_id);
        let filter = AuditFilter {
            since: r.since.as_ref().map(|t| proto::from_timestamp("since", t)).transpose()?,
            until: r.until.as_ref().map(|t| proto::from_timestamp("until", t)).transpose()?,
            action: None,
        };
        let store = self.store.clone();
        // Pages of EXPORT_BATCH rows, fetched as the client reads: memory
        // stays bounded whatever the range, and a slow reader slows the reads.
        let pages = futures::stream::try_unfold(Some(None::<i64>), move |cursor| {
            let store = store.clone();
            let organization_id = organization_id.clone();
            let filter = filter.clone();
            async move {
                let Some(before) = cursor else { return Ok(None) };
                let batch = store.list_audit_events(&organization_id, &filter, before, EXPORT_BATCH).await?;
                let next = (batch.len() == EXPORT_BATCH).then(|| batch.last().map(|e| e.id));
                Ok::<_, Error>(Some((batch, next)))
            }
        });
        let events = pages
            .map_ok(|batch| futures::stream::iter(batch.into_iter().map(|e| Ok::<_, Error>(pb::AuditEvent::from(e)))))
            .try_flatten()
            .map_err(Status::from);
        Ok(Box::pin(events))
    }

    async fn watch_key_changes(&self, req: Request<pb::WatchKeyChangesRequest>) -> Result<ChangeStream> {
        self.caller(&req, Rpc::WatchKeyChanges).await?;
        let organization = req.into_inner().organization_id;
        if let Some(o) = &organization {
            validate::ident("organization_id", o)?;
        }
        let rx = self.verifier.changes().subscribe().map_err(|why| change_stream_ended(&why))?;
        Ok(change_stream(rx, organization))
    }

    async fn set_organization_plan(&self, req: Request<pb::SetOrganizationPlanRequest>) -> Result<pb::Organization> {
        let caller = self.caller(&req, Rpc::SetOrganizationPlan).await?;
        let r = req.into_inner();
        validate::ident("organization_id", &r.organization_id)?;
        let plan = proto::plan(r.plan)?;
        let org = self.store.set_plan(&r.organization_id, plan, &caller.audit()).await?;
        tracing::info!(organization_id = %spans::Escaped(&org.id), plan = org.plan.as_str(), "plan set");
        Ok(proto::organization(org))
    }
}

/// Longest grace period RollKey accepts.
const MAX_GRACE: chrono::Duration = chrono::Duration::days(7);

/// RollKey's `grace_period`: absent or zero is none; negative, a `nanos`
/// field out of range or of the other sign, or more than 7 days is INVALID_ARGUMENT.
fn grace_period(d: Option<&prost_types::Duration>) -> Result<chrono::Duration> {
    let Some(d) = d else { return Ok(chrono::Duration::zero()) };
    let in_range = d.nanos.abs() < 1_000_000_000 && !(d.seconds > 0 && d.nanos < 0) && !(d.seconds < 0 && d.nanos > 0);
    if !in_range {
        return Err(Error::invalid(
            "grace_period is not a valid Duration: nanos must be within ±999,999,999 and of the same sign as seconds",
        ));
    }
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Error::invalid("grace_period must not be negative (0 revokes the old key at once)"));
    }
    // Bounded before converting: chrono panics on seconds near i64::MAX.
    let too_long = || Error::invalid("grace_period must be at most 7 days (604800s)");
    if d.seconds > MAX_GRACE.num_seconds() {
        return Err(too_long());
    }
    let grace = chrono::Duration::seconds(d.seconds) + chrono::Duration::nanoseconds(i64::from(d.nanos));
    if grace > MAX_GRACE {
        return Err(too_long());
    }
    Ok(grace)
}

/// A verdict as `VerifyKey` answers it: the key's identity whenever the
/// secret was proven (so a caller can say which key was refused), nothing
/// for a malformed or unknown key.
fn verify_response(v: Verdict) -> pb::VerifyKeyResponse {
    let code = v.code();
    let mut r = pb::VerifyKeyResponse { valid: code == pb::VerifyCode::Valid, code: code as i32, ..Default::default() };
    let (key, stale) = match v {
        Verdict::Valid { key, stale } => (Some(key), stale),
        Verdict::Denied { denial, key, stale } => {
            if let Denial::InsufficientScope(missing) = denial {
                r.missing_scopes = missing;
            }
            (key, stale)
        }
    };
    r.stale = stale;
    if let Some(key) = key {
        r.key_id = key.id.clone();
        r.organization_id = key.organization_id.clone();
        r.name = key.name.clone();
        r.created_by = key.created_by.clone();
        r.scopes = key.scopes.clone();
        r.environment = pb::Environment::from(key.environment) as i32;
        r.metadata = key.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    r
}

fn scope_catalog() -> pb::ListScopesResponse {
    pb::ListScopesResponse {
        groups: scopes::CATALOG
            .iter()
            .map(|g| pb::ScopeGroup {
                name: g.name.to_owned(),
                scopes: g
                    .scopes
                    .iter()
                    .map(|(n, d)| pb::ScopeInfo { name: (*n).to_owned(), description: (*d).to_owned() })
                    .collect(),
            })
            .collect(),
        presets: scopes::PRESETS
            .iter()
            .map(|p| pb::PresetInfo { preset: pb::ScopePreset::from(*p) as i32, scopes: scopes::expand_preset(*p) })
            .collect(),
    }
}

/// Ids in error messages are ours only when well-formed; anything else is
/// cut to an id's length, so a key pasted as an id (with or without its
/// `tk_…_` prefix) shows no character of its secret.
fn printable_id(id: &str) -> String {
    if keys::is_valid_id(id) {
        id.to_owned()
    } else {
        format!("{:?}", id.chars().take(keys::ID_LEN).collect::<String>())
    }
}

/// Rows read per page while exporting the audit log.
const EXPORT_BATCH: usize = 500;

pub type AuditStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

pub type ChangeStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::KeyChange, Status>> + Send>>;

/// Why a change stream cannot go on (or start): the caller must stop
/// trusting cached verdicts and reconnect with backoff.
fn change_stream_ended(why: &Change) -> Error {
    let message = match why {
        Change::Stopping => "this replica is shutting down: reconnect (to another replica)",
        _ => {
            "this replica has not heard key changes for a while (its database is out of reach): keep verdicts \
             briefly and retry with backoff, perhaps on another replica"
        }
    };
    Error::Unavailable { message: message.into(), source: None }
}

/// The stream of one `WatchKeyChanges` call: changes of `organization`
/// (all when `None`), a resync when this subscriber fell behind, the end
/// (UNAVAILABLE) when changes stop flowing or the process stops.
fn change_stream(rx: broadcast::Receiver<Change>, organization: Option<String>) -> ChangeStream {
    let resync = pb::KeyChange { resync: true, ..Default::default() };
    let stream = futures::stream::unfold(Some(rx), move |rx| {
        let (organization, resync) = (organization.clone(), resync.clone());
        async move {
            let mut rx = rx?;
            loop {
                let item = match rx.recv().await {
                    Ok(Change::Key { id, organization_id }) => {
                        // A notice that names no organization goes to every stream.
                        if let (Some(want), Some(got)) = (&organization, &organization_id)
                            && **want != **got
                        {
                            continue;
                        }
                        Ok(pb::KeyChange {
                            key_id: id.to_string(),
                            organization_id: organization_id.map(|o| o.to_string()).unwrap_or_default(),
                            resync: false,
                        })
                    }
                    Ok(Change::Resync) => Ok(resync),
                    // Changes were dropped for this slow reader: it must forget everything.
                    Err(broadcast::error::RecvError::Lagged(_)) => Ok(resync),
                    Ok(why @ (Change::Lost | Change::Stopping)) => {
                        return Some((Err(Status::from(change_stream_ended(&why))), None));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                return Some((item, Some(rx)));
            }
        }
    });
    Box::pin(stream)
}

fn page_size(requested: i32) -> Result<usize> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Error::invalid("page_size must not be negative")),
        n if n as usize > MAX_PAGE_SIZE => Err(Error::invalid(format!("page_size must be at most {MAX_PAGE_SIZE}"))),
        n => Ok(n as usize),
    }
}

impl KeysService {
    /// Runs a handler body, maps its domain error to a status (in one
    /// place), and records the outcome on the RPC's span and in the metrics.
    async fn respond<T>(
        &self,
        rpc: Rpc,
        body: impl std::future::Future<Output = Result<T>>,
    ) -> std::result::Result<Response<T>, Status> {
        let start = std::time::Instant::now();
        let result = body.await.map(Response::new).map_err(Status::from);
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        let span = tracing::Span::current();
        span.record("code", metrics::code_name(code));
        span.record("rpc.grpc.status_code", code as i32);
        self.verifier.metrics().observe_rpc(rpc.name(), code, start.elapsed());
        result
    }
}

#[tonic::async_trait]
impl ApiKeyService for KeysService {
    async fn create_key(&self, r: Request<pb::CreateKeyRequest>) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.respond(Rpc::CreateKey, KeysService::create_key(self, r)).await
    }
    async fn get_key(&self, r: Request<pb::GetKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        self.respond(Rpc::GetKey, KeysService::get_key(self, r)).await
    }
    async fn list_keys(&self, r: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.respond(Rpc::ListKeys, KeysService::list_keys(self, r)).await
    }
    async fn set_key_status(&self, r: Request<pb::SetKeyStatusRequest>) -> Result<Response<pb::ApiKey>, Status> {
        self.respond(Rpc::SetKeyStatus, KeysService::set_key_status(self, r)).await
    }
    async fn update_key(&self, r: Request<pb::UpdateKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        self.respond(Rpc::UpdateKey, KeysService::update_key(self, r)).await
    }
    async fn roll_key(&self, r: Request<pb::RollKeyRequest>) -> Result<Response<pb::RollKeyResponse>, Status> {
        self.respond(Rpc::RollKey, KeysService::roll_key(self, r)).await
    }
    async fn report_leaked_keys(
        &self,
        r: Request<pb::ReportLeakedKeysRequest>,
    ) -> Result<Response<pb::ReportLeakedKeysResponse>, Status> {
        self.respond(Rpc::ReportLeakedKeys, KeysService::report_leaked_keys(self, r)).await
    }
    async fn revoke_key(&self, r: Request<pb::RevokeKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        self.respond(Rpc::RevokeKey, KeysService::revoke_key(self, r)).await
    }
    async fn delete_key(&self, r: Request<pb::DeleteKeyRequest>) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        self.respond(Rpc::DeleteKey, KeysService::delete_key(self, r)).await
    }
    async fn verify_key(&self, r: Request<pb::VerifyKeyRequest>) -> Result<Response<pb::VerifyKeyResponse>, Status> {
        self.respond(Rpc::VerifyKey, KeysService::verify_key(self, r)).await
    }
    async fn get_key_stats(&self, r: Request<pb::GetKeyStatsRequest>) -> Result<Response<pb::KeyStats>, Status> {
        self.respond(Rpc::GetKeyStats, KeysService::get_key_stats(self, r)).await
    }
    async fn list_scopes(&self, r: Request<pb::ListScopesRequest>) -> Result<Response<pb::ListScopesResponse>, Status> {
        self.respond(Rpc::ListScopes, KeysService::list_scopes(self, r)).await
    }
    async fn set_organization_plan(
        &self,
        r: Request<pb::SetOrganizationPlanRequest>,
    ) -> Result<Response<pb::Organization>, Status> {
        self.respond(Rpc::SetOrganizationPlan, KeysService::set_organization_plan(self, r)).await
    }
    async fn list_audit_events(
        &self,
        r: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        self.respond(Rpc::ListAuditEvents, KeysService::list_audit_events(self, r)).await
    }
    type ExportAuditEventsStream = AuditStream;
    async fn export_audit_events(
        &self,
        r: Request<pb::ExportAuditEventsRequest>,
    ) -> Result<Response<AuditStream>, Status> {
        self.respond(Rpc::ExportAuditEvents, KeysService::export_audit_events(self, r)).await
    }
    type WatchKeyChangesStream = ChangeStream;
    async fn watch_key_changes(
        &self,
        r: Request<pb::WatchKeyChangesRequest>,
    ) -> Result<Response<ChangeStream>, Status> {
        self.respond(Rpc::WatchKeyChanges, KeysService::watch_key_changes(self, r)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_size_of_zero_is_the_default_and_the_bounds_are_exact() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(1).unwrap(), 1);
        assert_eq!(page_size(MAX_PAGE_SIZE as i32).unwrap(), MAX_PAGE_SIZE);
        let message = |n| page_size(n).unwrap_err().to_string();
        assert!(message(MAX_PAGE_SIZE as i32 + 1).contains("at most 500"));
        assert!(message(-1).contains("must not be negative"));
        assert!(message(i32::MIN).contains("must not be negative"));
    }

    /// Every branch of RollKey's grace period at its edges: which error a
    /// caller gets tells it what to fix.
    #[test]
    fn a_grace_period_is_checked_at_every_edge() {
        enum Want {
            Ns(i64),
            Malformed,
            Negative,
            TooLong,
        }
        use Want::*;
        const WEEK: i64 = 7 * 86_400;
        let cases = [
            (0, 0, Ns(0)),
            (0, 1, Ns(1)),
            (1, 5, Ns(1_000_000_005)),
            (0, 999_999_999, Ns(999_999_999)),
            (WEEK - 1, 999_999_999, Ns(WEEK * 1_000_000_000 - 1)),
            (WEEK, 0, Ns(WEEK * 1_000_000_000)),
            (0, 1_000_000_000, Malformed),
            (0, -1_000_000_000, Malformed),
            (1, -1, Malformed),
            (-1, 1, Malformed),
            (0, -1, Negative),
            (0, -999_999_999, Negative),
            (-1, 0, Negative),
            (-1, -1, Negative),
            (WEEK, 1, TooLong),
            (WEEK + 1, 0, TooLong),
            (i64::MAX, 0, TooLong),
        ];
        for (seconds, nanos, want) in cases {
            let got = grace_period(Some(&prost_types::Duration { seconds, nanos }));
            let case = format!("{seconds}s {nanos}ns");
            match want {
                Ns(ns) => assert_eq!(got.unwrap().num_nanoseconds(), Some(ns), "{case}"),
                Malformed | Negative | TooLong => {
                    let message = got.expect_err(&case).to_string();
                    let needle = match want {
                        Malformed => "not a valid Duration",
                        Negative => "must not be negative",
                        _ => "at most 7 days",
                    };
                    assert!(message.contains(needle), "{case}: {message}");
                }
            }
        }
        assert_eq!(grace_period(None).unwrap(), chrono::Duration::zero(), "absent: none");
    }
}
