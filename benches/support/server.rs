//! The server under test as a child process: making sure the binary is built,
//! its environment (only the caller's settings), starting it, waiting until it
//! answers health, stopping or killing it; and the bench's own ports and signals.
//! Shared with the integration tests (`tests/common` includes this file): their
//! `ServerProcess` starts, probes and stops the server with the same functions.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};
use tonic::transport::Endpoint;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// `cargo bench` builds the server binary; a custom `--server-bin` may not exist yet.
pub fn ensure_server_built(server_bin: &Path) {
    if server_bin.exists() {
        return;
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "takumo-keys"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --release failed");
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

/// A port on 127.0.0.1 that was free a moment ago (bound, then released).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The server binary with only the bench's settings: any TAKUMO_* / OTEL_* /
/// DATABASE_URL / RUST_LOG of the caller is dropped, so that the server
/// defaults are what is measured, then `env` is set.
pub fn server_command(server_bin: &Path, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(server_bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("TAKUMO_") || k.starts_with("OTEL_") || k == "DATABASE_URL" || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// Whether the server at `addr` answers gRPC health with SERVING.
pub async fn serving(addr: SocketAddr) -> bool {
    let Ok(ch) = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint").connect().await else {
        return false;
    };
    let r = HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await;
    r.is_ok_and(|r| r.get_ref().status() == ServingStatus::Serving)
}

/// Polls [`serving`] every `every` until it holds (true) or `limit` passes (false).
pub async fn wait_serving(addr: SocketAddr, limit: Duration, every: Duration) -> bool {
    let give_up = Instant::now() + limit;
    while !serving(addr).await {
        if Instant::now() >= give_up {
            return false;
        }
        tokio::time::sleep(every).await;
    }
    true
}

/// SIGTERM to a child, as an orchestrator stopping a pod would.
pub fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child's pid, which we have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

/// One server process (`serve`); stopped on drop, panics included.
pub struct Server {
    child: Option<Child>,
    log: PathBuf,
    pid: u32,
    /// The gRPC address (`TAKUMO_LISTEN`).
    pub addr: SocketAddr,
    /// The metrics address (`TAKUMO_METRICS_LISTEN`).
    pub metrics: SocketAddr,
}

impl Server {
    /// Starts `serve` with `env` (see [`server_command`]), listening on `addr`
    /// with metrics on `metrics`, its stderr written to `log`.
    pub fn start(
        server_bin: &Path,
        env: &[(String, String)],
        log: &Path,
        addr: SocketAddr,
        metrics: SocketAddr,
    ) -> Self {
        let log_file = std::fs::File::create(log).expect("server log file");
        let mut cmd = server_command(server_bin, env);
        cmd.env("TAKUMO_LISTEN", addr.to_string()).env("TAKUMO_METRICS_LISTEN", metrics.to_string());
        // SAFETY: prctl is async-signal-safe; the child gets SIGTERM if this process dies
        // without running its destructors (e.g. SIGKILL), so no server outlives the bench.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start takumo-keys");
        let pid = child.id();
        Server { child: Some(child), log: log.to_owned(), pid, addr, metrics }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits (up to 60 s) until the server answers health with SERVING.
    pub async fn wait_ready(&self) {
        // Short polls: verify's restart phase times the first SERVING answer with it.
        if !wait_serving(self.addr, Duration::from_secs(60), Duration::from_millis(5)).await {
            panic!("server did not become SERVING in 60 s; log:\n{}", self.read_log());
        }
    }

    pub fn read_log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// SIGKILL, as a crash or an OOM kill would: no graceful shutdown, no final usage flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, unless the process has already exited.
    pub fn signal_term(&mut self) {
        if let Some(c) = &mut self.child
            && !matches!(c.try_wait(), Ok(Some(_)))
        {
            sigterm(c);
        }
    }

    /// Waits for the process to exit (after [`Server::signal_term`]), killing
    /// it after `grace`: its exit status, `None` when it had to be killed.
    pub fn reap(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let give_up = Instant::now() + grace;
        while Instant::now() < give_up {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s) and returns its log.
    pub fn stop(mut self) -> String {
        self.signal_term();
        self.reap(Duration::from_secs(5));
        self.read_log()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal_term();
            self.reap(Duration::from_secs(5));
        }
    }
}

/// SIGTERM to every server, then wait for each: the exit status (None: killed after `grace`).
pub fn stop_all(servers: &mut [Server], grace: Duration) -> Vec<Option<ExitStatus>> {
    servers.iter_mut().for_each(Server::signal_term);
    servers.iter_mut().map(|s| s.reap(grace)).collect()
}

/// The WARN and ERROR lines of a server log.
pub fn warn_lines(log: &str) -> impl Iterator<Item = &str> {
    log.lines().filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
}
