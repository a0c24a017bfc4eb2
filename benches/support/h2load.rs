//! h2load: the load generator for throughput ratios. A tonic client on the
//! same cores costs about as much CPU per request as the server and flatters
//! ratios; h2load (one C thread) costs far less, so the server is the
//! bottleneck. It sends one body with one set of headers per run, and counts
//! an HTTP 200 as success whatever the gRPC status in the trailers says: the
//! caller must check each target's answer some other way (see `nghttp_grpc_status`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

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
