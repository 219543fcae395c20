//! Whole runs into OpenSpecimen: a generated study read from an extract
//! file, mapped, and written through `sync::run` with the sink `for_cp`
//! chooses from the CP's `[target]`, into the OpenSpecimen simulator. What
//! the simulator holds afterwards is checked against the ODM itself
//! (participants by PPID, visits, specimens, form values), and its request
//! log says which subjects a run touched.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ocsync::cp::{self, CpConfig, Severity};
use ocsync::mapping::is_removed;
use ocsync::odm::generate::{GeneratorConfig, generate, subject_key};
use ocsync::odm::{OdmReader, Record, Study, Subject};
use ocsync::openclinica::SourceRegistry;
use ocsync::sink::openspecimen::FormLevel;
use ocsync::sink::openspecimen::sim::{LoggedRequest, OsSim, OsSimConfig, SimForm};
use ocsync::sink::{AnySink, EntityCounts};
use ocsync::sync::{self, Control, Mode, Progress, RunContext, RunOutcome, RunResult};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use crate::harness::TestDb;

const CP: &str = "CP-TEST";
const PASSWORD: &str = "os-sim-password";

/// A runner for tests: records every checkpoint.
struct TestRun {
    id: String,
    checkpoints: Vec<Progress>,
    cancel: CancellationToken,
}

impl TestRun {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            checkpoints: Vec::new(),
            cancel: CancellationToken::new(),
        }
    }
}

impl RunContext for TestRun {
    fn run_id(&self) -> &str {
        &self.id
    }

    fn resume(&self) -> Option<Progress> {
        None
    }

    async fn checkpoint(
        &mut self,
        _tx: &mut PgConnection,
        progress: &Progress,
    ) -> Result<Control, sqlx::Error> {
        self.checkpoints.push(progress.clone());
        Ok(Control::Continue)
    }

    fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// A generated study without null items. Why: OpenSpecimen requires a
/// specimen type, and the generator's nulls also land on the sample type,
/// so a null there is (rightly) an error row; the runs here must have
/// none. [`a_sample_without_a_type_is_an_error_row_and_the_rest_syncs`]
/// covers the nulls.
fn study_config(subjects: u32, seed: u64) -> GeneratorConfig {
    GeneratorConfig {
        seed,
        subjects,
        sites: 2,
        null_rate: 0.0,
        ..GeneratorConfig::default()
    }
}

fn write_study(dir: &Path, config: &GeneratorConfig) -> PathBuf {
    let path = dir.join("study.xml");
    let file = std::fs::File::create(&path).unwrap();
    generate(config, file).unwrap();
    path
}

/// The study's metadata and every subject, in document order.
fn read_study(path: &Path) -> (Study, Vec<Subject>) {
    let reader = OdmReader::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut study = None;
    let mut subjects = Vec::new();
    for record in reader {
        match record.unwrap() {
            Record::Study(s) => study = Some(*s),
            Record::Subject(s) => subjects.push(*s),
        }
    }
    (
        study.expect("the generated study carries metadata"),
        subjects,
    )
}

/// Every CRF of the metadata (`FormDef`'s `ParentFormOID`), in order, with
/// the OpenSpecimen form it goes to: form ids from 100, contexts from 200.
fn form_targets(study: &Study) -> Vec<(String, SimForm)> {
    let crfs: BTreeSet<String> = study
        .metadata_versions
        .iter()
        .flat_map(|m| &m.form_defs)
        .map(|f| {
            f.parent_form_oid
                .clone()
                .expect("3.x metadata names the CRF")
        })
        .collect();
    crfs.into_iter()
        .zip(0..)
        .map(|(crf, i)| {
            let form = SimForm {
                form_id: 100 + i,
                form_ctxt_id: 200 + i,
                level: FormLevel::Visit,
            };
            (crf, form)
        })
        .collect()
}

/// Everything one scenario stands on.
struct Env {
    db: TestDb,
    sim: OsSim,
    dir: tempfile::TempDir,
    config: GeneratorConfig,
    path: PathBuf,
    cp: CpConfig,
    /// OpenSpecimen form id → CRF OID.
    crf_of_form: BTreeMap<i64, String>,
}

async fn env(config: GeneratorConfig, batch_size: u32) -> Env {
    let db = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_study(dir.path(), &config);
    let (study, _) = read_study(&path);
    let forms = form_targets(&study);
    let sim = OsSim::start_with(OsSimConfig {
        password: SecretString::from(PASSWORD),
        forms: forms.iter().map(|(_, f)| *f).collect(),
        ..OsSimConfig::default()
    })
    .await
    .unwrap();
    let secret = dir.path().join("os-password");
    std::fs::write(&secret, format!("{PASSWORD}\n")).unwrap();
    let mut form_toml = String::new();
    for (crf, f) in &forms {
        form_toml.push_str(&format!(
            "[target.forms.{crf}]\nform_id = {}\nform_ctxt_id = {}\nlevel = \"visit\"\n",
            f.form_id, f.form_ctxt_id
        ));
    }
    // Fast retries (a retry here only ever meets a busy machine) and a
    // generous response timeout for a loaded 2-core machine.
    let toml = format!(
        r#"
id = "{CP}"
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

[target]
kind = "openspecimen"
base_url = "{base_url}"
login_name = "ocsync"
password = {{ file = {secret:?} }}
response_timeout_ms = 30000
retry = {{ max_attempts = 4, base_delay_ms = 1, max_delay_ms = 5 }}

{form_toml}"#,
        path = path.display().to_string(),
        base_url = sim.base_url,
        secret = secret.display().to_string(),
    );
    let cp = CpConfig::from_toml(&toml, "test.toml").unwrap();
    // The configuration is complete for this study: no CRF without a form.
    let errors: Vec<_> = cp::validate(&cp, &study)
        .into_iter()
        .filter(|p| p.severity == Severity::Error)
        .collect();
    assert_eq!(errors, vec![]);
    let crf_of_form = forms.iter().map(|(c, f)| (f.form_id, c.clone())).collect();
    Env {
        db,
        sim,
        dir,
        config,
        path,
        cp,
        crf_of_form,
    }
}

async fn run(env: &Env, mode: Mode, id: &str) -> RunOutcome {
    let sink = sync::for_cp(&env.cp).expect("the password file is there");
    assert!(matches!(sink, AnySink::OpenSpecimen(_)));
    sync::run(
        &env.db.pool,
        &SourceRegistry::new(),
        &env.cp,
        &mode,
        &sink,
        &mut TestRun::new(id),
    )
    .await
    .expect("run")
}

fn all_unchanged(c: &EntityCounts) -> bool {
    c.created == 0 && c.updated == 0 && c.failed == 0 && c.unchanged > 0
}

fn counts_by_entity(p: &Progress) -> [(&'static str, EntityCounts); 4] {
    let c = p.counts;
    [
        ("participants", c.participants),
        ("visits", c.visits),
        ("specimens", c.specimens),
        ("form_records", c.form_records),
    ]
}

/// Requests other than logging in.
fn data_requests(sim: &OsSim) -> Vec<LoggedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.api_path() != "/sessions")
        .collect()
}

// ---------------------------------------------------------------------------
// What OpenSpecimen must hold, derived from the ODM alone.

/// A date for OpenSpecimen: the date part of a full date, else nothing.
fn full_date(v: Option<&str>) -> Option<String> {
    v.filter(|s| {
        let b = s.as_bytes();
        b.len() >= 10
            && b[4] == b'-'
            && b[7] == b'-'
            && b[..10]
                .iter()
                .enumerate()
                .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
    })
    .map(|s| s[..10].to_owned())
}

type Values = BTreeMap<String, Option<String>>;
/// A participant as OpenSpecimen holds it: uid, birthDate, gender.
type Person = (Option<String>, Option<String>, Option<String>);
/// A specimen: visit name, label, type, quantity, collection time.
type Sample = (String, String, String, String, String);

