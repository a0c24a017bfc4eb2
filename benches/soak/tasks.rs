//! The tasks of the mix, run together for a phase: closed-loop VerifyKey
//! workers, and paced tasks (creates, key lifecycles, status toggles, ListKeys
//! walks, wrong secrets), every answer checked.

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};
use takumo_keys::proto::pb::{
    DeleteKeyRequest, GetKeyRequest, GetKeyStatsRequest, KeyStatus, ListKeysRequest, ListKeysResponse, Plan,
    RevokeKeyRequest, SetKeyStatusRequest, VerifyCode, VerifyKeyRequest,
};
use tonic::Code;

use crate::checks::{Conn, Ctx, Expect, TestKey, body, expect_code};
use crate::stats::{Kind, Stats};
use crate::support::{keygen::random_key, load::status_text};
use crate::{HELD_SCOPES, MISSING_SCOPE, REPLICAS};

/// Runs every task of the mix for `dur`; the paced tasks finish the cycle they are in.
pub async fn run_phase(ctx: &Arc<Ctx>, dur: Duration) -> Stats {
    let mut all = Stats::new(ctx.orgs.len());
    if dur.is_zero() {
        return all;
    }
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for i in 0..ctx.opts.concurrency {
        tasks.push(tokio::spawn(verify_worker(ctx.clone(), i, deadline)));
    }
    for w in 0..ctx.opts.toggle_workers.min(ctx.toggle.len()) {
        tasks.push(tokio::spawn(toggle_task(ctx.clone(), w, deadline)));
    }
    tasks.push(tokio::spawn(create_task(ctx.clone(), deadline)));
    tasks.push(tokio::spawn(lifecycle_task(ctx.clone(), deadline)));
    tasks.push(tokio::spawn(list_task(ctx.clone(), deadline)));
    tasks.push(tokio::spawn(wrong_secret_task(ctx.clone(), deadline)));
    for t in tasks {
        all.merge(t.await.expect("soak task panicked"));
    }
    all
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Valid,
    Created,
    Toggled,
    Scope,
    WrongOrg,
    Malformed,
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Mix {
    pub table: Vec<(Pick, u32)>,
    pub total: u32,
}

impl Mix {
    pub fn parse(s: &str) -> Result<Mix, String> {
        let mut table = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, w) = part.split_once('=').ok_or_else(|| format!("`{part}` is not name=weight"))?;
            let pick = match name.trim() {
                "valid" => Pick::Valid,
                "created" => Pick::Created,
                "toggled" => Pick::Toggled,
                "scope" => Pick::Scope,
                "org" => Pick::WrongOrg,
                "malformed" => Pick::Malformed,
                "unknown" => Pick::Unknown,
                other => return Err(format!("unknown kind `{other}`")),
            };
            let w: u32 = w.trim().parse().map_err(|_| format!("`{part}`: weight is not a whole number"))?;
            table.push((pick, w));
        }
        let total = table.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err("all weights are zero".into());
        }
        Ok(Mix { table, total })
    }

    fn pick(&self, mut n: u32) -> Pick {
        for &(p, w) in &self.table {
            if n < w {
                return p;
            }
            n -= w;
        }
        self.table[0].0
    }

    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .table
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|(p, w)| format!("{p:?} {:.1}%", *w as f64 * 100.0 / self.total as f64).to_lowercase())
            .collect();
        parts.join(", ")
    }
}

