//! Restart (PostgreSQL): the server SIGKILLed under load and started again on
//! the same database; how long until the verification rate is back.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use takumo_keys::proto::pb::{VerifyKeyRequest, api_key_service_client::ApiKeyServiceClient};
use tonic::{metadata::AsciiMetadataValue, transport::Channel};

use crate::calls::{Expect, authed, check_verify, verify_req};
use crate::measure::{Counters, Ctx};
use crate::report::Verdict;
use crate::support::{
    load::{Outcome, connect},
    report::{fmt_dur, fmt_rps},
    server::Server,
};
use crate::{
    Backend, BackendReport, Opts, RESTART_BUCKET, RESTART_RATE_TARGET, RESTART_SUSTAINED_BUCKETS, RESTART_WITHIN,
};

pub struct Restart {
    pub keys: usize,
    /// Verifications per second over the load before the kill (its first second left out).
    pub before_rps: f64,
    /// From the kill to the new process's first SERVING health answer.
    pub down: Duration,
    /// Successful answers per bucket after health, as req/s.
    pub after: Vec<f64>,
    /// The last buckets before the kill, as req/s (oldest first).
    pub before: Vec<f64>,
    /// The client's longest wait between two successful answers from the kill
    /// on (`None`: none came after it).
    pub gap: Option<Duration>,
    pub errors_before_kill: u64,
    pub errors_while_down: u64,
    pub errors_after_health: u64,
    /// Answers that were wrong (not transport failures).
    pub wrong_answers: u64,
    pub first_errors: Vec<String>,
    /// The restarted server's counters at the end of the phase (it started at zero).
    pub counters_after: Option<Counters>,
    pub observed: Duration,
}

impl Restart {
    fn threshold(&self) -> f64 {
        self.before_rps * RESTART_RATE_TARGET
    }

    /// End of the first bucket of `RESTART_SUSTAINED_BUCKETS` consecutive ones
    /// at or above the threshold, counted from the health answer.
    fn recovered_after(&self) -> Option<Duration> {
        let t = self.threshold();
        let n = RESTART_SUSTAINED_BUCKETS;
        (0..self.after.len().saturating_sub(n - 1))
            .find(|&k| self.after[k..k + n].iter().all(|r| *r >= t))
            .map(|k| RESTART_BUCKET * (k as u32 + 1))
    }

    /// End of the first bucket at or above the threshold, sustained or not.
    fn first_back(&self) -> Option<Duration> {
        let t = self.threshold();
        self.after.iter().position(|r| *r >= t).map(|k| RESTART_BUCKET * (k as u32 + 1))
    }

    pub fn summary(&self) -> String {
        format!(
            "before {} req/s, down {}, back to ≥ {RESTART_RATE_TARGET}× after {}",
            fmt_rps(self.before_rps),
            fmt_dur(self.down),
            self.recovered_after().map_or_else(|| format!("more than {}", fmt_dur(self.observed)), fmt_dur)
        )
    }
}

/// One own-client task of the restart load: each answer's time since `t0`.
#[derive(Default)]
struct RestartTrace {
    pub ok_us: Vec<u64>,
    /// (time since t0, wrong answer rather than a failed call)
    pub err_us: Vec<(u64, bool)>,
    /// The task's first wrong answers, with their time since t0.
    pub first_wrong: Vec<(u64, String)>,
    /// The task's last failed calls, with their time since t0: the outage's
    /// come first, so only the last ones can show failures after it.
    pub last_failed: Vec<(u64, String)>,
}

pub async fn restart_phase(ctx: &Ctx<'_>, server: &mut Server, env: &[(String, String)], keys: &[String]) -> Restart {
    let opts = ctx.opts;
    let reqs: Arc<[VerifyKeyRequest]> = keys.iter().map(|k| verify_req(k)).collect();
    // Fresh connections: the phase's own, which the kill breaks and tonic re-establishes.
    let channels = connect(ctx.addr, opts.connections, None).await;
    let (next, stop, t0) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)), Instant::now());
    let tasks: Vec<_> = (0..opts.concurrency)
        .map(|i| {
            let client = ApiKeyServiceClient::new(channels[i % channels.len()].clone());
            let (auth, reqs, next, stop) = (ctx.auth.clone(), reqs.clone(), next.clone(), stop.clone());
            tokio::spawn(restart_load(client, auth, reqs, next, stop, t0))
        })
        .collect();

    tokio::time::sleep(Duration::from_secs_f64(opts.restart_before)).await;
    let killed = Instant::now();
    server.kill();
    *server = Server::start(&opts.server_bin, env, &ctx.dir.join("server-restarted.log"), ctx.addr, ctx.metrics);
    server.wait_ready().await;
    let healthy = Instant::now();
    eprintln!("restart: killed, new pid {} serving after {}", server.pid(), fmt_dur(healthy - killed));
    let observed = Duration::from_secs_f64(opts.restart_after);
    tokio::time::sleep(observed).await;
    stop.store(true, Ordering::Relaxed);
    let mut traces = Vec::new();
    for t in tasks {
        traces.push(t.await.expect("restart load task"));
    }
    let counters_after = Counters::scrape(ctx.metrics);
    restart_report(keys.len(), &traces, t0, killed, healthy, observed, counters_after)
}