/// The OpenSpecimen view of a study (or of what OpenSpecimen holds).
#[derive(Debug, Default, PartialEq)]
struct Holdings {
    /// PPID → (uid, birthDate, gender).
    participants: BTreeMap<String, Person>,
    /// Visit name → (PPID, event label, visit date).
    visits: BTreeMap<String, (String, String, Option<String>)>,
    specimens: BTreeSet<Sample>,
    /// (visit name, CRF) → the records' values by item name, sorted.
    form_records: BTreeMap<(String, String), Vec<Values>>,
}

fn expected(path: &Path) -> Holdings {
    let (study, subjects) = read_study(path);
    let mdv = &study.metadata_versions[0];
    let item_name: BTreeMap<&str, &str> = mdv
        .item_defs
        .iter()
        .map(|i| (i.oid.as_str(), i.name.as_deref().unwrap_or(&i.oid)))
        .collect();
    let event_label = |oid: &str| -> String {
        if oid == "SE_VISIT" {
            return "Visit".to_owned(); // the CP's event map
        }
        let def = mdv.study_event_defs.iter().find(|e| e.oid == oid).unwrap();
        def.name.clone().unwrap()
    };
    let mut out = Holdings::default();
    for s in &subjects {
        // Removed in OpenClinica before it ever reached OpenSpecimen:
        // nothing is created for it.
        if is_removed(s.status.as_deref()) {
            continue;
        }
        let ppid = s.study_subject_id.clone().unwrap();
        let gender = match s.sex.as_deref() {
            Some("m") => Some("Male".to_owned()),
            Some("f") => Some("Female".to_owned()),
            _ => None,
        };
        // A year of birth alone is no birth date in OpenSpecimen.
        let birth = full_date(s.date_of_birth.as_deref());
        out.participants
            .insert(ppid.clone(), (s.unique_identifier.clone(), birth, gender));
        for e in &s.events {
            if is_removed(e.status.as_deref()) {
                continue;
            }
            let label = event_label(&e.oid);
            let repeat = e.repeat_key.clone().unwrap_or_else(|| "1".to_owned());
            let visit = format!("{ppid}-{label}-{repeat}");
            out.visits.insert(
                visit.clone(),
                (ppid.clone(), label, full_date(e.start_date.as_deref())),
            );
            for f in &e.forms {
                if is_removed(f.status.as_deref()) {
                    continue;
                }
                let crf = f.oid.rsplit_once("_V").map_or(f.oid.as_str(), |(c, _)| c);
                for g in &f.item_groups {
                    let value = |oid: &str| {
                        g.items
                            .iter()
                            .find(|i| i.oid == oid)
                            .and_then(|i| i.value.clone())
                            .unwrap()
                    };
                    if g.oid == "IG_SPECI_SAMPLES" {
                        let qty: f64 = value("I_SPECI_QTY").trim().parse().unwrap();
                        out.specimens.insert((
                            visit.clone(),
                            value("I_SPECI_BARCODE"),
                            value("I_SPECI_TYPE"),
                            qty.to_string(),
                            // Minutes only in the generator: OpenSpecimen
                            // gets `:00` seconds.
                            format!("{}:00", value("I_SPECI_COLLECTED")),
                        ));
                        continue;
                    }
                    let values = g
                        .items
                        .iter()
                        .map(|i| (item_name[i.oid.as_str()].to_owned(), i.value.clone()))
                        .collect();
                    out.form_records
                        .entry((visit.clone(), crf.to_owned()))
                        .or_default()
                        .push(values);
                }
            }
        }
    }
    for records in out.form_records.values_mut() {
        records.sort();
    }
    out
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// What the simulator holds, live records only, in the same shape.
fn holdings(env: &Env) -> Holdings {
    let sim = &env.sim;
    let live = |v: &Value| v["activityStatus"] != "Disabled";
    let cprs: BTreeMap<i64, Value> = sim
        .registrations()
        .into_iter()
        .filter(live)
        .map(|c| (c["id"].as_i64().unwrap(), c))
        .collect();
    let visits: BTreeMap<i64, Value> = sim
        .visits()
        .into_iter()
        .filter(live)
        .map(|v| (v["id"].as_i64().unwrap(), v))
        .collect();
    let mut out = Holdings::default();
    for c in cprs.values() {
        assert_eq!(c["cpShortTitle"], CP);
        let p = &c["participant"];
        out.participants.insert(
            text(&c["ppid"]).unwrap(),
            (text(&p["uid"]), text(&p["birthDate"]), text(&p["gender"])),
        );
    }
    let visit_name = |id: &Value| text(&visits[&id.as_i64().unwrap()]["name"]).unwrap();
    for v in visits.values() {
        let ppid = text(&cprs[&v["cprId"].as_i64().unwrap()]["ppid"]).unwrap();
        out.visits.insert(
            text(&v["name"]).unwrap(),
            (ppid, text(&v["eventLabel"]).unwrap(), text(&v["visitDate"])),
        );
    }
    for s in sim.specimens().into_iter().filter(live) {
        out.specimens.insert((
            visit_name(&s["visitId"]),
            text(&s["label"]).unwrap(),
            text(&s["type"]).unwrap(),
            s["initialQty"].as_f64().unwrap().to_string(),
            text(&s["collectionEvent"]["time"]).unwrap(),
        ));
    }
    for (form_id, r) in sim.form_records() {
        if !live(&r) {
            continue;
        }
        let values: Values = r
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "id" | "appData"))
            .map(|(k, v)| (k.clone(), text(v)))
            .collect();
        out.form_records
            .entry((
                visit_name(&r["appData"]["objectId"]),
                env.crf_of_form[&form_id].clone(),
            ))
            .or_default()
            .push(values);
    }
    for records in out.form_records.values_mut() {
        records.sort();
    }
    out
}

