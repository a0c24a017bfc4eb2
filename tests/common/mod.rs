//! Shared test harness: a fresh database per test (a PostgreSQL database or a
//! SQLite file), and the real server on an ephemeral port with a tonic client.

pub mod cluster;
/// The benches' throwaway PostgreSQL database: one way to make and drop one.
#[allow(dead_code)]
#[path = "../../benches/support/pgdb.rs"]
pub mod pgdb;
/// The benches' child-process helpers (one source for starting, probing and
/// stopping the server binary); the tests use part of them.
#[allow(dead_code)]
#[path = "../../benches/support/server.rs"]
pub mod server;

use std::sync::Arc;
use takumo_keys::{
    domain::secret::SecretString,
    metrics::Metrics,
    proto::pb::{self, api_key_service_client::ApiKeyServiceClient, create_key_request::Scopes},
    server::config::ServeArgs,
    server::startup::Application,
    store::{self, Store, StoreOptions},
    verify::usage::Usage,
};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::{Request, metadata::MetadataValue, transport::Channel};

pub const SERVICE_TOKEN: &str = "svc-token-0123456789abcdef0123456789abcdef";

/// Every call of the test clients carries this deadline, so a call that
/// would block (a statement timeout no longer applied, a lost wake-up) fails
/// the test with DEADLINE_EXCEEDED instead of hanging CI.
pub const RPC_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
pub const PEPPER: &str = "test-pepper-0123456789abcdef";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database that lives as long as this guard.
pub struct TestDb {
    pub url: String,
    _pg: Option<pgdb::PgDatabase>,
    _dir: Option<TempDir>,
}

impl TestDb {
    /// A database someone else owns (e.g. a test's own cluster); nothing is dropped.
    pub fn external(url: String) -> Self {
        Self { url, _pg: None, _dir: None }
    }

    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}", dir.path().join("keys.db").display());
                Self { url, _pg: None, _dir: Some(dir) }
            }
            Backend::Postgres => {
                let db = pgdb::PgDatabase::create_on(&admin_url(), "tk_test").unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL is not reachable at TEST_DATABASE_URL ({e}). Start it with \
                         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
                         or point TEST_DATABASE_URL at a server where user postgres may create databases"
                    )
                });
                Self { url: db.url(), _pg: Some(db), _dir: None }
            }
        }
    }

    /// PostgreSQL only: `false` cuts the database off (new connections are
    /// refused, open ones ended), `true` lets connections in again.
    pub async fn allow_connections(&self, allow: bool) {
        let name = self.url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
        let admin = sqlx::PgPool::connect(&self.url.replace(&format!("/{name}"), "/postgres")).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allow}")))
            .execute(&admin)
            .await
            .unwrap();
        if !allow {
            sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
                .bind(&name)
                .execute(&admin)
                .await
                .unwrap();
        }
        admin.close().await;
    }
}

/// A store on a fresh database, for the conformance suite.
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub db: TestDb,
}

impl std::ops::Deref for TestStore {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        &*self.store
    }
}

pub async fn test_store(backend: Backend) -> TestStore {
    let db = TestDb::new(backend).await;
    let store = store::connect(&db.url, &StoreOptions::default()).await.expect("connect store");
    TestStore { store, db }
}

/// Arguments of a test server on `url`: cheap argon2 (the defaults are
/// covered by their own test), a fixed pepper and one service token.
pub fn serve_args(url: &str) -> ServeArgs {
    let mut a = ServeArgs::defaults();
    a.listen = "127.0.0.1:0".parse().unwrap();
    a.service_tokens = Some(SecretString::new(format!("dashboard={SERVICE_TOKEN}")));
    // Usage is flushed when a test asks (or at shutdown), not on a timer.
    a.usage_flush_interval_ms = 60_000;
    a.cache_capacity = 10_000;
    a.shutdown_timeout_ms = 5_000;
    a.store.database_url = SecretString::new(url);
    a.store.pepper = Some(SecretString::new(PEPPER));
    // Cheap argon2: tests hash thousands of keys; the parameters' cost is
    // the benchmarks' business.
    a.store.argon2_memory_kib = 256;
    a.store.argon2_iterations = 1;
    a.store.argon2_parallelism = 1;
    a.store.db_max_connections = 8;
    a
}

/// The real server on an ephemeral port; stopped when dropped.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    /// The channel `client` uses (lazy, every call with `RPC_DEADLINE`), for
    /// other clients of the same server (ext_authz, compressed calls).
    pub channel: Channel,
    pub client: ApiKeyServiceClient<Channel>,
    pub usage: Usage,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The public HTTP surface, when `http_listen` was set.
    pub http_addr: Option<std::net::SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<takumo_keys::Result<()>>>,
    pub db: Arc<TestDb>,
}

