//! Helpers both benchmark binaries use (`verify` and `soak`): machine
//! facts and the header of the results files, formatting, ports, signals, a
//! throwaway database, metrics scraping, and the `h2load` runner.
//!
//! Each bench compiles this module on its own and uses only part of it (the
//! soak drives no `h2load`), so unused-item warnings are silenced here
//! rather than item by item.
#![allow(dead_code)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else if us < 100_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else if us < 1_000_000.0 {
        format!("{:.0} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

pub fn fmt_rps(r: f64) -> String {
    if r >= 100.0 { format!("{r:.0}") } else { format!("{r:.1}") }
}

pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

pub async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub fn shell(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------
// Results files: generated, owned by one bench, rewritten whole on each run.
// The hand-written analysis lives in a separate file that no program writes,
// so a run can never lose it, and the analysis can name the results it is about.

/// `git rev-parse --short HEAD`, plus `-dirty` when tracked files differ from
/// it, plus which top-level paths differ. `own` (the results file being
/// written) is left out: a previous run's output does not make the tree dirty.
pub fn git_commit(own: &Path) -> String {
    let head = shell(&["git", "rev-parse", "--short", "HEAD"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut args = vec!["git".to_owned(), "status".into(), "--porcelain".into(), "--untracked-files=no".into()];
    args.extend(["--".into(), ".".into()]);
    // A pathspec outside the repository is an error, so only a results file inside it is excluded.
    if let Ok(rel) = own.strip_prefix(root) {
        args.push(format!(":(exclude){}", rel.display()));
    }
    let status = shell(&args.iter().map(String::as_str).collect::<Vec<_>>());
    if status == "?" {
        return format!("{head} (could not tell whether the tree is dirty)");
    }
    if status.is_empty() {
        return head;
    }
    // `XY path` (or `XY old -> new`); keep the first path component.
    let mut tops: Vec<&str> =
        status.lines().filter_map(|l| l.split_whitespace().last()).map(|p| p.split('/').next().unwrap_or(p)).collect();
    tops.sort_unstable();
    tops.dedup();
    format!("{head}-dirty (uncommitted changes in {})", tops.join(", "))
}

/// `N CPUs (nproc), <model>; Linux <release>`.
pub fn machine() -> String {
    format!(
        "{} CPUs (nproc), {}; Linux {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        shell(&["uname", "-r"])
    )
}

/// The command that reproduces this run: the bench's own flags, and any of
/// its environment variables (`env_prefix`, e.g. `TAKUMO_BENCH_`) that were set.
pub fn bench_command(bench: &str, env_prefix: &str) -> String {
    let mut env: Vec<String> =
        std::env::vars().filter(|(k, _)| k.starts_with(env_prefix)).map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    let argv: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut cmd = env.join(" ");
    if !cmd.is_empty() {
        cmd.push(' ');
    }
    cmd.push_str(&format!("cargo bench --bench {bench}"));
    if !argv.is_empty() {
        cmd.push_str(" -- ");
        cmd.push_str(&argv.join(" "));
    }
    cmd
}

/// What every results file starts with.
pub struct ResultsHeader<'a> {
    pub title: &'a str,
    /// `benches/verify.rs`
    pub generator: &'a str,
    /// `docs/performance.md`: where the hand-written analysis is.
    pub analysis: &'a str,
    pub command: String,
    /// The file being written (left out of the dirty check).
    pub path: &'a Path,
}

impl ResultsHeader<'_> {
    pub fn render(&self) -> String {
        format!(
            "# {}\n\nGenerated by `{}` and rewritten whole on each run: do not edit by hand. The analysis of \
             these figures is hand-written in [{}]({}); no program writes that file.\n\n\
             - Command: `{}`\n- Commit: {}\n- Machine: {}\n- Date: {}\n",
            self.title,
            self.generator,
            self.analysis,
            Path::new(self.analysis).file_name().map_or(self.analysis.into(), |f| f.to_string_lossy()),
            self.command,
            git_commit(self.path),
            machine(),
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        )
    }
}

/// Writes a results file whole (creating its directory).
pub fn write_results(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the results directory");
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    eprintln!("wrote {}", path.display());
}

/// The argon2id parameters the server uses by default, read from its
/// `serve --help` (`m=… KiB, t=…, p=…`), so that the results name what was
/// measured without the bench fixing or assuming them.
pub fn server_argon2_defaults(server_bin: &Path) -> String {
    let help = Command::new(server_bin)
        .args(["serve", "--help"])
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // clap prints the flag, its doc, then `[env: …] [default: N]` for each option.
    let default_of = |flag: &str| -> String {
        let Some(at) = help.find(flag) else { return "?".into() };
        let rest = &help[at..];
        let end = rest[flag.len()..].find("\n  -").map_or(rest.len(), |i| i + flag.len());
        rest[..end]
            .split("[default: ")
            .nth(1)
            .and_then(|d| d.split(']').next())
            .map_or("?".into(), |d| d.trim().to_owned())
    };
    format!(
        "m={} KiB, t={}, p={}",
        default_of("--argon2-memory-kib"),
        default_of("--argon2-iterations"),
        default_of("--argon2-parallelism")
    )
}

// ---------------------------------------------------------------------------
// A throwaway PostgreSQL database.

/// A fresh PostgreSQL database for one run, made and dropped with `psql`.
pub struct PgDatabase {
    host: String,
    port: u16,
    user: String,
    name: String,
}

impl PgDatabase {
    /// Creates `<prefix>_<pid>_<millis>` on the server at `host:port`.
    pub fn create(prefix: &str, host: &str, port: u16, user: &str) -> Self {
        let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let db = PgDatabase {
            host: host.to_owned(),
            port,
            user: user.to_owned(),
            name: format!("{prefix}_{}_{millis}", std::process::id()),
        };
        db.psql(&format!("CREATE DATABASE {}", db.name));
        db
    }

    /// URL of the database on its own server.
    pub fn url(&self) -> String {
        self.url_via(&self.host, self.port)
    }

    /// URL of the database reached through another address (a proxy).
    pub fn url_via(&self, host: &str, port: u16) -> String {
        format!("postgres://{}@{host}:{port}/{}?sslmode=disable", self.user, self.name)
    }

    fn psql_command(&self) -> Command {
        let mut cmd = Command::new("psql");
        cmd.args(["-h", &self.host, "-p", &self.port.to_string(), "-U", &self.user, "-d", "postgres"])
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs SQL against the `postgres` maintenance database.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.psql_command().args(["-v", "ON_ERROR_STOP=1", "-Atc", sql]).output().expect("run psql");
        assert!(out.status.success(), "psql `{sql}` failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = self
            .psql_command()
            .args(["-qAtc", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------
// The server's Prometheus endpoint.

/// `GET /metrics` over plain HTTP/1.1.
pub fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_owned());
    }
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(body.to_owned());
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((len, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).map_err(|_| "bad chunk")?;
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    Ok(out)
}

/// Sum of the samples of `name` whose labels contain every `filter` string;
/// `None` when the server does not export `name` (an older build).
pub fn metric(text: &str, name: &str, filter: &[&str]) -> Option<f64> {
    let mut sum = None;
    for (series, value) in text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.rsplit_once(' ')) {
        let (n, labels) = series.split_at(series.find('{').unwrap_or(series.len()));
        if n == name && filter.iter().all(|f| labels.contains(f)) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

// ---------------------------------------------------------------------------
// h2load: the load generator for throughput ratios. A tonic client on the
// same cores costs about as much CPU per request as the server and flatters
// ratios; h2load (one C thread) costs far less, so the server is the
// bottleneck. It sends one body with one set of headers per run, and counts
// an HTTP 200 as success whatever the gRPC status in the trailers says: the
// caller must check each target's answer some other way (see `nghttp_grpc_status`).

/// The 5-byte gRPC frame header (uncompressed, big-endian length) and the message.
pub fn grpc_frame(msg: &impl prost::Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).expect("message under 4 GiB").to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// One gRPC call h2load repeats: URL, headers and the framed body on disk.
#[derive(Clone, Debug)]
pub struct GrpcTarget {
    pub url: String,
    /// `name: value` headers besides the ones every gRPC call needs.
    pub headers: Vec<String>,
    pub body_file: PathBuf,
}

impl GrpcTarget {
    /// Writes `frame` to `dir/<file>` and targets `http://addr/<path>` with
    /// `authorization: <authorization>`.
    pub fn new(addr: SocketAddr, path: &str, authorization: &str, frame: &[u8], dir: &Path, file: &str) -> Self {
        let body_file = dir.join(file);
        std::fs::write(&body_file, frame).expect("write the h2load body file");
        GrpcTarget {
            url: format!("http://{addr}{path}"),
            headers: vec![
                "content-type: application/grpc".into(),
                "te: trailers".into(),
                format!("authorization: {authorization}"),
            ],
            body_file,
        }
    }

    /// The value of header `name`, as sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| h.split_once(": ").filter(|(n, _)| *n == name).map(|(_, v)| v))
    }

    fn header_args(&self) -> Vec<String> {
        self.headers.iter().flat_map(|h| ["-H".to_owned(), h.clone()]).collect()
    }
}

#[derive(Clone, Debug)]
pub struct H2load {
    pub bin: PathBuf,
    pub connections: usize,
    pub streams: usize,
}

/// What one or more h2load runs reported.
#[derive(Clone, Debug, Default)]
pub struct H2loadRun {
    pub succeeded: u64,
    /// `failed + errored + timeout`, and every non-2xx status.
    pub failed: u64,
    /// Measured time, summed over runs.
    pub secs: f64,
    /// Mean request time, weighted by requests.
    pub mean_us: f64,
    /// Response DATA bytes (gRPC messages), summed: 0 for trailers-only answers.
    pub data_bytes: u64,
    pub runs: u32,
}

impl H2loadRun {
    pub fn rps(&self) -> f64 {
        self.succeeded as f64 / self.secs.max(1e-9)
    }

    pub fn merge(&mut self, o: &H2loadRun) {
        let n = self.succeeded + o.succeeded;
        if n > 0 {
            self.mean_us = (self.mean_us * self.succeeded as f64 + o.mean_us * o.succeeded as f64) / n as f64;
        }
        self.succeeded = n;
        self.failed += o.failed;
        self.secs += o.secs;
        self.data_bytes += o.data_bytes;
        self.runs += o.runs;
    }

    /// Parses h2load's summary (nghttp2 1.4x–1.6x format).
    pub fn parse(out: &str) -> Result<H2loadRun, String> {
        let line = |prefix: &str| {
            out.lines().map(str::trim).find(|l| l.starts_with(prefix)).ok_or_else(|| format!("no `{prefix}` line"))
        };
        // `finished in 5.00s, 120000.00 req/s, 7.50MB/s`
        // The wall time includes stopping the clients; req/s is over the main duration alone.
        let finished = line("finished in")?;
        let mut parts = finished.trim_start_matches("finished in").split(',').map(str::trim);
        let wall = parts.next().and_then(parse_h2load_duration).ok_or_else(|| format!("cannot read `{finished}`"))?;
        let reported_rps = parts.next().and_then(|r| r.strip_suffix(" req/s")?.parse::<f64>().ok()).unwrap_or(0.0);
        // `requests: 600000 total, 600256 started, 600000 done, 600000 succeeded, 0 failed, 0 errored, 0 timeout`
        let requests = line("requests:")?;
        let count = |what: &str| -> u64 {
            requests
                .split(',')
                .find(|p| p.trim().ends_with(what))
                .and_then(|p| p.split_whitespace().rev().nth(1))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        // `status codes: 600000 2xx, 0 3xx, 0 4xx, 0 5xx`
        let codes = line("status codes:")?;
        let non_2xx: u64 = codes
            .trim_start_matches("status codes:")
            .split(',')
            .filter(|p| !p.trim().ends_with("2xx"))
            .filter_map(|p| p.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        // `traffic: 30.52MB (32000000) total, 1.14MB (1200000) headers (space savings 95.00%), 11.44MB (12000000) data`
        let data_bytes = line("traffic:")
            .ok()
            .and_then(|t| t.split(',').find(|p| p.trim().ends_with("data")))
            .and_then(|p| p.split('(').nth(1)?.split(')').next()?.parse().ok())
            .unwrap_or(0);
        // `time for request:  1.00ms  50.00ms  2.00ms  1.00ms  70.00%`: min, max, mean, sd, ±sd
        let mean_us = line("time for request:")
            .ok()
            .and_then(|l| l.trim_start_matches("time for request:").split_whitespace().nth(2))
            .and_then(parse_h2load_duration)
            .map_or(0.0, |s| s * 1e6);
        let succeeded = count("succeeded");
        let done = count("done");
        let secs = if reported_rps > 0.0 && done > 0 { done as f64 / reported_rps } else { wall };
        Ok(H2loadRun {
            succeeded: succeeded.saturating_sub(non_2xx),
            failed: count("failed") + count("errored") + count("timeout") + non_2xx,
            secs,
            mean_us,
            data_bytes,
            runs: 1,
        })
    }
}

/// `5.00s`, `12.5ms`, `830us`, `1.2m` (h2load's units), in seconds.
fn parse_h2load_duration(s: &str) -> Option<f64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "ns" => n / 1e9,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    })
}

impl H2load {
    /// `h2load --version`, or an error naming the package to install.
    pub fn version(&self) -> Result<String, String> {
        let out = Command::new(&self.bin).arg("--version").stdin(Stdio::null()).output().map_err(|e| {
            format!("cannot run `{}` ({e}): install it with `apt-get install -y nghttp2-client`", self.bin.display())
        })?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `h2load -c C -m M -t 1 -D <dur>` against `target`: one client thread,
    /// C × M requests in flight, for `dur` (no warm-up inside the run, so that
    /// whatever CPU the caller measures around it belongs to the counted requests).
    pub fn run(&self, target: &GrpcTarget, dur: Duration) -> Result<H2loadRun, String> {
        let ms = dur.as_millis().max(1);
        let out = Command::new(&self.bin)
            .args(["-c", &self.connections.to_string(), "-m", &self.streams.to_string(), "-t", "1"])
            .args(["-D", &format!("{ms}ms")])
            .arg("-d")
            .arg(&target.body_file)
            .args(target.header_args())
            .arg(&target.url)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run h2load: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("h2load exited with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
        }
        H2loadRun::parse(&stdout).map_err(|e| format!("h2load output: {e}:\n{stdout}"))
    }

    /// Runs `target` back to back in `chunk`-long runs on a thread of its own
    /// until `stop`, for a background load whose end is not known in advance.
    pub fn run_until(&self, target: &GrpcTarget, chunk: Duration, stop: Arc<AtomicBool>) -> H2loadLoop {
        let (h2load, target) = (self.clone(), target.clone());
        let thread = std::thread::Builder::new()
            .name("h2load-loop".into())
            .spawn(move || {
                let mut total = H2loadRun::default();
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match h2load.run(&target, chunk) {
                        Ok(r) => total.merge(&r),
                        Err(e) => {
                            errors.push(e);
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
                (total, errors)
            })
            .expect("spawn the h2load thread");
        H2loadLoop { thread }
    }
}

pub struct H2loadLoop {
    thread: JoinHandle<(H2loadRun, Vec<String>)>,
}

impl H2loadLoop {
    /// Waits for the run in progress to end (at most one chunk).
    pub fn join(self) -> (H2loadRun, Vec<String>) {
        self.thread.join().expect("h2load thread panicked")
    }
}

/// The gRPC status of one call of `target`, sent with `nghttp` from the
/// same body file and headers h2load uses: `(grpc-status, grpc-message)`.
/// h2load cannot see it, so this is what makes its figure trustworthy.
pub fn nghttp_grpc_status(target: &GrpcTarget) -> Result<(i32, String), String> {
    let out = Command::new("nghttp")
        .args(["-v", "-n", "-d"])
        .arg(&target.body_file)
        .args(target.header_args())
        .arg(&target.url)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run nghttp ({e}): install it with `apt-get install -y nghttp2-client`"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `-v` prints every received header and trailer as `[  0.002] recv (stream_id=13) grpc-status: 0`.
    let field = |name: &str| {
        text.lines().filter(|l| l.contains("recv")).find_map(|l| {
            let (_, rest) = l.split_once(") ")?;
            rest.strip_prefix(name)?.strip_prefix(": ").map(|v| v.trim().to_owned())
        })
    };
    let status = field("grpc-status").ok_or_else(|| {
        format!(
            "no grpc-status in nghttp's answer (exit {}): {}",
            out.status,
            text.lines()
                .filter(|l| l.contains(":status") || l.contains("recv"))
                .take(5)
                .collect::<Vec<_>>()
                .join(" / ")
        )
    })?;
    let status = status.parse().map_err(|_| format!("grpc-status `{status}` is not a number"))?;
    Ok((status, field("grpc-message").unwrap_or_default()))
}

/// `cargo bench` builds the server binary; a custom `--server-bin` may not exist yet.
pub fn ensure_server_built(server_bin: &std::path::Path) {
    if server_bin.exists() {
        return;
    }
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "takumo-keys"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --release failed");
}