/// A closed-loop VerifyKey worker on replica `i % 2`.
async fn verify_worker(ctx: Arc<Ctx>, i: usize, deadline: Instant) -> Stats {
    let mut c = ctx.conn(i % REPLICAS, i / REPLICAS);
    let mut rng = StdRng::from_os_rng();
    let mut st = Stats::new(ctx.orgs.len());
    let valid = Expect::code(VerifyCode::Valid);
    while Instant::now() < deadline {
        let mut pick = ctx.mix.pick(rng.random_range(0..ctx.mix.total));
        let created = if pick == Pick::Created {
            let pool = ctx.pool.read().expect("pool lock");
            (!pool.is_empty()).then(|| pool[rng.random_range(0..pool.len())].clone())
        } else {
            None
        };
        if (pick == Pick::Created && created.is_none()) || (pick == Pick::Toggled && ctx.toggle.is_empty()) {
            pick = Pick::Valid;
        }
        let stable = &ctx.stable[rng.random_range(0..ctx.stable.len())];
        match pick {
            Pick::Valid | Pick::Created => {
                let (k, kind) = match &created {
                    Some(k) => (k, Kind::VerifyCreated),
                    None => (stable, Kind::VerifyValid),
                };
                // Any subset of the held scopes, with or without the (right) organization.
                let n = rng.random_range(0..=HELD_SCOPES.len());
                let b = VerifyKeyRequest {
                    key: k.secret.clone(),
                    required_scopes: HELD_SCOPES[..n].iter().map(|s| (*s).to_owned()).collect(),
                    organization_id: rng.random_bool(0.3).then(|| ctx.orgs[k.org].clone()),
                };
                ctx.verify(&mut st, kind, &mut c, b, Expect { key: Some(k), ..valid }).await;
            }
            Pick::Toggled => {
                let k = &ctx.toggle[rng.random_range(0..ctx.toggle.len())];
                let exp = Expect { codes: &[VerifyCode::Valid, VerifyCode::Disabled], key: Some(k) };
                ctx.verify(&mut st, Kind::VerifyToggled, &mut c, body(&k.secret), exp).await;
            }
            Pick::Scope => {
                let b = VerifyKeyRequest {
                    key: stable.secret.clone(),
                    required_scopes: vec![HELD_SCOPES[0].to_owned(), MISSING_SCOPE.to_owned()],
                    organization_id: None,
                };
                ctx.verify(
                    &mut st,
                    Kind::VerifyScope,
                    &mut c,
                    b,
                    Expect::strict(VerifyCode::InsufficientScope, stable),
                )
                .await;
            }
            Pick::WrongOrg => {
                let other = if ctx.orgs.len() > 1 {
                    ctx.orgs[(stable.org + 1) % ctx.orgs.len()].clone()
                } else {
                    "soak-org-nobody".to_owned()
                };
                let b = VerifyKeyRequest { organization_id: Some(other), ..body(&stable.secret) };
                let exp = Expect::strict(VerifyCode::WrongOrganization, stable);
                ctx.verify(&mut st, Kind::VerifyWrongOrg, &mut c, b, exp).await;
            }
            Pick::Malformed => {
                let k = &ctx.malformed[rng.random_range(0..ctx.malformed.len())];
                ctx.verify(&mut st, Kind::VerifyMalformed, &mut c, body(k), Expect::code(VerifyCode::Malformed)).await;
            }
            Pick::Unknown => {
                let k = random_key(&mut rng, None);
                ctx.verify(&mut st, Kind::VerifyUnknown, &mut c, body(&k), Expect::code(VerifyCode::NotFound)).await;
            }
        }
    }
    st
}

/// Ticks at a fixed rate; after a slow step it runs the next at once, without catching up.
struct Pacer {
    pub period: Option<Duration>,
    pub next: Instant,
}

impl Pacer {
    pub fn new(rate: f64) -> Self {
        Pacer { period: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)), next: Instant::now() }
    }

    async fn tick(&mut self, deadline: Instant) -> bool {
        let Some(p) = self.period else { return false };
        tokio::time::sleep_until(self.next.min(deadline).into()).await;
        if Instant::now() >= deadline {
            return false;
        }
        self.next = (self.next + p).max(Instant::now());
        true
    }
}

fn conns(ctx: &Ctx, i: usize) -> [Conn; REPLICAS] {
    [ctx.conn(0, i), ctx.conn(1, i)]
}

