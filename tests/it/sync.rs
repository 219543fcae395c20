//! Whole runs: a generated study read from an extract file, mapped, and
//! written to the Postgres sink, checked row by row against the ODM itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ocsync::cp::CpConfig;
use ocsync::odm::generate::{GeneratorConfig, generate};
use ocsync::odm::{OdmReader, Record, Subject};
use ocsync::openclinica::SourceRegistry;
use ocsync::sink::EntityCounts;
use ocsync::sink::postgres::PostgresSink;
use ocsync::sync::{self, Control, Mode, Progress, RunContext, RunOutcome, RunResult};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::harness::TestDb;

/// A runner for tests: records every checkpoint, can ask to stop after a
/// number of batches, can resume from a given checkpoint.
struct TestRun {
    id: String,
    resume: Option<Progress>,
    checkpoints: Vec<Progress>,
    stop_after: Option<usize>,
    cancel: CancellationToken,
}

impl TestRun {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            resume: None,
            checkpoints: Vec::new(),
            stop_after: None,
            cancel: CancellationToken::new(),
        }
    }
}

impl RunContext for TestRun {
    fn run_id(&self) -> &str {
        &self.id
    }

    fn resume(&self) -> Option<Progress> {
        self.resume.clone()
    }

    async fn checkpoint(
        &mut self,
        _tx: &mut PgConnection,
        progress: &Progress,
    ) -> Result<Control, sqlx::Error> {
        self.checkpoints.push(progress.clone());
        Ok(match self.stop_after {
            Some(n) if self.checkpoints.len() >= n => Control::Stop,
            _ => Control::Continue,
        })
    }

    fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

fn study_config(subjects: u32, seed: u64) -> GeneratorConfig {
    GeneratorConfig {
        seed,
        subjects,
        sites: 2,
        ..GeneratorConfig::default()
    }
}

fn write_study(dir: &Path, config: &GeneratorConfig) -> PathBuf {
    let path = dir.join("study.xml");
    let file = std::fs::File::create(&path).unwrap();
    generate(config, file).unwrap();
    path
}

fn cp_config(study: &Path, batch_size: u32) -> CpConfig {
    let toml = format!(
        r#"
id = "CP-TEST"
batch_size = {batch_size}
default_site = "Main"

[source]
kind = "file"
path = {path:?}

[site_map]
S_GEN_SITE1 = "Site one"

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

async fn run(t: &TestDb, cp: &CpConfig, mode: Mode, ctx: &mut TestRun) -> RunOutcome {
    sync::run(
        &t.pool,
        &SourceRegistry::new(),
        cp,
        &mode,
        &PostgresSink::new(),
        ctx,
    )
    .await
    .expect("run")
}

/// Every subject of the document, in order.
fn subjects_of(path: &Path) -> Vec<Subject> {
    let reader = OdmReader::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    reader
        .filter_map(|r| match r.unwrap() {
            Record::Subject(s) => Some(*s),
            Record::Study(_) => None,
        })
        .collect()
}

/// What the form_records table must hold, derived from the ODM alone:
/// every item group repeat outside the specimen group, its values exactly.
type FormKey = (String, String, String, String, String, String);
fn expected_form_values(
    subjects: &[Subject],
) -> BTreeMap<FormKey, BTreeMap<String, Option<String>>> {
    // Generated OC 3.x CRF version OIDs end in `_V<n>`; the CRF is the rest.
    expected_form_values_by(subjects, |f| f.rsplit_once("_V").map_or(f, |(c, _)| c))
}

/// As [`expected_form_values`], with the CRF OID of each form OID from `crf`.
fn expected_form_values_by(
    subjects: &[Subject],
    crf: fn(&str) -> &str,
) -> BTreeMap<FormKey, BTreeMap<String, Option<String>>> {
    let mut out = BTreeMap::new();
    for s in subjects {
        for e in &s.events {
            for f in &e.forms {
                let crf = crf(&f.oid);
                for g in &f.item_groups {
                    if g.oid == "IG_SPECI_SAMPLES" {
                        continue;
                    }
                    let key = (
                        s.subject_key.clone(),
                        e.oid.clone(),
                        e.repeat_key.clone().unwrap_or_default(),
                        crf.to_owned(),
                        g.oid.clone(),
                        g.repeat_key.clone().unwrap_or_default(),
                    );
                    let values = g
                        .items
                        .iter()
                        .map(|i| (i.oid.clone(), i.value.clone()))
                        .collect();
                    out.insert(key, values);
                }
            }
        }
    }
    out
}

async fn actual_form_values(pool: &PgPool) -> BTreeMap<FormKey, BTreeMap<String, Option<String>>> {
    let rows: Vec<(
        String,
        String,
        String,
        String,
        String,
        String,
        serde_json::Value,
    )> = sqlx::query_as(
        "SELECT subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid, \
                    item_group_repeat_key, \"values\" \
             FROM ocsync_data.form_records WHERE cp_id = 'CP-TEST'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(s, e, er, c, g, gr, v)| {
            let values = serde_json::from_value(v).unwrap();
            ((s, e, er, c, g, gr), values)
        })
        .collect()
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM ocsync_data.{table} WHERE cp_id = 'CP-TEST'"
    )))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// `xmin` of every data row: unchanged when nothing was written.