fn assert_holds(env: &Env, want: &Holdings) {
    let have = holdings(env);
    // Entity by entity, so a failure shows the part that differs.
    assert_eq!(have.participants, want.participants, "participants");
    assert_eq!(have.visits, want.visits, "visits");
    assert_eq!(have.specimens, want.specimens, "specimens");
    assert_eq!(have.form_records, want.form_records, "form records");
}

/// The PPIDs a request is about: every OpenSpecimen id it names (in its
/// path or body) traced up to its registration, and the PPID, visit name or
/// specimen label in its query.
fn ppids_of(env: &Env, r: &LoggedRequest) -> BTreeSet<String> {
    let sim = &env.sim;
    let mut owner: BTreeMap<i64, String> = BTreeMap::new();
    for c in sim.registrations() {
        owner.insert(c["id"].as_i64().unwrap(), text(&c["ppid"]).unwrap());
    }
    let mut visit_names = BTreeMap::new();
    for v in sim.visits() {
        let ppid = owner[&v["cprId"].as_i64().unwrap()].clone();
        visit_names.insert(text(&v["name"]).unwrap(), ppid.clone());
        owner.insert(v["id"].as_i64().unwrap(), ppid);
    }
    let mut labels = BTreeMap::new();
    for s in sim.specimens() {
        let ppid = owner[&s["visitId"].as_i64().unwrap()].clone();
        labels.insert(text(&s["label"]).unwrap(), ppid.clone());
        owner.insert(s["id"].as_i64().unwrap(), ppid);
    }
    for (_, f) in sim.form_records() {
        let ppid = owner[&f["appData"]["objectId"].as_i64().unwrap()].clone();
        owner.insert(f["id"].as_i64().unwrap(), ppid);
    }

    let mut ids: Vec<i64> = r
        .api_path()
        .split('/')
        .filter_map(|s| s.parse().ok())
        .collect();
    let mut out = BTreeSet::new();
    if let Some(b) = &r.body {
        for v in [
            &b["id"],
            &b["cprId"],
            &b["visitId"],
            &b["appData"]["objectId"],
        ] {
            ids.extend(v.as_i64());
        }
        // A new registration names its PPID.
        out.extend(text(&b["ppid"]));
    }
    // Form ids are in form record paths too; they name no subject.
    let forms: BTreeSet<i64> = env.crf_of_form.keys().copied().collect();
    out.extend(
        ids.into_iter()
            .filter(|i| !forms.contains(i))
            .map(|i| owner[&i].clone()),
    );
    let query: Vec<(String, String)> = r
        .query
        .as_deref()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    for (k, v) in query {
        match k.as_str() {
            "ppid" => {
                out.insert(v);
            }
            "visitName" => out.extend(visit_names.get(&v).cloned()),
            "label" => out.extend(labels.get(&v).cloned()),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_full_sync_leaves_exactly_what_the_study_holds_in_openspecimen() {
    let env = env(study_config(30, 21), 7).await;
    let out = run(&env, Mode::All, "run-1").await;
    assert_eq!(out.result, RunResult::Success, "{:?}", out.progress);
    assert_eq!(out.progress.errors, 0);
    assert_eq!(out.progress.subjects_done, 30);

    let want = expected(&env.path);
    assert_holds(&env, &want);

    // The counts say what was created: every live record, nothing failed.
    let c = out.progress.counts;
    assert_eq!(c.participants.created as usize, want.participants.len());
    assert_eq!(c.visits.created as usize, want.visits.len());
    assert_eq!(c.specimens.created as usize, want.specimens.len());
    let records: usize = want.form_records.values().map(Vec::len).sum();
    assert_eq!(c.form_records.created as usize, records);
    for (name, e) in counts_by_entity(&out.progress) {
        assert_eq!(e.failed, 0, "{name}");
        assert_eq!(e.updated, 0, "{name}");
    }
    // The study has what makes this interesting: removed subjects (never
    // created), and both full and year-only birth dates.
    assert!(c.participants.unchanged > 0, "a removed subject: {c:?}");
    let births: Vec<_> = want.participants.values().map(|p| p.1.is_some()).collect();
    assert!(births.contains(&true) && births.contains(&false));
}

#[tokio::test]
async fn a_second_full_sync_finds_everything_unchanged_and_sends_nothing() {
    let env = env(study_config(20, 22), 6).await;
    let first = run(&env, Mode::All, "run-1").await;
    assert_eq!(first.result, RunResult::Success, "{:?}", first.progress);
    let before = (
        env.sim.registrations(),
        env.sim.visits(),
        env.sim.specimens(),
        env.sim.form_records(),
    );
    env.sim.clear_requests();

    let out = run(&env, Mode::All, "run-2").await;
    assert_eq!(out.result, RunResult::Success, "{:?}", out.progress);
    for (name, e) in counts_by_entity(&out.progress) {
        assert!(all_unchanged(&e), "{name}: {e:?}");
    }
    assert_eq!(data_requests(&env.sim), vec![], "not one data request");
    let after = (
        env.sim.registrations(),
        env.sim.visits(),
        env.sim.specimens(),
        env.sim.form_records(),
    );
    assert_eq!(after, before);
}

#[tokio::test]
async fn an_incremental_run_touches_only_the_edited_subjects() {
    let mut env = env(study_config(30, 23), 8).await;
    let first = run(&env, Mode::Incremental, "run-1").await;
    assert_eq!(first.result, RunResult::Success, "{:?}", first.progress);
    assert_holds(&env, &expected(&env.path));

    // Nothing changed: no request at all.
    env.sim.clear_requests();
    let same = run(&env, Mode::Incremental, "run-2").await;
    assert_eq!(same.result, RunResult::Success);
    assert_eq!(same.progress.counts.participants.unchanged, 30);
    assert_eq!(data_requests(&env.sim), vec![]);

    // Edit three live subjects in OpenClinica.
    let (_, subjects) = read_study(&env.path);
    let live: Vec<u32> = (0..30)
        .filter(|i| !is_removed(subjects[*i as usize].status.as_deref()))
        .collect();
    let edited = [live[2], live[11], live[live.len() - 1]];
    for (n, i) in edited.iter().enumerate() {
        env.config.edits.insert(*i, n as u32 + 1);
    }
    write_study(env.dir.path(), &env.config);
    env.sim.clear_requests();

    let out = run(&env, Mode::Incremental, "run-3").await;
    assert_eq!(out.result, RunResult::Success, "{:?}", out.progress);
    assert_eq!(out.progress.errors, 0);
    assert!(out.progress.counts.form_records.updated > 0);
    assert_eq!(out.progress.counts.participants.created, 0);

    let want: BTreeSet<String> = edited
        .iter()
        .map(|i| subjects[*i as usize].study_subject_id.clone().unwrap())
        .collect();
    let requests = data_requests(&env.sim);
    let mut touched = BTreeSet::new();
    for r in &requests {
        let about = ppids_of(&env, r);
        assert!(
            !about.is_empty() && about.is_subset(&want),
            "{} {} is about {about:?}, not only {want:?}",
            r.method,
            r.api_path()
        );
        assert_eq!(r.status, 200, "{r:?}");
        touched.extend(about);
    }
    assert_eq!(touched, want, "every edited subject, and only they");
    // The edits only change item values: updates, no lookups, no creation.
    assert!(requests.iter().all(|r| r.method == "PUT"), "{requests:?}");
    assert_holds(&env, &expected(&env.path));
    let keys: BTreeSet<String> = sqlx::query_scalar(
        "SELECT subject_key FROM ocsync.subject_state WHERE cp_id = $1 AND run_id = 'run-3'",
    )
    .bind(CP)
    .fetch_all(&env.db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let edited_keys: BTreeSet<String> = edited.iter().map(|i| subject_key(*i)).collect();
    assert_eq!(keys, edited_keys);
}

#[tokio::test]
async fn a_subjects_run_touches_only_the_listed_subjects() {
    let env = env(study_config(12, 24), 5).await;
    let (_, subjects) = read_study(&env.path);
    let live: Vec<&Subject> = subjects
        .iter()
        .filter(|s| !is_removed(s.status.as_deref()))
        .collect();
    // One by SubjectKey, one by label, one unknown.
    let (a, b) = (live[1], live[4]);
    let mode = Mode::Subjects {
        subjects: vec![
            a.subject_key.clone(),
            b.study_subject_id.clone().unwrap(),
            "NOBODY".into(),
        ],
    };
    let out = run(&env, mode, "run-s").await;
    assert_eq!(
        out.result,
        RunResult::Failed,
        "the unknown subject is an error row"
    );
    assert_eq!(out.progress.errors, 1);

    let want: BTreeSet<String> = [a, b]
        .iter()
        .map(|s| s.study_subject_id.clone().unwrap())
        .collect();
    let have: BTreeSet<String> = env
        .sim
        .registrations()
        .iter()
        .map(|c| text(&c["ppid"]).unwrap())
        .collect();
    assert_eq!(have, want);
    for r in data_requests(&env.sim) {
        let about = ppids_of(&env, &r);
        assert!(
            !about.is_empty() && about.is_subset(&want),
            "{} {} is about {about:?}",
            r.method,
            r.api_path()
        );
    }
    // What is there for them is exactly what the study says.
    let mut full = expected(&env.path);
    full.participants.retain(|p, _| want.contains(p));
    full.visits.retain(|_, v| want.contains(&v.0));
    let visits = full.visits.clone();
    full.specimens.retain(|s| visits.contains_key(&s.0));
    full.form_records.retain(|k, _| visits.contains_key(&k.0));
    assert_holds(&env, &full);

    let mut csv = Vec::new();
    sync::write_error_report(&env.db.pool, "run-s", &mut csv)
        .await
        .unwrap();
    let csv = String::from_utf8(csv).unwrap();
    let row = csv.lines().nth(1).unwrap();
    assert!(
        row.starts_with("NOBODY,,,,,,,fetch,subject not found"),
        "{row}"
    );
}

#[tokio::test]
async fn a_year_of_birth_is_no_birth_date_in_openspecimen_and_stays_raw_in_postgres() {
    let env = env(study_config(30, 25), 10).await;
    let out = run(&env, Mode::All, "run-os").await;
    assert_eq!(out.result, RunResult::Success, "{:?}", out.progress);

    // The same study into the Postgres sink (another CP id, so the two
    // CPs' bookkeeping stays apart).
    let mut pg = env.cp.clone();
    pg.id = cp::CpId::parse("CP-PG").unwrap();
    pg.target = cp::TargetConfig::Postgres;
    let sink = sync::for_cp(&pg).unwrap();
    assert!(matches!(sink, AnySink::Postgres(_)));
    let pg_out = sync::run(
        &env.db.pool,
        &SourceRegistry::new(),
        &pg,
        &Mode::All,
        &sink,
        &mut TestRun::new("run-pg"),
    )
    .await
    .unwrap();
    assert_eq!(pg_out.result, RunResult::Success);

    let raw: BTreeMap<String, Option<String>> = sqlx::query_as(
        "SELECT ppid, birth_date FROM ocsync_data.participants WHERE cp_id = 'CP-PG'",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let in_os: BTreeMap<String, Value> = env
        .sim
        .registrations()
        .into_iter()
        .map(|c| {
            (
                text(&c["ppid"]).unwrap(),
                c["participant"]["birthDate"].clone(),
            )
        })
        .collect();
    let (_, subjects) = read_study(&env.path);
    let mut years = 0;
    for s in subjects.iter().filter(|s| !is_removed(s.status.as_deref())) {
        let ppid = s.study_subject_id.clone().unwrap();
        match (s.date_of_birth.as_deref(), s.year_of_birth.as_deref()) {
            (Some(dob), _) => {
                assert_eq!(in_os[&ppid], dob, "{ppid}");
                assert_eq!(raw[&ppid].as_deref(), Some(dob), "{ppid}");
            }
            (None, Some(year)) if year != "Not Used" => {
                years += 1;
                assert_eq!(in_os[&ppid], Value::Null, "{ppid}: no birth date");
                assert_eq!(raw[&ppid].as_deref(), Some(year), "{ppid}: raw year");
            }
            _ => {
                assert_eq!(in_os[&ppid], Value::Null, "{ppid}");
                assert_eq!(raw[&ppid], None, "{ppid}");
            }
        }
    }
    assert!(years > 0, "the study has year-only birth dates");
    // Nothing was refused (a 404 is a lookup finding nothing).
    let refused: Vec<_> = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.status != 200 && r.status != 404)
        .collect();
    assert_eq!(refused, vec![]);
}

#[tokio::test]
async fn a_sample_without_a_type_is_an_error_row_and_the_rest_syncs() {
    // The generator's default null rate: some sample types are null.
    let config = GeneratorConfig {
        null_rate: GeneratorConfig::default().null_rate,
        ..study_config(30, 26)
    };
    let env = env(config, 10).await;
    let out = run(&env, Mode::All, "run-n").await;
    let (_, subjects) = read_study(&env.path);
    // The live samples whose type is null, by barcode.
    let mut untyped = 0u64;
    for s in subjects.iter().filter(|s| !is_removed(s.status.as_deref())) {
        for e in &s.events {
            for f in e.forms.iter().filter(|f| !is_removed(f.status.as_deref())) {
                for g in f.item_groups.iter().filter(|g| g.oid == "IG_SPECI_SAMPLES") {
                    let ty = g.items.iter().find(|i| i.oid == "I_SPECI_TYPE").unwrap();
                    if ty.value.is_none() {
                        untyped += 1;
                    }
                }
            }
        }
    }
    assert!(untyped > 0, "pick a seed with null sample types");
    assert_eq!(out.result, RunResult::Failed);
    assert_eq!(out.progress.counts.specimens.failed, untyped);
    assert_eq!(
        out.progress.errors, untyped,
        "one row per sample, nothing else"
    );
    let mut csv = Vec::new();
    sync::write_error_report(&env.db.pool, "run-n", &mut csv)
        .await
        .unwrap();
    let csv = String::from_utf8(csv).unwrap();
    for row in csv.lines().skip(1) {
        assert!(row.contains(",IG_SPECI_SAMPLES,"), "{row}");
        assert!(row.contains("Specimen type is required"), "{row}");
    }
    // Everything else arrived.
    assert_eq!(out.progress.counts.participants.failed, 0);
    assert_eq!(out.progress.counts.visits.failed, 0);
    assert_eq!(out.progress.counts.form_records.failed, 0);
}
