//! CP configuration: TOML files, storage in Postgres, validation against a
//! study's metadata, the `ocsync cp` commands, and mapping a whole
//! generated study with a CP.

use std::collections::BTreeSet;

use ocsync::cp::{self, ConfigProblem, CpConfig, CpId, Severity, StoreError, store};
use ocsync::db;
use ocsync::mapping::{MetadataIndex, RecordStatus, content_hash, map_subject};
use ocsync::odm::generate::{GeneratorConfig, generate};
use ocsync::odm::{OdmReader, Record, Study, Subject};

use crate::harness::{TestDb, ocsync, output, stderr};

const GOOD: &str = r#"
id = "GEN"
source = { kind = "file", path = "/data/gen.xml" }
site_map = { S_GEN_SITE1 = "Site 1", S_GEN_SITE2 = "Site 2" }
event_map = { SE_VISIT = "Visit" }

[crfs]
exclude = ["F_AE"]

[[specimens]]
item_group_oid = "IG_SPECI_SAMPLES"
label_item = "I_SPECI_BARCODE"
type_item = "I_SPECI_TYPE"
quantity_item = "I_SPECI_QTY"
collection_time_item = "I_SPECI_COLLECTED"
fields = { unit = "I_SPECI_UNIT" }
value_maps = { I_SPECI_TYPE = { BLOOD = "Whole Blood" } }

[participant_fields]
race = { item = "I_DEMOG_RACE", crf = "F_DEMOG" }
"#;

const TYPOS: &str = r#"
id = "GEN"
source = { kind = "file", path = "/data/gen.xml" }
site_map = { S_GEN_SITE1 = "Site 1", S_GEN_SITE3 = "Site 3" }
event_map = { SE_VISTI = "Visit" }
visit_name = "{ppid}-{event_label}"

[crfs]
exclude = ["F_AEE"]

[[specimens]]
item_group_oid = "IG_SPECI_SAMPLES"
type_item = "I_VITAL_WEIGHT"
quantity_item = "I_SPECI_QTX"

[participant_fields]
race = { item = "I_DEMOG_RACE", crf = "F_VITALS" }
"#;

/// A generated study: the document, its `Study` and its subjects.
fn generated(subjects: u32) -> (Vec<u8>, Study, Vec<Subject>) {
    let mut doc = Vec::new();
    generate(
        &GeneratorConfig {
            subjects,
            include_metadata: true,
            audit_logs: false,
            discrepancy_notes: false,
            ..GeneratorConfig::default()
        },
        &mut doc,
    )
    .unwrap();
    let mut study = None;
    let mut subjects = Vec::new();
    for record in OdmReader::new(&doc[..]) {
        match record.unwrap() {
            Record::Study(s) => study = Some(*s),
            Record::Subject(s) => subjects.push(*s),
        }
    }
    (doc, study.expect("metadata"), subjects)
}

fn config(text: &str) -> CpConfig {
    CpConfig::from_toml(text, "cp.toml").unwrap()
}

fn problem(
    severity: Severity,
    path: &str,
    oid: Option<&str>,
    message: &str,
    suggestion: Option<&str>,
) -> ConfigProblem {
    ConfigProblem {
        severity,
        path: path.into(),
        oid: oid.map(str::to_owned),
        message: message.into(),
        suggestion: suggestion.map(str::to_owned),
    }
}

fn sites() -> BTreeSet<String> {
    ["S_GEN_SITE1".to_owned(), "S_GEN_SITE2".to_owned()].into()
}

#[test]
fn a_good_configuration_validates_cleanly() {
    let (_, study, _) = generated(4);
    let good = config(GOOD);
    assert_eq!(
        cp::validate_with_sites(&good, std::slice::from_ref(&study), &sites()),
        vec![]
    );
    // Metadata alone names no sites: the site map cannot be checked.
    let warning = |site: &str| {
        problem(
            Severity::Warning,
            &format!("site_map.{site}"),
            Some(site),
            &format!(
                "the metadata names no sites, so site OID {site} cannot be checked (validate \
                 against OpenClinica 3.x full metadata or an extract)"
            ),
            None,
        )
    };
    assert_eq!(
        cp::validate(&good, &study),
        vec![warning("S_GEN_SITE1"), warning("S_GEN_SITE2")]
    );
}

