//! The web pages in a real browser: headless Chromium driven through
//! chromedriver (WebDriver, with fantoccini) against a real `ocsync serve`
//! (API, pages, worker) syncing from the OpenClinica simulator, in process.
//!
//! A user signs in with an API token, opens a CP, starts an All CRF
//! records run, watches its progress move on the Import Logs (updated in
//! place by the page's script, without a reload), aborts it through the
//! confirmation dialog, sees Aborted and "(Aborted)", and downloads the
//! error report of a run that failed. The test saves screenshots of the
//! CP page and the Import Logs to `target/screenshots/`; with
//! `OCSYNC_UPDATE_SCREENSHOTS=1` it replaces those the README shows, in
//! `docs/screenshots/`.
//!
//! It needs Debian's `chromium` and `chromium-driver` (`make test` and CI
//! install them through `deploy/local/ensure-tools.sh`) and fails, saying
//! so, without them.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use ocsync::api::tokens::{self, Role};
use ocsync::cp::{CpConfig, store};
use ocsync::odm::generate::GeneratorConfig;
use ocsync::openclinica::sim::{Faults, SimConfig, Simulator};
use secrecy::SecretString;
use serde_json::json;

use crate::harness::{TestDb, ocsync};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const DEADLINE: Duration = Duration::from_secs(60);
const OC_PASSWORD: &str = "oc-browser-pw";

/// A child process, killed (by its own id) when dropped.
struct Spawned {
    child: Child,
    log: PathBuf,
}

