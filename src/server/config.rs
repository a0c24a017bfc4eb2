//! Command line and environment. Every flag has a `TAKUMO_*` variable
//! (the database keeps the conventional `DATABASE_URL`); each default has one
//! source: the constants below for what only the process knows, and the
//! `Default` of the layer's own settings type (`StoreOptions`,
//! `CacheSettings`, `HashParams`) for the rest. Secret-bearing values are `SecretString`, and
//! `hide_env_values` keeps them out of `--help`.

use crate::{
    domain::model::{LeakAction, Plan},
    domain::secret::SecretString,
    store::StoreOptions,
    verify::cache::CacheSettings,
    verify::hashing::HashParams,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://takumo-keys.db";
pub const DEFAULT_USAGE_FLUSH_MS: u64 = 1_000;
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 20_000;

#[derive(Debug, Parser)]
#[command(name = "takumo-keys", version, about = "Issues and verifies Takumo API keys over gRPC")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `takumo-keys` alone is `takumo-keys serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (the default).
    Serve(Box<ServeArgs>),
    /// Write a first organization-preset key straight to the store and print it once.
    Bootstrap(Box<BootstrapArgs>),
    /// Exit 0 when the server at `--addr` reports SERVING (for container health checks).
    Health(HealthArgs),
    /// Bring the database schema up to date and exit (`serve` also does this at start).
    Migrate(MigrateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The database to migrate: postgres://… or sqlite://….
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: SecretString,
}

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// gRPC address of the server to check.
    #[arg(long, env = "TAKUMO_LISTEN", default_value = DEFAULT_LISTEN)]
    pub addr: SocketAddr,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Where keys live: postgres://… in production, sqlite://… for the embedded default.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true, hide_default_value = false)]
    pub database_url: SecretString,

    /// A hot standby of DATABASE_URL's primary (PostgreSQL only): the verification path's
    /// reads (cache misses and refreshes) go to it; management, writes and the change
    /// listener stay on the primary. Reads it cannot be trusted with go to the primary.
    #[arg(long, env = "DATABASE_READ_URL", hide_env_values = true)]
    pub database_read_url: Option<SecretString>,

    /// Where the change listener connects (PostgreSQL only), when DATABASE_URL goes through a
    /// pooler that cannot hold a LISTEN (PgBouncer in transaction mode): the primary directly.
    #[arg(long, env = "DATABASE_LISTEN_URL", hide_env_values = true)]
    pub database_listen_url: Option<SecretString>,

    /// Server-side pepper (argon2's secret input), at least 16 bytes. Required on PostgreSQL;
    /// the embedded default generates one beside its database file when unset.
    #[arg(long, env = "TAKUMO_PEPPER", hide_env_values = true)]
    pub pepper: Option<SecretString>,

    /// Earlier peppers, comma-separated, kept so keys hashed with them still verify
    /// after a rotation. New keys always use TAKUMO_PEPPER.
    #[arg(long, env = "TAKUMO_PREVIOUS_PEPPERS", hide_env_values = true)]
    pub previous_peppers: Option<SecretString>,

    /// File holding the pepper (a Kubernetes secret mount); trailing whitespace is ignored.
    #[arg(long, env = "TAKUMO_PEPPER_FILE", conflicts_with = "pepper")]
    pub pepper_file: Option<PathBuf>,

    /// Argon2id memory cost in KiB for new hashes (OWASP: 19456).
    #[arg(long, env = "TAKUMO_ARGON2_MEMORY_KIB", default_value_t = HashParams::default().memory_kib)]
    pub argon2_memory_kib: u32,

    /// Argon2id iterations for new hashes (OWASP: 2).
    #[arg(long, env = "TAKUMO_ARGON2_ITERATIONS", default_value_t = HashParams::default().iterations)]
    pub argon2_iterations: u32,

    /// Argon2id lanes for new hashes (OWASP: 1).
    #[arg(long, env = "TAKUMO_ARGON2_PARALLELISM", default_value_t = HashParams::default().parallelism)]
    pub argon2_parallelism: u32,

    /// Most database connections held by this process.
    #[arg(long, env = "TAKUMO_DB_MAX_CONNECTIONS", default_value_t = StoreOptions::default().max_connections)]
    pub db_max_connections: u32,

    /// How long a request waits for a database connection before UNAVAILABLE, in milliseconds.
    #[arg(long, env = "TAKUMO_DB_ACQUIRE_TIMEOUT_MS", default_value_t = StoreOptions::default().acquire_timeout.as_millis() as u64)]
    pub db_acquire_timeout_ms: u64,

    /// PostgreSQL statement timeout, in milliseconds.
    #[arg(long, env = "TAKUMO_DB_STATEMENT_TIMEOUT_MS", default_value_t = StoreOptions::default().statement_timeout.as_millis() as u64)]
    pub db_statement_timeout_ms: u64,
}

