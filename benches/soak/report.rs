//! The report (`docs/reliability-results.md`): the verdict, the run, requests
//! by kind, memory, usage counting, the servers' side, and the checks.

use std::{collections::BTreeMap, fmt::Write as _, process::ExitStatus, time::Duration};

use crate::stats::{Kind, KindStats, Stats};
use crate::support::{
    procfs::{mem_total_gib, mib},
    report::{ResultsHeader, bench_command, fmt_dur, fmt_rps},
    scrape::{metric, non_ok_rpcs},
    server::{server_argon2_defaults, warn_lines},
};
use crate::tasks::Mix;
use crate::{Opts, RssSample, USAGE_FLUSH_INTERVAL};

pub struct UsageCheck {
    pub orgs: Vec<String>,
    /// Accepted (VALID) verifications, counted by this client from the answers.
    pub client: Vec<u64>,
    /// Resolved answers naming an organization the soak did not create (must be 0).
    pub other: u64,
    /// `api_calls_24h` at the first read and when compared.
    pub first: Vec<Option<i64>>,
    pub stored: Vec<Option<i64>>,
    pub settled_after: Duration,
}

impl UsageCheck {
    pub fn equal(&self) -> bool {
        self.other == 0
            && self.stored.len() == self.client.len()
            && self.stored.iter().zip(&self.client).all(|(s, c)| *s == Some(*c as i64))
    }
}

pub struct Report {
    pub pg_version: String,
    pub setup: Stats,
    pub warm: Stats,
    pub warm_elapsed: Duration,
    pub soak: Stats,
    pub soak_elapsed: Duration,
    pub post: Stats,
    pub stable_keys: usize,
    pub toggle_keys: usize,
    pub pool_size: usize,
    pub rss_boot: Vec<Option<u64>>,
    pub rss_start: Vec<Option<u64>>,
    pub rss_end: Vec<Option<u64>>,
    /// CPUs used on average over the measured run: replica 0, replica 1, the load generator, the rest.
    pub cpu: Vec<Option<f64>>,
    pub hwm: Vec<Option<u64>>,
    pub samples: Vec<RssSample>,
    pub scraped: Vec<Result<String, String>>,
    pub client_codes: [u64; 9],
    pub usage: UsageCheck,
    pub exits: Vec<Option<ExitStatus>>,
    pub logs: Vec<String>,
}

impl Report {
    fn total_errors(&self) -> u64 {
        [&self.setup, &self.warm, &self.soak, &self.post].iter().map(|s| s.errors()).sum()
    }

    fn cache_entries(&self) -> Vec<Option<f64>> {
        self.scraped.iter().map(|m| m.as_ref().ok().and_then(|t| metric(t, "takumo_keys_cache_entries", &[]))).collect()
    }

    fn memory_ok(&self, opts: &Opts) -> bool {
        let growth_ok = self.rss_start.iter().zip(&self.rss_end).all(|(s, e)| match (s, e) {
            (Some(s), Some(e)) => mib(*e) - mib(*s) <= opts.max_rss_growth_mb,
            _ => false,
        });
        let cache_ok = self.cache_entries().iter().all(|c| c.is_some_and(|c| c <= opts.cache_capacity as f64));
        growth_ok && cache_ok
    }

    /// Server-side VerifyKey outcomes (both replicas) by code, as the client saw them.
    fn server_codes(&self) -> Option<[u64; 9]> {
        let mut out = [0u64; 9];
        for m in &self.scraped {
            let t = m.as_ref().ok()?;
            for (i, name) in verify_code_labels() {
                let label = format!("code=\"{name}\"");
                out[i] += metric(t, "takumo_keys_verify_outcomes_total", &[&label])? as u64;
            }
        }
        Some(out)
    }

    fn codes_match(&self) -> bool {
        self.server_codes().is_some_and(|s| s[1..] == self.client_codes[1..])
    }

    fn clean_exit(&self) -> bool {
        self.exits.iter().all(|e| e.is_some_and(|s| s.success()))
    }

    pub fn late(&self) -> u64 {
        [&self.setup, &self.warm, &self.soak, &self.post].iter().map(|s| s.late).sum()
    }

    pub fn all_met(&self, opts: &Opts) -> bool {
        self.total_errors() == 0
            && self.memory_ok(opts)
            && self.usage.equal()
            && self.codes_match()
            && self.clean_exit()
            && self.late() == 0
    }