#[test]
fn typos_are_named_with_their_key_path_and_a_suggestion() {
    use Severity::{Error, Warning};
    let (_, study, _) = generated(4);
    let problems = cp::validate_with_sites(&config(TYPOS), &[study], &sites());
    assert_eq!(
        problems,
        vec![
            problem(
                Error,
                "site_map.S_GEN_SITE3",
                Some("S_GEN_SITE3"),
                "study or site S_GEN_SITE3 is not defined in the study metadata",
                Some("S_GEN_SITE1"),
            ),
            problem(
                Error,
                "event_map.SE_VISTI",
                Some("SE_VISTI"),
                "study event SE_VISTI is not defined in the study metadata",
                Some("SE_VISIT"),
            ),
            problem(
                Error,
                "crfs.exclude[0]",
                Some("F_AEE"),
                "CRF F_AEE is not defined in the study metadata",
                Some("F_AE"),
            ),
            problem(
                Error,
                "specimens[0].type_item",
                Some("I_VITAL_WEIGHT"),
                "item I_VITAL_WEIGHT is not in item group IG_SPECI_SAMPLES",
                None,
            ),
            problem(
                Error,
                "specimens[0].quantity_item",
                Some("I_SPECI_QTX"),
                "item I_SPECI_QTX is not defined in the study metadata",
                Some("I_SPECI_QTY"),
            ),
            problem(
                Error,
                "participant_fields.race.item",
                Some("I_DEMOG_RACE"),
                "item I_DEMOG_RACE is not in any item group of CRF F_VITALS",
                None,
            ),
            problem(
                Warning,
                "visit_name",
                None,
                "event SE_VISIT repeats but visit_name has no {repeat}: its visits would share \
                 one name",
                None,
            ),
        ]
    );
    assert_eq!(
        problems[4].to_string(),
        "error: specimens[0].quantity_item: item I_SPECI_QTX is not defined in the study \
         metadata (did you mean I_SPECI_QTY?)"
    );
}

#[test]
fn toml_errors_name_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "id = \"GEN\"\nsource = { kind = \"file\", path = \"/d\" }\n\n[crfs]\nimport = \"all\"\nincluded = [\"F_X\"]\n",
    )
    .unwrap();
    let e = CpConfig::load(&path).unwrap_err().to_string();
    let expected = format!("{}:6:1: unknown field `included`", path.display());
    assert!(e.starts_with(&expected), "{e}");

    let e = CpConfig::load(&dir.path().join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.toml"), "{e}");
}

async fn migrated() -> TestDb {
    let t = TestDb::empty().await;
    db::migrate(&t.pool).await.unwrap();
    t
}

#[tokio::test]
async fn store_adds_gets_updates_with_versions_and_refuses_duplicates() {
    let t = migrated().await;
    let good = config(GOOD);
    let added = store::add(&t.pool, &good).await.unwrap();
    assert_eq!(added.version, 1);
    assert!(matches!(
        store::add(&t.pool, &good).await,
        Err(StoreError::AlreadyExists(id)) if id == "GEN"
    ));

    let got = store::get(&t.pool, &good.id).await.unwrap();
    assert_eq!(
        serde_json::to_value(&got.config).unwrap(),
        serde_json::to_value(&good).unwrap()
    );
    assert!(matches!(
        store::get(&t.pool, &CpId::parse("NOPE").unwrap()).await,
        Err(StoreError::NotFound(_))
    ));

    let mut edited = good.clone();
    edited.default_site = Some("Central".into());
    let updated = store::update(&t.pool, &edited, 1).await.unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.config.default_site.as_deref(), Some("Central"));
    assert!(updated.updated_at >= updated.created_at);

    // A second editor who started from version 1 is refused.
    match store::update(&t.pool, &good, 1).await {
        Err(StoreError::VersionConflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (1, 2)),
        other => panic!("version conflict expected, got {other:?}"),
    }
    let mut other = good.clone();
    other.id = CpId::parse("OTHER").unwrap();
    assert!(matches!(
        store::update(&t.pool, &other, 1).await,
        Err(StoreError::NotFound(_))
    ));

    store::add(&t.pool, &other).await.unwrap();
    let disabled = store::set_enabled(&t.pool, &other.id, false).await.unwrap();
    assert!(!disabled.config.enabled);
    assert_eq!(disabled.version, 2);
    let enabled_column: bool =
        sqlx::query_scalar("SELECT enabled FROM ocsync.cps WHERE id = 'OTHER'")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert!(!enabled_column);

    let ids: Vec<_> = store::list(&t.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.config.id.to_string())
        .collect();
    assert_eq!(ids, vec!["GEN", "OTHER"]);
    store::delete(&t.pool, &other.id).await.unwrap();
    assert_eq!(store::list(&t.pool).await.unwrap().len(), 1);
}

