//! Observability with a real `ocsync worker` process: after a run, its
//! `/metrics` carries every series the dashboard and the alerts read, each
//! with help text and labels from closed sets plus the CP id; the probes
//! answer on the same port. The rules file passes `promtool check rules`.
//! With an OTLP endpoint, a run started over the API is one trace from the
//! request to its batches.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ocsync::cp::{CpConfig, store};
use ocsync::odm::generate::{GeneratorConfig, generate};
use ocsync::queue::{self, RunStatus};

use crate::harness::{TestDb, ocsync};

const DEADLINE: Duration = Duration::from_secs(60);

fn write_study(dir: &Path, subjects: u32) -> PathBuf {
    let path = dir.join("study.xml");
    let config = GeneratorConfig {
        seed: 11,
        subjects,
        sites: 2,
        ..GeneratorConfig::default()
    };
    generate(&config, std::fs::File::create(&path).unwrap()).unwrap();
    path
}

fn cp_config(id: &str, study: &Path) -> CpConfig {
    let toml = format!(
        r#"
id = "{id}"
batch_size = 2
default_site = "Main"

[source]
kind = "file"
path = {path:?}

[event_map]
SE_VISIT = "Visit"

[[specimens]]
item_group_oid = "IG_SPECI_SAMPLES"
label_item = "I_SPECI_BARCODE"
type_item = "I_SPECI_TYPE"
quantity_item = "I_SPECI_QTY"
collection_time_item = "I_SPECI_COLLECTED"
"#,
        path = study.display().to_string()
    );
    CpConfig::from_toml(&toml, "test.toml").unwrap()
}