/// The calls most tests make, as the dashboard (creates), a backend
/// (verifies) and billing (plans) would.
impl TestApp {
    /// Creates a key named `cursor-dev` in `org` as the dashboard acting for
    /// `actor` (`scopes` as CreateKey takes them: `None` is refused); returns it and its secret.
    pub async fn create_as(&self, org: &str, actor: &str, scopes: Option<Scopes>) -> (pb::ApiKey, String) {
        let req = pb::CreateKeyRequest {
            organization_id: org.into(),
            name: "cursor-dev".into(),
            scopes,
            ..Default::default()
        };
        let r = self.client.clone().create_key(as_service(req, actor)).await.expect("create key").into_inner();
        (r.key.expect("the created key"), r.secret)
    }

    /// [`Self::create_as`] for alice.
    pub async fn create(&self, org: &str, scopes: Option<Scopes>) -> (pb::ApiKey, String) {
        self.create_as(org, "alice", scopes).await
    }

    /// VerifyKey as a backend would call it; any answer but OK fails the test.
    pub async fn verify(&self, key: &str, required: &[&str], org: Option<&str>) -> pb::VerifyKeyResponse {
        let req = pb::VerifyKeyRequest {
            key: key.into(),
            required_scopes: required.iter().map(|s| s.to_string()).collect(),
            organization_id: org.map(str::to_owned),
        };
        self.client.clone().verify_key(as_service(req, "alice")).await.expect("verify is an OK response").into_inner()
    }

    /// Puts `org` on `plan`, as the billing backend.
    pub async fn set_plan(&self, org: &str, plan: pb::Plan) {
        set_plan(&mut self.client.clone(), org, plan).await
    }

