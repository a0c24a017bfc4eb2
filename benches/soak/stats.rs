//! Bookkeeping: per-kind counts and latency histograms, merged at the end.

use std::time::{Duration, Instant};
use takumo_keys::proto::pb::{VerifyCode, VerifyKeyResponse};

use crate::checks::counts_as_call;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    VerifyValid,
    VerifyCreated,
    VerifyToggled,
    VerifyScope,
    VerifyWrongOrg,
    VerifyMalformed,
    VerifyUnknown,
    VerifyWrongSecret,
    VerifyFresh,
    VerifyCheck,
    Create,
    ListPage,
    GetKey,
    GetStats,
    SetStatus,
    Revoke,
    Delete,
    SetPlan,
}

impl Kind {
    pub const ALL: [Kind; 18] = [
        Kind::VerifyValid,
        Kind::VerifyCreated,
        Kind::VerifyToggled,
        Kind::VerifyScope,
        Kind::VerifyWrongOrg,
        Kind::VerifyMalformed,
        Kind::VerifyUnknown,
        Kind::VerifyWrongSecret,
        Kind::VerifyFresh,
        Kind::VerifyCheck,
        Kind::Create,
        Kind::ListPage,
        Kind::GetKey,
        Kind::GetStats,
        Kind::SetStatus,
        Kind::Revoke,
        Kind::Delete,
        Kind::SetPlan,
    ];

    pub fn is_verify(self) -> bool {
        (self as usize) <= Kind::VerifyCheck as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::VerifyValid => "VerifyKey valid, stable keys (warm) → VALID",
            Kind::VerifyCreated => "VerifyKey valid, keys created during the run → VALID",
            Kind::VerifyToggled => "VerifyKey toggled keys → VALID or DISABLED",
            Kind::VerifyScope => "VerifyKey insufficient scope → INSUFFICIENT_SCOPE",
            Kind::VerifyWrongOrg => "VerifyKey other organization → WRONG_ORGANIZATION",
            Kind::VerifyMalformed => "VerifyKey malformed → MALFORMED",
            Kind::VerifyUnknown => "VerifyKey well-formed, unknown id → NOT_FOUND",
            Kind::VerifyWrongSecret => "VerifyKey wrong secret for a real id → NOT_FOUND",
            Kind::VerifyFresh => "VerifyKey first sight of a new key (argon2) → VALID",
            Kind::VerifyCheck => "VerifyKey after a change: same replica at once, other replica until it converges",
            Kind::Create => "CreateKey (`x-takumo-actor`)",
            Kind::ListPage => "ListKeys, one page (full walks)",
            Kind::GetKey => "GetKey of a deleted key → NOT_FOUND",
            Kind::GetStats => "GetKeyStats",
            Kind::SetStatus => "SetKeyStatus (toggles; re-enabling a revoked key → FAILED_PRECONDITION)",
            Kind::Revoke => "RevokeKey",
            Kind::Delete => "DeleteKey (and deleting again → NOT_FOUND)",
            Kind::SetPlan => "SetOrganizationPlan → ENTERPRISE",
        }
    }
}

/// Log-linear latency histogram in µs: exact below 64 µs, then 32 buckets per
/// power of two (about 3% wide). Percentiles report a bucket's upper edge.
#[derive(Debug, Clone, Default)]
pub struct Hist {
    pub counts: Vec<u64>,
    pub n: u64,
    pub sum_us: u64,
    pub max_us: u64,
}

const HIST_LEN: usize = 64 + 26 * 32;

fn hist_index(us: u32) -> usize {
    if us < 64 {
        return us as usize;
    }
    let b = 31 - us.leading_zeros();
    let sub = (us >> (b - 5)) & 31;
    64 + ((b - 6) * 32 + sub) as usize
}

fn hist_upper(idx: usize) -> u64 {
    if idx < 64 {
        return idx as u64;
    }
    let (b, sub) = ((idx - 64) / 32 + 6, ((idx - 64) % 32) as u64);
    ((33 + sub) << (b - 5)) - 1
}

impl Hist {
    fn add(&mut self, d: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_LEN];
        }
        let us = d.as_micros().min(u32::MAX as u128) as u32;
        self.counts[hist_index(us)] += 1;
        self.n += 1;
        self.sum_us += us as u64;
        self.max_us = self.max_us.max(us as u64);
    }

    pub fn merge(&mut self, o: &Hist) {
        if o.n == 0 {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_LEN];
        }
        self.counts.iter_mut().zip(&o.counts).for_each(|(a, b)| *a += b);
        self.n += o.n;
        self.sum_us += o.sum_us;
        self.max_us = self.max_us.max(o.max_us);
    }

    pub fn mean(&self) -> Option<Duration> {
        (self.n > 0).then(|| Duration::from_micros(self.sum_us / self.n))
    }

    pub fn percentile(&self, q: f64) -> Option<Duration> {
        if self.n == 0 {
            return None;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(hist_upper(i).min(self.max_us)));
            }
        }
        Some(Duration::from_micros(self.max_us))
    }
}

