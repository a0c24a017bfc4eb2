//! A throwaway PostgreSQL database for one run, made and dropped with `psql`.

use std::process::{Command, Stdio};

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
