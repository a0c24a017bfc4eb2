//! A throwaway PostgreSQL database, created on a server and dropped (forcibly)
//! with its guard. Shared with the integration tests (`tests/common` includes
//! this file), so both make and clean up databases the same way.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// Runs one statement on the server's maintenance database at `admin_url`.
/// From any context, inside a runtime or not: it runs on a thread of its own.
pub fn admin_execute(admin_url: &str, sql: String) -> Result<(), String> {
    use sqlx::Connection;
    let admin = admin_url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut conn = sqlx::PgConnection::connect(&admin).await.map_err(|e| e.to_string())?;
            // The caller builds the statement from names it chose (letters, digits, `_`).
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.map_err(|e| e.to_string())?;
            Ok(())
        })
    })
    .join()
    .map_err(|_| "the admin thread panicked".to_owned())?
}

/// `url` with its database path replaced by `name`, query string kept.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..].find('/').map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

pub struct PgDatabase {
    admin: String,
    name: String,
}

impl PgDatabase {
    /// Creates `<prefix>_<pid>_<millis>_<n>` on the server `admin_url` names
    /// (unique across processes and across databases made in one millisecond).
    pub fn create_on(admin_url: &str, prefix: &str) -> Result<Self, String> {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}_{}_{millis}_{n}", std::process::id());
        admin_execute(admin_url, format!("CREATE DATABASE {name}"))?;
        Ok(PgDatabase { admin: admin_url.to_owned(), name })
    }

    /// [`Self::create_on`] the server at `host:port` as `user` (trust auth).
    pub fn create(prefix: &str, host: &str, port: u16, user: &str) -> Self {
        let admin = format!("postgres://{user}@{host}:{port}/postgres?sslmode=disable");
        Self::create_on(&admin, prefix).unwrap_or_else(|e| panic!("cannot create a database on {host}:{port}: {e}"))
    }

    /// URL of the database on its own server.
    pub fn url(&self) -> String {
        with_database(&self.admin, &self.name)
    }

    /// URL of the database reached through another address (a proxy).
    pub fn url_via(&self, host: &str, port: u16) -> String {
        let options: sqlx::postgres::PgConnectOptions = self.admin.parse().expect("the admin URL parsed before");
        format!("postgres://{}@{host}:{port}/{}?sslmode=disable", options.get_username(), self.name)
    }

    /// Runs SQL against the `postgres` maintenance database with `psql`.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .arg(&self.admin)
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql `{sql}` failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = admin_execute(&self.admin, format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}