impl StoreArgs {
    pub fn hash_params(&self) -> HashParams {
        HashParams {
            memory_kib: self.argon2_memory_kib,
            iterations: self.argon2_iterations,
            parallelism: self.argon2_parallelism,
        }
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_connections: self.db_max_connections.max(1),
            acquire_timeout: Duration::from_millis(self.db_acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
            read_url: self.database_read_url.clone(),
            listen_url: self.database_listen_url.clone(),
        }
    }
}

impl ServeArgs {
    /// What `takumo-keys serve` runs with given no flags and no environment:
    /// every default from its one source, environment variables ignored. For
    /// tests and embedders, who then override what they need.
    pub fn defaults() -> Self {
        use clap::FromArgMatches;
        let cmd = Self::augment_args(clap::Command::new("takumo-keys")).mut_args(|a| a.env(None));
        let matches = cmd.try_get_matches_from(["takumo-keys"]).expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults are valid settings")
    }

    pub fn cache_settings(&self) -> CacheSettings {
        CacheSettings {
            capacity: self.cache_capacity,
            freshness: Duration::from_millis(self.cache_freshness_ms),
            stale_window: Duration::from_millis(self.cache_stale_ms),
            negative_ttl: Duration::from_millis(self.negative_cache_ttl_ms),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC server listens on.
    #[arg(long, env = "TAKUMO_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Service tokens of internal backends, `name=token,name=token` (tokens ≥ 32 characters).
    /// Several tokens per name are allowed, for rotation.
    #[arg(long, env = "TAKUMO_SERVICE_TOKENS", hide_env_values = true)]
    pub service_tokens: Option<SecretString>,

    /// File with more service tokens, same `name=token` format (commas or newlines);
    /// for a Kubernetes secret mount. Combined with TAKUMO_SERVICE_TOKENS.
    #[arg(long, env = "TAKUMO_SERVICE_TOKENS_FILE")]
    pub service_tokens_file: Option<PathBuf>,

    /// PEM certificate chain: serve gRPC over TLS (needs TAKUMO_TLS_KEY).
    #[arg(long, env = "TAKUMO_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of TAKUMO_TLS_CERT.
    #[arg(long, env = "TAKUMO_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "TAKUMO_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Client-certificate identities that are service principals under mutual TLS,
    /// each typed by the one certificate field it matches:
    /// `uri:spiffe://takumo/billing=billing,dns:dashboard.internal=dashboard,cn:support=support`.
    #[arg(long, env = "TAKUMO_MTLS_SERVICES", requires = "tls_client_ca")]
    pub mtls_services: Option<String>,

    /// How often usage counts are written to the store, in milliseconds.
    #[arg(long, env = "TAKUMO_USAGE_FLUSH_INTERVAL_MS", default_value_t = DEFAULT_USAGE_FLUSH_MS)]
    pub usage_flush_interval_ms: u64,

    /// Most verified keys cached per process (and as many remembered misses).
    #[arg(long, env = "TAKUMO_CACHE_CAPACITY", default_value_t = CacheSettings::default().capacity)]
    pub cache_capacity: u64,

    /// After this many milliseconds a cached key's record is re-read from the store
    /// (no rehash). Changes reach every replica at once through notices anyway.
    #[arg(long, env = "TAKUMO_CACHE_FRESHNESS_MS", default_value_t = CacheSettings::default().freshness.as_millis() as u64)]
    pub cache_freshness_ms: u64,

    /// While the store is unreachable, cached keys keep verifying up to this age
    /// in milliseconds (fail static); older ones answer UNAVAILABLE.
    #[arg(long, env = "TAKUMO_CACHE_STALE_MS", default_value_t = CacheSettings::default().stale_window.as_millis() as u64)]
    pub cache_stale_ms: u64,

    /// How long a well-formed key that named no key, or carried a wrong secret, is remembered.
    #[arg(long, env = "TAKUMO_NEGATIVE_CACHE_TTL_MS", default_value_t = CacheSettings::default().negative_ttl.as_millis() as u64)]
    pub negative_cache_ttl_ms: u64,

    /// Argon2 jobs that may wait for a hashing thread; beyond it, RESOURCE_EXHAUSTED.
    #[arg(long, env = "TAKUMO_HASH_QUEUE", default_value_t = crate::verify::hashing::DEFAULT_QUEUE_CAPACITY)]
    pub hash_queue: usize,

    /// Address of the public HTTP surface (GitHub's secret scanning reports at
    /// `POST /v1/secret-scanning/github`, plain HTTP behind your TLS proxy); off when unset.
    #[arg(long, env = "TAKUMO_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// GitHub's secret scanning public keys, in the format GitHub publishes at
    /// `https://api.github.com/meta/public_keys/secret_scanning`; re-read when it changes.
    #[arg(long, env = "TAKUMO_GITHUB_SCANNING_KEYS_FILE")]
    pub github_scanning_keys_file: Option<PathBuf>,

    /// Address of the Prometheus metrics endpoint (`GET /metrics`, plain HTTP); off when unset.
    #[arg(long, env = "TAKUMO_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// What a reported leak of one of our keys does: `revoke` (a key found in
    /// public is compromised), `disable`, or `report` (audit only).
    #[arg(long, env = "TAKUMO_LEAK_ACTION", default_value_t = LeakAction::Revoke)]
    pub leak_action: LeakAction,

    /// On SIGTERM, how long health reports NOT_SERVING before the listener closes, in
    /// milliseconds, so load balancers stop sending new calls first.
    #[arg(long, env = "TAKUMO_SHUTDOWN_DELAY_MS", default_value_t = 0)]
    pub shutdown_delay_ms: u64,

    /// On SIGTERM, how long in-flight calls may take to finish before they are abandoned, in milliseconds.
    #[arg(long, env = "TAKUMO_SHUTDOWN_TIMEOUT_MS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_MS)]
    pub shutdown_timeout_ms: u64,

    /// Largest request message accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TAKUMO_MAX_REQUEST_BYTES", default_value_t = crate::api::limits::DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// Most concurrent HTTP/2 streams (in-flight calls) per client connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS); a client needing more opens more connections.
    #[arg(long, env = "TAKUMO_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = crate::api::limits::DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub http2_max_concurrent_streams: u32,

    /// Log format on stderr.
    #[arg(long, env = "TAKUMO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// Organization the key belongs to.
    #[arg(long)]
    pub organization: String,
    /// Member recorded as the key's creator.
    #[arg(long)]
    pub member: String,
    /// Set the organization's plan first.
    #[arg(long)]
    pub plan: Option<Plan>,
    /// Name of the key.
    #[arg(long, default_value = "bootstrap")]
    pub name: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_each_settings_one_source() {
        let d = ServeArgs::defaults();
        assert_eq!(d.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(d.store.database_url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(d.cache_settings().freshness, CacheSettings::default().freshness);
        assert_eq!(d.store.store_options().statement_timeout, StoreOptions::default().statement_timeout);
        assert_eq!(d.store.argon2_memory_kib, HashParams::default().memory_kib);
        assert!(d.service_tokens.is_none() && d.store.pepper.is_none());
    }
}