/// The connection to replica `a` and the one to the other replica.
fn pair(cs: &mut [Conn; REPLICAS], a: usize) -> (&mut Conn, &mut Conn) {
    let [c0, c1] = cs;
    if a == 0 { (c0, c1) } else { (c1, c0) }
}

/// Creates keys at `--create-rate`; each is verified on the other replica, then joins the pool.
async fn create_task(ctx: Arc<Ctx>, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, 0);
    let mut pacer = Pacer::new(ctx.opts.create_rate);
    let mut i = 0;
    while pacer.tick(deadline).await {
        let (a, b) = (i % REPLICAS, (i + 1) % REPLICAS);
        if let Some(k) = ctx.create(&mut st, &mut cs[a], i % ctx.orgs.len(), "created").await
            && ctx
                .verify(&mut st, Kind::VerifyFresh, &mut cs[b], body(&k.secret), Expect::strict(VerifyCode::Valid, &k))
                .await
                .is_some()
        {
            ctx.pool.write().expect("pool lock").push(k);
        }
        i += 1;
    }
    st
}

/// Create, verify on both replicas, then either revoke → (re-enable refused) →
/// delete, or delete at once; after each change the key is checked on the
/// replica that made it (at once) and on the other (within the bound).
async fn lifecycle_task(ctx: Arc<Ctx>, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, 1);
    let mut pacer = Pacer::new(ctx.opts.lifecycle_rate);
    let mut i = 0;
    while pacer.tick(deadline).await {
        let (x, y) = (i % REPLICAS, (i + 1) % REPLICAS);
        let revoke_first = (i / REPLICAS).is_multiple_of(2);
        i += 1;
        let Some(k) = ctx.create(&mut st, &mut cs[x], i % ctx.orgs.len(), "lifecycle").await else { continue };
        for r in [y, x] {
            ctx.verify(&mut st, Kind::VerifyFresh, &mut cs[r], body(&k.secret), Expect::strict(VerifyCode::Valid, &k))
                .await;
        }
        let mut stale = VerifyCode::Valid;
        let mut deleter = x;
        if revoke_first {
            let t0 = Instant::now();
            let r = cs[x].c.revoke_key(ctx.req(RevokeKeyRequest { id: k.id.clone() })).await;
            let r = match r {
                Ok(r) if r.get_ref().id == k.id && r.get_ref().status == KeyStatus::Revoked as i32 => Ok(()),
                Ok(r) => Err(format!("RevokeKey answered status {}", r.get_ref().status)),
                Err(s) => Err(status_text(&s)),
            };
            if st.record(Kind::Revoke, x, t0, r).is_none() {
                continue;
            }
            let (cx, cy) = pair(&mut cs, x);
            ctx.check_change(&mut st, cx, cy, &k, VerifyCode::Revoked, VerifyCode::Valid).await;
            // Revocation is terminal.
            let t0 = Instant::now();
            let req = ctx.req(SetKeyStatusRequest { id: k.id.clone(), status: KeyStatus::Active as i32 });
            let r = expect_code(cs[y].c.set_key_status(req).await, Code::FailedPrecondition);
            st.record(Kind::SetStatus, y, t0, r);
            stale = VerifyCode::Revoked;
            deleter = y;
        }
        let other = (deleter + 1) % REPLICAS;
        let t0 = Instant::now();
        let r = cs[deleter].c.delete_key(ctx.req(DeleteKeyRequest { id: k.id.clone() })).await;
        if st.record(Kind::Delete, deleter, t0, r.map_err(|s| status_text(&s))).is_none() {
            continue;
        }
        let (cd, co) = pair(&mut cs, deleter);
        ctx.check_change(&mut st, cd, co, &k, VerifyCode::NotFound, stale).await;
        // Gone for the management API too.
        let t0 = Instant::now();
        let r = if revoke_first {
            expect_code(cs[other].c.get_key(ctx.req(GetKeyRequest { id: k.id.clone() })).await, Code::NotFound)
        } else {
            expect_code(cs[other].c.delete_key(ctx.req(DeleteKeyRequest { id: k.id.clone() })).await, Code::NotFound)
        };
        st.record(if revoke_first { Kind::GetKey } else { Kind::Delete }, other, t0, r);
    }
    st
}

