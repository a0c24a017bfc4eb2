//! A PostgreSQL server of the test's own (initdb + pg_ctl into a temporary
//! directory, on a free port), so fault tests can stop, kill and restart it
//! without touching the shared server.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

fn postgres_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (Debian's postgresql package)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("initdb under /usr/lib/postgresql/*/bin")
}

/// initdb refuses to run as root: run the server tools as `postgres` then.
fn as_postgres(bin: &Path, tool: &str) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl PgCluster {
    pub fn start() -> Self {
        let bin = postgres_bin();
        let dir = tempfile::Builder::new().prefix("takumo-pg-").tempdir().unwrap();
        // The server runs as postgres: let it into the directory.
        run(
            {
                let mut c = Command::new("chmod");
                c.arg("0777").arg(dir.path());
                c
            },
            "chmod",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let me = Self { dir, bin, port };
        let mut init = as_postgres(&me.bin, "initdb");
        init.args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(me.data());
        run(init, "initdb");
        me.pg_ctl_start();
        me
    }

    /// A hot standby of `primary`, streaming from it (`pg_basebackup -R`),
    /// that replays each transaction only `apply_delay` after its commit
    /// (`recovery_min_apply_delay`), so lag is deterministic.
    pub fn standby_of(primary: &PgCluster, apply_delay: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("takumo-pg-standby-").tempdir().unwrap();
        run(
            {
                let mut c = Command::new("chmod");
                c.arg("0777").arg(dir.path());
                c
            },
            "chmod",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let me = Self { dir, bin: primary.bin.clone(), port };
        let mut base = as_postgres(&me.bin, "pg_basebackup");
        base.args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres", "-R", "-X", "stream", "-D"])
            .arg(me.data());
        run(base, "pg_basebackup");
        let conf = me.data().join("postgresql.auto.conf");
        let mut auto = std::fs::read_to_string(&conf).unwrap();
        auto.push_str(&format!("hot_standby = on\nrecovery_min_apply_delay = '{apply_delay}'\n"));
        std::fs::write(&conf, auto).unwrap();
        me.pg_ctl_start();
        me
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `synchronous_commit = off` is for speed, and also a setting production
    /// primaries use: with it a commit returns before its WAL is written,
    /// which the standby's barrier must allow for (the standby tests failed
    /// when it was taken from the write position).
    fn pg_ctl_start(&self) {
        let mut c = as_postgres(&self.bin, "pg_ctl");
        c.args(["-w", "-t", "30", "-D"]).arg(self.data()).arg("-l").arg(self.dir.path().join("log")).arg("-o").arg(
            format!(
                "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off",
                self.port,
                self.dir.path().display()
            ),
        );
        c.arg("start");
        run(c, "pg_ctl start");
    }

    /// `postgres://` URL of a database on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }

    /// Fast shutdown: sessions are ended, the server is gone until `restart`.
    pub fn stop(&self) {
        let mut c = as_postgres(&self.bin, "pg_ctl");
        c.args(["-w", "-m", "fast", "-D"]).arg(self.data()).arg("stop");
        run(c, "pg_ctl stop");
    }

    pub fn restart(&self) {
        self.pg_ctl_start();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut c = as_postgres(&self.bin, "pg_ctl");
        c.args(["-m", "immediate", "-D"]).arg(self.data()).arg("stop");
        let _ = c.output();
    }
}