async fn row_versions(pool: &PgPool) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for table in ["participants", "visits", "specimens", "form_records"] {
        let v: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT subject_key || ' {table} ' || xmin::text || ':' || ctid::text \
             FROM ocsync_data.{table}"
        )))
        .fetch_all(pool)
        .await
        .unwrap();
        all.extend(v);
    }
    all
}

fn all_unchanged(c: &EntityCounts) -> bool {
    c.created == 0 && c.updated == 0 && c.failed == 0 && c.unchanged > 0
}

#[tokio::test]
async fn a_full_sync_writes_exactly_what_the_study_holds() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_study(dir.path(), &study_config(40, 7));
    let cp = cp_config(&path, 7);
    let subjects = subjects_of(&path);

    let mut ctx = TestRun::new("run-1");
    let out = run(&t, &cp, Mode::All, &mut ctx).await;
    assert_eq!(out.result, RunResult::Success, "{:?}", out.progress);
    assert_eq!(out.progress.subjects_done, 40);
    assert_eq!(
        ctx.checkpoints.len(),
        40usize.div_ceil(7) + 1,
        "one per batch, one at the end"
    );

    // Form records: every item group repeat, values exactly as written.
    assert_eq!(
        actual_form_values(&t.pool).await,
        expected_form_values(&subjects)
    );

    // Participants: one per subject, PPID = the label.
    let ppids: BTreeMap<String, String> = sqlx::query_as(
        "SELECT subject_key, ppid FROM ocsync_data.participants WHERE cp_id = 'CP-TEST'",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let want: BTreeMap<String, String> = subjects
        .iter()
        .map(|s| (s.subject_key.clone(), s.study_subject_id.clone().unwrap()))
        .collect();
    assert_eq!(ppids, want);

    // Visits: one per event occurrence; specimens: one per sample repeat.
    let events: usize = subjects.iter().map(|s| s.events.len()).sum();
    assert_eq!(count(&t.pool, "visits").await as usize, events);
    let samples: usize = subjects
        .iter()
        .flat_map(|s| &s.events)
        .flat_map(|e| &e.forms)
        .flat_map(|f| &f.item_groups)
        .filter(|g| g.oid == "IG_SPECI_SAMPLES")
        .count();
    assert_eq!(count(&t.pool, "specimens").await as usize, samples);

    let c = out.progress.counts;
    assert_eq!(c.participants.created, 40);
    assert_eq!(c.visits.created as usize, events);
    assert_eq!(c.specimens.created as usize, samples);
}

#[tokio::test]
async fn a_second_full_sync_finds_everything_unchanged_and_writes_nothing() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_study(dir.path(), &study_config(25, 8));
    let cp = cp_config(&path, 10);
    run(&t, &cp, Mode::All, &mut TestRun::new("run-1")).await;
    let before = row_versions(&t.pool).await;

    let out = run(&t, &cp, Mode::All, &mut TestRun::new("run-2")).await;
    assert_eq!(out.result, RunResult::Success);
    let c = out.progress.counts;
    for (name, e) in [
        ("participants", c.participants),
        ("visits", c.visits),
        ("specimens", c.specimens),
        ("form_records", c.form_records),
    ] {
        assert!(all_unchanged(&e), "{name}: {e:?}");
    }
    assert_eq!(row_versions(&t.pool).await, before, "no row was rewritten");
}