/// Disables and re-enables its own toggle keys, alternating replicas.
async fn toggle_task(ctx: Arc<Ctx>, w: usize, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, w);
    let mine: Vec<&TestKey> = ctx.toggle.iter().skip(w).step_by(ctx.opts.toggle_workers.max(1)).collect();
    let pause = Duration::from_millis(ctx.opts.toggle_pause_ms);
    let mut cycle = 0;
    while Instant::now() < deadline && !mine.is_empty() {
        let k = mine[cycle % mine.len()];
        let (a, b) = ((cycle + w) % REPLICAS, (cycle + w + 1) % REPLICAS);
        cycle += 1;
        if ctx.set_status(&mut st, &mut cs[a], k, KeyStatus::Disabled).await {
            let (ca, cb) = pair(&mut cs, a);
            ctx.check_change(&mut st, ca, cb, k, VerifyCode::Disabled, VerifyCode::Valid).await;
        }
        tokio::time::sleep(pause).await;
        // Always re-enabled, so that every phase ends with the toggle keys active.
        if ctx.set_status(&mut st, &mut cs[b], k, KeyStatus::Active).await {
            let (cb, ca) = pair(&mut cs, b);
            ctx.check_change(&mut st, cb, ca, k, VerifyCode::Valid, VerifyCode::Disabled).await;
        }
        tokio::time::sleep(pause).await;
    }
    st
}

/// Walks every ListKeys page of one organization (every third walk filtered to
/// ACTIVE), checks order, uniqueness and that no long-lived key is missing,
/// then reads GetKeyStats on the other replica.
async fn list_task(ctx: Arc<Ctx>, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, 0);
    let mut pacer = Pacer::new(ctx.opts.list_rate);
    let page_size = ctx.opts.list_page_size;
    let mut i = 0;
    while pacer.tick(deadline).await {
        let (org, r, other) = (i % ctx.orgs.len(), i % REPLICAS, (i + 1) % REPLICAS);
        let active_only = i % 3 == 2;
        i += 1;
        // Keys that exist throughout the walk; toggle keys may be DISABLED at any moment.
        let mut must: HashSet<String> = ctx.stable.iter().filter(|k| k.org == org).map(|k| k.id.clone()).collect();
        if !active_only {
            must.extend(ctx.toggle.iter().filter(|k| k.org == org).map(|k| k.id.clone()));
        }
        let long_lived_active = {
            let pool = ctx.pool.read().expect("pool lock");
            must.extend(pool.iter().filter(|k| k.org == org).map(|k| k.id.clone()));
            ctx.stable.iter().filter(|k| k.org == org).count() + pool.iter().filter(|k| k.org == org).count()
        };
        let mut seen = HashSet::new();
        let mut last: Option<(i64, i32)> = None;
        let mut token = String::new();
        let complete = loop {
            let t0 = Instant::now();
            let req = ListKeysRequest {
                organization_id: ctx.orgs[org].clone(),
                page_size,
                page_token: std::mem::take(&mut token),
                status: active_only.then_some(KeyStatus::Active as i32),
                created_by: None,
            };
            let res = cs[r].c.list_keys(ctx.req(req)).await.map_err(|s| status_text(&s)).and_then(|resp| {
                check_page(resp.into_inner(), &ctx.orgs[org], active_only, page_size, &mut seen, &mut last)
            });
            match st.record(Kind::ListPage, r, t0, res) {
                None => break false,
                Some(t) if t.is_empty() => break true,
                Some(t) => token = t,
            }
            if seen.len() > 1_000_000 {
                st.fail(Kind::ListPage, r, "pagination does not end".into());
                break false;
            }
        };
        if complete {
            st.walks += 1;
            let missing: Vec<&String> = must.iter().filter(|id| !seen.contains(*id)).collect();
            if !missing.is_empty() {
                st.fail(
                    Kind::ListPage,
                    r,
                    format!("walk of {} misses {} long-lived keys, e.g. {}", ctx.orgs[org], missing.len(), missing[0]),
                );
            }
        }
        let t0 = Instant::now();
        let res =
            cs[other].c.get_key_stats(ctx.req(GetKeyStatsRequest { organization_id: ctx.orgs[org].clone() })).await;
        let res = res.map_err(|s| status_text(&s)).and_then(|s| {
            let s = s.into_inner();
            if s.plan != Plan::Enterprise as i32 || s.key_limit != 0 {
                Err(format!("plan {} limit {} (expected Enterprise, unlimited)", s.plan, s.key_limit))
            } else if complete && !active_only && (s.total_keys as usize) < seen.len() {
                Err(format!("total_keys {} below the {} keys just listed", s.total_keys, seen.len()))
            } else if (s.active_keys as usize) < long_lived_active {
                Err(format!("active_keys {} below the {long_lived_active} keys that are always active", s.active_keys))
            } else {
                Ok(())
            }
        });
        st.record(Kind::GetStats, other, t0, res);
    }
    st
}