impl Spawned {
    fn start(mut cmd: Command, log: PathBuf) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self { child, log }
    }

    fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let text = format!(
            "{}{}",
            read(&self.log),
            read(&self.log.with_extension("err"))
        );
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it gives a value; an error naming `what` at the
/// deadline.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            eprintln!("{what}: {:.1} s", start.elapsed().as_secs_f64());
            return Ok(v);
        }
        if start.elapsed() > DEADLINE {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// chromedriver, asked to quit (closing the browsers it started) before
/// its process is ended.
struct Driver {
    process: Spawned,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        use std::io::Write;
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
            let _ = s.write_all(
                b"GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            );
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.process.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The CP configuration of a study on the simulator, read over OC 4.x.
fn oc4_cp(
    id: &str,
    study: &str,
    sim: &ocsync::openclinica::sim::SimHandle,
    extra: &str,
) -> CpConfig {
    let toml = format!(
        r#"
id = "{id}"
description = "{study} on the OpenClinica simulator"
batch_size = 2
{extra}

[source]
kind = "oc4"
base_url = "{base}"
auth_url = "{auth}"
study_oid = "{study}"
username = "ocsync"
password = {{ env = "OC_BROWSER_PASSWORD" }}
# A document per participant, one in flight at a time: with the
# simulator's latency, the run takes long enough to be watched and aborted.
whole_study = false
network = {{ max_concurrency = 1 }}

[event_map]
SE_VISIT = "Visit"
"#,
        base = sim.base_url_oc4().as_str().trim_end_matches('/'),
        auth = sim.auth_url().as_str().trim_end_matches('/'),
    );
    CpConfig::from_toml(&toml, "browser.toml").unwrap()
}

async fn row_text(c: &Client, run: &str) -> Option<String> {
    let row = c
        .find(Locator::Css(&format!("tr[data-run-id=\"{run}\"]")))
        .await
        .ok()?;
    row.text().await.ok()
}

async fn progress_value(c: &Client, run: &str) -> Option<u64> {
    let bar = c
        .find(Locator::Css(&format!("tr[data-run-id=\"{run}\"] progress")))
        .await
        .ok()?;
    // The content attribute, which the `value` property reflects.
    bar.attr("value")
        .await
        .ok()??
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

async fn path_of(c: &Client) -> String {
    c.current_url()
        .await
        .map(|u| u.path().to_owned())
        .unwrap_or_default()
}

fn screenshot(name: &str, png: &[u8]) {
    assert!(png.starts_with(b"\x89PNG"), "{name} is not a PNG");
    // Into target/screenshots, so a test run leaves the tree clean;
    // OCSYNC_UPDATE_SCREENSHOTS=1 replaces the ones the README shows.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = if std::env::var_os("OCSYNC_UPDATE_SCREENSHOTS").is_some() {
        root.join("docs/screenshots")
    } else {
        root.join("target/screenshots")
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_starts_watches_aborts_and_downloads_in_a_real_browser() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: the browser test drives headless Chromium and needs Debian's \
             `chromium` and `chromium-driver` packages (apt-get install -y chromium chromium-driver; \
             `make test` and CI install them with deploy/local/ensure-tools.sh)"
        );
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let downloads = dir.path().join("downloads");
    let profile = dir.path().join("profile");
    std::fs::create_dir_all(&downloads).unwrap();

    // The simulator: a study big enough to watch (120 subjects, 100 ms a
    // request, one at a time) and a small one whose subjects' sites the
    // CP does not map, so its run ends Failed with error rows.
    let big = GeneratorConfig {
        seed: 31,
        subjects: 120,
        sites: 1,
        study_oid: "S_BIOBANK".to_owned(),
        ..GeneratorConfig::default()
    };
    let small = GeneratorConfig {
        seed: 32,
        subjects: 4,
        sites: 2,
        study_oid: "S_PILOT".to_owned(),
        ..GeneratorConfig::default()
    };
    let mut sim_config = SimConfig::new(big, "ocsync", SecretString::from(OC_PASSWORD));
    sim_config.studies.push(small);
    // Three runs within a minute each ask for a 4.x token; OpenClinica's
    // own limit (two a minute) would hold the third back for most of one.
    sim_config.auth.token_limit = 10;
    sim_config.faults = Faults {
        latency_ms: 100,
        ..Faults::default()
    };
    let sim = Simulator::start(sim_config).await.unwrap();

    let t = TestDb::migrated().await;
    store::add(
        &t.pool,
        &oc4_cp(
            "BIOBANK",
            "S_BIOBANK",
            &sim,
            "default_site = \"Main hospital\"",
        ),
    )
    .await
    .unwrap();
    store::add(&t.pool, &oc4_cp("PILOT", "S_PILOT", &sim, ""))
        .await
        .unwrap();
    let token = tokens::create(&t.pool, "dana.manager", Role::Admin)
        .await
        .unwrap();

    // The service: API, pages, worker and schedule in one process.
    let mut cmd = ocsync();
    cmd.arg("serve")
        .env("DATABASE_URL", t.url())
        .env("DATABASE_MAX_CONNECTIONS", "6")
        .env("API_LISTEN", "127.0.0.1:0")
        .env("METRICS_LISTEN", "127.0.0.1:0")
        .env("WORKER_POLL_INTERVAL_MS", "200")
        .env("SCHEDULE_CRON", "0 3 * * *")
        .env("RUST_LOG", "info")
        .env("OC_BROWSER_PASSWORD", OC_PASSWORD);
    let server = Spawned::start(cmd, dir.path().join("ocsync.log"));
    let addr = eventually("ocsync serve to listen", || {
        let logs = std::fs::read_to_string(dir.path().join("ocsync.err")).unwrap_or_default();
        async move {
            let line = logs.lines().find(|l| l.contains("API listening"))?;
            let rest = line.split("addr=").nth(1)?;
            Some(rest.split_whitespace().next()?.to_owned())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", server.logs()));
    let base = format!("http://{addr}");

    // The run that fails, started over SQL while the browser starts.
    let failed: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('PILOT', 'all')")
        .fetch_one(&t.pool)
        .await
        .unwrap();

    // chromedriver on a free loopback port, Chromium headless with a
    // fresh profile and a download folder of its own.
    let port = free_port();
    let mut cmd = Command::new(CHROMEDRIVER);
    cmd.arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1");
    let driver = Driver {
        process: Spawned::start(cmd, dir.path().join("chromedriver.log")),
        port,
    };
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
            "prefs": {
                "download.default_directory": downloads.display().to_string(),
                "download.prompt_for_download": false,
            },
        }),
    );
    let webdriver = format!("http://127.0.0.1:{port}");
    let c = eventually("chromedriver to open a session", || {
        let caps = caps.clone();
        let webdriver = webdriver.clone();
        async move {
            ClientBuilder::new(HttpConnector::new())
                .capabilities(caps)
                .connect(&webdriver)
                .await
                .ok()
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", driver.process.logs()));
    let result = drive(&c, &base, &token, &failed, &downloads, &t).await;
    let _ = c.close().await;
    if let Err(message) = result {
        panic!(
            "{message}\n== ocsync serve\n{}\n== chromedriver\n{}",
            server.logs(),
            driver.process.logs()
        );
    }
    eprintln!("browser test took {:.1} s", started.elapsed().as_secs_f64());
}

/// The user's steps; an error says which one went wrong.
async fn drive(
    c: &Client,
    base: &str,
    token: &str,
    failed: &str,
    downloads: &Path,
    t: &TestDb,
) -> Result<(), String> {
    let step = |what: &'static str| move |e: fantoccini::error::CmdError| format!("{what}: {e}");

    // Sign in: the pages send to the sign-in form and come back.
    c.goto(&format!("{base}/ui/runs"))
        .await
        .map_err(step("open the Import Logs"))?;
    let field = c
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Id("token"))
        .await
        .map_err(step("the sign-in form"))?;
    field
        .send_keys(token)
        .await
        .map_err(step("type the token"))?;
    c.find(Locator::Css("form.signin button[type=submit]"))
        .await
        .map_err(step("the sign-in button"))?
        .click()
        .await
        .map_err(step("sign in"))?;
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::XPath("//h1[text()='Import Logs']"))
        .await
        .map_err(step("the Import Logs after sign-in"))?;
    let who = c
        .find(Locator::Css(".who"))
        .await
        .map_err(step("who is signed in"))?
        .text()
        .await
        .map_err(step("who is signed in"))?;
    if !who.contains("dana.manager") || !who.contains("admin") {
        return Err(format!("the header says {who:?}"));
    }

    // The PILOT run fails (its sites are not mapped).
    eventually("the PILOT run to fail", || async {
        let status: String =
            sqlx::query_scalar("SELECT status FROM ocsync.import_logs WHERE run_id = $1")
                .bind(failed)
                .fetch_one(&t.pool)
                .await
                .ok()?;
        (status == "Failed").then_some(())
    })
    .await?;

    // Open the CP, choose All CRF records, synchronize.
    c.find(Locator::LinkText("CPs"))
        .await
        .map_err(step("the CPs link"))?
        .click()
        .await
        .map_err(step("open the CPs"))?;
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::LinkText("BIOBANK"))
        .await
        .map_err(step("BIOBANK in the CP list"))?
        .click()
        .await
        .map_err(step("open BIOBANK"))?;
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Id("mode-all"))
        .await
        .map_err(step("the Synchronize Records form"))?
        .click()
        .await
        .map_err(step("choose All CRF records"))?;
    let subjects_enabled = c
        .find(Locator::Id("subjects"))
        .await
        .map_err(step("the subject list"))?
        .is_enabled()
        .await
        .map_err(step("the subject list"))?;
    if subjects_enabled {
        return Err("the subject list stays enabled for All CRF records".into());
    }
    c.find(Locator::Css("form.sync button[type=submit]"))
        .await
        .map_err(step("the Synchronize Records button"))?
        .click()
        .await
        .map_err(step("synchronize"))?;
    let run = eventually("the run page", || async {
        let path = path_of(c).await;
        let id = path.strip_prefix("/ui/runs/")?;
        (id.len() == 26).then(|| id.to_owned())
    })
    .await?;

    // The Import Logs: the run's progress moves, in place.
    c.find(Locator::LinkText("Import Logs"))
        .await
        .map_err(step("the Import Logs link"))?
        .click()
        .await
        .map_err(step("open the Import Logs"))?;
    let first = eventually("the run to show progress", || async {
        progress_value(c, &run).await.filter(|v| *v > 0)
    })
    .await?;
    c.execute("window.ocsyncTestMarker = 1;", vec![])
        .await
        .map_err(step("mark the page"))?;
    let later = eventually("the progress bar to move", || async {
        progress_value(c, &run).await.filter(|v| *v > first)
    })
    .await?;
    let same_page = c
        .execute("return window.ocsyncTestMarker === 1;", vec![])
        .await
        .map_err(step("read the mark"))?;
    if same_page != json!(true) {
        return Err("the page was reloaded instead of updated in place".into());
    }
    let row = row_text(c, &run).await.unwrap_or_default();
    for text in [
        "BIOBANK",
        "All CRF records",
        "dana.manager",
        "In Progress",
        "of 120 subjects",
    ] {
        if !row.contains(text) {
            return Err(format!("the running row lacks {text:?}: {row:?}"));
        }
    }
    eprintln!("progress moved from {first} to {later} of 120");

    // Abort, confirming in the dialog.
    c.find(Locator::Css(&format!(
        "tr[data-run-id=\"{run}\"] form.abort button"
    )))
    .await
    .map_err(step("the Abort button"))?
    .click()
    .await
    .map_err(step("click Abort"))?;
    let question = eventually("the confirmation dialog", || async {
        c.get_alert_text().await.ok()
    })
    .await?;
    if !question.contains(&run) || !question.contains("Abort run") {
        return Err(format!("the dialog asks {question:?}"));
    }
    c.accept_alert().await.map_err(step("confirm the abort"))?;
    let row = eventually("Aborted and (Aborted) on the Import Logs", || async {
        let row = row_text(c, &run).await?;
        (row.contains("Aborted") && row.contains("(Aborted)")).then_some(row)
    })
    .await?;
    if row.contains("In Progress") {
        return Err(format!("the aborted row still says In Progress: {row:?}"));
    }
    let (status, by, done): (String, Option<String>, Option<i64>) = sqlx::query_as(
        "SELECT status, aborted_by, subjects_done FROM ocsync.import_logs WHERE run_id = $1",
    )
    .bind(&run)
    .fetch_one(&t.pool)
    .await
    .map_err(|e| e.to_string())?;
    if status != "Aborted" || by.as_deref() != Some("dana.manager") {
        return Err(format!("the run is {status}, aborted by {by:?}"));
    }
    let done = done.unwrap_or(0);
    if !(1..120).contains(&done) {
        return Err(format!("the aborted run kept {done} subjects"));
    }

    // The failed run's error report, downloaded.
    let failed_row = row_text(c, failed).await.unwrap_or_default();
    if !failed_row.contains("Failed") {
        return Err(format!("the PILOT row says {failed_row:?}"));
    }
    c.find(Locator::Css(&format!(
        "tr[data-run-id=\"{failed}\"] a[href$=\"/errors.csv\"]"
    )))
    .await
    .map_err(step("the error report link"))?
    .click()
    .await
    .map_err(step("download the error report"))?;
    let file = downloads.join(format!("run-{failed}-errors.csv"));
    let csv = eventually("the error report in the download folder", || {
        let file = file.clone();
        async move {
            std::fs::read_to_string(&file)
                .ok()
                .filter(|s| !s.is_empty())
        }
    })
    .await?;
    let mut lines = csv.lines();
    if lines.next() != Some(ocsync::sync::CSV_HEADER.join(",").as_str()) {
        return Err(format!("the report's header: {csv:?}"));
    }
    if lines.count() == 0 {
        return Err(format!("the report has no rows: {csv:?}"));
    }

    // A link to a run from another site (an e-mail, a chat message): the
    // browser holds the strict cookie back on that request; the page
    // reloads itself from our origin, where it is sent, so the run opens
    // without a second sign-in.
    let html = format!("<a id=\"go\" href=\"{base}/ui/runs/{failed}\">the failed run</a>");
    let encoded: String = html
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    c.goto(&format!("data:text/html;charset=utf-8,{encoded}"))
        .await
        .map_err(step("open a page of another site"))?;
    c.find(Locator::Id("go"))
        .await
        .map_err(step("the link on the other site"))?
        .click()
        .await
        .map_err(step("follow the link"))?;
    let heading = eventually("the run page from the other site's link", || async {
        let h1 = c.find(Locator::Css("h1")).await.ok()?.text().await.ok()?;
        (h1.starts_with("Run") || h1 == "Sign in").then_some(h1)
    })
    .await?;
    if !heading.contains(failed) {
        return Err(format!(
            "a link from another site led to {heading:?}, not to the run"
        ));
    }

    // The screenshots the README shows: the CP page with its last run and
    // the form, and the Import Logs with a run in progress beside the
    // aborted and the failed one.
    c.goto(&format!("{base}/ui/cps/BIOBANK"))
        .await
        .map_err(step("open BIOBANK"))?;
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Id("mode-incremental"))
        .await
        .map_err(step("the CP page"))?;
    let png = c
        .screenshot()
        .await
        .map_err(step("screenshot the CP page"))?;
    screenshot("cp.png", &png);
    c.find(Locator::Css("form.sync button[type=submit]"))
        .await
        .map_err(step("the Synchronize Records button"))?
        .click()
        .await
        .map_err(step("start an incremental run"))?;
    let second = eventually("the second run's page", || async {
        let path = path_of(c).await;
        let id = path.strip_prefix("/ui/runs/")?;
        (id.len() == 26 && id != run).then(|| id.to_owned())
    })
    .await?;
    c.goto(&format!("{base}/ui/runs"))
        .await
        .map_err(step("open the Import Logs"))?;
    eventually("the second run to show progress", || async {
        progress_value(c, &second).await.filter(|v| *v >= 4)
    })
    .await?;
    let png = c
        .screenshot()
        .await
        .map_err(step("screenshot the Import Logs"))?;
    screenshot("import-logs.png", &png);
    Ok(())
}