#[tokio::test]
async fn an_incremental_run_touches_only_the_changed_subjects() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = study_config(30, 9);
    let path = write_study(dir.path(), &config);
    let cp = cp_config(&path, 8);
    let first = run(&t, &cp, Mode::Incremental, &mut TestRun::new("run-1")).await;
    assert_eq!(first.result, RunResult::Success);
    assert_eq!(first.progress.counts.participants.created, 30);

    // Nothing changed: every subject is skipped as unchanged.
    let same = run(&t, &cp, Mode::Incremental, &mut TestRun::new("run-2")).await;
    assert_eq!(same.progress.counts.participants.unchanged, 30);
    assert_eq!(
        same.progress.counts.form_records.created + same.progress.counts.form_records.updated,
        0
    );

    // Edit three subjects in OpenClinica.
    let edited = [3u32, 11, 27];
    for (n, i) in edited.iter().enumerate() {
        config.edits.insert(*i, n as u32 + 1);
    }
    write_study(dir.path(), &config);
    let before = row_versions(&t.pool).await;
    let out = run(&t, &cp, Mode::Incremental, &mut TestRun::new("run-3")).await;
    assert_eq!(out.result, RunResult::Success);
    // Item values changed: their participants are unchanged records, but
    // some of their form records were updated.
    assert_eq!(out.progress.counts.participants.unchanged, 30);
    assert!(out.progress.counts.form_records.updated > 0);
    let touched: BTreeSet<String> = sqlx::query_scalar(
        "SELECT subject_key FROM ocsync.subject_state WHERE cp_id = 'CP-TEST' AND run_id = 'run-3'",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let want: BTreeSet<String> = edited
        .iter()
        .map(|i| ocsync::odm::generate::subject_key(*i))
        .collect();
    assert_eq!(touched, want);
    // Only the edited subjects' rows were rewritten.
    let rewritten: BTreeSet<String> = row_versions(&t.pool)
        .await
        .difference(&before)
        .map(|v| v.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(rewritten, want);
    assert_eq!(
        actual_form_values(&t.pool).await,
        expected_form_values(&subjects_of(&path))
    );
}

#[tokio::test]
async fn a_subjects_run_touches_only_the_listed_subjects() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_study(dir.path(), &study_config(12, 10));
    let cp = cp_config(&path, 5);
    let subjects = subjects_of(&path);
    // One by SubjectKey, one by label, one unknown.
    let by_key = subjects[2].subject_key.clone();
    let by_label = subjects[5].study_subject_id.clone().unwrap();
    let mode = Mode::Subjects {
        subjects: vec![by_key.clone(), by_label, "NOBODY".into()],
    };
    let mut ctx = TestRun::new("run-s");
    let out = run(&t, &cp, mode, &mut ctx).await;
    assert_eq!(
        out.result,
        RunResult::Failed,
        "the unknown subject is an error row"
    );
    let keys: BTreeSet<String> = sqlx::query_scalar(
        "SELECT subject_key FROM ocsync_data.participants WHERE cp_id = 'CP-TEST'",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(
        keys,
        BTreeSet::from([by_key, subjects[5].subject_key.clone()])
    );
    let mut csv = Vec::new();
    let rows = sync::write_error_report(&t.pool, "run-s", &mut csv)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    let csv = String::from_utf8(csv).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "subject_key,ppid,event_oid,repeat,form_oid,item_group_oid,item_oid,stage,message"
    );
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("NOBODY,,,,,,,fetch,subject not found"),
        "{row}"
    );
}

