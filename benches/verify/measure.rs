//! What the phases share ([`Ctx`]), what a phase's row holds, and measuring a
//! window: the server's CPU, PostgreSQL statements and the server's counters.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicUsize},
    time::{Duration, Instant},
};
use takumo_keys::proto::pb::{VerifyKeyRequest, api_key_service_client::ApiKeyServiceClient};
use tonic::{metadata::AsciiMetadataValue, transport::Channel};
use tonic_health::pb::health_client::HealthClient;

use crate::Opts;
use crate::calls::{ColdJob, Expect, HealthJob, VerifyJob};
use crate::support::{
    h2load::H2loadRun,
    load::{Job, Stats, run_for, run_jobs},
    pgproxy::{Counts, StatementCounter},
    procfs::ProcCpu,
    scrape::{metric, scrape},
};

/// Statements the server sent to PostgreSQL during one measured window.
#[derive(Clone, Copy)]
pub struct DbWindow {
    pub counts: Counts,
    pub secs: f64,
}

#[derive(Clone)]
pub struct Row {
    pub kind: Phase,
    pub client: Client,
    pub label: String,
    pub in_flight: String,
    pub stats: Stats,
    /// Server process CPU seconds over the phase.
    pub server_cpu_s: Option<f64>,
    pub db: Option<DbWindow>,
    /// The server's own counters over the phase.
    pub counters: Option<Counters>,
    /// h2load's mean request time (it reports no percentiles).
    pub mean: Option<Duration>,
    pub extra: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Baseline,
    Warm,
    Malformed,
    Cold,
    WarmBeforeFlood,
    WarmUnderFlood,
    FreshUnderFlood,
    ForgedFlood,
    WrongSecretFlood,
}

/// Which load generator produced a figure.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Client {
    H2load,
    Own,
}

impl Client {
    pub fn name(self) -> &'static str {
        match self {
            Client::H2load => "h2load",
            Client::Own => "own (tonic)",
        }
    }
}

/// What the phases share: the running server's address and counters, the
/// own client's connections, the service token.
pub struct Ctx<'a> {
    pub opts: &'a Opts,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub channels: Vec<Channel>,
    pub auth: AsciiMetadataValue,
    pub cpu: ProcCpu,
    pub counter: Option<Arc<StatementCounter>>,
    /// Where h2load's body files go.
    pub dir: PathBuf,
}

/// The keys a run creates (secrets as returned by CreateKey).
pub struct Keys {
    pub warm: Vec<String>,
    pub cold: Vec<String>,
    pub fresh: Vec<String>,
}

// ---------------------------------------------------------------------------
// Measuring a window: server CPU, PostgreSQL statements, server counters.

/// The server's Prometheus counters the report uses.
#[derive(Clone, Copy, Default)]
pub struct Counters {
    pub argon2_verifications: Option<f64>,
    pub argon2_hashes: Option<f64>,
    /// Exported once the server rehashes keys on verification.
    pub argon2_rehashes: Option<f64>,
    pub key_reads: Option<f64>,
    pub valid: f64,
    pub malformed: f64,
    /// VerifyKey answered with any gRPC status but OK.
    pub verify_not_ok: f64,
    pub list_keys_unauthenticated: f64,
}

impl Counters {
    pub fn scrape(addr: SocketAddr) -> Option<Counters> {
        let t = scrape(addr).ok()?;
        let all = |name: &str, filter: &[&str]| metric(&t, name, filter).unwrap_or(0.0);
        let verify = ["method=\"VerifyKey\""];
        Some(Counters {
            argon2_verifications: metric(&t, "takumo_keys_argon2_verifications_total", &[]),
            argon2_hashes: metric(&t, "takumo_keys_argon2_hashes_total", &[]),
            argon2_rehashes: metric(&t, "takumo_keys_argon2_rehashes_total", &[]),
            key_reads: metric(&t, "takumo_keys_store_key_reads_total", &[]),
            valid: all("takumo_keys_verify_outcomes_total", &["code=\"valid\""]),
            malformed: all("takumo_keys_verify_outcomes_total", &["code=\"malformed\""]),
            verify_not_ok: all("takumo_keys_rpc_requests_total", &verify)
                - all("takumo_keys_rpc_requests_total", &[verify[0], "code=\"OK\""]),
            list_keys_unauthenticated: all(
                "takumo_keys_rpc_requests_total",
                &["method=\"ListKeys\"", "code=\"Unauthenticated\""],
            ),
        })
    }

    fn minus(&self, o: &Counters) -> Counters {
        let d = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Counters {
            argon2_verifications: d(self.argon2_verifications, o.argon2_verifications),
            argon2_hashes: d(self.argon2_hashes, o.argon2_hashes),
            argon2_rehashes: d(self.argon2_rehashes, o.argon2_rehashes),
            key_reads: d(self.key_reads, o.key_reads),
            valid: self.valid - o.valid,
            malformed: self.malformed - o.malformed,
            verify_not_ok: self.verify_not_ok - o.verify_not_ok,
            list_keys_unauthenticated: self.list_keys_unauthenticated - o.list_keys_unauthenticated,
        }
    }

