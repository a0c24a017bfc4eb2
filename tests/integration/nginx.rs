//! HTTP forward-auth behind a real nginx (`auth_request`), with the
//! configuration `deploy/README.md` shows, in front of an upstream that
//! echoes the headers it got. Skipped, saying how to install nginx, where
//! it is missing, unless `TAKUMO_REQUIRE_NGINX=1` (set by `.ci/run`).

use crate::common::{self, Backend, SERVICE_TOKEN, TestApp, TestDb};
use axum::{Router, http::HeaderMap, routing::get};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};
use takumo_keys::proto::pb::{self, create_key_request::Scopes};

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// nginx, or `None` (after saying why) when it is not installed and not required.
fn nginx_or_skip() -> Option<PathBuf> {
    common::peer_or_skip(nginx_binary(), "nginx", "TAKUMO_REQUIRE_NGINX", "apt-get install nginx")
}

/// The `http {}` body under test: the same directives as deploy/README.md's
/// snippet, with this test's ports, token and temporary directory.
fn config(dir: &Path, port: u16, keys_http: std::net::SocketAddr) -> String {
    let d = dir.display();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 { "user root;" } else { "" };
    format!(
        r#"{user}
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    upstream takumo_keys {{ server {keys_http}; keepalive 8; }}

    server {{
        listen 127.0.0.1:{port};

        # The check: the original headers, no body, plus the proxy's service
        # token and the scopes the calling location needs.
        location = /_takumo_authz {{
            internal;
            proxy_pass http://takumo_keys/v1/authz;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Takumo-Service-Token "{SERVICE_TOKEN}";
            proxy_set_header X-Takumo-Required-Scopes $takumo_required_scopes;
        }}

        location /fleet/ {{
            set $takumo_required_scopes "fleet.read";
            include {d}/takumo_protect.conf;
        }}

        location /admin/ {{
            set $takumo_required_scopes "fleet.read fleet.manage";
            include {d}/takumo_protect.conf;
        }}
    }}
}}
"#
    )
}

/// What every protected location includes.
fn protect(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"auth_request /_takumo_authz;
auth_request_set $takumo_key_id $upstream_http_x_takumo_key_id;
auth_request_set $takumo_organization $upstream_http_x_takumo_organization;
auth_request_set $takumo_environment $upstream_http_x_takumo_environment;
auth_request_set $takumo_scopes $upstream_http_x_takumo_scopes;
auth_request_set $takumo_challenge $upstream_http_www_authenticate;
auth_request_set $takumo_missing $upstream_http_x_takumo_missing_scopes;
add_header WWW-Authenticate $takumo_challenge always;
add_header X-Takumo-Missing-Scopes $takumo_missing always;
proxy_set_header X-Takumo-Key-Id $takumo_key_id;
proxy_set_header X-Takumo-Organization $takumo_organization;
proxy_set_header X-Takumo-Environment $takumo_environment;
proxy_set_header X-Takumo-Scopes $takumo_scopes;
proxy_set_header Authorization "";
proxy_set_header X-Api-Key "";
proxy_pass http://{upstream};
"#
    )
}

struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Drop for Nginx {
    /// SIGTERM, so the master stops its worker (a killed master orphans it),
    /// then SIGKILL if it has not exited within 5 s.
    fn drop(&mut self) {
        // SAFETY: kill with a pid we spawned and still hold; no memory is touched.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    async fn start(bin: &Path, keys_http: std::net::SocketAddr, upstream: std::net::SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::fs::write(dir.path().join("nginx.conf"), config(dir.path(), port, keys_http)).unwrap();
        std::fs::write(dir.path().join("takumo_protect.conf"), protect(upstream)).unwrap();
        let conf = dir.path().join("nginx.conf");
        let test = Command::new(bin).arg("-t").arg("-p").arg(dir.path()).arg("-c").arg(&conf).output().unwrap();
        assert!(test.status.success(), "nginx -t: {}", String::from_utf8_lossy(&test.stderr));
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen in 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Nginx { child, _dir: dir, port }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, String) {
        let mut req =
            reqwest::Client::new().get(format!("http://127.0.0.1:{}{path}", self.port)).timeout(common::RPC_DEADLINE);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.expect("request through nginx");
        let (status, headers) = (res.status().as_u16(), res.headers().clone());
        (status, headers, res.text().await.unwrap())
    }
}

/// An upstream that answers with the request headers it received, one
/// `name: value` per line, names in lower case.
async fn echo_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(get(|headers: HeaderMap| async move {
        let mut lines: Vec<String> =
            headers.iter().map(|(k, v)| format!("{}: {}", k.as_str(), v.to_str().unwrap_or("?"))).collect();
        lines.sort();
        lines.join("\n")
    }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn custom(s: &[&str]) -> Option<Scopes> {
    Some(Scopes::Custom(pb::ScopeList { scopes: s.iter().map(|s| s.to_string()).collect() }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_lets_valid_keys_through_with_their_identity_and_refuses_the_rest() {
    let Some(bin) = nginx_or_skip() else { return };
    let app = TestApp::spawn_on(Arc::new(TestDb::new(Backend::Sqlite).await), |url| {
        let mut a = common::serve_args(url);
        a.http_listen = Some("127.0.0.1:0".parse().unwrap());
        a
    })
    .await;
    let (reader, reader_secret) = app.create("acme", custom(&["fleet.read"])).await;
    let upstream = echo_upstream().await;
    let nginx = Nginx::start(&bin, app.http_addr.unwrap(), upstream).await;
    let bearer = format!("Bearer {reader_secret}");

    // A valid key reaches the upstream with its identity, and without itself;
    // an identity header the client made up is replaced.
    let (status, _, body) =
        nginx.get("/fleet/instances", &[("authorization", &bearer), ("x-takumo-key-id", "forged")]).await;
    assert_eq!(status, 200, "{body}");
    let seen: Vec<&str> = body.lines().collect();
    assert!(seen.contains(&format!("x-takumo-key-id: {}", reader.id).as_str()), "{body}");
    assert!(seen.contains(&"x-takumo-organization: acme"), "{body}");
    assert!(seen.contains(&"x-takumo-environment: live"), "{body}");
    assert!(seen.contains(&"x-takumo-scopes: fleet.read"), "{body}");
    assert!(!body.contains("forged"), "a client-made identity header reached the upstream: {body}");
    assert!(!body.contains(&reader_secret), "the key reached the upstream: {body}");
    assert!(!body.contains("x-takumo-service-token"), "{body}");
    // X-Api-Key works the same, and is removed too.
    let (status, _, body) = nginx.get("/fleet/instances", &[("x-api-key", &reader_secret)]).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(&reader_secret), "{body}");

    // Bad or missing keys: 401 with the challenge.
    for headers in [vec![], vec![("authorization", "Bearer tk_live_garbage")]] {
        let (status, h, _) = nginx.get("/fleet/instances", &headers).await;
        assert_eq!(status, 401);
        assert_eq!(h.get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer realm=\"takumo\""));
    }
    // A key lacking the location's scopes: 403, naming them.
    let (status, h, _) = nginx.get("/admin/drain", &[("authorization", &bearer)]).await;
    assert_eq!(status, 403);
    assert_eq!(h.get("x-takumo-missing-scopes").map(|v| v.to_str().unwrap()), Some("fleet.manage"));
}