    pub fn render(&self, opts: &Opts, total: Duration) -> String {
        let header = ResultsHeader {
            title: "Reliability results: soak",
            generator: "benches/soak.rs",
            analysis: "docs/reliability.md",
            command: bench_command("soak", "TAKUMO_SOAK_"),
            path: &opts.docs,
        };
        let mut s = header.render();
        s.push('\n');
        s.push_str(&self.verdict(opts));
        s.push_str(&self.run_section(opts, total));
        s.push_str(&self.requests_section(opts));
        s.push_str(&self.memory_section(opts));
        s.push_str(&self.usage_section());
        s.push_str(&self.server_section());
        s.push_str(&self.checks_section(opts));
        s
    }

    /// The one-line verdict under the header.
    fn verdict(&self, opts: &Opts) -> String {
        let mut s = String::new();
        let soak = &self.soak;
        let secs = self.soak_elapsed.as_secs_f64();
        let verifies = soak.combined(Kind::is_verify);
        let errors = self.total_errors();
        let memory_ok = self.memory_ok(opts);
        let usage_ok = self.usage.equal();
        let all = self.all_met(opts);
        let _ = writeln!(
            s,
            "**Verdict: {}** — {} errors in {} requests; {} verifications/s; verify p99 {}; memory {}; \
             usage counted {}.\n",
            if all { "met" } else { "not met" },
            errors,
            self.setup.requests() + self.warm.requests() + soak.requests() + self.post.requests(),
            fmt_rps(verifies.ok as f64 / secs),
            verifies.hist.percentile(0.99).map_or("–".into(), fmt_dur),
            if memory_ok { "bounded" } else { "NOT bounded" },
            if usage_ok { "exactly" } else { "WRONG" },
        );
        s
    }

    /// `## Run`: machine, servers, load generator, CPU use.
    fn run_section(&self, opts: &Opts, total: Duration) -> String {
        let mut s = String::new();
        let secs = self.soak_elapsed.as_secs_f64();
        let _ = writeln!(s, "## Run\n");
        let _ = writeln!(
            s,
            "- Machine, besides the above: {:.1} GiB RAM; PostgreSQL {} on 127.0.0.1 (TCP loopback, \
             `sslmode=disable`)",
            mem_total_gib(),
            self.pg_version
        );
        let _ = writeln!(
            s,
            "- Servers: 2 release `takumo-keys` processes on one fresh PostgreSQL database (started together: \
             migrations ran once), one pepper and service token, argon2id at the server binary's defaults ({}, \
             from `serve --help`), `TAKUMO_CACHE_CAPACITY={}`, other settings default (freshness 30 s, negative \
             TTL 30 s, usage flush every 1 s), metrics on. {} organizations on PLAN_ENTERPRISE; {} stable keys, {} \
             toggle keys, all read-only preset.",
            server_argon2_defaults(&opts.server_bin),
            opts.cache_capacity,
            opts.orgs,
            self.stable_keys,
            self.toggle_keys
        );
        let _ = writeln!(
            s,
            "- Load generator: this bench (tonic client, {} tokio threads) on the same {} CPUs as both servers and \
             PostgreSQL; {:.0} s warm-up then {:.0} s measured (wall {:.1} s); {} closed-loop VerifyKey requests in \
             flight, half per replica, over {} HTTP/2 connections per replica, mix: {}. Paced alongside, \
             alternating replicas: CreateKey {}/s (then verified on the other replica and added to the verified \
             pool, {} keys at the end), key lifecycles {}/s, toggle tasks {} (pause {} ms), ListKeys walks {}/s \
             (page size {}) each followed by GetKeyStats, wrong secrets {}/s. A change must show on the other \
             replica within {} ms. Whole run {:.0} s.",
            opts.client_threads,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            opts.warmup,
            opts.duration,
            secs,
            opts.concurrency,
            opts.connections,
            Mix::parse(&opts.mix).map_or(opts.mix.clone(), |m| m.describe()),
            opts.create_rate,
            self.pool_size,
            opts.lifecycle_rate,
            opts.toggle_workers,
            opts.toggle_pause_ms,
            opts.list_rate,
            opts.list_page_size,
            opts.wrong_secret_rate,
            opts.propagation_bound_ms,
            total.as_secs_f64()
        );
        let c = |i: usize| self.cpu.get(i).copied().flatten().map_or("?".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "- CPUs used on average over the measured run: replica 0 {}, replica 1 {}, this load generator {}, \
             everything else (PostgreSQL, …) {}. The closed-loop workers keep the machine saturated, so the \
             latencies of calls that need a store read or argon2 (creates, first sights, wrong secrets, verifies \
             right after a change) include waiting for a core behind them, not only their own work.",
            c(0),
            c(1),
            c(2),
            c(3)
        );
        if opts.duration < 30.0 {
            let _ = writeln!(s, "- **Short run** ({:.0} s): a smoke test, not a soak.", opts.duration);
        }
        s.push('\n');
        s
    }