    pub fn plus(&self, o: &Counters) -> Counters {
        let s = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
        Counters {
            argon2_verifications: s(self.argon2_verifications, o.argon2_verifications),
            argon2_hashes: s(self.argon2_hashes, o.argon2_hashes),
            argon2_rehashes: s(self.argon2_rehashes, o.argon2_rehashes),
            key_reads: s(self.key_reads, o.key_reads),
            valid: self.valid + o.valid,
            malformed: self.malformed + o.malformed,
            verify_not_ok: self.verify_not_ok + o.verify_not_ok,
            list_keys_unauthenticated: self.list_keys_unauthenticated + o.list_keys_unauthenticated,
        }
    }
}

/// The start of a measured window.
pub struct Mark {
    pub cpu: Option<f64>,
    pub db: Option<Counts>,
    pub counters: Option<Counters>,
    pub at: Instant,
}

impl Ctx<'_> {
    pub fn mark(&self) -> Mark {
        // Counters first, so that the scrape's own CPU falls outside the window.
        let counters = Counters::scrape(self.metrics);
        Mark { cpu: self.cpu.seconds(), db: self.counter.as_ref().map(|c| c.snapshot()), counters, at: Instant::now() }
    }

    /// What happened on the server since `m`, around `stats`.
    pub fn since(&self, m: Mark, stats: Stats) -> Measured {
        let cpu = self.cpu.since(m.cpu);
        let db = self
            .counter
            .as_ref()
            .zip(m.db)
            .map(|(c, c0)| DbWindow { counts: c.snapshot().minus(&c0), secs: m.at.elapsed().as_secs_f64() });
        let counters = m.counters.and_then(|c0| Some(Counters::scrape(self.metrics)?.minus(&c0)));
        Measured { stats, server_cpu_s: cpu, db, counters, h2load: None }
    }

    /// Runs `concurrency` own-client jobs for `dur` and measures the window.
    pub async fn measure<J: Job>(&self, concurrency: usize, dur: Duration, make: impl Fn(usize) -> J) -> Measured {
        let m = self.mark();
        let stats = run_for(concurrency, dur, make).await;
        self.since(m, stats)
    }

    /// Runs own-client jobs until they run out of work and measures the window.
    pub async fn measure_jobs<J: Job>(&self, jobs: Vec<J>) -> Measured {
        let m = self.mark();
        let stats = run_jobs(jobs, None, None).await;
        self.since(m, stats)
    }

    pub fn health(&self, i: usize) -> HealthJob {
        HealthJob { client: HealthClient::new(self.channels[i % self.channels.len()].clone()) }
    }

    pub fn verify_job(&self, i: usize, reqs: &Arc<[VerifyKeyRequest]>, expect: Expect) -> VerifyJob {
        VerifyJob {
            client: ApiKeyServiceClient::new(self.channels[i % self.channels.len()].clone()),
            auth: self.auth.clone(),
            reqs: reqs.clone(),
            next: i,
            expect,
        }
    }

    /// Jobs that verify each of `reqs` exactly once between them.
    pub fn once_each(&self, concurrency: usize, reqs: Arc<[VerifyKeyRequest]>) -> Vec<ColdJob> {
        let next = Arc::new(AtomicUsize::new(0));
        (0..concurrency.max(1))
            .map(|i| ColdJob {
                client: ApiKeyServiceClient::new(self.channels[i % self.channels.len()].clone()),
                auth: self.auth.clone(),
                reqs: reqs.clone(),
                next: next.clone(),
            })
            .collect()
    }
}

/// Sums of the slices of one phase.
#[derive(Default)]
pub struct Measured {
    pub stats: Stats,
    pub server_cpu_s: Option<f64>,
    pub db: Option<DbWindow>,
    pub counters: Option<Counters>,
    /// h2load phases: what it reported, summed.
    pub h2load: Option<H2loadRun>,
}

impl Measured {
    pub fn add(&mut self, m: Measured) {
        self.stats.merge(m.stats);
        self.server_cpu_s = match (self.server_cpu_s, m.server_cpu_s) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.db = match (self.db, m.db) {
            (Some(a), Some(b)) => Some(DbWindow { counts: a.counts.plus(&b.counts), secs: a.secs + b.secs }),
            (a, b) => a.or(b),
        };
        self.counters = match (self.counters, m.counters) {
            (Some(a), Some(b)) => Some(a.plus(&b)),
            (a, b) => a.or(b),
        };
        self.h2load = match (self.h2load.take(), m.h2load) {
            (Some(mut a), Some(b)) => {
                a.merge(&b);
                Some(a)
            }
            (a, b) => a.or(b),
        };
    }

    pub fn row(self, kind: Phase, client: Client, label: &str, in_flight: String) -> Row {
        Row {
            kind,
            client,
            label: label.to_owned(),
            in_flight,
            stats: self.stats,
            server_cpu_s: self.server_cpu_s,
            db: self.db,
            counters: self.counters,
            mean: self.h2load.as_ref().filter(|r| r.succeeded > 0).map(|r| Duration::from_secs_f64(r.mean_us / 1e6)),
            extra: String::new(),
        }
    }
}