#[tokio::test]
async fn a_stopped_run_keeps_its_committed_batches_and_resumes_from_its_checkpoint() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_study(dir.path(), &study_config(20, 11));
    let cp = cp_config(&path, 6);

    let mut ctx = TestRun::new("run-a");
    ctx.stop_after = Some(2);
    let out = run(&t, &cp, Mode::All, &mut ctx).await;
    assert_eq!(out.result, RunResult::Aborted);
    assert_eq!(out.progress.subjects_done, 12);
    assert_eq!(count(&t.pool, "participants").await, 12);

    let mut resumed = TestRun::new("run-a");
    resumed.resume = Some(out.progress.clone());
    let done = run(&t, &cp, Mode::All, &mut resumed).await;
    assert_eq!(done.result, RunResult::Success);
    assert_eq!(done.progress.subjects_done, 20);
    assert_eq!(done.progress.counts.participants.created, 20);
    assert_eq!(count(&t.pool, "participants").await, 20);
    assert_eq!(
        actual_form_values(&t.pool).await,
        expected_form_values(&subjects_of(&path))
    );
}

#[tokio::test]
async fn a_cancelled_run_ends_aborted_at_once() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_study(dir.path(), &study_config(5, 12));
    let cp = cp_config(&path, 2);
    let mut ctx = TestRun::new("run-c");
    ctx.cancel.cancel();
    let out = run(&t, &cp, Mode::All, &mut ctx).await;
    assert_eq!(out.result, RunResult::Aborted);
    assert_eq!(out.progress.subjects_done, 0);
    assert_eq!(count(&t.pool, "participants").await, 0);
}

#[tokio::test]
async fn a_broken_document_fails_the_run_but_keeps_the_good_batches() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_study(dir.path(), &study_config(10, 13));
    // Cut the document inside the last subject.
    let bytes = std::fs::read(&path).unwrap();
    let cut = bytes
        .windows(12)
        .rposition(|w| w == b"<SubjectData")
        .unwrap()
        + 200;
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let cp = cp_config(&path, 3);
    let mut ctx = TestRun::new("run-b");
    let err = sync::run(
        &t.pool,
        &SourceRegistry::new(),
        &cp,
        &Mode::All,
        &PostgresSink::new(),
        &mut ctx,
    )
    .await
    .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("line"), "{err}");
    assert_eq!(count(&t.pool, "participants").await, 9);
    let mut csv = Vec::new();
    sync::write_error_report(&t.pool, "run-b", &mut csv)
        .await
        .unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert!(csv.lines().nth(1).unwrap().contains(",parse,"), "{csv}");
}

// ---------------------------------------------------------------------------
// OpenClinica 4.x, through the simulator: full runs read the whole study in
// one document, and a document per participant when OC cannot build it.

struct Oc4Study {
    sim: ocsync::openclinica::sim::SimHandle,
    study: GeneratorConfig,
    _secret: tempfile::TempDir,
    cp: CpConfig,
}

async fn oc4_study(subjects: u32, batch_size: u32, whole_study: bool) -> Oc4Study {
    use ocsync::openclinica::sim::{SimConfig, Simulator};
    let study = GeneratorConfig {
        oc4_dates: true,
        ..study_config(subjects, 23)
    };
    let sim = Simulator::start(SimConfig::new(
        study.clone(),
        "ocsync",
        secrecy::SecretString::from("oc4-password"),
    ))
    .await
    .unwrap();
    let secret = tempfile::tempdir().unwrap();
    let password = secret.path().join("oc-password");
    std::fs::write(&password, "oc4-password").unwrap();
    let toml = format!(
        r#"
id = "CP-TEST"
batch_size = {batch_size}
default_site = "Main"

[source]
kind = "oc4"
base_url = "{base}"
auth_url = "{auth}"
study_oid = "{oid}"
username = "ocsync"
password = {{ file = {password:?} }}
whole_study = {whole_study}

[[specimens]]
item_group_oid = "IG_SPECI_SAMPLES"
label_item = "I_SPECI_BARCODE"
type_item = "I_SPECI_TYPE"
quantity_item = "I_SPECI_QTY"
collection_time_item = "I_SPECI_COLLECTED"
"#,
        base = sim.base_url_oc4(),
        auth = sim.auth_url(),
        oid = study.study_oid,
        password = password.display().to_string(),
    );
    let cp = CpConfig::from_toml(&toml, "oc4.toml").unwrap();
    Oc4Study {
        sim,
        study,
        _secret: secret,
        cp,
    }
}