#[derive(Debug, Clone, Default)]
pub struct KindStats {
    pub ok: u64,
    pub errors: u64,
    pub hist: Hist,
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub kinds: Vec<KindStats>,
    pub first_errors: Vec<String>,
    /// Every VerifyKey answer by code, expected or not.
    pub codes: [u64; 9],
    /// Accepted (VALID) answers, by organization index; the last slot is "another organization".
    pub resolved: Vec<u64>,
    /// Convergence: answers still showing the state before a change (within the bound), changes seen, slowest.
    pub stale: u64,
    pub converged: u64,
    /// Changes already visible to the first request after the change call returned.
    pub converged_at_once: u64,
    /// Changes still not visible on the other replica after the bound (each is also an error).
    pub late: u64,
    pub max_lag: Duration,
    pub walks: u64,
}

impl Stats {
    pub fn new(orgs: usize) -> Self {
        Stats {
            kinds: vec![KindStats::default(); Kind::ALL.len()],
            first_errors: Vec::new(),
            codes: [0; 9],
            resolved: vec![0; orgs + 1],
            stale: 0,
            converged: 0,
            converged_at_once: 0,
            late: 0,
            max_lag: Duration::ZERO,
            walks: 0,
        }
    }

    /// Counts a call's outcome (latency of every answered call, right or wrong); `Some` when right.
    pub fn record<T>(&mut self, kind: Kind, replica: usize, t0: Instant, r: Result<T, String>) -> Option<T> {
        let k = &mut self.kinds[kind as usize];
        k.hist.add(t0.elapsed());
        match r {
            Ok(v) => {
                k.ok += 1;
                Some(v)
            }
            Err(e) => {
                k.errors += 1;
                self.note_error(kind, replica, e);
                None
            }
        }
    }

    /// An error found after the calls themselves were fine (e.g. a listing that misses a key).
    pub fn fail(&mut self, kind: Kind, replica: usize, e: String) {
        self.kinds[kind as usize].errors += 1;
        self.note_error(kind, replica, e);
    }

    fn note_error(&mut self, kind: Kind, replica: usize, e: String) {
        if self.first_errors.len() < 8 {
            let e = format!("{} on replica {replica}: {e}", kind.label());
            eprintln!("error: {e}");
            self.first_errors.push(e);
        }
    }

    pub fn note_verify(&mut self, r: &VerifyKeyResponse, orgs: &[String]) {
        if let Some(slot) = self.codes.get_mut(r.code.clamp(0, 8) as usize) {
            *slot += 1;
        }
        if VerifyCode::try_from(r.code).is_ok_and(counts_as_call) {
            let i = orgs.iter().position(|o| *o == r.organization_id).unwrap_or(orgs.len());
            self.resolved[i] += 1;
        }
    }

    pub fn merge(&mut self, o: Stats) {
        for (a, b) in self.kinds.iter_mut().zip(&o.kinds) {
            a.ok += b.ok;
            a.errors += b.errors;
            a.hist.merge(&b.hist);
        }
        for e in o.first_errors {
            if self.first_errors.len() < 8 {
                self.first_errors.push(e);
            }
        }
        self.codes.iter_mut().zip(&o.codes).for_each(|(a, b)| *a += b);
        self.resolved.iter_mut().zip(&o.resolved).for_each(|(a, b)| *a += b);
        self.stale += o.stale;
        self.converged += o.converged;
        self.converged_at_once += o.converged_at_once;
        self.late += o.late;
        self.max_lag = self.max_lag.max(o.max_lag);
        self.walks += o.walks;
    }

    pub fn kind(&self, k: Kind) -> &KindStats {
        &self.kinds[k as usize]
    }

    pub fn requests(&self) -> u64 {
        self.kinds.iter().map(|k| k.ok + k.errors).sum()
    }

    pub fn errors(&self) -> u64 {
        self.kinds.iter().map(|k| k.errors).sum()
    }

    pub fn resolved_other(&self) -> u64 {
        self.resolved.last().copied().unwrap_or(0)
    }

    /// Requests, errors and latencies of every kind matching `f`, together.
    pub fn combined(&self, f: impl Fn(Kind) -> bool) -> KindStats {
        let mut out = KindStats::default();
        for k in Kind::ALL.into_iter().filter(|k| f(*k)) {
            let s = self.kind(k);
            out.ok += s.ok;
            out.errors += s.errors;
            out.hist.merge(&s.hist);
        }
        out
    }
}
