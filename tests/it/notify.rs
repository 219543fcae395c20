//! Notifications of ended runs, against a local SMTP sink and a local
//! webhook receiver on the real Postgres: a failed run through real
//! workers and the OpenClinica simulator sends exactly one email and one
//! signed webhook, with every field and none of the study's values;
//! aborted runs (queued or running), poison pills and runs out of retries
//! notify once; a success only when the CP asks; a failing mail server is
//! retried with backoff and recorded while the run stays as it ended; two
//! dispatchers never send one notification twice; the runs API and CLI
//! show the notifications. No sleeps to wait for work: waits poll against
//! a deadline, or drive the dispatcher's step directly.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use hmac::{Hmac, Mac};
use ocsync::config::{Env, NotifyConfig};
use ocsync::cp::{CpConfig, store};
use ocsync::notify::{Delivery, DeliveryStatus, Dispatcher, outbox};
use ocsync::odm::generate::{GeneratorConfig, generate};
use ocsync::queue::{self, RunInfo, RunStatus};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::harness::{TestDb, ocsync, output, stderr};
use crate::queue::{Worker, oc_cp_with, sim_study, worker_logs as logs};

const DEADLINE: Duration = Duration::from_secs(60);
const HOOK_SECRET: &str = "hook-secret-for-tests";
const PUBLIC_URL: &str = "https://ocsync.lab.test";

// ---------------------------------------------------------------- SMTP sink

/// One message the sink accepted.
#[derive(Debug, Clone)]
struct Mail {
    from: String,
    to: Vec<String>,
    /// Headers and body, dot-unstuffed, CRLF line ends.
    data: String,
}

/// How the sink answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkMode {
    Accept,
    /// Every MAIL FROM gets 451: try again later.
    Busy,
}

/// A tiny SMTP server on 127.0.0.1: enough of RFC 5321 for lettre (no
/// extensions, so no STARTTLS and no AUTH), keeping what it accepts.
#[derive(Clone)]
struct SmtpSink {
    addr: SocketAddr,
    mail: Arc<Mutex<Vec<Mail>>>,
    mode: Arc<Mutex<SinkMode>>,
    /// MAIL FROM commands seen (each a delivery attempt).
    attempts: Arc<AtomicU64>,
}

impl SmtpSink {
    async fn start(mode: SinkMode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink = Self {
            addr: listener.local_addr().unwrap(),
            mail: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
            attempts: Arc::default(),
        };
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = s.serve(conn).await;
                });
            }
        });
        sink
    }

    fn set_mode(&self, mode: SinkMode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn mail(&self) -> Vec<Mail> {
        self.mail.lock().unwrap().clone()
    }

    async fn serve(&self, conn: tokio::net::TcpStream) -> std::io::Result<()> {
        let (read, mut write) = conn.into_split();
        let mut lines = BufReader::new(read);
        write.write_all(b"220 sink.test ESMTP\r\n").await?;
        let mut from = String::new();
        let mut to = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let command = line.trim_end().to_owned();
            let verb = command
                .split([' ', ':'])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let answer: &[u8] = match verb.as_str() {
                "EHLO" | "HELO" => b"250 sink.test\r\n",
                "MAIL" => {
                    self.attempts.fetch_add(1, Ordering::SeqCst);
                    if *self.mode.lock().unwrap() == SinkMode::Busy {
                        b"451 4.3.0 busy, try again later\r\n"
                    } else {
                        from = command[10..].trim().to_owned();
                        to.clear();
                        b"250 OK\r\n"
                    }
                }
                "RCPT" => {
                    to.push(command[8..].trim().to_owned());
                    b"250 OK\r\n"
                }
                "DATA" => {
                    write.write_all(b"354 go ahead\r\n").await?;
                    let mut data = String::new();
                    loop {
                        line.clear();
                        if lines.read_line(&mut line).await? == 0 {
                            return Ok(());
                        }
                        if line == ".\r\n" || line == ".\n" {
                            break;
                        }
                        let unstuffed = line.strip_prefix('.').unwrap_or(&line);
                        data.push_str(unstuffed);
                    }
                    self.mail.lock().unwrap().push(Mail {
                        from: from.clone(),
                        to: to.clone(),
                        data,
                    });
                    b"250 OK queued\r\n"
                }
                "RSET" | "NOOP" => b"250 OK\r\n",
                "QUIT" => {
                    write.write_all(b"221 bye\r\n").await?;
                    return Ok(());
                }
                _ => b"502 command not implemented\r\n",
            };
            write.write_all(answer).await?;
        }
    }
}

/// A port on which nothing listens (bound, then released).
async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------- webhook receiver

#[derive(Debug, Clone)]
struct Hook {
    headers: HeaderMap,
    body: Bytes,
}

