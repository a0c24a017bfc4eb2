//! Cross-replica propagation (PostgreSQL): a change made through replica A must
//! reach replica B's verified-key cache (LISTEN/NOTIFY, sent in the change's
//! own transaction) before B stops accepting the key.

use futures::future::BoxFuture;
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};
use takumo_keys::proto::pb::{
    DeleteKeyRequest, KeyStatus, RevokeKeyRequest, SetKeyStatusRequest, VerifyCode, VerifyKeyRequest,
    api_key_service_client::ApiKeyServiceClient,
};
use tonic::{Code, metadata::AsciiMetadataValue, transport::Channel};

use crate::calls::{Expect, authed, check_verify, create_key_req, verify_req};
use crate::measure::Ctx;
use crate::report::Verdict;
use crate::support::{
    load::{Outcome, admin_req, connect, status_text},
    report::fmt_dur,
    server::{Server, free_addr},
};
use crate::{Backend, BackendReport, warnings};

/// A second server process (replica B) on the same database, with the same
/// environment and its own ports, then [`run_propagation`] between the running
/// server (A) and B. Started only now, so that its background work stays out
/// of the measured windows before; killed on drop like the first, panics and
/// interrupts included.
pub async fn replica_phase(ctx: &Ctx<'_>, env: &[(String, String)]) -> Propagation {
    let opts = ctx.opts;
    let (addr_b, metrics_b) = (free_addr(), free_addr());
    let server_b = Server::start(&opts.server_bin, env, &ctx.dir.join("server-b.log"), addr_b, metrics_b);
    server_b.wait_ready().await;
    eprintln!("replica B: server pid {} on {addr_b}", server_b.pid());
    let channel_b = connect(addr_b, 1, None).await.remove(0);
    let mut p = run_propagation(ctx.channels[0].clone(), channel_b, &ctx.auth, opts.propagation_rounds).await;
    let log_b = server_b.stop();
    if let Some(w) = warnings(&log_b) {
        p.notes.push(format!("replica B logged warnings/errors, e.g. {w}"));
    }
    eprintln!("propagation done ({} rounds, {} failed)", p.rounds.len(), p.failed());
    p
}

/// A round whose change B has not reflected by then is a failure. Well inside
/// the cache's 30 s freshness window, so a round can only pass through the
/// change notice, never through B re-reading a stale entry on its own.
const PROPAGATION_GIVE_UP: Duration = Duration::from_secs(5);
/// Cached (warm) verifications of each fresh key on B, after its first (cold) one.
const PROPAGATION_WARM_VERIFIES: usize = 3;
pub const PROPAGATION_TARGET: &str = "a change on one replica takes effect on every replica within 1 s";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Disable,
    Revoke,
    Delete,
}

impl Change {
    const ALL: [Change; 3] = [Change::Disable, Change::Revoke, Change::Delete];

    fn rpc(self) -> &'static str {
        match self {
            Change::Disable => "SetKeyStatus(DISABLED)",
            Change::Revoke => "RevokeKey",
            Change::Delete => "DeleteKey",
        }
    }

    /// What B must answer once the change has reached it.
    pub fn expect(self) -> VerifyCode {
        match self {
            Change::Disable => VerifyCode::Disabled,
            Change::Revoke => VerifyCode::Revoked,
            Change::Delete => VerifyCode::NotFound,
        }
    }
}

pub struct PropRound {
    pub change: Change,
    pub result: Result<PropTimes, String>,
}

#[derive(Clone, Copy)]
pub struct PropTimes {
    /// From just before A's change call to B's first answer with the new code.
    pub effect: Duration,
    /// A's change call alone (it may return after B already agrees).
    pub ack: Duration,
    /// From t0 to B's last VALID answer: B dropped its cache entry after
    /// serving that one; the rest of `effect` is B resolving the key afresh.
    pub last_valid: Duration,
    /// B's VALID answers to requests sent after A had acknowledged the change.
    pub valid_after_ack: u64,
}

#[derive(Default)]
pub struct Propagation {
    pub rounds: Vec<PropRound>,
    /// Round trips of B's polls that were still answered VALID (cache hits):
    /// the resolution of the measurement.
    pub poll_us: Vec<u32>,
    pub notes: Vec<String>,
}