/// One task of the restart load: verifies `reqs` in turn (shared `next`)
/// until `stop`, recording when each answer came.
async fn restart_load(
    mut client: ApiKeyServiceClient<Channel>,
    auth: AsciiMetadataValue,
    reqs: Arc<[VerifyKeyRequest]>,
    next: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> RestartTrace {
    let mut trace = RestartTrace::default();
    while !stop.load(Ordering::Relaxed) {
        let body = reqs[next.fetch_add(1, Ordering::Relaxed) % reqs.len()].clone();
        let r = client.verify_key(authed(body, &auth)).await;
        let failed_call = r.is_err();
        let at = t0.elapsed().as_micros() as u64;
        let e = match check_verify(r, Expect::Valid) {
            Outcome::Ok => {
                trace.ok_us.push(at);
                continue;
            }
            Outcome::Shed => "shed (RESOURCE_EXHAUSTED)".to_owned(),
            Outcome::Error(e) => e,
        };
        // A failed call is expected while the server is down; an
        // answer that is not VALID never is.
        trace.err_us.push((at, !failed_call));
        if !failed_call {
            if trace.first_wrong.len() < 3 {
                trace.first_wrong.push((at, e));
            }
            continue;
        }
        if trace.last_failed.len() == 3 {
            trace.last_failed.remove(0);
        }
        trace.last_failed.push((at, e));
        // The server may be down: do not spin on refused connections.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    trace
}

fn restart_report(
    keys: usize,
    traces: &[RestartTrace],
    t0: Instant,
    killed: Instant,
    healthy: Instant,
    observed: Duration,
    counters_after: Option<Counters>,
) -> Restart {
    let us = |t: Instant| t.duration_since(t0).as_micros() as u64;
    let (kill_us, health_us, bucket_us) = (us(killed), us(healthy), RESTART_BUCKET.as_micros() as u64);
    let mut ok: Vec<u64> = traces.iter().flat_map(|t| t.ok_us.iter().copied()).collect();
    ok.sort_unstable();
    // Before the kill: whole buckets counted back from the kill, the load's first second left out.
    let skip_us = 1_000_000.min(kill_us / 2);
    let n_before = ((kill_us - skip_us) / bucket_us) as usize;
    let count_in = |from: u64, to: u64| (ok.partition_point(|&t| t < to) - ok.partition_point(|&t| t < from)) as f64;
    let bucket_secs = RESTART_BUCKET.as_secs_f64();
    let before: Vec<f64> = (0..n_before)
        .rev()
        .map(|j| count_in(kill_us - (j as u64 + 1) * bucket_us, kill_us - j as u64 * bucket_us) / bucket_secs)
        .collect();
    let before_rps = if n_before > 0 { before.iter().sum::<f64>() / n_before as f64 } else { 0.0 };
    let n_after = (observed.as_micros() as u64 / bucket_us) as usize;
    let after: Vec<f64> = (0..n_after)
        .map(|k| count_in(health_us + k as u64 * bucket_us, health_us + (k as u64 + 1) * bucket_us) / bucket_secs)
        .collect();
    // Answers to calls sent before the kill may still arrive after it: the
    // outage the client saw is the longest silence between two successes
    // from the kill on (or from the last success before it).
    let from = ok.partition_point(|&t| t < kill_us).saturating_sub(1);
    let gap = (ok.len() > from + 1 && ok[ok.len() - 1] >= kill_us)
        .then(|| ok[from..].windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0))
        .map(Duration::from_micros);
    let errs = |f: &dyn Fn(u64) -> bool| traces.iter().flat_map(|t| &t.err_us).filter(|(at, _)| f(*at)).count() as u64;
    Restart {
        keys,
        before_rps,
        down: healthy - killed,
        after,
        before: before.iter().rev().take(4).rev().copied().collect(),
        gap,
        errors_before_kill: errs(&|at| at < kill_us),
        errors_while_down: errs(&|at| (kill_us..health_us).contains(&at)),
        errors_after_health: errs(&|at| at >= health_us),
        wrong_answers: traces.iter().flat_map(|t| &t.err_us).filter(|(_, wrong)| *wrong).count() as u64,
        // The ones that matter: wrong answers, and failed calls before the kill or once the
        // server answered health again.
        first_errors: traces
            .iter()
            .flat_map(|t| {
                t.first_wrong.iter().chain(t.last_failed.iter().filter(|(at, _)| *at >= health_us || *at < kill_us))
            })
            .map(|(at, e)| format!("{} after the health answer: {e}", fmt_signed_ms(*at as i64 - health_us as i64)))
            .take(3)
            .collect(),
        counters_after,
        observed,
    }
}

/// `+12 ms` / `-3 ms`.
fn fmt_signed_ms(us: i64) -> String {
    format!("{}{:.0} ms", if us < 0 { "-" } else { "+" }, us.unsigned_abs() as f64 / 1e3)
}

impl BackendReport {
    pub fn restart_verdict(&self) -> Verdict {
        let Some(r) = &self.restart else {
            return match self.backend {
                Backend::Sqlite => Verdict::na("PostgreSQL only"),
                Backend::Postgres => Verdict::na("skipped (`--restart-after 0` or no cold keys)"),
            };
        };
        let back = r.recovered_after();
        let ok = back.is_some_and(|b| b <= RESTART_WITHIN) && r.wrong_answers == 0 && r.errors_before_kill == 0;
        let detail = format!(
            "{} after the health answer (sustained {} ms), from {} req/s before; down {} (kill → SERVING)",
            back.map_or_else(|| format!("not back within {}", fmt_dur(r.observed)), fmt_dur),
            RESTART_BUCKET.as_millis() * RESTART_SUSTAINED_BUCKETS as u128,
            fmt_rps(r.before_rps),
            fmt_dur(r.down)
        );
        let mut short = Vec::new();
        match back {
            Some(b) if b > RESTART_WITHIN => {
                short.push(format!("{} over {} s", fmt_dur(b - RESTART_WITHIN), RESTART_WITHIN.as_secs()))
            }
            None => short.push(format!(
                "more than {} over {} s",
                fmt_dur(r.observed.saturating_sub(RESTART_WITHIN)),
                RESTART_WITHIN.as_secs()
            )),
            _ => {}
        }
        if r.wrong_answers + r.errors_before_kill > 0 {
            short.push(format!("{} wrong answers, {} errors before the kill", r.wrong_answers, r.errors_before_kill));
        }
        Verdict { met: Some(ok), detail, shortfall: (!ok).then(|| short.join(", ")) }
    }
}

impl Restart {
    pub fn section(&self, opts: &Opts) -> String {
        let mut t =
            String::from("### Restart after SIGKILL (PostgreSQL, own client)\n\n| figure | value |\n|---|---|\n");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "| {k} | {v} |");
        };
        row(
            "load",
            format!(
                "{} in flight over {} HTTP/2 connections, cycling over {} distinct keys (the cold keys, cached)",
                opts.concurrency, opts.connections, self.keys
            ),
        );
        row(
            "rate before the kill",
            format!(
                "{} req/s ({} s of load, its first second left out)",
                fmt_rps(self.before_rps),
                opts.restart_before
            ),
        );
        row("SIGKILL → first SERVING health answer of the new process", fmt_dur(self.down));
        row(
            "longest silence between two successful answers, from the kill on",
            self.gap.map_or_else(|| "no successful answer after the kill".into(), fmt_dur),
        );
        row(
            &format!(
                "back to ≥ {RESTART_RATE_TARGET}× ({} req/s) for {} consecutive {} ms buckets, from the health answer",
                fmt_rps(self.threshold()),
                RESTART_SUSTAINED_BUCKETS,
                RESTART_BUCKET.as_millis()
            ),
            self.recovered_after().map_or_else(|| format!("not within {}", fmt_dur(self.observed)), fmt_dur),
        );
        row("first bucket at ≥ that rate (sustained or not)", self.first_back().map_or_else(|| "none".into(), fmt_dur));
        row(
            "failed calls: before the kill / while down / after the health answer; wrong answers",
            format!(
                "{} / {} / {}; {}",
                self.errors_before_kill, self.errors_while_down, self.errors_after_health, self.wrong_answers
            ),
        );
        let count = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
        if let Some(c) = self.counters_after {
            row(
                &format!("restarted server's work over the observed {}", fmt_dur(self.observed)),
                format!(
                    "{} argon2 verifications, {} key reads, {} VALID answers",
                    count(c.argon2_verifications),
                    count(c.key_reads),
                    c.valid
                ),
            );
        }
        let fmt = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" ");
        let shown = self.after.len().min(40);
        let _ = writeln!(
            t,
            "\nSuccessful verifications per {} ms bucket, as req/s: the last {} before the kill: {}; from the health \
             answer on (first {}): {}",
            RESTART_BUCKET.as_millis(),
            self.before.len(),
            fmt(&self.before),
            fmt_dur(RESTART_BUCKET * shown as u32),
            fmt(&self.after[..shown])
        );
        for e in &self.first_errors {
            let _ = writeln!(t, "\n- {e}");
        }
        t
    }
}