/// An HTTP server on 127.0.0.1 that keeps every POST to `/hook` and
/// answers `status`, after `delay_ms`.
#[derive(Clone)]
struct Receiver {
    url: String,
    hooks: Arc<Mutex<Vec<Hook>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Self {
            url: format!("http://{}/hook", listener.local_addr().unwrap()),
            hooks: Arc::default(),
            status: Arc::new(AtomicU16::new(204)),
            delay_ms: Arc::default(),
        };
        let state = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(r): axum::extract::State<Receiver>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let delay = r.delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    r.hooks.lock().unwrap().push(Hook { headers, body });
                    StatusCode::from_u16(r.status.load(Ordering::SeqCst)).unwrap()
                },
            ),
        );
        tokio::spawn(async move {
            axum::serve(listener, app.with_state(state)).await.unwrap();
        });
        r
    }

    fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap().clone()
    }
}

/// Checks a webhook's signature as a receiver would: HMAC-SHA256 of
/// `{timestamp}.{body}` with the shared secret, in constant time.
fn verify_signature(hook: &Hook, secret: &[u8]) -> Result<(), String> {
    let header = |n: &str| {
        hook.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(format!("no {n} header"))
    };
    let timestamp = header("x-ocsync-timestamp")?;
    let signature = header("x-ocsync-signature")?;
    let hex = signature
        .strip_prefix("sha256=")
        .ok_or("the signature does not start with sha256=")?;
    let tag: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&hook.body);
    mac.verify_slice(&tag)
        .map_err(|_| "bad signature".to_owned())?;
    let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
    if !(-5..=300).contains(&age) {
        return Err(format!("timestamp {age} s away"));
    }
    Ok(())
}

// ----------------------------------------------------------------- helpers

/// A worker that links to [`PUBLIC_URL`] and signs with [`HOOK_SECRET`],
/// plus `env`.
fn worker(t: &TestDb, dir: &Path, label: &str, env: &[(&str, String)]) -> Worker {
    let fixed = [("PUBLIC_URL", PUBLIC_URL), ("HOOK_SECRET", HOOK_SECRET)];
    Worker::spawn_with(
        t,
        dir,
        label,
        fixed
            .into_iter()
            .map(|(k, v)| (k, v.to_owned()))
            .chain(env.iter().cloned()),
    )
}

/// The SMTP settings of a worker (or dispatcher) sending to `port`.
fn smtp_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("SMTP_HOST", "127.0.0.1".to_owned()),
        ("SMTP_PORT", port.to_string()),
        ("SMTP_TLS", "none".to_owned()),
        ("SMTP_FROM", "ocsync <ocsync@lab.test>".to_owned()),
    ]
}

/// A dispatcher in this process, configured as a worker with `env` is.
fn dispatcher(pool: &PgPool, env: &[(&str, String)]) -> Dispatcher {
    let mut pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    pairs.push(("PUBLIC_URL", PUBLIC_URL));
    let config = NotifyConfig::from_lookup(&Env::from_pairs(pairs)).unwrap();
    Dispatcher::new(pool.clone(), &config).unwrap()
}

/// Writes the webhook secret to a file in `dir`; its reference.
fn secret_file(dir: &Path) -> String {
    let path = dir.join("hook-secret");
    std::fs::write(&path, format!("{HOOK_SECRET}\n")).unwrap();
    format!("{{ file = {:?} }}", path.display().to_string())
}

/// The `[notify]` section sending to `email` and/or `hook`, whose secret
/// is `secret` (a reference, as TOML).
fn notify_section(email: Option<&str>, hook: Option<(&str, &str)>, on_success: bool) -> String {
    let mut s = String::from("\n[notify]\n");
    if let Some(e) = email {
        s += &format!("email = [{e:?}]\n");
    }
    if let Some((url, secret)) = hook {
        s += &format!("webhook_url = {url:?}\nwebhook_secret = {secret}\n");
    }
    s += &format!("on_success = {on_success}\n");
    s
}

/// A CP reading a small generated study from a file, with `notify`.
async fn file_cp(t: &TestDb, dir: &Path, id: &str, notify: &str) {
    study_cp(t, dir, id, 3, 50, notify).await;
}

/// A CP reading a generated study of `subjects` from a file, `batch`
/// subjects per batch, with `notify`.
async fn study_cp(t: &TestDb, dir: &Path, id: &str, subjects: u32, batch: u32, notify: &str) {
    let path = dir.join(format!("{id}.xml"));
    let study = GeneratorConfig {
        seed: 3,
        subjects,
        sites: 1,
        ..GeneratorConfig::default()
    };
    generate(&study, std::fs::File::create(&path).unwrap()).unwrap();
    let toml = format!(
        "id = {id:?}\ndefault_site = \"Main\"\nbatch_size = {batch}\n[source]\nkind = \"file\"\npath = {:?}\n{notify}",
        path.display().to_string()
    );
    store::add(&t.pool, &CpConfig::from_toml(&toml, "cp.toml").unwrap())
        .await
        .unwrap();
}

