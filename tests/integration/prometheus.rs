//! The metrics as an operator's Prometheus sees them: `promtool check
//! metrics` is clean on a live scrape, and a real Prometheus (Debian package
//! `prometheus`, on a free port with a temporary config and data directory)
//! scrapes a real server, finds the verify outcome series with their labels,
//! loads `deploy/observability/rules.yaml` and evaluates every rule without
//! error, and evaluates every PromQL expression of the Grafana dashboard.
//! Skipped, saying how to install Prometheus, where it is missing, unless
//! `TAKUMO_REQUIRE_PROMETHEUS=1` (set by `.ci/run`).

use crate::common::{self, Backend, TestApp, TestDb};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};
use takumo_keys::proto::pb::{self, create_key_request::Scopes};

fn binary(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/local/bin", "/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists())
}

/// `prometheus` and `promtool`, or `None` (after saying why) when missing and not required.
fn prometheus_or_skip() -> Option<(PathBuf, PathBuf)> {
    let found = binary("prometheus").zip(binary("promtool"));
    common::peer_or_skip(found, "Prometheus", "TAKUMO_REQUIRE_PROMETHEUS", "apt-get install prometheus")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters kept).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    fn start(bin: &Path, target: std::net::SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: takumo-keys\n    static_configs:\n      - targets: ['{target}']\n",
            repo("deploy/observability/rules.yaml").display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus { child, _dir: dir, port }
    }

    async fn api(&self, path_and_query: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}{path_and_query}", self.port);
        let text = reqwest::Client::new()
            .get(url)
            .timeout(common::RPC_DEADLINE)
            .send()
            .await
            .expect("Prometheus API")
            .text()
            .await
            .unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path_and_query}: {e}: {text}"))
    }

    async fn query(&self, expr: &str) -> serde_json::Value {
        self.api(&format!("/api/v1/query?query={}", encode(expr))).await
    }

    async fn until(&self, secs: u64, what: &str, mut ok: impl FnMut(&serde_json::Value) -> bool, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let ready = reqwest::Client::new()
                .get(format!("http://127.0.0.1:{}/-/ready", self.port))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready && ok(&self.api(path).await) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not within {secs} s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Every `expr` of the dashboard, its Grafana variables given values.
fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(repo("deploy/observability/dashboard.json")).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = vec![];
    walk(&dashboard["panels"], &mut out);
    out.iter()
        .map(|e| {
            e.replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "5m")
                .replace("$instance", ".*")
                .replace("$job", ".*")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_series_and_evaluates_every_rule_and_dashboard_query() {
    let Some((prometheus, promtool)) = prometheus_or_skip() else { return };
    let app = TestApp::spawn_on(Arc::new(TestDb::new(Backend::Sqlite).await), |url| {
        let mut a = common::serve_args(url);
        a.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        a
    })
    .await;
    let (_, secret) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
    assert!(app.verify(&secret, &[], None).await.valid);
    assert!(!app.verify("tk_live_not-a-key", &[], None).await.valid);
    let target = app.metrics_addr.unwrap();

    // The exposition itself: promtool reads the Prometheus text format a
    // plain scrape gets, and must have nothing to say about it.
    let scrape = reqwest::get(format!("http://{target}/metrics")).await.unwrap().text().await.unwrap();
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");

    let p = Prometheus::start(&prometheus, target);
    p.until(30, "the target is up", |v| v["data"]["activeTargets"][0]["health"] == "up", "/api/v1/targets").await;
    p.until(
        30,
        "the verify outcome series arrive with their labels",
        |v| {
            let codes: Vec<&str> = v["data"]["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["metric"]["code"].as_str())
                .collect();
            codes.contains(&"valid") && codes.contains(&"malformed")
        },
        &format!("/api/v1/query?query={}", encode("takumo_keys_verify_outcomes_total")),
    )
    .await;

    // Every rule loaded, evaluated, and healthy.
    p.until(
        30,
        "every rule has been evaluated",
        |v| {
            let rules: Vec<&serde_json::Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            !rules.is_empty()
                && rules.iter().all(|r| r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001")))
        },
        "/api/v1/rules",
    )
    .await;
    let rules = p.api("/api/v1/rules").await;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "rule {} does not evaluate: {}", rule["name"], rule["lastError"]);
        }
    }

    // Every dashboard query evaluates.
    let exprs = dashboard_exprs();
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    for expr in exprs {
        let r = p.query(&expr).await;
        assert_eq!(r["status"], "success", "dashboard query {expr:?}: {r}");
    }
}