    /// Polls until `key` verifies with `want`, failing after 5 s; returns how long it took.
    pub async fn verifies_eventually(&self, key: &str, want: pb::VerifyCode) -> std::time::Duration {
        let start = std::time::Instant::now();
        loop {
            let got = self.verify(key, &[], None).await.code();
            if got == want {
                return start.elapsed();
            }
            assert!(start.elapsed().as_secs() < 5, "still {got:?}, want {want:?} after 5 s");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Polls `check` every 50 ms until it holds, failing after `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        let db = Arc::new(TestDb::new(backend).await);
        Self::spawn_on(db, serve_args).await
    }

    pub async fn spawn_on(db: Arc<TestDb>, args: impl FnOnce(&str) -> ServeArgs) -> Self {
        init_logs();
        let app = Application::build(&args(&db.url)).await.expect("build app");
        let addr = app.local_addr();
        let usage = app.usage();
        let store = app.store();
        let metrics = app.metrics();
        let metrics_addr = app.metrics_addr();
        let http_addr = app.http_addr();
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        // On PostgreSQL, wait for the change listener's first connect: it marks
        // the cache for re-reads, which would otherwise race the test's first
        // verifications and their store-read counts.
        if db.url.starts_with("postgres") {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while metrics.cache_resets.get() == 0 {
                assert!(std::time::Instant::now() < deadline, "change listener did not connect in 10 s");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        // Lazy: a TLS server would refuse this plaintext channel; tests of TLS make their own.
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().timeout(RPC_DEADLINE).connect_lazy();
        Self {
            addr,
            client: ApiKeyServiceClient::new(channel.clone()),
            channel,
            usage,
            store,
            metrics,
            metrics_addr,
            http_addr,
            stop: Some(tx),
            server: Some(server),
            db,
        }
    }

    /// Stops the server and waits for it to drain and flush.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            h.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Logs print only when TEST_LOG is set.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter("debug").with_test_writer().try_init();
    }
}

/// Reads a server stream to its end. The channel's deadline (and the
/// grpc-timeout the server sees) bounds a call only until its response
/// headers, so a stream that never ends would hang CI (an export that
/// restarted from the top forever held a mutation run for its full 300 s):
/// this fails the test instead, after [`RPC_DEADLINE`].
pub async fn read_to_end<T>(stream: &mut tonic::Streaming<T>) -> Result<Vec<T>, tonic::Status> {
    let read = async {
        let mut out = vec![];
        while let Some(m) = stream.message().await? {
            out.push(m);
        }
        Ok(out)
    };
    tokio::time::timeout(RPC_DEADLINE, read).await.expect("the stream did not end within RPC_DEADLINE")
}

/// A request carrying `token` as its bearer.
pub fn with_bearer<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {token}")).unwrap());
    r
}

/// A request from the dashboard backend acting for `actor`.
pub fn as_service<T>(msg: T, actor: &str) -> Request<T> {
    let mut r = with_bearer(msg, SERVICE_TOKEN);
    r.metadata_mut().insert("x-takumo-actor", MetadataValue::try_from(actor).unwrap());
    r
}

/// Expands each named test function for both backends.
#[macro_export]
macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Writes a key that expired a second ago (the API refuses to create one),
/// through the library with the test server's pepper; returns the full key.
pub async fn expired_key(app: &TestApp, org: &str) -> String {
    use takumo_keys::{
        api::issue::{KeySpec, issue_key},
        domain::model::{AuditContext, Environment},
        domain::scopes::{Preset, expand_preset},
        verify::hashing::{HashParams, Hasher},
    };
    let hasher = Hasher::new(
        SecretString::new(PEPPER),
        HashParams { memory_kib: 256, iterations: 1, parallelism: 1 },
        Default::default(),
    )
    .unwrap();
    let spec = KeySpec {
        organization_id: org.into(),
        name: "expired".into(),
        scopes: expand_preset(Preset::Organization),
        created_by: "alice".into(),
        environment: Environment::Live,
        expires_at: Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
        metadata: Default::default(),
    };
    let (_, secret) = issue_key(&*app.store, &hasher, spec, &AuditContext::operator("alice")).await.unwrap();
    secret.into_exposed()
}

/// The real `takumo-keys` binary as a child process, for what only a process
/// can show: signals, exit codes, exported telemetry. Killed when dropped.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl ServerProcess {
    /// Starts `takumo-keys serve` on a free port with `env`, and waits until
    /// its health check answers SERVING (10 s deadline).
    pub async fn start(database_url: &str, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut owned: Vec<(String, String)> = vec![
            ("TAKUMO_LISTEN".into(), addr.to_string()),
            ("DATABASE_URL".into(), database_url.into()),
            ("TAKUMO_PEPPER".into(), PEPPER.into()),
            ("TAKUMO_SERVICE_TOKENS".into(), format!("dashboard={SERVICE_TOKEN}")),
            ("TAKUMO_ARGON2_MEMORY_KIB".into(), "256".into()),
            ("TAKUMO_ARGON2_ITERATIONS".into(), "1".into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        owned.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut cmd = server::server_command(std::path::Path::new(env!("CARGO_BIN_EXE_takumo-keys")), &owned);
        cmd.arg("serve").stdout(std::process::Stdio::null());
        if std::env::var_os("TEST_LOG").is_none() {
            cmd.stderr(std::process::Stdio::null());
        }
        let child = cmd.spawn().expect("start takumo-keys");
        let me = Self { child, addr };
        let ready = std::time::Duration::from_secs(10);
        assert!(
            server::wait_serving(addr, ready, std::time::Duration::from_millis(50)).await,
            "server did not become healthy in {ready:?}"
        );
        me
    }

    pub async fn client(&self) -> ApiKeyServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .timeout(RPC_DEADLINE)
            .connect()
            .await
            .unwrap();
        ApiKeyServiceClient::new(channel)
    }

    /// Sends SIGTERM, as an orchestrator stopping a pod would.
    pub fn terminate(&self) {
        server::sigterm(&self.child);
    }

    /// Waits for the process to exit (10 s deadline) and returns its status.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        self.wait_for(std::time::Duration::from_secs(10)).await
    }

    /// Waits for the process to exit, at most `limit`, and returns its status.
    pub async fn wait_for(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "server did not exit in {limit:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type Client = ApiKeyServiceClient<Channel>;

/// Puts `org` on `plan`, as the billing backend.
pub async fn set_plan(c: &mut Client, org: &str, plan: takumo_keys::proto::pb::Plan) {
    use takumo_keys::proto::pb::SetOrganizationPlanRequest;
    c.set_organization_plan(as_service(
        SetOrganizationPlanRequest { organization_id: org.into(), plan: plan as i32 },
        "billing",
    ))
    .await
    .unwrap();
}

/// Creates a read-only key in `org`, as the dashboard acting for alice.
pub async fn create_read_only(
    c: &mut Client,
    org: &str,
    expires_at: Option<prost_types::Timestamp>,
) -> Result<takumo_keys::proto::pb::CreateKeyResponse, tonic::Status> {
    use takumo_keys::proto::pb::{CreateKeyRequest, ScopePreset, create_key_request::Scopes};
    let req = CreateKeyRequest {
        organization_id: org.into(),
        name: "gateway".into(),
        scopes: Some(Scopes::Preset(ScopePreset::ReadOnly as i32)),
        expires_at,
        ..Default::default()
    };
    c.create_key(as_service(req, "alice")).await.map(|r| r.into_inner())
}

/// A peer program a test runs against (nginx, Prometheus), or `None` after
/// saying how to install it when it is missing, unless `require_var` is
/// `1` (as `.ci/run` sets it): then a missing peer fails the test.
pub fn peer_or_skip<T>(found: Option<T>, what: &str, require_var: &str, install: &str) -> Option<T> {
    if found.is_none() {
        assert!(
            std::env::var(require_var).as_deref() != Ok("1"),
            "{require_var}=1 but {what} is not installed ({install})"
        );
        eprintln!("skipped: {what} is not installed; `{install}` (Debian) runs this test");
    }
    found
}