async fn sql_enqueue(pool: &PgPool, cp: &str) -> String {
    sqlx::query_scalar("SELECT ocsync.enqueue_sync($1, 'incremental', NULL, 'sql', 'tester')")
        .bind(cp)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Enqueues a run of `cp` and aborts it while it waits: it ends Aborted
/// without any worker.
async fn aborted_run(pool: &PgPool, cp: &str) -> String {
    let id = sql_enqueue(pool, cp).await;
    let status: String = sqlx::query_scalar("SELECT ocsync.abort_run($1, 'ops')")
        .bind(&id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(status, "Aborted");
    id
}

async fn run(pool: &PgPool, id: &str) -> RunInfo {
    queue::runs::get(pool, id)
        .await
        .unwrap()
        .expect("the run exists")
}

/// Polls until `pred` holds for the run's notifications.
async fn wait_for_notifications(
    pool: &PgPool,
    id: &str,
    dir: Option<&Path>,
    what: &str,
    pred: impl Fn(&[Delivery]) -> bool,
) -> Vec<Delivery> {
    let start = Instant::now();
    loop {
        let n = outbox::for_run(pool, id).await.unwrap();
        if pred(&n) {
            return n;
        }
        if start.elapsed() > DEADLINE {
            let logs = dir.map(logs).unwrap_or_default();
            panic!(
                "timed out waiting for {what}: {n:#?}\n{:#?}{logs}",
                run(pool, id).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_run(pool: &PgPool, id: &str, dir: &Path) -> RunInfo {
    let start = Instant::now();
    loop {
        let r = run(pool, id).await;
        if r.status.is_terminal() {
            return r;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "run {id} did not end: {r:#?}{}",
            logs(dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn all_settled(n: &[Delivery]) -> bool {
    !n.is_empty() && n.iter().all(|d| d.status != DeliveryStatus::Pending)
}

/// The import log row of a run, as JSON (to show it did not change).
async fn import_log(pool: &PgPool, id: &str) -> serde_json::Value {
    sqlx::query_scalar("SELECT to_jsonb(l) FROM ocsync.import_logs l WHERE run_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every value of the study a simulator serves, the subject identifiers
/// and the item values (at least four characters: shorter ones, like `1`
/// or `m`, occur in any text), except the literal `null` (a JSON word).
fn study_values(study: &GeneratorConfig) -> BTreeSet<String> {
    let mut doc = Vec::new();
    generate(study, &mut doc).unwrap();
    let mut dump = Vec::new();
    ocsync::odm::cli::dump(&doc[..], &mut dump).unwrap();
    let mut values = BTreeSet::new();
    for line in String::from_utf8(dump).unwrap().lines() {
        let item: serde_json::Value = serde_json::from_str(line).unwrap();
        values.insert(item["subject_key"].as_str().unwrap().to_owned());
        if let Some(v) = item["value"].as_str() {
            let v = v.trim();
            if v.chars().count() >= 4 && v != "null" {
                values.insert(v.to_owned());
            }
        }
    }
    // Subject labels (StudySubjectID) and unique identifiers too.
    let text = String::from_utf8(doc).unwrap();
    for attr in [
        "OpenClinica:StudySubjectID=\"",
        "OpenClinica:UniqueIdentifier=\"",
    ] {
        for part in text.split(attr).skip(1) {
            if let Some(v) = part.split('"').next()
                && v.len() >= 4
            {
                values.insert(v.to_owned());
            }
        }
    }
    values
}

// ------------------------------------------------------------------- tests

/// The test: a failed run (error rows) through two real workers
/// and the OpenClinica simulator sends exactly one email and one webhook,
/// with every field, a valid signature, and none of the study's values.
#[tokio::test]
async fn a_failed_run_sends_exactly_one_email_and_one_signed_webhook_without_study_values() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::migrated().await;
    let sink = SmtpSink::start(SinkMode::Accept).await;
    let receiver = Receiver::start().await;
    let notify = notify_section(
        Some("Biobank Team <team@lab.test>"),
        Some((&receiver.url, "{ env = \"HOOK_SECRET\" }")),
        false,
    );
    let sim = oc_cp_with(&t, dir.path(), "CP-N", &notify).await;
    let study = sim_study();
    let env = smtp_env(sink.addr.port());
    let _a = worker(&t, dir.path(), "a", &env);
    let _b = worker(&t, dir.path(), "b", &env);

    // Two real subjects and one that does not exist: an error row, so the
    // run ends Failed.
    let id: String = sqlx::query_scalar(
        "SELECT ocsync.enqueue_sync('CP-N', 'subjects', ARRAY['SS_GEN000001','SS_GEN000002','NOBODY'], 'sql', 'tester')",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    let r = wait_for_run(&t.pool, &id, dir.path()).await;
    assert_eq!(r.status, RunStatus::Failed, "{r:#?}");
    assert_eq!(r.error_count, 1);
    assert!(r.counts.participants.created >= 2, "{r:#?}");
    let n = wait_for_notifications(&t.pool, &id, Some(dir.path()), "both sent", all_settled).await;
    assert_eq!(n.len(), 2, "{n:#?}");
    for d in &n {
        assert_eq!(d.status, DeliveryStatus::Sent, "{d:#?}{}", logs(dir.path()));
        assert_eq!(d.attempts, 1);
        assert!(d.sent_at.is_some() && d.last_error.is_none() && d.next_attempt_at.is_none());
    }
    let url = format!("{PUBLIC_URL}/ui/runs/{id}");

    // Exactly one email, with the fields.
    let mail = sink.mail();
    assert_eq!(mail.len(), 1, "{mail:#?}");
    let m = &mail[0];
    assert_eq!(m.from, "<ocsync@lab.test>");
    assert_eq!(m.to, vec!["<team@lab.test>".to_owned()]);
    let (headers, body) = m
        .data
        .split_once("\r\n\r\n")
        .expect("headers, then the body");
    assert!(
        headers.contains(&format!("Subject: [ocsync] CP-N run {id} Failed")),
        "{headers}"
    );
    assert!(
        headers.contains("To: \"Biobank Team\" <team@lab.test>")
            || headers.contains("To: Biobank Team <team@lab.test>"),
        "{headers}"
    );
    assert!(
        headers.contains("Content-Type: text/plain; charset=utf-8"),
        "{headers}"
    );
    assert!(
        headers.contains("Content-Transfer-Encoding: 7bit"),
        "{headers}"
    );
    let body = body.replace("\r\n", "\n");
    let c = &r.counts;
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    for want in [
        format!("Run {id} of CP CP-N ended Failed."),
        "CP:           CP-N".to_owned(),
        format!("Run:          {id}"),
        "Status:       Failed".to_owned(),
        "Mode:         subjects".to_owned(),
        "Trigger:      sql".to_owned(),
        "Requested by: tester".to_owned(),
        format!("Started:      {}", time(r.started_at)),
        format!("Finished:     {}", time(r.finished_at)),
        format!(
            "Subjects:     {} of {}",
            r.subjects_done.unwrap(),
            r.subjects_total.unwrap()
        ),
        "Error rows:   1".to_owned(),
        format!(
            "participants  {:>9} {:>9} {:>9} {:>9}",
            c.participants.created,
            c.participants.updated,
            c.participants.unchanged,
            c.participants.failed
        ),
        format!(
            "visits        {:>9} {:>9} {:>9} {:>9}",
            c.visits.created, c.visits.updated, c.visits.unchanged, c.visits.failed
        ),
        format!(
            "form records  {:>9} {:>9} {:>9} {:>9}",
            c.form_records.created,
            c.form_records.updated,
            c.form_records.unchanged,
            c.form_records.failed
        ),
        format!("Run page: {url}"),
    ] {
        assert!(
            body.contains(&want),
            "{want:?} missing from the email:\n{body}"
        );
    }

    // Exactly one webhook, signed, with the fields.
    let hooks = receiver.hooks();
    assert_eq!(hooks.len(), 1, "{hooks:#?}");
    let h = &hooks[0];
    verify_signature(h, HOOK_SECRET.as_bytes()).unwrap();
    assert!(verify_signature(h, b"another secret").is_err());
    assert_eq!(h.headers["content-type"], "application/json");
    assert!(
        h.headers["x-ocsync-id"]
            .to_str()
            .unwrap()
            .parse::<i64>()
            .is_ok()
    );
    let json: serde_json::Value = serde_json::from_slice(&h.body).unwrap();
    let keys: BTreeSet<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "event",
            "cp",
            "run_id",
            "status",
            "mode",
            "trigger",
            "requested_by",
            "enqueued_at",
            "started_at",
            "finished_at",
            "subjects_done",
            "subjects_total",
            "counts",
            "error_count",
            "url",
        ])
    );
    assert_eq!(json["event"], "run.ended");
    assert_eq!(json["cp"], "CP-N");
    assert_eq!(json["run_id"], id.as_str());
    assert_eq!(json["status"], "Failed");
    assert_eq!(json["mode"], "subjects");
    assert_eq!(json["trigger"], "sql");
    assert_eq!(json["requested_by"], "tester");
    assert_eq!(json["error_count"], 1);
    assert_eq!(json["url"], url.as_str());
    assert_eq!(json["subjects_done"], r.subjects_done.unwrap());
    assert_eq!(json["counts"], serde_json::to_value(&r.counts).unwrap());
    for (field, value) in [("started_at", r.started_at), ("finished_at", r.finished_at)] {
        let sent: chrono::DateTime<chrono::Utc> = json[field].as_str().unwrap().parse().unwrap();
        assert_eq!(Some(sent), value, "{field}");
    }

    // None of the study's values, in either.
    let served = sim.study(&study.study_oid).unwrap();
    let values = study_values(&served);
    assert!(
        values.len() > 20,
        "the check needs values to look for: {values:?}"
    );
    // The run id, the link and the times were checked field by field
    // above; they are masked here, because a short number from the study
    // ("12.2") can occur in a time ("…T17:04:12.2…Z") or an id by chance.
    // Everything else the messages say is searched for every value.
    let mut known: Vec<String> = vec![url.clone(), id.clone()];
    for field in ["enqueued_at", "started_at", "finished_at"] {
        if let Some(t) = json[field].as_str() {
            known.push(t.to_owned());
            let t: chrono::DateTime<chrono::Utc> = t.parse().unwrap();
            known.push(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        }
    }
    let mask = |text: &str| {
        known.iter().fold(text.to_owned(), |text, k| {
            text.replace(k.as_str(), "<checked>")
        })
    };
    let hook_text = mask(std::str::from_utf8(&h.body).unwrap());
    // The email's subject and body (its other headers, Date and a random
    // Message-ID, are lettre's).
    let subject = headers
        .lines()
        .find(|l| l.starts_with("Subject: "))
        .unwrap();
    let said = mask(&format!("{subject}\n{body}"));
    for v in &values {
        assert!(
            !said.contains(v.as_str()),
            "the email carries a study value {v:?}:\n{said}"
        );
        assert!(
            !hook_text.contains(v.as_str()),
            "the webhook carries a study value {v:?}:\n{hook_text}"
        );
    }
    // Nor the error message (it names the subject that was not found).
    assert!(!said.contains("NOBODY") && !hook_text.contains("NOBODY"));

    // Still exactly one of each, however many dispatchers there are.
    assert_eq!(sink.mail().len(), 1);
    assert_eq!(receiver.hooks().len(), 1);
    assert_eq!(run(&t.pool, &id).await.status, RunStatus::Failed);
}

/// A queued run aborted in SQL notifies; the API and the CLI list the
/// notifications; a Success notifies only the CP that asks for it; a run
/// aborted while running (ended by its worker) notifies too.
#[tokio::test]
async fn aborted_runs_notify_success_only_when_asked_and_runs_show_their_notifications() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::migrated().await;
    let receiver = Receiver::start().await;
    let secret = secret_file(dir.path());
    let hook = Some((receiver.url.as_str(), secret.as_str()));
    file_cp(
        &t,
        dir.path(),
        "CP-QUIET",
        &notify_section(None, hook, false),
    )
    .await;
    file_cp(&t, dir.path(), "CP-LOUD", &notify_section(None, hook, true)).await;
    file_cp(&t, dir.path(), "CP-NONE", "").await;

    // Aborted while queued: no worker involved; the database queues the
    // notification in the abort's own transaction.
    let aborted = aborted_run(&t.pool, "CP-QUIET").await;
    let silent = aborted_run(&t.pool, "CP-NONE").await;
    let n = outbox::for_run(&t.pool, &aborted).await.unwrap();
    assert_eq!(n.len(), 1, "{n:#?}");
    assert_eq!(n[0].status, DeliveryStatus::Pending);
    assert!(outbox::for_run(&t.pool, &silent).await.unwrap().is_empty());
    // Aborting again changes nothing and queues nothing more.
    let again: String = sqlx::query_scalar("SELECT ocsync.abort_run($1)")
        .bind(&aborted)
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(again, "Aborted");
    let d = dispatcher(&t.pool, &[]);
    assert_eq!(d.deliver_due().await.unwrap(), 1);
    assert_eq!(d.deliver_due().await.unwrap(), 0);
    let hooks = receiver.hooks();
    assert_eq!(hooks.len(), 1);
    verify_signature(&hooks[0], HOOK_SECRET.as_bytes()).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&hooks[0].body).unwrap();
    assert_eq!(json["status"], "Aborted");
    assert_eq!(json["run_id"], aborted.as_str());
    assert!(json["started_at"].is_null(), "it never started: {json}");

    // GET /api/v1/runs/{id} and `ocsync runs show` list it.
    let token = ocsync::api::tokens::create(&t.pool, "viewer", ocsync::api::tokens::Role::Viewer)
        .await
        .unwrap();
    let app = ocsync::api::router(ocsync::api::AppState {
        pool: t.pool.clone(),
    });
    let resp = app
        .oneshot(
            Request::get(format!("/api/v1/runs/{aborted}"))
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value = serde_json::from_slice(
        &axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap(),
    )
    .unwrap();
    let listed = body["notifications"]
        .as_array()
        .expect("a notifications list");
    assert_eq!(listed.len(), 1, "{body}");
    assert_eq!(listed[0]["channel"], "webhook");
    assert_eq!(listed[0]["target"], receiver.url.as_str());
    assert_eq!(listed[0]["status"], "sent");
    assert_eq!(listed[0]["attempts"], 1);
    assert!(listed[0]["last_error"].is_null() && listed[0]["sent_at"].is_string());
    let out = output({
        let mut c = ocsync();
        c.args(["runs", "show", &aborted])
            .env("DATABASE_URL", t.url());
        c
    })
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["notifications"][0]["status"], "sent", "{shown}");
    assert_eq!(shown["notifications"][0]["channel"], "webhook");

    // Success: only the CP with on_success = true notifies.
    let _w = worker(&t, dir.path(), "w", &[]);
    let quiet = sql_enqueue(&t.pool, "CP-QUIET").await;
    let loud = sql_enqueue(&t.pool, "CP-LOUD").await;
    for id in [&quiet, &loud] {
        assert_eq!(
            wait_for_run(&t.pool, id, dir.path()).await.status,
            RunStatus::Success
        );
    }
    let n = wait_for_notifications(
        &t.pool,
        &loud,
        Some(dir.path()),
        "the success sent",
        all_settled,
    )
    .await;
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].status, DeliveryStatus::Sent, "{n:#?}");
    assert!(outbox::for_run(&t.pool, &quiet).await.unwrap().is_empty());
    let statuses: Vec<String> = receiver
        .hooks()
        .iter()
        .map(|h| {
            serde_json::from_slice::<serde_json::Value>(&h.body).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(statuses, ["Aborted", "Success"]);

    // Aborted while running: the worker ends it (Killed, through apalis),
    // and it notifies like the others.
    study_cp(
        &t,
        dir.path(),
        "CP-SLOW",
        300,
        1,
        &notify_section(None, hook, false),
    )
    .await;
    let slow = sql_enqueue(&t.pool, "CP-SLOW").await;
    let start = Instant::now();
    while run(&t.pool, &slow).await.subjects_done.unwrap_or(0) < 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "the run did not start{}",
            logs(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        queue::abort(&t.pool, &slow).await.unwrap(),
        queue::AbortOutcome::Aborting
    );
    let r = wait_for_run(&t.pool, &slow, dir.path()).await;
    assert_eq!(r.status, RunStatus::Aborted, "{r:#?}");
    let n = wait_for_notifications(&t.pool, &slow, Some(dir.path()), "sent", all_settled).await;
    assert_eq!((n.len(), n[0].status), (1, DeliveryStatus::Sent), "{n:#?}");
    let last: serde_json::Value =
        serde_json::from_slice(&receiver.hooks().last().unwrap().body).unwrap();
    assert_eq!(last["run_id"], slow.as_str());
    assert_eq!(last["status"], "Aborted");
    assert!(last["started_at"].is_string() && last["subjects_done"].as_i64().unwrap() >= 2);
    assert_eq!(receiver.hooks().len(), 3);
}

/// A mail server that answers "try later" is tried again with a growing,
/// jittered delay, each failure recorded, and given up after
/// NOTIFY_MAX_ATTEMPTS; the run never changes. A server that is down is
/// recorded the same way; without SMTP_HOST, email fails at once, saying so.
#[tokio::test]
async fn a_failing_mail_server_is_retried_with_backoff_recorded_and_never_touches_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::migrated().await;
    file_cp(
        &t,
        dir.path(),
        "CP-M",
        &notify_section(Some("team@lab.test"), None, false),
    )
    .await;
    let sink = SmtpSink::start(SinkMode::Busy).await;
    let mut env = smtp_env(sink.addr.port());
    env.push(("NOTIFY_RETRY_BASE_SECS", "1".to_owned()));
    env.push(("NOTIFY_MAX_ATTEMPTS", "3".to_owned()));
    let d = dispatcher(&t.pool, &env);

    let id = aborted_run(&t.pool, "CP-M").await;
    let before = import_log(&t.pool, &id).await;
    let next_at = |n: &[Delivery]| n[0].next_attempt_at.expect("pending, with a next attempt");

    // Attempt 1: 451. Recorded, retried after 0.5–1 s (base 1 s, jittered).
    let t0 = chrono::Utc::now();
    assert_eq!(d.deliver_due().await.unwrap(), 1);
    let n = outbox::for_run(&t.pool, &id).await.unwrap();
    assert_eq!(
        (n[0].status, n[0].attempts),
        (DeliveryStatus::Pending, 1),
        "{n:#?}"
    );
    let err = n[0].last_error.clone().unwrap();
    assert!(
        err.contains(&format!("SMTP server 127.0.0.1:{}", sink.addr.port())),
        "{err}"
    );
    assert!(err.contains("451"), "{err}");
    let wait1 = next_at(&n) - t0;
    assert!(
        wait1 >= chrono::Duration::milliseconds(450)
            && wait1 <= chrono::Duration::milliseconds(1500),
        "{wait1:?}"
    );
    // Not due yet: nothing is claimed.
    assert_eq!(d.deliver_due().await.unwrap(), 0);

    // Attempt 2 when due: still busy; the delay doubles (1–2 s).
    let n = drive_until(&d, &t.pool, &id, |n| n[0].attempts == 2).await;
    let wait2 = next_at(&n) - chrono::Utc::now();
    assert!(wait2 >= chrono::Duration::milliseconds(800), "{wait2:?}");
    assert_eq!(n[0].status, DeliveryStatus::Pending);

    // Attempt 3, the last: given up, with the reason.
    let n = drive_until(&d, &t.pool, &id, |n| n[0].status != DeliveryStatus::Pending).await;
    assert_eq!(
        (n[0].status, n[0].attempts),
        (DeliveryStatus::Failed, 3),
        "{n:#?}"
    );
    assert!(
        n[0].last_error
            .as_deref()
            .unwrap()
            .starts_with("gave up after 3 attempts: "),
        "{n:#?}"
    );
    assert!(n[0].next_attempt_at.is_none() && n[0].sent_at.is_none());
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 3);
    assert!(sink.mail().is_empty());
    // The run is exactly as it ended.
    assert_eq!(import_log(&t.pool, &id).await, before);
    assert_eq!(d.deliver_due().await.unwrap(), 0);

    // A mail server that is down: a connection error, recorded, retried.
    let down = dispatcher(&t.pool, &smtp_env(dead_port().await));
    let id2 = aborted_run(&t.pool, "CP-M").await;
    assert_eq!(down.deliver_due().await.unwrap(), 1);
    let n = outbox::for_run(&t.pool, &id2).await.unwrap();
    assert_eq!(
        (n[0].status, n[0].attempts),
        (DeliveryStatus::Pending, 1),
        "{n:#?}"
    );
    assert!(
        n[0].last_error
            .as_deref()
            .unwrap()
            .contains("Connection error"),
        "{n:#?}"
    );
    // The server comes back: the retry delivers it.
    sink.set_mode(SinkMode::Accept);
    let n = drive_until(&d, &t.pool, &id2, |n| {
        n[0].status != DeliveryStatus::Pending
    })
    .await;
    assert_eq!(
        (n[0].status, n[0].attempts),
        (DeliveryStatus::Sent, 2),
        "{n:#?}"
    );
    assert!(n[0].last_error.is_none());
    assert_eq!(sink.mail().len(), 1);

    // No SMTP server configured: failed at once, saying so.
    let none = dispatcher(&t.pool, &[]);
    let id3 = aborted_run(&t.pool, "CP-M").await;
    assert_eq!(none.deliver_due().await.unwrap(), 1);
    let n = outbox::for_run(&t.pool, &id3).await.unwrap();
    assert_eq!(
        (n[0].status, n[0].attempts),
        (DeliveryStatus::Failed, 1),
        "{n:#?}"
    );
    assert_eq!(
        n[0].last_error.as_deref(),
        Some("SMTP is not configured (SMTP_HOST is unset)")
    );
    assert_eq!(run(&t.pool, &id3).await.status, RunStatus::Aborted);
}

/// Runs `d`'s step until `pred` holds for run `id`'s notifications.
async fn drive_until(
    d: &Dispatcher,
    pool: &PgPool,
    id: &str,
    pred: impl Fn(&[Delivery]) -> bool,
) -> Vec<Delivery> {
    let start = Instant::now();
    loop {
        d.deliver_due().await.unwrap();
        let n = outbox::for_run(pool, id).await.unwrap();
        if pred(&n) {
            return n;
        }
        assert!(start.elapsed() < DEADLINE, "timed out: {n:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Success run whose mail server is down stays Success; the notification
/// ends failed after its attempts, on the run's record. Runs that end after
/// spent retries (OpenClinica down) or as poison pills notify once.
#[tokio::test]
async fn a_run_ends_as_it_would_whatever_its_notifications_do_and_every_end_notifies_once() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::migrated().await;
    let receiver = Receiver::start().await;
    file_cp(
        &t,
        dir.path(),
        "CP-OK",
        &notify_section(Some("team@lab.test"), None, true),
    )
    .await;
    let mut env = smtp_env(dead_port().await);
    env.push(("NOTIFY_RETRY_BASE_SECS", "0".to_owned()));
    env.push(("NOTIFY_MAX_ATTEMPTS", "2".to_owned()));
    let _w = worker(&t, dir.path(), "w", &env);
    let id = sql_enqueue(&t.pool, "CP-OK").await;
    let r = wait_for_run(&t.pool, &id, dir.path()).await;
    assert_eq!(r.status, RunStatus::Success, "{r:#?}");
    let n = wait_for_notifications(&t.pool, &id, Some(dir.path()), "given up", all_settled).await;
    assert_eq!(
        (n[0].status, n[0].attempts),
        (DeliveryStatus::Failed, 2),
        "{n:#?}"
    );
    assert!(
        n[0].last_error
            .as_deref()
            .unwrap()
            .contains("Connection error"),
        "{n:#?}"
    );
    assert_eq!(run(&t.pool, &id).await.status, RunStatus::Success);
    drop(_w);

    // Poison pill: a Pending run whose attempts are spent, failed by the
    // sweep; one notification.
    let secret = secret_file(dir.path());
    let notify = notify_section(None, Some((&receiver.url, &secret)), false);
    let sim = oc_cp_with(&t, dir.path(), "CP-P", &notify).await;
    let mut tx = t.pool.begin().await.unwrap();
    let p: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-P', 'all')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE apalis.jobs SET attempts = max_attempts WHERE id = $1")
        .bind(&p)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        outbox::for_run(&t.pool, &p).await.unwrap().is_empty(),
        "not ended yet"
    );
    assert_eq!(queue::retention::fail_exhausted(&t.pool).await.unwrap(), 1);
    assert_eq!(run(&t.pool, &p).await.status, RunStatus::Failed);
    assert_eq!(outbox::for_run(&t.pool, &p).await.unwrap().len(), 1);

    // Spent retries: OpenClinica answers 503 to everything; each attempt
    // fails, the run is retried, then ends Failed. One notification, at the
    // end; none for the failed attempts before it.
    sim.set_faults(ocsync::openclinica::sim::Faults {
        error_every: 1,
        error_status: 503,
        ..Default::default()
    })
    .unwrap();
    let _w = worker(&t, dir.path(), "w2", &[]);
    let q: String =
        sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-P', 'all', NULL, 'sql', 'tester', 3)")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    let r = wait_for_run(&t.pool, &q, dir.path()).await;
    assert_eq!((r.status, r.attempts), (RunStatus::Failed, 3), "{r:#?}");
    let n = wait_for_notifications(&t.pool, &q, Some(dir.path()), "sent", all_settled).await;
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].status, DeliveryStatus::Sent, "{n:#?}");
    let bodies: Vec<serde_json::Value> = receiver
        .hooks()
        .iter()
        .map(|h| serde_json::from_slice(&h.body).unwrap())
        .collect();
    let for_q: Vec<_> = bodies
        .iter()
        .filter(|b| b["run_id"] == q.as_str())
        .collect();
    assert_eq!(for_q.len(), 1, "{bodies:#?}");
    assert_eq!(for_q[0]["status"], "Failed");
    assert!(for_q[0]["error_count"].as_i64().unwrap() >= 1);
}

/// Two dispatchers draining one outbox at once send every notification
/// exactly once.
#[tokio::test]
async fn two_dispatchers_never_send_one_notification_twice() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::migrated().await;
    let receiver = Receiver::start().await;
    receiver.delay_ms.store(20, Ordering::SeqCst);
    let secret = secret_file(dir.path());
    file_cp(
        &t,
        dir.path(),
        "CP-D",
        &notify_section(None, Some((&receiver.url, &secret)), false),
    )
    .await;
    let mut runs = BTreeSet::new();
    for _ in 0..40 {
        runs.insert(aborted_run(&t.pool, "CP-D").await);
    }
    let a = dispatcher(&t.pool, &[]);
    let b = dispatcher(&t.pool, &[]);
    let drain = |d: Dispatcher| async move {
        let mut claimed = 0;
        loop {
            let n = d.deliver_due().await.unwrap();
            if n == 0 {
                return claimed;
            }
            claimed += n;
        }
    };
    let (na, nb) = tokio::join!(drain(a), drain(b));
    assert_eq!(na + nb, 40, "{na} + {nb}");
    assert!(na > 0 && nb > 0, "both took part: {na} + {nb}");
    let hooks = receiver.hooks();
    assert_eq!(hooks.len(), 40);
    let ids: BTreeSet<String> = hooks
        .iter()
        .map(|h| h.headers["x-ocsync-id"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 40, "a notification was sent twice");
    let sent: BTreeSet<String> = hooks
        .iter()
        .map(|h| {
            serde_json::from_slice::<serde_json::Value>(&h.body).unwrap()["run_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(sent, runs);
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ocsync.notifications WHERE status <> 'sent'")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(pending, 0);
}