/// One ListKeys page of organization `org` (of `page_size`, ACTIVE keys only if
/// `active_only`): full unless it is the last, the right organization and
/// status, no key seen before in the walk, newest first. Its next page token.
fn check_page(
    resp: ListKeysResponse,
    org: &str,
    active_only: bool,
    page_size: i32,
    seen: &mut HashSet<String>,
    last: &mut Option<(i64, i32)>,
) -> Result<String, String> {
    if resp.keys.len() > page_size as usize
        || (!resp.next_page_token.is_empty() && resp.keys.len() != page_size as usize)
    {
        return Err(format!(
            "page of {} keys (page_size {page_size}) with next token {:?}",
            resp.keys.len(),
            !resp.next_page_token.is_empty()
        ));
    }
    for k in &resp.keys {
        let at = k.created_at.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
        if k.organization_id != org {
            return Err(format!("key {} of {} listed for {}", k.id, k.organization_id, org));
        }
        if active_only && k.status != KeyStatus::Active as i32 {
            return Err(format!("key {} with status {} in an ACTIVE listing", k.id, k.status));
        }
        if !seen.insert(k.id.clone()) {
            return Err(format!("key {} listed twice", k.id));
        }
        // Newest first (ties on created_at are ordered by id in the database's collation).
        if last.is_some_and(|l| at > l) {
            return Err(format!("key {} is newer than the one listed before it", k.id));
        }
        *last = Some(at);
    }
    Ok(resp.next_page_token)
}

/// Wrong secrets for real key ids (argon2 on the server); every other one repeats the last (negative cache).
async fn wrong_secret_task(ctx: Arc<Ctx>, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, 1);
    let mut rng = StdRng::from_os_rng();
    let mut pacer = Pacer::new(ctx.opts.wrong_secret_rate);
    let mut last: [Option<String>; REPLICAS] = Default::default();
    let mut i = 0;
    while pacer.tick(deadline).await {
        let r = (i / 2) % REPLICAS;
        let key = match (&last[r], i % 2) {
            (Some(k), 1) => k.clone(),
            _ => {
                let id = &ctx.stable[rng.random_range(0..ctx.stable.len())].id;
                random_key(&mut rng, Some(id))
            }
        };
        i += 1;
        ctx.verify(&mut st, Kind::VerifyWrongSecret, &mut cs[r], body(&key), Expect::code(VerifyCode::NotFound)).await;
        last[r] = Some(key);
    }
    st
}