    /// `## Requests`: each kind of call of the measured run, then the errors.
    fn requests_section(&self, opts: &Opts) -> String {
        let mut s = String::new();
        let soak = &self.soak;
        let secs = self.soak_elapsed.as_secs_f64();
        let verifies = soak.combined(Kind::is_verify);
        let mgmt = soak.combined(|k| !k.is_verify());
        let _ = writeln!(s, "## Requests (measured {:.0} s)\n", opts.duration);
        let _ = writeln!(
            s,
            "Every answer is checked for the outcome it must have; an error is any other answer (gRPC error, wrong \
             code, wrong identity, a listing out of order or missing a key, a change not visible on the other replica \
             in time). Latency of every answered call, from this client.\n"
        );
        s.push_str(
            "| requests | count | errors | per second | mean | p50 | p99 |\n|---|---:|---:|---:|---:|---:|---:|\n",
        );
        let row = |s: &mut String, label: &str, k: &KindStats, bold: bool| {
            let n = k.ok + k.errors;
            let b = if bold { "**" } else { "" };
            let errs = if k.errors > 0 { format!("**{}**", k.errors) } else { "0".into() };
            let _ = writeln!(
                s,
                "| {b}{label}{b} | {n} | {errs} | {} | {} | {} | {} |",
                fmt_rps(n as f64 / secs),
                k.hist.mean().map_or("–".into(), fmt_dur),
                k.hist.percentile(0.5).map_or("–".into(), fmt_dur),
                k.hist.percentile(0.99).map_or("–".into(), fmt_dur),
            );
        };
        for k in Kind::ALL {
            let ks = soak.kind(k);
            if ks.ok + ks.errors > 0 {
                row(&mut s, k.label(), ks, false);
            }
        }
        row(&mut s, "all VerifyKey", &verifies, true);
        row(&mut s, "all management calls", &mgmt, true);
        let _ = writeln!(
            s,
            "\nErrors outside the measured window: setup {}, warm-up {} ({} requests in {:.1} s), \
             final GetKeyStats {}. \
             ListKeys walks completed: {}. Changes checked on the other replica: {}, {} of them visible to the \
             first request sent after the change call returned; the slowest was first seen by a request sent {} \
             after it; {} answers showed the previous state meanwhile.\n",
            self.setup.errors(),
            self.warm.errors(),
            self.warm.requests(),
            self.warm_elapsed.as_secs_f64(),
            self.post.errors(),
            soak.walks,
            soak.converged,
            soak.converged_at_once,
            fmt_dur(soak.max_lag),
            soak.stale
        );
        let mut errs: Vec<&String> = Vec::new();
        for st in [&self.setup, &self.warm, soak, &self.post] {
            errs.extend(st.first_errors.iter());
        }
        if !errs.is_empty() {
            s.push_str("First errors:\n\n");
            for e in errs.iter().take(8) {
                let _ = writeln!(s, "- {e}");
            }
            s.push('\n');
        }
        s
    }