impl Oc4Study {
    /// The form values the study implies, from the generator's own
    /// document of it.
    fn expected(&self, dir: &Path) -> BTreeMap<FormKey, BTreeMap<String, Option<String>>> {
        // As served: no audit logs or notes asked for.
        let served = GeneratorConfig {
            audit_logs: false,
            discrepancy_notes: false,
            ..self.study.clone()
        };
        // 4.x names forms by their CRF OID.
        expected_form_values_by(&subjects_of(&write_study(dir, &served)), |f| f)
    }

    fn clinical_requests(&self, status: u16) -> u64 {
        self.sim.counters().count("oc4.clinicaldata", status)
    }

    /// OC answers 500 to any document of more than five subjects, as it
    /// does for a study too large to build.
    fn refuse_whole_study(&self) {
        self.sim
            .set_faults(ocsync::openclinica::sim::Faults {
                max_document_subjects: 5,
                ..Default::default()
            })
            .unwrap();
    }
}

/// The requests a failing document gets: every attempt of the retry policy.
fn retry_attempts() -> u64 {
    u64::from(ocsync::openclinica::RetryPolicy::default().max_attempts)
}

#[tokio::test]
async fn an_oc4_full_sync_reads_the_whole_study_in_one_document() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let oc = oc4_study(30, 7, true).await;

    let mut ctx = TestRun::new("oc4-whole");
    let out = run(&t, &oc.cp, Mode::All, &mut ctx).await;
    assert_eq!(out.result, RunResult::Success, "{out:?}");
    assert_eq!(out.progress.subjects_done, 30);
    assert_eq!(out.progress.subjects_total, Some(30));
    assert_eq!(out.progress.cursor.whole_study, Some(true));
    assert_eq!(count(&t.pool, "participants").await, 30);
    assert_eq!(actual_form_values(&t.pool).await, oc.expected(dir.path()));
    // The metadata (with one participant's data) and the whole study.
    assert_eq!(oc.clinical_requests(200), 2);

    // A second full run finds everything as it was.
    let before = row_versions(&t.pool).await;
    let again = run(&t, &oc.cp, Mode::All, &mut TestRun::new("oc4-again")).await;
    assert_eq!(again.result, RunResult::Success);
    assert!(all_unchanged(&again.progress.counts.form_records));
    assert_eq!(row_versions(&t.pool).await, before);
}

#[tokio::test]
async fn an_oc4_full_sync_reads_a_document_per_participant_when_oc_cannot_build_the_study() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let oc = oc4_study(30, 7, true).await;
    oc.refuse_whole_study();

    let out = run(&t, &oc.cp, Mode::All, &mut TestRun::new("oc4-fallback")).await;
    assert_eq!(out.result, RunResult::Success, "{out:?}");
    assert_eq!(out.progress.cursor.whole_study, Some(false));
    assert_eq!(out.progress.errors, 0);
    assert_eq!(count(&t.pool, "participants").await, 30);
    assert_eq!(actual_form_values(&t.pool).await, oc.expected(dir.path()));
    // The whole study failed (each of the retry policy's attempts); the
    // metadata and each participant came one document each.
    assert_eq!(oc.clinical_requests(500), retry_attempts());
    assert_eq!(oc.clinical_requests(200), 31);
}

#[tokio::test]
async fn an_oc4_cp_set_to_read_per_participant_never_asks_for_the_whole_study() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let oc = oc4_study(12, 5, false).await;
    let out = run(&t, &oc.cp, Mode::All, &mut TestRun::new("oc4-each")).await;
    assert_eq!(out.result, RunResult::Success, "{out:?}");
    assert_eq!(out.progress.cursor.whole_study, Some(false));
    assert_eq!(actual_form_values(&t.pool).await, oc.expected(dir.path()));
    assert_eq!(oc.clinical_requests(200), 13);
    assert_eq!(oc.clinical_requests(500), 0);
}