#[tokio::test]
async fn edits_are_refused_while_the_cp_has_an_active_run() {
    let t = migrated().await;
    let good = config(GOOD);
    store::add(&t.pool, &good).await.unwrap();
    // Stand in for the queue: CP GEN has run RUN1 going.
    sqlx::query(
        "CREATE OR REPLACE FUNCTION ocsync.cp_active_run(cp text) RETURNS text
         LANGUAGE sql STABLE AS $$ SELECT CASE WHEN cp = 'GEN' THEN 'RUN1' END $$",
    )
    .execute(&t.pool)
    .await
    .unwrap();
    match store::update(&t.pool, &good, 1).await {
        Err(StoreError::ActiveRun { id, run }) => {
            assert_eq!((id.as_str(), run.as_str()), ("GEN", "RUN1"))
        }
        other => panic!("active run expected, got {other:?}"),
    }
    assert!(matches!(
        store::delete(&t.pool, &good.id).await,
        Err(StoreError::ActiveRun { .. })
    ));
    assert_eq!(store::get(&t.pool, &good.id).await.unwrap().version, 1);
    // Another CP is not held up.
    let mut other = good.clone();
    other.id = CpId::parse("OTHER").unwrap();
    store::add(&t.pool, &other).await.unwrap();
    assert_eq!(store::update(&t.pool, &other, 1).await.unwrap().version, 2);
}

#[tokio::test]
async fn a_cp_without_runs_has_no_active_run() {
    let t = migrated().await;
    let run: Option<String> = sqlx::query_scalar("SELECT ocsync.cp_active_run('ANY')")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(run, None);
}

#[tokio::test]
async fn cli_validates_files_against_local_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (doc, _, _) = generated(6);
    let metadata = dir.path().join("gen.xml");
    std::fs::write(&metadata, doc).unwrap();
    for (text, code, expected) in [
        (GOOD, 0, "CP GEN: 0 error(s), 0 warning(s)"),
        (TYPOS, 1, "CP GEN: 6 error(s), 1 warning(s)"),
    ] {
        let file = dir.path().join("cp.toml");
        std::fs::write(&file, text).unwrap();
        let mut cmd = ocsync();
        cmd.args(["cp", "validate"])
            .arg(&file)
            .arg("--metadata")
            .arg(&metadata);
        let out = output(cmd).await;
        let stdout = String::from_utf8(out.stdout.clone()).unwrap();
        assert_eq!(out.status.code(), Some(code), "{stdout}{}", stderr(&out));
        assert_eq!(stdout.lines().last(), Some(expected), "{stdout}");
        if code == 1 {
            assert!(
                stdout.contains(
                    "error: event_map.SE_VISTI: study event SE_VISTI is not defined in the \
                     study metadata (did you mean SE_VISIT?)"
                ),
                "{stdout}"
            );
        }
    }
}

