//! The report: each backend's tables and notes, the targets and their
//! verdicts, and the results file (`docs/performance-results.md`).

use std::{fmt::Write as _, time::Duration};

use crate::measure::{Client, Phase, Row};
use crate::propagation::PROPAGATION_TARGET;
use crate::support::{
    report::{ResultsHeader, bench_command, fmt_dur, fmt_rps},
    server::server_argon2_defaults,
};
use crate::{
    Backend, BackendReport, COLD_CPU_TARGET, COLD_RATIO_TARGET, FLOODED_WARM_TARGET, FRESH_P99_TARGET,
    HEALTH_PING_EVERY_S, MALFORMED_RATIO_TARGET, Opts, REQUIRED_SCOPE, RESTART_RATE_TARGET, RESTART_WITHIN,
    USAGE_FLUSH_EVERY_S, WARM_RATIO_TARGET,
};

/// A target's verdict for one backend.
pub struct Verdict {
    /// `None`: not applicable or not measured.
    pub met: Option<bool>,
    pub detail: String,
    /// How far from the target, when not met.
    pub shortfall: Option<String>,
}

impl Verdict {
    pub fn na(why: &str) -> Verdict {
        Verdict { met: None, detail: why.to_owned(), shortfall: None }
    }

    fn cell(&self) -> String {
        match (self.met, &self.shortfall) {
            (None, _) => format!("n/a ({})", self.detail),
            (Some(true), _) => format!("met ({})", self.detail),
            (Some(false), Some(s)) => format!("**not met** ({}; {s})", self.detail),
            (Some(false), None) => format!("**not met** ({})", self.detail),
        }
    }
}

/// `0.62× is 0.23× short of 0.85× (27% below)`: how far a ratio misses a floor.
fn ratio_shortfall(r: f64, target: f64) -> String {
    format!("{:.3}× short of {target}×, {:.0}% below it", target - r, (1.0 - r / target) * 100.0)
}

impl BackendReport {
    pub fn row(&self, kind: Phase, client: Client) -> Option<&Row> {
        self.rows.iter().find(|r| r.kind == kind && r.client == client)
    }

    pub fn rps(&self, kind: Phase, client: Client) -> Option<f64> {
        self.row(kind, client).map(|r| r.stats.rps())
    }

    /// Server CPU seconds per request of a row.
    fn cpu_per_req(&self, kind: Phase, client: Client) -> Option<f64> {
        let r = self.row(kind, client)?;
        let n = r.stats.ok + r.stats.errors;
        (n > 0).then_some(r.server_cpu_s? / n as f64)
    }