#[tokio::test]
async fn a_resumed_oc4_run_reads_the_study_the_way_its_first_attempt_did() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();

    // First attempt on the whole-study document, stopped after two batches.
    let oc = oc4_study(30, 7, true).await;
    let mut first = TestRun::new("oc4-resume");
    first.stop_after = Some(2);
    let out = run(&t, &oc.cp, Mode::All, &mut first).await;
    assert_eq!(out.result, RunResult::Aborted);
    assert_eq!(out.progress.subjects_done, 14);
    assert_eq!(out.progress.cursor.whole_study, Some(true));
    let mut resumed = TestRun::new("oc4-resume");
    resumed.resume = Some(out.progress);
    let done = run(&t, &oc.cp, Mode::All, &mut resumed).await;
    assert_eq!(done.result, RunResult::Success, "{done:?}");
    assert_eq!(done.progress.subjects_done, 30);
    assert_eq!(done.progress.counts.participants.created, 30);
    assert_eq!(actual_form_values(&t.pool).await, oc.expected(dir.path()));

    // First attempt per participant (OC could not build the study); the
    // resumed attempt stays per participant even though OC now could.
    let t = TestDb::migrated().await;
    let oc = oc4_study(30, 7, true).await;
    oc.refuse_whole_study();
    let mut first = TestRun::new("oc4-resume-each");
    first.stop_after = Some(2);
    let out = run(&t, &oc.cp, Mode::All, &mut first).await;
    assert_eq!(out.progress.cursor.whole_study, Some(false));
    assert_eq!(out.progress.subjects_done, 14);
    oc.sim
        .set_faults(ocsync::openclinica::sim::Faults::default())
        .unwrap();
    let mut resumed = TestRun::new("oc4-resume-each");
    resumed.resume = Some(out.progress);
    let done = run(&t, &oc.cp, Mode::All, &mut resumed).await;
    assert_eq!(done.result, RunResult::Success, "{done:?}");
    assert_eq!(done.progress.subjects_done, 30);
    assert_eq!(count(&t.pool, "participants").await, 30);
    assert_eq!(actual_form_values(&t.pool).await, oc.expected(dir.path()));
    assert_eq!(
        oc.clinical_requests(500),
        retry_attempts(),
        "no second try of the whole study"
    );
}

/// Each subject's input fingerprint, by key.
async fn input_hashes(pool: &PgPool) -> BTreeMap<String, Option<String>> {
    sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT subject_key, input_hash FROM ocsync.subject_state WHERE cp_id = 'CP-TEST'",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test]
async fn an_incremental_run_skips_unchanged_input_but_not_a_changed_mapping() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_study(dir.path(), &study_config(20, 31));
    let cp = cp_config(&path, 6);
    let full = run(&t, &cp, Mode::All, &mut TestRun::new("fp-1")).await;
    assert_eq!(full.result, RunResult::Success);
    let first = input_hashes(&t.pool).await;
    assert_eq!(first.len(), 20);
    assert!(
        first
            .values()
            .all(|h| h.as_ref().is_some_and(|h| h.len() == 32))
    );

    // Same input, same configuration: skipped, fingerprints as they were.
    let before = row_versions(&t.pool).await;
    let same = run(&t, &cp, Mode::Incremental, &mut TestRun::new("fp-2")).await;
    assert_eq!(same.progress.counts.participants.unchanged, 20);
    assert_eq!(input_hashes(&t.pool).await, first);
    assert_eq!(row_versions(&t.pool).await, before);

    // A configuration change that changes no record: every subject is read
    // again (its fingerprint no longer matches), found unchanged, and keeps
    // a new fingerprint; nothing is rewritten.
    let mut described = cp.clone();
    described.description = Some("now with a description".into());
    let same = run(&t, &described, Mode::Incremental, &mut TestRun::new("fp-3")).await;
    assert_eq!(same.progress.counts.participants.unchanged, 20);
    assert_eq!(same.progress.counts.visits.updated, 0);
    assert_eq!(row_versions(&t.pool).await, before);
    let refreshed = input_hashes(&t.pool).await;
    assert!(
        first
            .iter()
            .all(|(k, h)| refreshed[k] != *h && refreshed[k].is_some())
    );

    // A mapping change the same input: the visits get their new label.
    let mut relabelled = described.clone();
    relabelled
        .event_map
        .insert("SE_VISIT".into(), "Visit, relabelled".into());
    let out = run(
        &t,
        &relabelled,
        Mode::Incremental,
        &mut TestRun::new("fp-4"),
    )
    .await;
    assert_eq!(out.result, RunResult::Success);
    assert!(out.progress.counts.visits.updated > 0, "{out:?}");
    let labels: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ocsync_data.visits WHERE event_label = 'Visit, relabelled'",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(labels as u64, out.progress.counts.visits.updated);
}