#[tokio::test]
async fn cli_adds_shows_edits_and_lists() {
    let t = migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gen.toml");
    std::fs::write(&file, GOOD).unwrap();
    let run = |args: Vec<String>| {
        let mut cmd = ocsync();
        cmd.args(args).env("DATABASE_URL", t.url());
        output(cmd)
    };
    let path = file.display().to_string();
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let out = run(args(&["cp", "add", &path])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "added CP GEN (version 1)\n"
    );

    let out = run(args(&["cp", "add", &path])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "ocsync: CP GEN already exists\n");

    let out = run(args(&["cp", "show", "GEN"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(shown.starts_with("# version 1, updated "), "{shown}");
    let again = CpConfig::from_toml(&shown, "shown").unwrap();
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(config(GOOD)).unwrap()
    );

    // Edit: the file's id must match, and the version moves on.
    std::fs::write(&file, GOOD.replace("\"Site 2\"", "\"Site Two\"")).unwrap();
    let out = run(args(&["cp", "edit", "OTHER", &path])).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = run(args(&["cp", "edit", "GEN", &path])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "updated CP GEN (version 2)\n"
    );
    let out = run(args(&[
        "cp",
        "edit",
        "GEN",
        &path,
        "--expected-version",
        "1",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("was changed by someone else"),
        "{}",
        stderr(&out)
    );

    let out = run(args(&["cp", "list"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(listed.starts_with("GEN\tenabled\tv2\tfile\t"), "{listed}");

    let out = run(args(&["cp", "show", "NOPE"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "ocsync: CP NOPE does not exist\n");
}

#[tokio::test]
async fn cli_reports_bad_toml_with_exit_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\nsite_mpa = {}\n",
    )
    .unwrap();
    for sub in ["add", "validate"] {
        let mut cmd = ocsync();
        cmd.args(["cp", sub]).arg(&file);
        let out = output(cmd).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{sub}: {err}");
        assert!(
            err.starts_with(&format!(
                "ocsync: {}:3:1: unknown field `site_mpa`",
                file.display()
            )),
            "{sub}: {err}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_whole_generated_study_maps_without_losing_anything() {
    let (_, study, subjects) = generated(60);
    let cp = config(GOOD.replace("exclude = [\"F_AE\"]", "").as_str());
    let meta = MetadataIndex::new(&study);
    let mut group_repeats = 0;
    let mut specimen_repeats = 0;
    let mut events = 0;
    let (mut visits, mut specimens, mut forms) = (0, 0, 0);
    let (mut removed_seen, mut invalid_seen) = (0, 0);
    for subject in &subjects {
        let mapped = map_subject(&cp, &meta, subject);
        let records = mapped.records.expect("every generated subject has a label");
        assert_eq!(
            content_hash(&records),
            content_hash(&map_subject(&cp, &meta, subject).records.unwrap())
        );
        for e in &mapped.errors {
            assert_eq!(e.subject_key.as_deref(), Some(subject.subject_key.as_str()));
        }
        events += subject.events.len();
        for (_, _, group) in subject
            .events
            .iter()
            .flat_map(|e| e.forms.iter().map(move |f| (e, f)))
            .flat_map(|(e, f)| f.item_groups.iter().map(move |g| (e, f, g)))
        {
            if group.oid == "IG_SPECI_SAMPLES" {
                specimen_repeats += 1;
            } else {
                group_repeats += 1;
            }
        }
        visits += records.visits.len();
        specimens += records.specimens.len();
        forms += records.form_records.len();
        let removed = records.participant.status == RecordStatus::Removed;
        assert_eq!(
            removed,
            subject.status.as_deref() == Some("removed"),
            "{}",
            subject.subject_key
        );
        if removed {
            removed_seen += 1;
            assert!(
                records
                    .visits
                    .iter()
                    .all(|v| v.status == RecordStatus::Removed)
            );
            assert!(
                records
                    .form_records
                    .iter()
                    .all(|f| f.status == RecordStatus::Removed)
            );
        }
        // Forms OpenClinica marks invalid are flagged, never dropped.
        for f in &records.form_records {
            let source = subject
                .events
                .iter()
                .filter(|e| {
                    e.oid == f.event_oid
                        && e.repeat_key.as_deref().unwrap_or("") == f.event_repeat_key
                })
                .flat_map(|e| &e.forms)
                .find(|sf| sf.oid == f.form_oid)
                .unwrap();
            if source.status.as_deref() == Some("invalid") {
                invalid_seen += 1;
                assert_eq!(f.status, RecordStatus::Removed);
            }
        }
    }
    assert_eq!(visits, events);
    assert_eq!(specimens, specimen_repeats);
    assert_eq!(forms, group_repeats);
    assert!(specimens > 60 && forms > 60, "{specimens} {forms}");
    // The generated study does exercise both flags.
    assert!(
        removed_seen > 0 && invalid_seen > 0,
        "{removed_seen} {invalid_seen}"
    );
}

#[test]
fn an_openspecimen_target_needs_a_known_form_for_every_crf_that_becomes_records() {
    use Severity::{Error, Warning};
    let (_, study, _) = generated(4);
    let target = r#"
[target]
kind = "openspecimen"
base_url = "https://os.example.org/openspecimen"
login_name = "ocsync"
password = { env = "OS_PASSWORD" }

[target.forms]
F_AE = { form_id = 1, form_ctxt_id = 11 }
F_DEMOG = { form_id = 2, form_ctxt_id = 12, level = "participant" }
F_LABS = { form_id = 3, form_ctxt_id = 13, level = "specimen" }
F_SPECIMEN = { form_id = 4, form_ctxt_id = 14 }
F_VITALS = { form_id = 5, form_ctxt_id = 15 }
F_VITALZ = { form_id = 6, form_ctxt_id = 16 }
"#;
    let cp = config(&format!("{GOOD}{target}"));
    assert_eq!(
        cp::validate_with_sites(&cp, std::slice::from_ref(&study), &sites()),
        vec![
            problem(
                Warning,
                "target.forms.F_AE",
                Some("F_AE"),
                "CRF F_AE becomes no form records (crfs.include/exclude, or every item group is \
                 a specimen): this form is never written",
                None,
            ),
            problem(
                Error,
                "target.forms.F_LABS.level",
                Some("F_LABS"),
                "form records of CRF F_LABS are attached to specimens, but item group \
                 IG_LABS_LABS is not mapped as a specimen: its records would have nothing to \
                 attach to",
                None,
            ),
            problem(
                Warning,
                "target.forms.F_SPECIMEN",
                Some("F_SPECIMEN"),
                "CRF F_SPECIMEN becomes no form records (crfs.include/exclude, or every item \
                 group is a specimen): this form is never written",
                None,
            ),
            problem(
                Error,
                "target.forms.F_VITALZ",
                Some("F_VITALZ"),
                "CRF F_VITALZ is not defined in the study metadata",
                Some("F_VITALS"),
            ),
            problem(
                Error,
                "target.forms",
                Some("F_CONSENT"),
                "CRF F_CONSENT becomes form records but target.forms names no OpenSpecimen form \
                 for it: each of its records would fail (add target.forms.F_CONSENT, or list it \
                 in crfs.exclude)",
                None,
            ),
        ]
    );

    // Every CRF that becomes records has a form: clean.
    let complete = r#"
[target]
kind = "openspecimen"
base_url = "https://os.example.org/openspecimen"
login_name = "ocsync"
password = { file = "/run/secrets/os" }

[target.forms]
F_CONSENT = { form_id = 1, form_ctxt_id = 11 }
F_DEMOG = { form_id = 2, form_ctxt_id = 12, level = "participant" }
F_LABS = { form_id = 3, form_ctxt_id = 13 }
F_VITALS = { form_id = 5, form_ctxt_id = 15 }
"#;
    let cp = config(&format!("{GOOD}{complete}"));
    assert_eq!(
        cp::validate_with_sites(&cp, std::slice::from_ref(&study), &sites()),
        vec![]
    );
    // And it survives `cp show` (TOML) and storage (JSON) unchanged.
    let shown = CpConfig::from_toml(&cp.to_toml(), "shown.toml").unwrap();
    assert_eq!(
        serde_json::to_value(&shown).unwrap(),
        serde_json::to_value(&cp).unwrap()
    );
}