    /// The backend's part of the results: one table per client, then notes,
    /// propagation and restart.
    pub fn section(&self, opts: &Opts) -> String {
        let mut s = format!("## {}\n\n", self.backend.title());
        let _ = writeln!(
            s,
            "### Throughput ratios (h2load)\n\n`h2load -c {} -m {} -t 1`; baseline, warm and malformed alternate in \
             {} rounds of {:.2} s each, summed per phase. Each run was checked first (own client and `nghttp`, same \
             request) and after (the server's outcome counters account for every success).\n\n{}",
            opts.h2load_connections,
            opts.h2load_streams,
            opts.rounds.max(1),
            opts.duration / opts.rounds.max(1) as f64,
            self.table(Client::H2load)
        );
        let _ = writeln!(
            s,
            "### Own client (tonic)\n\nEvery answer checked (gRPC status, `valid`, `code`). The load generator \
             costs about as much CPU as the server on the same cores, so its ratios are not the throughput ratios \
             above; they serve the cold and flood targets, which compare figures of this client only.\n\n{}",
            self.table(Client::Own)
        );
        if self.backend == Backend::Postgres {
            let _ = writeln!(
                s,
                "{}",
                DB_COLUMN_NOTE
                    .replace("{ping}", &format!("{HEALTH_PING_EVERY_S:.0}"))
                    .replace("{flush}", &format!("{USAGE_FLUSH_EVERY_S:.0}"))
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        if let Some(p) = self.propagation_section("###") {
            let _ = writeln!(s, "{p}");
        }
        if let Some(r) = &self.restart {
            let _ = writeln!(s, "{}", r.section(opts));
        }
        s
    }

    pub fn table(&self, client: Client) -> String {
        let base = self.rps(Phase::Baseline, client);
        let mut t = String::from(
            "| phase | in flight | req/s | ratio to baseline | latency | errors | server CPU per req | argon2 \
             verify / hash / rehash | key reads | DB statements per 10k | notes |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for r in self.rows.iter().filter(|r| r.client == client) {
            let rps = r.stats.rps();
            let ratio = match (r.kind, base) {
                (Phase::Baseline, _) => "1×".into(),
                (Phase::ForgedFlood | Phase::WrongSecretFlood | Phase::FreshUnderFlood, _) => "–".into(),
                (_, Some(b)) if b > 0.0 => format!("{:.3}×", rps / b),
                _ => "–".into(),
            };
            let latency = match (r.mean, r.stats.percentile(0.5), r.stats.percentile(0.99)) {
                (Some(m), _, _) => format!("mean {}", fmt_dur(m)),
                (None, Some(p50), Some(p99)) => format!("p50 {} · p99 {}", fmt_dur(p50), fmt_dur(p99)),
                _ => "–".into(),
            };
            let errors = match (r.stats.errors, r.stats.shed) {
                (0, 0) => "0".into(),
                (e, 0) => format!("**{e}**"),
                (e, s) => format!("**{e}** + {s} shed"),
            };
            let requests = r.stats.ok + r.stats.errors;
            let loaded = matches!(r.kind, Phase::WarmUnderFlood | Phase::FreshUnderFlood | Phase::ForgedFlood);
            let cpu = match r.server_cpu_s {
                Some(s) if requests > 0 => {
                    let per = fmt_dur(Duration::from_secs_f64(s.max(0.0) / requests as f64));
                    if loaded { format!("{per} (flood included)") } else { per }
                }
                _ => "–".into(),
            };
            let count = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
            let (argon2, reads) = match r.counters {
                Some(c) => (
                    format!(
                        "{} / {} / {}",
                        count(c.argon2_verifications),
                        count(c.argon2_hashes),
                        count(c.argon2_rehashes)
                    ),
                    count(c.key_reads),
                ),
                None => ("–".into(), "–".into()),
            };
            let db = match (r.db, self.backend) {
                (Some(w), _) => {
                    let c = w.counts;
                    let detail = format!(
                        "{} read, {} write, {} ping, {} other in {:.1} s",
                        c.reads, c.writes, c.pings, c.other, w.secs
                    );
                    if r.kind == Phase::Baseline {
                        format!("– ({detail})")
                    } else if loaded {
                        format!("– ({detail}, flood included)")
                    } else {
                        format!("{:.1} ({detail})", c.total() as f64 * 10_000.0 / requests.max(1) as f64)
                    }
                }
                (None, Backend::Sqlite) if r.kind == Phase::Warm => "n/a (SQLite)".into(),
                (None, Backend::Postgres) if r.kind == Phase::Warm => "n/a (no proxy)".into(),
                _ => String::new(),
            };
            let mut notes = format!("{} ok in {:.1} s", r.stats.ok, r.stats.elapsed.as_secs_f64());
            if !r.extra.is_empty() {
                let _ = write!(notes, "; {}", r.extra);
            }
            let _ = writeln!(
                t,
                "| {} | {} | {} | {ratio} | {latency} | {errors} | {cpu} | {argon2} | {reads} | {db} | {notes} |",
                r.label,
                r.in_flight,
                fmt_rps(rps),
            );
        }
        t
    }

    /// Whether the rows behind a target are trustworthy: no errors in them or
    /// in the baseline of their client.
    fn judge(&self, ok: bool, detail: String, shortfall: String, rows: &[(Phase, Client)]) -> Verdict {
        let mut errs: u64 = rows.iter().filter_map(|(k, c)| self.row(*k, *c)).map(|r| r.stats.errors).sum();
        for client in [Client::H2load, Client::Own] {
            if rows.iter().any(|(_, c)| *c == client) {
                errs += self.row(Phase::Baseline, client).map_or(0, |r| r.stats.errors);
            }
        }
        if errs > 0 {
            let detail = format!("{detail}; {errs} errors, figures untrustworthy");
            return Verdict { met: Some(false), detail, shortfall: None };
        }
        Verdict { met: Some(ok), detail, shortfall: (!ok).then_some(shortfall) }
    }

    /// A same-client throughput ratio against a floor.
    fn ratio_target(&self, kind: Phase, client: Client, target: f64) -> Verdict {
        let (Some(v), Some(b)) = (self.rps(kind, client), self.rps(Phase::Baseline, client)) else {
            return Verdict::na("not measured");
        };
        let r = v / b.max(1e-9);
        self.judge(
            r >= target,
            format!("{r:.3}×: {} vs {} req/s", fmt_rps(v), fmt_rps(b)),
            ratio_shortfall(r, target),
            &[(kind, client)],
        )
    }

    pub fn targets(&self, opts: &Opts) -> Vec<(String, Verdict)> {
        let mut out = Vec::new();
        out.push((
            format!("warm VerifyKey ≥ {WARM_RATIO_TARGET}× Health/Check req/s (h2load)"),
            self.ratio_target(Phase::Warm, Client::H2load, WARM_RATIO_TARGET),
        ));
        out.push((
            format!("malformed VerifyKey ≥ {MALFORMED_RATIO_TARGET}× Health/Check req/s (h2load)"),
            self.ratio_target(Phase::Malformed, Client::H2load, MALFORMED_RATIO_TARGET),
        ));
        out.push((
            format!(
                "cold VerifyKey ({} distinct keys, once each) ≥ {COLD_RATIO_TARGET}× Health/Check req/s (own client)",
                opts.cold_keys
            ),
            self.ratio_target(Phase::Cold, Client::Own, COLD_RATIO_TARGET),
        ));
        out.push((
            format!("server CPU per cold verification ≤ {COLD_CPU_TARGET}× a warm one (own client)"),
            self.cold_cpu_verdict(),
        ));
        out.push((
            format!(
                "under the flood: first verifications of fresh keys p99 < {} ms, no errors (own client)",
                FRESH_P99_TARGET.as_millis()
            ),
            self.fresh_verdict(),
        ));
        out.push((
            format!("under the flood: warm VerifyKey ≥ {FLOODED_WARM_TARGET}× its rate just before (own client)"),
            self.flooded_warm_verdict(),
        ));
        out.push((
            format!(
                "after SIGKILL and restart: verification rate back to ≥ {RESTART_RATE_TARGET}× within {} s of the \
                 health answer (own client)",
                RESTART_WITHIN.as_secs()
            ),
            self.restart_verdict(),
        ));
        // Targets of earlier issues, still measured.
        out.push(("(earlier) warm VerifyKey p99 ≤ 2 ms at 64 in flight (own client)".into(), self.p99_verdict(opts)));
        out.push((
            "(earlier) zero DB reads for warm verifications; usage writes ≤ one batched statement per flush interval"
                .into(),
            self.db_verdict(),
        ));
        out.push((format!("(earlier) {PROPAGATION_TARGET}"), self.propagation_verdict()));
        out
    }

    fn cold_cpu_verdict(&self) -> Verdict {
        let (Some(cold), Some(warm)) =
            (self.cpu_per_req(Phase::Cold, Client::Own), self.cpu_per_req(Phase::Warm, Client::Own))
        else {
            return Verdict::na("not measured");
        };
        let x = cold / warm.max(1e-12);
        self.judge(
            x <= COLD_CPU_TARGET,
            format!(
                "{x:.1}×: {} vs {} per request",
                fmt_dur(Duration::from_secs_f64(cold)),
                fmt_dur(Duration::from_secs_f64(warm))
            ),
            format!("{:.1}× over the {COLD_CPU_TARGET}× bound", x - COLD_CPU_TARGET),
            &[(Phase::Cold, Client::Own), (Phase::Warm, Client::Own)],
        )
    }

    fn fresh_verdict(&self) -> Verdict {
        let Some(r) = self.row(Phase::FreshUnderFlood, Client::Own) else {
            return Verdict::na("no fresh keys (`--fresh-keys 0`)");
        };
        let Some(p99) = r.stats.percentile(0.99) else {
            return Verdict { met: Some(false), detail: "no successful verification".into(), shortfall: None };
        };
        let failures = r.stats.errors + r.stats.shed;
        let ok = p99 < FRESH_P99_TARGET && failures == 0;
        let mut short = Vec::new();
        if p99 >= FRESH_P99_TARGET {
            short.push(format!("p99 {} over {} ms", fmt_dur(p99 - FRESH_P99_TARGET), FRESH_P99_TARGET.as_millis()));
        }
        if failures > 0 {
            short.push(format!("{failures} verifications failed or shed"));
        }
        Verdict {
            met: Some(ok),
            detail: format!(
                "p99 {}, p50 {}, {} errors, {} shed over {} keys",
                fmt_dur(p99),
                r.stats.percentile(0.5).map_or("–".into(), fmt_dur),
                r.stats.errors,
                r.stats.shed,
                r.stats.ok + failures
            ),
            shortfall: (!ok).then(|| short.join(", ")),
        }
    }

    fn flooded_warm_verdict(&self) -> Verdict {
        let (Some(during), Some(before)) =
            (self.rps(Phase::WarmUnderFlood, Client::Own), self.rps(Phase::WarmBeforeFlood, Client::Own))
        else {
            return Verdict::na("not measured");
        };
        let r = during / before.max(1e-9);
        self.judge(
            r >= FLOODED_WARM_TARGET,
            format!("{r:.2}×: {} vs {} req/s", fmt_rps(during), fmt_rps(before)),
            ratio_shortfall(r, FLOODED_WARM_TARGET),
            &[(Phase::WarmUnderFlood, Client::Own), (Phase::WarmBeforeFlood, Client::Own)],
        )
    }

    fn p99_verdict(&self, opts: &Opts) -> Verdict {
        let Some(p99) = self.row(Phase::Warm, Client::Own).and_then(|r| r.stats.percentile(0.99)) else {
            return Verdict::na("not measured");
        };
        let note = if opts.concurrency == 64 { String::new() } else { format!(" at {} in flight", opts.concurrency) };
        let base_p99 = self
            .row(Phase::Baseline, Client::Own)
            .and_then(|r| r.stats.percentile(0.99))
            .map_or(String::new(), |b| format!("; the empty RPC's p99 {}", fmt_dur(b)));
        let limit = Duration::from_millis(2);
        self.judge(
            p99 <= limit,
            format!("p99 {}{note}{base_p99}", fmt_dur(p99)),
            format!("{} over 2 ms", fmt_dur(p99.saturating_sub(limit))),
            &[(Phase::Warm, Client::Own)],
        )
    }

    fn db_verdict(&self) -> Verdict {
        let Some(w) = self.row(Phase::Warm, Client::Own).and_then(|r| r.db) else {
            return match self.backend {
                Backend::Postgres => Verdict::na("run without the counting proxy"),
                Backend::Sqlite => Verdict::na("not measured on SQLite"),
            };
        };
        let c = w.counts;
        // Usage recorded in a warm slice may be flushed during the next
        // (interleaved) slice, so writes are judged over all three phases' windows.
        let (writes, secs) = [Phase::Baseline, Phase::Warm, Phase::Malformed]
            .iter()
            .filter_map(|k| self.row(*k, Client::Own).and_then(|r| r.db))
            .fold((0, 0.0), |(n, t), d| (n + d.counts.writes, t + d.secs));
        // One flush per interval, plus one for a window that straddles an extra tick.
        let budget = (secs / USAGE_FLUSH_EVERY_S).ceil() as u64 + 1;
        self.judge(
            c.reads == 0 && c.other == 0 && writes <= budget,
            format!(
                "warm: {} reads, {} other in {:.1} s; usage writes {writes} in {secs:.1} s of interleaved rounds, \
                 budget {budget}",
                c.reads, c.other, w.secs
            ),
            "see the counts".into(),
            &[(Phase::Warm, Client::Own)],
        )
    }
}

const DB_COLUMN_NOTE: &str = "DB statements per 10k: statements the server sent to PostgreSQL during the measured \
window (Execute and simple-Query messages, counted by a pass-through proxy between the server and PostgreSQL), per \
10,000 requests of the phase; in brackets the raw counts by kind: `read` (SELECT), `write` (INSERT/UPDATE/DELETE), \
`ping` (`SELECT 1`) and `other`. The count includes the service's background work, whatever the load: a health ping \
every {ping} s and a usage flush every {flush} s (when there is usage to write); the baseline row shows that \
background alone.\n";

pub fn targets_section(opts: &Opts, reports: &[BackendReport]) -> String {
    let mut s = String::from(
        "## Targets\n\nEach ratio compares figures of one client in one run (the client is named). n/a: not \
         applicable to that backend, or not measured.\n\n| target |",
    );
    for r in reports {
        let _ = write!(s, " {} |", r.backend.title());
    }
    s.push_str("\n|---|");
    for _ in reports {
        s.push_str("---|");
    }
    s.push('\n');
    let per: Vec<_> = reports.iter().map(|r| r.targets(opts)).collect();
    let names: Vec<&String> = per.first().map(|p| p.iter().map(|(n, _)| n).collect()).unwrap_or_default();
    for (i, name) in names.iter().enumerate() {
        let _ = write!(s, "| {name} |");
        for p in &per {
            let _ = write!(s, " {} |", p[i].1.cell());
        }
        s.push('\n');
    }
    let missed: Vec<String> = reports
        .iter()
        .zip(&per)
        .flat_map(|(r, p)| {
            p.iter().filter(|(_, v)| v.met == Some(false)).map(move |(n, v)| {
                let by = v.shortfall.as_deref().map_or_else(|| v.detail.clone(), |s| format!("{s} ({})", v.detail));
                format!("- **{}**: {n}: {by}", r.backend.title())
            })
        })
        .collect();
    if missed.is_empty() {
        s.push_str("\nEvery applicable target is met.\n");
    } else {
        let _ = writeln!(s, "\nNot met ({}):\n\n{}", missed.len(), missed.join("\n"));
    }
    s
}

pub fn render_results(opts: &Opts, reports: &[BackendReport], h2load_version: &str, total: Duration) -> String {
    let header = ResultsHeader {
        title: "Performance results: VerifyKey benchmark",
        generator: "benches/verify.rs",
        analysis: "docs/performance.md",
        command: bench_command("verify", "TAKUMO_BENCH_"),
        path: &opts.docs,
    };
    let mut s = header.render();
    let _ = writeln!(
        s,
        "- Server: release build, one process per backend (plus a second replica on PostgreSQL for the \
         propagation phase, and a restarted one for the restart phase), fresh database, every setting at its \
         default but the service token, pepper, listen and metrics addresses: argon2id {} (the defaults of the \
         server binary, from `serve --help`). PostgreSQL {}over TCP loopback with `sslmode=disable`, through the \
         bench's statement-counting proxy{}.",
        server_argon2_defaults(&opts.server_bin),
        reports.iter().find_map(|r| r.pg_version.as_deref()).map_or(String::new(), |v| format!("{v} ")),
        if opts.no_pg_proxy { " (off: `--no-pg-proxy`)" } else { " (one extra loopback hop per statement)" }
    );
    let _ = writeln!(
        s,
        "- Load generators, on the same cores as the server: **h2load** ({h2load_version}, `-c {} -m {} -t 1`, {} \
         in flight) for the throughput ratios and the forged-key flood; the **own client** (this bench: tonic, {} \
         tokio threads, {} in flight over {} HTTP/2 connections) for everything h2load cannot do (many distinct \
         keys, checking every answer, timing single requests).",
        opts.h2load_connections,
        opts.h2load_streams,
        opts.h2load_connections * opts.h2load_streams,
        opts.client_threads,
        opts.concurrency,
        opts.connections
    );
    let _ = writeln!(
        s,
        "- Phases: {:.1} s measured per phase after {:.1} s warm-up; baseline, warm and malformed in {} interleaved \
         rounds per client; {} warm keys (workspace preset, `required_scopes: [\"{REQUIRED_SCOPE}\"]`); cold: {} \
         distinct keys once each; flood: h2load's forged-key `ListKeys` plus {} in-flight wrong secrets over {} \
         connections, with {} fresh keys verified once each at {} in flight; propagation {} rounds and restart \
         ({:.0} s before the kill, {:.0} s after the health answer) on PostgreSQL. Total run {:.0} s.",
        opts.duration,
        opts.warmup,
        opts.rounds.max(1),
        opts.warm_keys,
        opts.cold_keys,
        opts.flood_concurrency,
        opts.flood_connections,
        opts.fresh_keys,
        opts.fresh_concurrency,
        opts.propagation_rounds,
        opts.restart_before,
        opts.restart_after,
        total.as_secs_f64()
    );
    if opts.duration < 3.0 || opts.cold_keys < 20_000 {
        let _ = writeln!(
            s,
            "- **Short run** ({:.1} s per phase, {} cold keys): a smoke test, not a measurement.",
            opts.duration, opts.cold_keys
        );
    }
    s.push('\n');
    s.push_str(&targets_section(opts, reports));
    s.push('\n');
    for r in reports {
        s.push_str(&r.section(opts));
    }
    s.push_str(READING_NOTES);
    s
}

const READING_NOTES: &str = "## How the figures are made\n\n\
- **Ratios** compare figures of the same client in the same run: h2load's warm and malformed against h2load's \
Health/Check, the own client's cold and flooded figures against the own client's. A tonic load generator costs about \
as much CPU per request as the server on the same two cores, which flatters ratios; h2load (one C thread) leaves the \
server as the bottleneck.\n\
- **h2load checks.** h2load counts an HTTP 200 as a success even when the gRPC status in the trailers is an error. \
Before every h2load run the same request goes once through the own tonic client (gRPC status, `valid`, `code`) and \
once through `nghttp` with h2load's very body file and headers (`grpc-status`); after it, the server's counters \
(`takumo_keys_verify_outcomes_total`, `takumo_keys_rpc_requests_total`) must show at least as many answers of the \
expected kind as h2load counted successes, and no VerifyKey with another status. A failed check is an error in the \
row and fails the run.\n\
- **Server CPU per request**: the server process's user + system time (`/proc/<pid>/stat`) over the phase divided by \
its requests; PostgreSQL's own CPU is not included. It does not depend on the client.\n\
- **argon2 / key reads**: deltas of `takumo_keys_argon2_verifications_total`, `…_hashes_total`, `…_rehashes_total` \
and `takumo_keys_store_key_reads_total` over the phase (– when the server does not export the counter).\n\
- **Latency**: the own client reports p50 and p99 of correct answers; h2load reports only a mean. At 64 or 256 in \
flight on shared cores latency is mostly queueing, so compare it with the baseline's.\n\
- **Flood**: the forged key is `tk_live_` + the id of the warm key + a random secret + a valid checksum, presented as \
a management call's credential; it passes every cheap check and must be refused with UNAUTHENTICATED. The own client \
adds fresh wrong secrets for all warm keys' ids (each a full argon2 verification that cannot be cached). Rows measured \
during the flood include the flood's CPU.\n\
- **Restart**: the server is killed with SIGKILL (no graceful shutdown) while the own client cycles over the cold \
keys, started again on the same database and port, and answers are counted in 250 ms buckets from its first \
SERVING health answer.\n";