    /// `## Memory`: resident memory of each replica, its trend and the cache gauge.
    fn memory_section(&self, opts: &Opts) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Memory\n");
        let _ = writeln!(
            s,
            "Resident memory (`VmRSS` from `/proc/<pid>/status`) after the warm-up and at the end of the measured \
             run; `VmHWM` is the peak over the process's life. The cache gauge is `takumo_keys_cache_entries` \
             (verified keys cached) scraped at the end; capacity {} per process (the negative cache has the same \
             bound). Bounded means: growth ≤ {} MiB and cache entries ≤ capacity.\n",
            opts.cache_capacity, opts.max_rss_growth_mb
        );
        s.push_str(concat!(
            "| replica | RSS after boot | RSS at start (after warm-up) | RSS at end | growth | peak sampled | VmHWM \
             | trend | cache entries at end |\n",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        ));
        let cache = self.cache_entries();
        for i in 0..self.rss_start.len() {
            let f = |v: Option<u64>| v.map_or("?".into(), |kb| format!("{:.1} MiB", mib(kb)));
            let growth = match (self.rss_start[i], self.rss_end[i]) {
                (Some(a), Some(b)) => format!("{:+.1} MiB", mib(b) - mib(a)),
                _ => "?".into(),
            };
            let peak = self.samples.iter().filter_map(|(_, v)| v.get(i).copied().flatten()).max();
            let _ = writeln!(
                s,
                "| {i} | {} | {} | {} | {growth} | {} | {} | {} | {} |",
                f(self.rss_boot[i]),
                f(self.rss_start[i]),
                f(self.rss_end[i]),
                f(peak),
                f(self.hwm[i]),
                self.slope(i).map_or("?".into(), |m| format!("{m:+.2} MiB/min")),
                cache.get(i).copied().flatten().map_or("?".into(), |c| format!("{c:.0} / {}", opts.cache_capacity)),
            );
        }
        let _ = writeln!(
            s,
            "\nTrend: least-squares slope of the samples over the measured run (every {:.0} s). Samples, MiB: {}\n",
            opts.sample_secs,
            (0..self.rss_start.len())
                .map(|i| format!(
                    "replica {i}: {}",
                    self.samples
                        .iter()
                        .map(|(_, v)| v.get(i).copied().flatten().map_or("?".into(), |kb| format!("{:.1}", mib(kb))))
                        .collect::<Vec<_>>()
                        .join(" ")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        s
    }

    /// `## Usage counting`: accepted verifications against `api_calls_24h`.
    fn usage_section(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Usage counting\n");
        let _ = writeln!(
            s,
            "Accepted verifications (VALID answers: refusals such as DISABLED or INSUFFICIENT_SCOPE are not API \
             calls), counted by this client from the \
             answers over the whole run (setup and warm-up included), against `api_calls_24h` from GetKeyStats, \
             read {:.1} s after the load stopped{}.\n",
            (USAGE_FLUSH_INTERVAL * 2 + Duration::from_millis(500)).as_secs_f64(),
            if self.usage.settled_after > Duration::from_millis(100) {
                format!(" and re-read until equal or 10 s ({:.1} s)", self.usage.settled_after.as_secs_f64())
            } else {
                String::new()
            }
        );
        s.push_str(concat!(
            "| organization | VALID verifications (client) | `api_calls_24h` (server) | equal |\n",
            "|---|---:|---:|---|\n"
        ));
        for (i, org) in self.usage.orgs.iter().enumerate() {
            let stored = self.usage.stored.get(i).copied().flatten();
            let first = self.usage.first.get(i).copied().flatten();
            let shown = match (first, stored) {
                (Some(a), Some(b)) if a != b => format!("{b} (first read {a})"),
                (_, Some(b)) => b.to_string(),
                _ => "?".into(),
            };
            let eq = stored == Some(self.usage.client[i] as i64);
            let _ =
                writeln!(s, "| {org} | {} | {shown} | {} |", self.usage.client[i], if eq { "yes" } else { "**no**" });
        }
        if self.usage.other > 0 {
            let _ =
                writeln!(s, "\n**{} resolved answers named an organization the soak never used.**", self.usage.other);
        }
        s.push('\n');
        s
    }

    /// `## Server side`: outcome counts, the servers' metrics, exits and logs.
    fn server_section(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Server side\n");
        let server = self.server_codes();
        s.push_str(
            "| VerifyKey outcome | client saw | servers counted (`verify_outcomes_total`, both) |\n|---|---:|---:|\n",
        );
        for (i, name) in verify_code_labels() {
            let sv = server.map_or("?".into(), |c| c[i].to_string());
            if self.client_codes[i] > 0 || server.is_some_and(|c| c[i] > 0) {
                let _ = writeln!(s, "| {name} | {} | {sv} |", self.client_codes[i]);
            }
        }
        let mut non_ok = BTreeMap::new();
        let mut extra = Vec::new();
        for (i, m) in self.scraped.iter().enumerate() {
            match m {
                Ok(t) => {
                    non_ok_rpcs(t, &mut non_ok);
                    let g = |n: &str| metric(t, n, &[]).map_or("?".into(), |v| format!("{v:.0}"));
                    extra.push(format!(
                        "replica {i}: VerifyKey answered {}, argon2 verifications {}, argon2 rejected {}, \
                         cache hits {}, misses {}, refreshes {}, negative hits {}, invalidations {}, \
                         cache resets {}, usage flush failures {}",
                        g("takumo_keys_verify_outcomes_total"),
                        g("takumo_keys_argon2_verifications_total"),
                        g("takumo_keys_argon2_rejected_total"),
                        g("takumo_keys_cache_hits_total"),
                        g("takumo_keys_cache_misses_total"),
                        g("takumo_keys_cache_refreshes_total"),
                        g("takumo_keys_negative_cache_hits_total"),
                        g("takumo_keys_cache_invalidations_total"),
                        g("takumo_keys_cache_resets_total"),
                        g("takumo_keys_usage_flush_failures_total"),
                    ));
                }
                Err(e) => extra.push(format!("replica {i}: metrics scrape failed: {e}")),
            }
        }
        s.push('\n');
        for e in &extra {
            let _ = writeln!(s, "- {e}");
        }
        if non_ok.is_empty() {
            s.push_str("- Non-OK gRPC answers: none.\n");
        } else {
            let list: Vec<String> = non_ok.iter().map(|(k, v)| format!("{k}: {v:.0}")).collect();
            let _ = writeln!(
                s,
                "- Non-OK gRPC answers (expected: the refused re-enable and the deleted-key calls): {}",
                list.join("; ")
            );
        }
        let exits: Vec<String> =
            self.exits.iter().map(|e| e.map_or("killed after 25 s".into(), |s| s.to_string())).collect();
        let _ = writeln!(s, "- SIGTERM at the end: {}", exits.join(", "));
        for (i, log) in self.logs.iter().enumerate() {
            let bad: Vec<&str> = warn_lines(log).collect();
            if bad.is_empty() {
                let _ = writeln!(s, "- replica {i} log: no WARN or ERROR lines");
            } else {
                let _ = writeln!(s, "- replica {i} log: {} WARN/ERROR lines, e.g. `{}`", bad.len(), bad[0].trim());
            }
        }
        s.push('\n');
        s
    }

    /// `## Checks`: each check and whether it was met.
    fn checks_section(&self, opts: &Opts) -> String {
        let mut s = String::new();
        let soak = &self.soak;
        let errors = self.total_errors();
        let memory_ok = self.memory_ok(opts);
        let usage_ok = self.usage.equal();
        let codes_ok = self.codes_match();
        let exit_ok = self.clean_exit();
        let met = |ok: bool| if ok { "met" } else { "**not met**" };
        let cache = self.cache_entries();
        let _ = writeln!(s, "## Checks\n");
        s.push_str("| check | result |\n|---|---|\n");
        let _ = writeln!(s, "| errors = 0 (setup, warm-up, measured, final reads) | {} ({errors}) |", met(errors == 0));
        let growth: Vec<String> = self
            .rss_start
            .iter()
            .zip(&self.rss_end)
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => format!("{:+.1} MiB", mib(*b) - mib(*a)),
                _ => "?".into(),
            })
            .collect();
        let cache_txt: Vec<String> = cache.iter().map(|c| c.map_or("?".into(), |c| format!("{c:.0}"))).collect();
        let _ = writeln!(
            s,
            "| memory bounded: RSS growth ≤ {} MiB per server, cache entries ≤ {} | {} (growth {}; entries {}) |",
            opts.max_rss_growth_mb,
            opts.cache_capacity,
            met(memory_ok),
            growth.join(", "),
            cache_txt.join(", ")
        );
        let _ = writeln!(
            s,
            "| stored `api_calls_24h` = accepted (VALID) verifications, per organization | {} ({} vs {}) |",
            met(usage_ok),
            self.usage.stored.iter().map(|v| v.map_or("?".into(), |v| v.to_string())).collect::<Vec<_>>().join("/"),
            self.usage.client.iter().map(u64::to_string).collect::<Vec<_>>().join("/")
        );
        let _ = writeln!(s, "| servers' VerifyKey outcome counts = the client's | {} |", met(codes_ok));
        let _ = writeln!(
            s,
            "| changes visible on the other replica within {} ms | {} (slowest {}; {} late) |",
            opts.propagation_bound_ms,
            met(self.late() == 0),
            fmt_dur(soak.max_lag.max(self.warm.max_lag)),
            self.late()
        );
        let _ = writeln!(s, "| both servers exit 0 on SIGTERM | {} |", met(exit_ok));
        s
    }

    /// Least-squares slope of replica `i`'s sampled RSS, MiB per minute.
    fn slope(&self, i: usize) -> Option<f64> {
        let pts: Vec<(f64, f64)> =
            self.samples.iter().filter_map(|(t, v)| v.get(i).copied().flatten().map(|kb| (*t, mib(kb)))).collect();
        if pts.len() < 3 {
            return None;
        }
        let n = pts.len() as f64;
        let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
        let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        (sxx > 0.0).then(|| sxy / sxx * 60.0)
    }
}

/// Every VerifyKey code but UNSPECIFIED, with its metric label, by wire number
/// (the index the client-side tallies use).
fn verify_code_labels() -> impl Iterator<Item = (usize, &'static str)> {
    (1..9).filter_map(|i| {
        let code = takumo_keys::proto::pb::VerifyCode::try_from(i as i32).ok()?;
        Some((i, takumo_keys::verify::code_label(code)))
    })
}