impl Propagation {
    pub fn failed(&self) -> usize {
        self.rounds.iter().filter(|r| r.result.is_err()).count()
    }

    pub fn times(&self, change: Option<Change>) -> (usize, Vec<PropTimes>) {
        let rounds: Vec<&PropRound> = self.rounds.iter().filter(|r| change.is_none_or(|c| r.change == c)).collect();
        let ok = rounds.iter().filter_map(|r| r.result.as_ref().ok().copied()).collect();
        (rounds.len(), ok)
    }
}

/// Nearest-rank quantile of unsorted durations.
fn quantile(mut v: Vec<Duration>, q: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

async fn run_propagation(a: Channel, b: Channel, auth: &AsciiMetadataValue, rounds: usize) -> Propagation {
    let mut out = Propagation::default();
    for i in 0..rounds {
        let change = Change::ALL[i % Change::ALL.len()];
        let result = propagation_round(&a, &b, auth, change, i, &mut out.poll_us).await;
        if let Err(e) = &result {
            eprintln!("propagation round {i} ({}): {e}", change.rpc());
            if out.notes.len() < 3 {
                out.notes.push(format!("round {i} ({}) failed: {e}", change.rpc()));
            }
        }
        out.rounds.push(PropRound { change, result });
    }
    out.poll_us.sort_unstable();
    out
}

/// One round: a fresh key, created on A, cached and warm on B; then `change`
/// on A while B is polled back-to-back until it gives the new answer.
async fn propagation_round(
    a: &Channel,
    b: &Channel,
    auth: &AsciiMetadataValue,
    change: Change,
    i: usize,
    poll_us: &mut Vec<u32>,
) -> Result<PropTimes, String> {
    let mut admin = ApiKeyServiceClient::new(a.clone());
    let mut replica = ApiKeyServiceClient::new(b.clone());
    let (id, body) = create_and_cache(&mut admin, &mut replica, auth, i).await?;

    // The change call, built up front; it starts when first polled, at t0.
    let call = change_future(admin, change, &id, auth);
    let acked = std::sync::OnceLock::<Instant>::new();
    let mut rtts = Vec::new();
    let t0 = Instant::now();
    let change_call = async {
        let r = call.await;
        let ack = t0.elapsed();
        let _ = acked.set(Instant::now());
        r.map(|()| ack).map_err(|s| format!("{} on A: {}", change.rpc(), status_text(&s)))
    };
    let poll = poll_until_changed(&mut replica, auth, &body, change, t0, &acked, &mut rtts);
    let both = async { tokio::try_join!(change_call, poll) };
    let result = match tokio::time::timeout(PROPAGATION_GIVE_UP, both).await {
        Ok(Ok((ack, (effect, last_valid, valid_after_ack)))) => {
            eprintln!(
                "propagation round {i} ({}): {} (A replied after {}, B's last VALID at {}, {valid_after_ack} \
                 VALID after A's reply)",
                change.rpc(),
                fmt_dur(effect),
                fmt_dur(ack),
                fmt_dur(last_valid)
            );
            Ok(PropTimes { effect, ack, last_valid, valid_after_ack })
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(match acked.get() {
            Some(a) => format!(
                "B still answered VALID 5 s after the change ({} on A returned after {})",
                change.rpc(),
                fmt_dur(a.duration_since(t0))
            ),
            None => format!("{} on A did not return in 5 s", change.rpc()),
        }),
    };
    poll_us.extend(rtts);
    result
}

/// A fresh key created through A, then verified on B: once cold (store read,
/// argon2, which caches it), then warm. Its id and the VerifyKey request.
async fn create_and_cache(
    admin: &mut ApiKeyServiceClient<Channel>,
    replica: &mut ApiKeyServiceClient<Channel>,
    auth: &AsciiMetadataValue,
    i: usize,
) -> Result<(String, VerifyKeyRequest), String> {
    let created = admin
        .create_key(admin_req(create_key_req(&format!("propagation-{i}")), auth))
        .await
        .map_err(|s| format!("CreateKey on A: {}", status_text(&s)))?
        .into_inner();
    let id = created.key.map(|k| k.id).ok_or("CreateKey on A returned no key")?;
    let body = verify_req(&created.secret);

    // B: the first verification is cold (store read, argon2) and caches the key.
    let give_up = Instant::now() + PROPAGATION_GIVE_UP;
    loop {
        match check_verify(replica.verify_key(authed(body.clone(), auth)).await, Expect::Valid) {
            Outcome::Ok => break,
            Outcome::Shed => {}
            Outcome::Error(e) if Instant::now() >= give_up => {
                return Err(format!("B did not verify the fresh key as VALID in 5 s: {e}"));
            }
            Outcome::Error(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for _ in 0..PROPAGATION_WARM_VERIFIES {
        if let Outcome::Error(e) = check_verify(replica.verify_key(authed(body.clone(), auth)).await, Expect::Valid) {
            return Err(format!("warm verify on B before the change: {e}"));
        }
    }
    Ok((id, body))
}

/// `change` of key `id` through A, as a future that starts when first polled.
fn change_future(
    mut admin: ApiKeyServiceClient<Channel>,
    change: Change,
    id: &str,
    auth: &AsciiMetadataValue,
) -> BoxFuture<'static, Result<(), tonic::Status>> {
    let id = id.to_owned();
    match change {
        Change::Disable => {
            let req = admin_req(SetKeyStatusRequest { id, status: KeyStatus::Disabled as i32 }, auth);
            Box::pin(async move { admin.set_key_status(req).await.map(drop) })
        }
        Change::Revoke => {
            let req = admin_req(RevokeKeyRequest { id }, auth);
            Box::pin(async move { admin.revoke_key(req).await.map(drop) })
        }
        Change::Delete => {
            let req = admin_req(DeleteKeyRequest { id }, auth);
            Box::pin(async move { admin.delete_key(req).await.map(drop) })
        }
    }
}

/// Polls B back-to-back, one request in flight, no sleep (the resolution is
/// one cached verify round trip), until it answers `change`'s code: when (from
/// `t0`), B's last VALID answer, and its VALID answers to requests sent after
/// A had acknowledged the change. The round trips of VALID answers go to `rtts`.
async fn poll_until_changed(
    replica: &mut ApiKeyServiceClient<Channel>,
    auth: &AsciiMetadataValue,
    body: &VerifyKeyRequest,
    change: Change,
    t0: Instant,
    acked: &std::sync::OnceLock<Instant>,
    rtts: &mut Vec<u32>,
) -> Result<(Duration, Duration, u64), String> {
    let (mut valid_after_ack, mut last_valid) = (0u64, Duration::ZERO);
    loop {
        let sent = Instant::now();
        let r = match replica.verify_key(authed(body.clone(), auth)).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::ResourceExhausted => continue,
            Err(s) => return Err(format!("VerifyKey on B: {}", status_text(&s))),
        };
        if !r.valid && r.code == change.expect() as i32 {
            return Ok((t0.elapsed(), last_valid, valid_after_ack));
        }
        if !(r.valid && r.code == VerifyCode::Valid as i32) {
            return Err(format!(
                "B answered valid={} {} (expected VALID, then {})",
                r.valid,
                VerifyCode::try_from(r.code).map_or("?", |c| c.as_str_name()),
                change.expect().as_str_name()
            ));
        }
        last_valid = t0.elapsed();
        rtts.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if acked.get().is_some_and(|a| sent >= *a) {
            valid_after_ack += 1;
        }
    }
}

impl BackendReport {
    /// Judged by the slowest round: every change must reach the other replica within 1 s.
    pub fn propagation_verdict(&self) -> Verdict {
        let Some(p) = &self.propagation else {
            return match self.backend {
                Backend::Sqlite => Verdict::na("one process; measured on PostgreSQL"),
                Backend::Postgres => Verdict::na("`--propagation-rounds 0`"),
            };
        };
        let (n, ok) = p.times(None);
        let failed = n - ok.len();
        let max = ok.iter().map(|t| t.effect).max();
        let p50 = quantile(ok.iter().map(|t| t.effect).collect(), 0.5);
        let detail = format!(
            "max {}, p50 {} over {n} rounds, {failed} failed; 2 replicas",
            max.map_or("–".into(), fmt_dur),
            p50.map_or("–".into(), fmt_dur)
        );
        let met = n > 0 && failed == 0 && max.is_some_and(|m| m <= Duration::from_secs(1));
        let shortfall = (!met).then(|| match max {
            Some(m) if m > Duration::from_secs(1) => {
                format!("slowest {} over 1 s", fmt_dur(m - Duration::from_secs(1)))
            }
            _ => format!("{failed} rounds failed"),
        });
        Verdict { met: Some(met), detail, shortfall }
    }

    /// The propagation table, under a heading of the given level (`###`, `####`).
    pub fn propagation_section(&self, heading: &str) -> Option<String> {
        let p = self.propagation.as_ref()?;
        let mut t = format!("{heading} Cross-replica propagation ({}, 2 replicas)\n\n", self.backend.title());
        t.push_str(
            "| change on replica A | replica B must answer | rounds | failed | propagation p50 | p99 | max \
             | A's change call p50 | B's last VALID answer p50 / max | B's VALID answers after A's reply |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let kinds = Change::ALL.iter().map(|c| (Some(*c), format!("`{}`", c.rpc()), c.expect().as_str_name()));
        for (change, label, answer) in kinds.chain([(None, "**all**".to_owned(), "")]) {
            let (n, ok) = p.times(change);
            if n == 0 {
                continue;
            }
            let failed = n - ok.len();
            let effect: Vec<Duration> = ok.iter().map(|t| t.effect).collect();
            let p99 = if effect.len() >= 100 {
                quantile(effect.clone(), 0.99).map_or("–".into(), fmt_dur)
            } else {
                format!("– (n = {})", effect.len())
            };
            let _ = writeln!(
                t,
                "| {label} | {answer} | {n} | {} | {} | {p99} | {} | {} | {} / {} | {} |",
                if failed > 0 { format!("**{failed}**") } else { "0".into() },
                quantile(effect.clone(), 0.5).map_or("–".into(), fmt_dur),
                effect.iter().max().copied().map_or("–".into(), fmt_dur),
                quantile(ok.iter().map(|t| t.ack).collect(), 0.5).map_or("–".into(), fmt_dur),
                quantile(ok.iter().map(|t| t.last_valid).collect(), 0.5).map_or("–".into(), fmt_dur),
                ok.iter().map(|t| t.last_valid).max().map_or("–".into(), fmt_dur),
                ok.iter().map(|t| t.valid_after_ack).sum::<u64>(),
            );
        }
        let poll = |q: f64| {
            let v = &p.poll_us;
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
            v.get(rank - 1).map_or("–".into(), |us| fmt_dur(Duration::from_micros(*us as u64)))
        };
        let _ = write!(
            t,
            "\nReplica B is a second server process on the same database with the same environment (pepper, \
             service tokens, database URL{}), on its own port, started after the phases above. Each round creates \
             a fresh key through A (`CreateKey`, with `x-takumo-actor`), verifies it on B once (cold: store read \
             and argon2, which caches it) and {PROPAGATION_WARM_VERIFIES} more times (cached), then makes the \
             change through A while polling `VerifyKey` on B back-to-back (one request in flight, no sleep) until \
             B gives the new answer; changes rotate disable, revoke, delete. The time runs from just before A's \
             change call to B's first new answer, so it includes A's whole change call (row lock, update, audit \
             row, `pg_notify`, commit), PostgreSQL delivering the notice to B's listener, B dropping its cache \
             entry, and B's next verification resolving from the store: for a disabled or revoked key that is a \
             store read plus an argon2 verification (the cached proof went with the entry), for a deleted key a \
             store read that finds nothing. Resolution: one poll of B, a cached verify round trip (p50 {}, max \
             {} over {} polls still answered VALID). A round that B has not reflected within {} s (well inside \
             the cache's 30 s freshness window, so only the change notice can pass it) is a failure. p99 is shown \
             from 100 rounds; below that it would be the max. B's last VALID answer (from the same t0) bounds when \
             the notice reached B: B dropped its entry after serving it, so the rest of the propagation time is B \
             resolving the key afresh. The last column counts VALID answers B gave to requests sent after A had \
             replied to the change call: the window in which a client told \"disabled\" could still get the key \
             accepted elsewhere.\n",
            if self.rows.iter().any(|r| r.db.is_some()) { ", through the counting proxy" } else { "" },
            poll(0.5),
            poll(1.0),
            p.poll_us.len(),
            PROPAGATION_GIVE_UP.as_secs()
        );
        for n in &p.notes {
            let _ = writeln!(t, "\n- {n}");
        }
        Some(t)
    }
}