/// A child process killed when dropped, with its log file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(t: &TestDb, dir: &Path, args: &[&str]) -> Self {
        Self::spawn_with(t, dir, args, &[])
    }

    /// As [`Proc::spawn`], with more environment variables.
    fn spawn_with(t: &TestDb, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("{}.log", args[0]));
        let mut cmd = ocsync();
        cmd.envs(env.iter().copied());
        cmd.args(args)
            .env("DATABASE_URL", t.url())
            .env("DATABASE_MAX_CONNECTIONS", "4")
            .env("WORKER_HEARTBEAT_SECS", "1")
            .env("WORKER_POLL_INTERVAL_MS", "200")
            .env("METRICS_LISTEN", "127.0.0.1:0")
            .env("API_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .env("OC_SIM_PASSWORD", "sim-password")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Self {
            child: cmd.spawn().expect("spawn ocsync"),
            log,
        }
    }

    /// The address its log says the metrics server bound.
    async fn metrics_addr(&mut self) -> String {
        self.logged_addr("metrics listening").await
    }

    /// The `addr=` of the first log line containing `message`.
    async fn logged_addr(&mut self, message: &str) -> String {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(message)) {
                let addr = line.split("addr=").nth(1).expect("addr field");
                return addr.split_whitespace().next().unwrap().to_owned();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ocsync exited ({status}) before logging {message:?}:\n{text}");
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no {message:?} within the deadline:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(url: &str) -> (u16, String) {
    ocsync::install_crypto_provider();
    let r = reqwest::get(url).await.expect("GET");
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The value of the sample `series` (name and labels exactly as rendered).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Every series the dashboard and the alert rules read.
pub const SERIES: &[&str] = &[
    "ocsync_runs",
    "ocsync_runs_finished_total",
    "ocsync_run_duration_seconds",
    "ocsync_records_total",
    "ocsync_subjects_processed_total",
    "ocsync_batch_duration_seconds",
    "ocsync_queue_depth",
    "ocsync_queue_oldest_age_seconds",
    "ocsync_workers_live",
    "ocsync_cp_last_success_timestamp_seconds",
    "ocsync_cp_schedule_interval_seconds",
    "ocsync_cp_enabled",
    "ocsync_up",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_metrics_with_help_text_and_probes_after_a_run() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let study = write_study(dir.path(), 6);
    store::add(&t.pool, &cp_config("OBS", &study))
        .await
        .unwrap();
    let mut worker = Proc::spawn(&t, dir.path(), &["worker", "--no-schedule"]);
    let base = format!("http://{}", worker.metrics_addr().await);

    let id: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('OBS', 'all')")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    let ended =
        "ocsync_runs_finished_total{cp=\"OBS\",mode=\"all\",trigger=\"sql\",status=\"success\"}";
    let start = Instant::now();
    let body = loop {
        let (status, body) = get(&format!("{base}/metrics")).await;
        assert_eq!(status, 200);
        let run = queue::runs::get(&t.pool, &id).await.unwrap().unwrap();
        // The counter moves when the handler returns, the row's status when
        // apalis acks it just after: wait for both.
        if run.status == RunStatus::Success
            && sample(&body, ended) == Some(1.0)
            && sample(&body, "ocsync_runs{cp=\"OBS\",status=\"Success\"}") == Some(1.0)
        {
            break body;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "run {:?} / metrics never showed the run's end:\n{body}\n{}",
            run.status,
            std::fs::read_to_string(&worker.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    for name in SERIES {
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "no help text for {name}:\n{body}"
        );
    }
    // Help on every family the process renders, not only the listed ones.
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "{name} has no help"
        );
    }
    assert_eq!(
        sample(&body, "ocsync_up{component=\"database\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "ocsync_runs{cp=\"OBS\",status=\"Success\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "ocsync_runs{cp=\"OBS\",status=\"Queued\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&body, "ocsync_queue_depth"), Some(0.0));
    assert!(sample(&body, "ocsync_workers_live").unwrap() >= 1.0);
    assert_eq!(
        sample(&body, "ocsync_subjects_processed_total{cp=\"OBS\"}"),
        Some(6.0)
    );
    assert_eq!(
        sample(
            &body,
            "ocsync_records_total{cp=\"OBS\",entity=\"participant\",outcome=\"created\"}"
        ),
        Some(6.0)
    );
    assert!(
        sample(
            &body,
            "ocsync_cp_last_success_timestamp_seconds{cp=\"OBS\"}"
        )
        .is_some()
    );
    assert_eq!(
        sample(&body, "ocsync_cp_schedule_interval_seconds{cp=\"OBS\"}"),
        Some(3600.0)
    );
    // No run id in any label or value.
    assert!(!body.contains(&id), "a run id leaked into the metrics");
    // Every label name is from the closed set.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        if let Some((_, rest)) = line.split_once('{') {
            let labels = rest.rsplit_once('}').unwrap().0;
            for pair in labels.split("\",") {
                let key = pair.split('=').next().unwrap();
                assert!(
                    [
                        "cp",
                        "status",
                        "mode",
                        "trigger",
                        "entity",
                        "outcome",
                        "upstream",
                        "status_class",
                        "component",
                        "le",
                        "quantile"
                    ]
                    .contains(&key),
                    "label {key} is not from the closed set: {line}"
                );
            }
        }
    }

    let (status, text) = get(&format!("{base}/healthz")).await;
    assert_eq!((status, text.as_str()), (200, "ok"));
    let (status, _) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 200);
}

/// The repository path of `rel`.
fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A tool CI installs (`deploy/local/ensure-tools.sh`); fails the test with
/// the way to get it when it is missing.
fn tool(name: &str) -> std::process::Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not on PATH: run deploy/local/ensure-tools.sh (Debian package `prometheus`), as `make test` and CI do"
    );
    std::process::Command::new(name)
}

#[test]
fn the_alert_rules_pass_promtool() {
    let out = tool("promtool")
        .args(["check", "rules"])
        .arg(repo("grafana/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `expr` of the dashboard, with Grafana's variables replaced by
/// what "All" and a short range mean.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("grafana/ocsync.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$cp", ".*")
                .replace("$__rate_interval", "1m");
            out.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    assert!(out.len() >= 14, "the dashboard lost panels");
    out
}

/// Every alert expression, its comparisons turned into `bool` ones so the
/// query returns its series whether or not the alert fires: what is
/// checked is that the series it compares exist.
fn alert_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("grafana/alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut name = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("- alert: ") {
            name = n.to_owned();
        } else if let Some(e) = t.strip_prefix("expr:") {
            let mut expr = e.trim().to_owned();
            if expr == "|" {
                expr.clear();
                while let Some(next) = lines.peek() {
                    if !next.starts_with("          ") {
                        break;
                    }
                    expr.push_str(lines.next().unwrap().trim());
                    expr.push(' ');
                }
            }
            let expr = [" >= ", " <= ", " == ", " > ", " < "]
                .iter()
                .fold(expr, |e, op| e.replace(op, &format!("{}bool ", op)));
            out.push((name.clone(), expr));
        }
    }
    assert!(out.len() >= 4, "the rules file lost alerts");
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_a_worker_and_the_api_answers_every_panel_and_alert() {
    use ocsync::openclinica::sim::{SimConfig, Simulator};
    let prometheus_bin = tool("prometheus");
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let study = GeneratorConfig {
        seed: 42,
        subjects: 8,
        sites: 2,
        study_oid: "S_OBS".to_owned(),
        ..GeneratorConfig::default()
    };
    let sim = Simulator::start(SimConfig::new(
        study,
        "ocsync",
        secrecy::SecretString::from("sim-password"),
    ))
    .await
    .unwrap();
    let toml = format!(
        r#"
id = "OBSOC"
batch_size = 3
default_site = "Main"

[source]
kind = "oc3"
base_url = "{base}"
study_oid = "S_OBS"
username = "ocsync"
password = {{ env = "OC_SIM_PASSWORD" }}

[event_map]
SE_VISIT = "Visit"

[[specimens]]
item_group_oid = "IG_SPECI_SAMPLES"
label_item = "I_SPECI_BARCODE"
type_item = "I_SPECI_TYPE"
quantity_item = "I_SPECI_QTY"
collection_time_item = "I_SPECI_COLLECTED"
"#,
        base = sim.base_url_oc3().as_str().trim_end_matches('/')
    );
    // The password reference is resolved by the worker process, which
    // gets OC_SIM_PASSWORD from `Proc::spawn`.
    let cp = CpConfig::from_toml(&toml, "obs.toml").unwrap();
    store::add(&t.pool, &cp).await.unwrap();

    let mut worker = Proc::spawn(&t, dir.path(), &["worker", "--no-schedule"]);
    let mut api = Proc::spawn(&t, dir.path(), &["api"]);
    let worker_addr = worker.metrics_addr().await;
    let api_addr = api.metrics_addr().await;

    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: ocsync\n    static_configs:\n      - targets: [{worker_addr:?}, {api_addr:?}]\n",
            rules = repo("grafana/alerts.yml").display().to_string()
        ),
    )
    .unwrap();
    let mut prom_cmd = prometheus_bin;
    prom_cmd
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap());
    let prom_child = prom_cmd.spawn().expect("start prometheus");
    let _prom = Proc {
        child: prom_child,
        log: dir.path().join("prometheus.log"),
    };

    let id: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('OBSOC', 'all')")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let run = queue::runs::get(&t.pool, &id).await.unwrap().unwrap();
        if run.status == RunStatus::Success {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE && !run.status.is_terminal(),
            "the run did not succeed: {run:#?}\n{}",
            std::fs::read_to_string(&worker.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let queries: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .chain(alert_queries())
        .collect();
    ocsync::install_crypto_provider();
    let client = reqwest::Client::new();
    let mut missing: Vec<String> = Vec::new();
    while start.elapsed() < DEADLINE * 2 {
        missing.clear();
        for (title, expr) in &queries {
            let mut url: url::Url = format!("http://127.0.0.1:{port}/api/v1/query")
                .parse()
                .unwrap();
            url.query_pairs_mut().append_pair("query", expr);
            let answer = client.get(url).send().await;
            let ok = match answer {
                Ok(r) => {
                    let v: serde_json::Value = r.json().await.unwrap_or_default();
                    assert_ne!(v["status"], "error", "{title}: {expr}: {v}");
                    v["data"]["result"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                }
                // Prometheus is still starting.
                Err(_) => false,
            };
            if !ok {
                missing.push(format!("{title}: {expr}"));
            }
        }
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        missing.is_empty(),
        "queries without data:\n{}\n{}",
        missing.join("\n"),
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    drop(sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_api_request_is_one_trace_down_to_its_batches() {
    use axum::body::Bytes;
    use ocsync::api::tokens::{self, Role};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
    use prost::Message as _;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// What the stand-in collector keeps of a span.
    #[derive(Debug, Clone)]
    struct Seen {
        name: String,
        trace: Vec<u8>,
        id: Vec<u8>,
        parent: Vec<u8>,
        /// String and integer attributes, as text.
        attrs: HashMap<String, String>,
    }

    // A stand-in collector (OTLP/HTTP, protobuf), shared by both processes.
    let spans: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post({
            let spans = spans.clone();
            move |body: Bytes| {
                let spans = spans.clone();
                async move {
                    let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut seen = spans.lock().unwrap();
                    for rs in req.resource_spans {
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                let attrs = s
                                    .attributes
                                    .iter()
                                    .filter_map(|kv| {
                                        let v = match kv.value.as_ref()?.value.as_ref()? {
                                            AnyValue::StringValue(v) => v.clone(),
                                            AnyValue::IntValue(v) => v.to_string(),
                                            _ => return None,
                                        };
                                        Some((kv.key.clone(), v))
                                    })
                                    .collect();
                                seen.push(Seen {
                                    name: s.name,
                                    trace: s.trace_id,
                                    id: s.span_id,
                                    parent: s.parent_span_id,
                                    attrs,
                                });
                            }
                        }
                    }
                    ""
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let study = write_study(dir.path(), 6);
    store::add(&t.pool, &cp_config("TRACE", &study))
        .await
        .unwrap();
    let token = tokens::create(&t.pool, "trace-test", Role::Operator)
        .await
        .unwrap();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // Export every half second rather than every five.
        ("OTEL_BSP_SCHEDULE_DELAY", "500"),
    ];
    let worker = Proc::spawn_with(&t, dir.path(), &["worker", "--no-schedule"], &env);
    let mut api = Proc::spawn_with(&t, dir.path(), &["api"], &env);
    let addr = api.logged_addr("API listening").await;

    ocsync::install_crypto_provider();
    let answer = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/cps/TRACE/runs"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"mode": "all"}))
        .send()
        .await
        .expect("POST the run");
    assert_eq!(answer.status().as_u16(), 201);
    let run: serde_json::Value = answer.json().await.unwrap();
    let id = run["id"].as_str().expect("run id").to_owned();

    let start = Instant::now();
    loop {
        let run = queue::runs::get(&t.pool, &id).await.unwrap().unwrap();
        if run.status == RunStatus::Success {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE && !run.status.is_terminal(),
            "{run:#?}\n{}",
            std::fs::read_to_string(&worker.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Both processes export in batches: poll until the request's trace
    // holds the whole run (three batches of two subjects).
    let is_request = |s: &Seen| {
        s.name == "http.request"
            && s.attrs.get("http.route").map(String::as_str) == Some("/api/v1/cps/{cp}/runs")
    };
    let (request, trace) = loop {
        let seen = spans.lock().unwrap().clone();
        if let Some(request) = seen.iter().find(|s| is_request(s)) {
            let trace: Vec<Seen> = seen
                .iter()
                .filter(|s| s.trace == request.trace)
                .cloned()
                .collect();
            let named = |n: &str| trace.iter().filter(|s| s.name == n).count();
            if named("sync.batch") >= 3
                && ["queue.enqueue", "queue.run", "sync.run"]
                    .iter()
                    .all(|n| named(n) == 1)
            {
                break (request.clone(), trace);
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no connected trace; spans seen: {:?}",
            seen.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    server.abort();

    assert_eq!(request.trace.len(), 16);
    assert!(request.parent.is_empty(), "the request span is the root");
    assert_eq!(request.attrs["http.method"], "POST");
    assert_eq!(request.attrs["http.status_code"], "201");
    // No ids, query strings or bodies in the request span's fields.
    for value in request.attrs.values() {
        assert!(!value.contains("TRACE") && !value.contains(&id), "{value}");
    }

    // The parent links form the chain: each span's nearest ancestor among
    // the chain's names is the step before it.
    let by_id: HashMap<&[u8], &Seen> = trace.iter().map(|s| (s.id.as_slice(), s)).collect();
    let chain = [
        "http.request",
        "queue.enqueue",
        "queue.run",
        "sync.run",
        "sync.batch",
    ];
    let nearest = |s: &Seen| -> Option<Seen> {
        let mut parent = s.parent.as_slice();
        while let Some(p) = by_id.get(parent) {
            if chain.contains(&p.name.as_str()) {
                return Some((*p).clone());
            }
            parent = p.parent.as_slice();
        }
        None
    };
    let one = |n: &str| trace.iter().find(|s| s.name == n).unwrap().clone();
    let enqueue = one("queue.enqueue");
    assert_eq!(
        enqueue.parent, request.id,
        "queue.enqueue is the request span's child"
    );
    let run = one("queue.run");
    assert_eq!(
        run.parent, enqueue.id,
        "queue.run is queue.enqueue's child (through the job's metadata)"
    );
    let sync = one("sync.run");
    assert_eq!(
        nearest(&sync).map(|p| p.id),
        Some(run.id.clone()),
        "sync.run is under queue.run"
    );
    let batches: Vec<&Seen> = trace.iter().filter(|s| s.name == "sync.batch").collect();
    for batch in &batches {
        assert_eq!(
            nearest(batch).map(|p| p.id),
            Some(sync.id.clone()),
            "sync.batch is under sync.run"
        );
    }
    assert!(
        trace.iter().any(|s| s.name == "sink.write"),
        "sink.write is in the trace"
    );
}
