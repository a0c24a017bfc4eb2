//! Helpers both benchmark binaries use (`verify` and `soak`): machine
//! facts for the reports, formatting, ports, signals, a throwaway database.

use std::{
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
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
