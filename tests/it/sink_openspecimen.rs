//! The OpenSpecimen sink against the OpenSpecimen simulator, with its
//! bookkeeping in a real database: what a write leaves in OpenSpecimen
//! (values included), exact counts, a second write that sends nothing, one
//! `PUT` per changed record, removed records disabled, OpenSpecimen's 400
//! messages in error rows (children failing with their parent), re-login
//! after the token expires, a rejected password, retries, and every
//! request's path, headers and body shape.

use std::collections::{BTreeMap, BTreeSet};

use ocsync::mapping::{
    FormRecord, ParticipantRecord, RecordStatus, SpecimenRecord, Stage, SubjectRecords, VisitRecord,
};
use ocsync::sink::openspecimen::sim::{LoggedRequest, OsSim, OsSimConfig, SimForm};
use ocsync::sink::openspecimen::{
    CredentialRef, FormLevel, FormTarget, OpenSpecimenConfig, OpenSpecimenSink,
};
use ocsync::sink::{BatchOutcome, EntityCounts, Sink, SinkError};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::harness::Captured;
use crate::harness::TestDb;

const CP: &str = "CP-TEST";
const PASSWORD: &str = "os-sim-password";
const VITALS: i64 = 101;
const DEMOG: i64 = 102;

fn sim_config() -> OsSimConfig {
    OsSimConfig {
        password: SecretString::from(PASSWORD),
        event_labels: vec!["Visit".into(), "Screening".into()],
        forms: vec![
            SimForm {
                form_id: VITALS,
                form_ctxt_id: 201,
                level: FormLevel::Visit,
            },
            SimForm {
                form_id: DEMOG,
                form_ctxt_id: 202,
                level: FormLevel::Participant,
            },
        ],
        ..OsSimConfig::default()
    }
}

fn os_config(sim: &OsSim) -> OpenSpecimenConfig {
    let mut c = OpenSpecimenConfig::new(
        sim.base_url.clone(),
        "ocsync",
        CredentialRef::Env("OCSYNC_TEST_UNUSED".into()),
    );
    // Fast retries: the tests inject failures and must not wait.
    c.retry.max_attempts = 4;
    c.retry.base_delay_ms = 1;
    c.retry.max_delay_ms = 5;
    c.response_timeout_ms = 10_000;
    c.forms = BTreeMap::from([
        (
            "F_VITALS".to_owned(),
            FormTarget {
                form_id: VITALS,
                form_ctxt_id: 201,
                level: FormLevel::Visit,
            },
        ),
        (
            "F_DEMOG".to_owned(),
            FormTarget {
                form_id: DEMOG,
                form_ctxt_id: 202,
                level: FormLevel::Participant,
            },
        ),
    ]);
    c
}

struct Env {
    db: TestDb,
    sim: OsSim,
    sink: OpenSpecimenSink,
}

async fn env() -> Env {
    let db = TestDb::migrated().await;
    let sim = OsSim::start_with(sim_config()).await.unwrap();
    let sink =
        OpenSpecimenSink::with_password(&os_config(&sim), SecretString::from(PASSWORD)).unwrap();
    Env { db, sim, sink }
}

/// Writes `batch` in a transaction of its own and commits it.
async fn write(env: &Env, batch: &[SubjectRecords]) -> BatchOutcome {
    write_with(&env.db.pool, &env.sink, batch).await.unwrap()
}

async fn write_with(
    pool: &PgPool,
    sink: &OpenSpecimenSink,
    batch: &[SubjectRecords],
) -> Result<BatchOutcome, SinkError> {
    let mut tx = pool.begin().await.unwrap();
    let out = sink.write_batch(&mut tx, CP, batch).await?;
    tx.commit().await.unwrap();
    Ok(out)
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

/// A subject with `visits` repeats of a repeating visit, each with one
/// specimen and one vitals form record, plus a demographics form record
/// attached to the registration.
fn subject(key: &str, visits: u32) -> SubjectRecords {
    let participant = ParticipantRecord {
        subject_key: key.to_owned(),
        ppid: format!("PPID-{key}"),
        study_oid: "S_TEST".to_owned(),
        site: s("Main"),
        uid: s(&format!("UID-{key}")),
        birth_date: s("1980-02-03"),
        gender: s("Female"),
        registration_date: s("2021-01-05"),
        oc_status: s("signed"),
        status: RecordStatus::Active,
        fields: BTreeMap::from([("ethnicity".to_owned(), s(" Hispanic "))]),
    };
    let mut out = SubjectRecords {
        participant,
        visits: vec![],
        specimens: vec![],
        form_records: vec![FormRecord {
            subject_key: key.to_owned(),
            event_oid: "SE_SCREEN".to_owned(),
            event_repeat_key: String::new(),
            crf_oid: "F_DEMOG".to_owned(),
            form_oid: "F_DEMOG_V1".to_owned(),
            form_version: s("v1"),
            item_group_oid: "IG_DEMOG".to_owned(),
            item_group_repeat_key: String::new(),
            form_status: s("complete"),
            status: RecordStatus::Active,
            values: BTreeMap::from([("I_SMOKER".to_owned(), s("no"))]),
            item_names: BTreeMap::from([("I_SMOKER".to_owned(), "smoker".to_owned())]),
        }],
    };
    for r in 1..=visits {
        let repeat = r.to_string();
        out.visits.push(VisitRecord {
            subject_key: key.to_owned(),
            event_oid: "SE_VISIT".to_owned(),
            event_repeat_key: repeat.clone(),
            event_label: "Visit".to_owned(),
            name: format!("{key}-v{r}"),
            visit_date: s(&format!("2022-04-1{r} 10:00:00.0")),
            end_date: None,
            site: s("Main"),
            oc_status: s("completed"),
            status: RecordStatus::Active,
        });
        out.specimens.push(SpecimenRecord {
            subject_key: key.to_owned(),
            event_oid: "SE_VISIT".to_owned(),
            event_repeat_key: repeat.clone(),
            crf_oid: "F_SAMPLES".to_owned(),
            item_group_oid: "IG_SAMPLES".to_owned(),
            item_group_repeat_key: "1".to_owned(),
            label: s(&format!("{key}-S{r}")),
            specimen_type: s("Whole Blood"),
            quantity: s("2.5"),
            collection_time: s(&format!("2022-04-1{r} 10:30:00.0")),
            fields: BTreeMap::new(),
            status: RecordStatus::Active,
        });
        out.form_records.push(FormRecord {
            subject_key: key.to_owned(),
            event_oid: "SE_VISIT".to_owned(),
            event_repeat_key: repeat,
            crf_oid: "F_VITALS".to_owned(),
            form_oid: "F_VITALS_V2".to_owned(),
            form_version: s("v2"),
            item_group_oid: "IG_VITALS".to_owned(),
            item_group_repeat_key: String::new(),
            form_status: s("complete"),
            status: RecordStatus::Active,
            values: BTreeMap::from([("I_HR".to_owned(), s("72")), ("I_NOTE".to_owned(), None)]),
            item_names: BTreeMap::from([
                ("I_HR".to_owned(), "heart_rate".to_owned()),
                ("I_NOTE".to_owned(), "note".to_owned()),
            ]),
        });
    }
    out
}

fn counts(created: u64, updated: u64, unchanged: u64, failed: u64) -> EntityCounts {
    EntityCounts {
        created,
        updated,
        unchanged,
        failed,
    }
}

fn by_key<'a>(items: &'a [Value], key: &str, value: &str) -> &'a Value {
    items
        .iter()
        .find(|v| v[key] == value)
        .unwrap_or_else(|| panic!("no record with {key} = {value}"))
}

/// Every request carries the token (but the login), every body is JSON
/// with the content type saying so.
fn assert_headers(requests: &[LoggedRequest]) {
    for r in requests {
        if r.api_path() == "/sessions" {
            assert!(r.header("x-os-api-token").is_none(), "{r:?}");
        } else {
            let token = r.header("x-os-api-token").unwrap_or_default();
            assert_eq!(token.len(), 32, "{} {} without a token", r.method, r.path);
        }
        if r.method == "POST" || r.method == "PUT" {
            assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
            assert!(r.body.as_ref().is_some_and(Value::is_object), "{r:?}");
        }
        assert_eq!(r.header("accept"), Some("application/json"), "{r:?}");
    }
}

fn api_calls(requests: &[LoggedRequest]) -> Vec<(String, String)> {
    requests
        .iter()
        .map(|r| (r.method.clone(), r.api_path().to_owned()))
        .collect()
}

async fn os_ids(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ocsync.os_ids")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_full_write_creates_exactly_the_records_and_a_second_sends_nothing() {
    let env = env().await;
    let batch = vec![subject("S1", 2), subject("S2", 2), subject("S3", 1)];
    let out = write(&env, &batch).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.counts.participants, counts(3, 0, 0, 0));
    assert_eq!(out.counts.visits, counts(5, 0, 0, 0));
    assert_eq!(out.counts.specimens, counts(5, 0, 0, 0));
    assert_eq!(out.counts.form_records, counts(8, 0, 0, 0));
    assert_eq!(os_ids(&env.db.pool).await, 21);

    // The store holds exactly the records, values included.
    let cprs = env.sim.registrations();
    assert_eq!(cprs.len(), 3);
    let cpr = by_key(&cprs, "ppid", "PPID-S1");
    let cpr_id = cpr["id"].as_i64().unwrap();
    assert_eq!(cpr["cpShortTitle"], CP);
    assert_eq!(cpr["registrationDate"], "2021-01-05");
    assert_eq!(cpr["activityStatus"], "Active");
    assert_eq!(
        cpr["participant"],
        json!({"uid": "UID-S1", "birthDate": "1980-02-03", "gender": "Female",
               "activityStatus": "Active", "ethnicity": " Hispanic "})
    );
    let visits = env.sim.visits();
    assert_eq!(visits.len(), 5);
    let v = by_key(&visits, "name", "S1-v2");
    let visit_id = v["id"].as_i64().unwrap();
    assert_eq!(
        v,
        &json!({"id": visit_id, "cprId": cpr_id, "eventLabel": "Visit", "name": "S1-v2",
                "site": "Main", "status": "Complete", "visitDate": "2022-04-12",
                "activityStatus": "Active"})
    );
    let specimens = env.sim.specimens();
    assert_eq!(specimens.len(), 5);
    let sp = by_key(&specimens, "label", "S1-S2");
    assert_eq!(sp["visitId"], visit_id);
    assert_eq!(sp["type"], "Whole Blood");
    assert_eq!(sp["initialQty"], 2.5);
    assert_eq!(sp["lineage"], "New");
    assert_eq!(sp["status"], "Collected");
    assert_eq!(
        sp["collectionEvent"],
        json!({"time": "2022-04-12 10:30:00"})
    );
    let forms = env.sim.form_records();
    assert_eq!(forms.len(), 8);
    let vitals: Vec<&Value> = forms
        .iter()
        .filter(|(f, r)| *f == VITALS && r["appData"]["objectId"] == visit_id)
        .map(|(_, r)| r)
        .collect();
    assert_eq!(vitals.len(), 1);
    assert_eq!(
        vitals[0]["appData"],
        json!({"formCtxtId": 201, "objectId": visit_id})
    );
    assert_eq!(vitals[0]["heart_rate"], "72");
    assert_eq!(vitals[0]["note"], Value::Null);
    let demog: Vec<&Value> = forms
        .iter()
        .filter(|(f, r)| *f == DEMOG && r["appData"]["objectId"] == cpr_id)
        .map(|(_, r)| r)
        .collect();
    assert_eq!(demog.len(), 1);
    assert_eq!(demog[0]["smoker"], "no");

    // The requests: one login, then per record a lookup (where OpenSpecimen
    // has a key) and a create, parents before children.
    let requests = env.sim.requests();
    assert_headers(&requests);
    let login = &requests[0];
    assert_eq!(
        (login.method.as_str(), login.api_path()),
        ("POST", "/sessions")
    );
    assert_eq!(
        login.body,
        Some(
            json!({"loginName": "ocsync", "password": "<redacted>", "domainName": "openspecimen"})
        )
    );
    assert_eq!(env.sim.logins(), 1);
    let calls = api_calls(&requests);
    let count = |m: &str, p: &str| calls.iter().filter(|(a, b)| a == m && b == p).count();
    assert_eq!(count("GET", "/collection-protocol-registrations"), 3);
    assert_eq!(count("POST", "/collection-protocol-registrations"), 3);
    assert_eq!(count("GET", "/visits/byname"), 5);
    assert_eq!(count("POST", "/visits"), 5);
    assert_eq!(count("GET", "/specimens"), 5);
    assert_eq!(count("POST", "/specimens"), 5);
    assert_eq!(count("POST", "/forms/101/data"), 5);
    assert_eq!(count("POST", "/forms/102/data"), 3);
    assert_eq!(requests.len(), 1 + 3 * 2 + 5 * 4 + 8);
    let lookup = requests
        .iter()
        .find(|r| r.method == "GET" && r.api_path() == "/collection-protocol-registrations")
        .unwrap();
    assert_eq!(
        lookup.query.as_deref(),
        Some("cpShortTitle=CP-TEST&ppid=PPID-S1")
    );
    assert!(lookup.body.is_none());
    let post_visit = requests
        .iter()
        .find(|r| r.method == "POST" && r.api_path() == "/visits")
        .unwrap();
    let keys: BTreeSet<&str> = post_visit
        .body
        .as_ref()
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "cprId",
            "eventLabel",
            "name",
            "site",
            "status",
            "visitDate",
            "activityStatus"
        ])
    );
    // Order within a subject: its registration first, its forms last.
    let first_cpr = calls
        .iter()
        .position(|c| c.1 == "/collection-protocol-registrations")
        .unwrap();
    let first_form = calls
        .iter()
        .position(|c| c.1.starts_with("/forms"))
        .unwrap();
    assert!(first_cpr < first_form);

    // Again: everything unchanged and not one request, not even a login.
    env.sim.clear_requests();
    let again = write(&env, &batch).await;
    assert!(again.errors.is_empty());
    assert_eq!(again.counts.participants, counts(0, 0, 3, 0));
    assert_eq!(again.counts.visits, counts(0, 0, 5, 0));
    assert_eq!(again.counts.specimens, counts(0, 0, 5, 0));
    assert_eq!(again.counts.form_records, counts(0, 0, 8, 0));
    assert_eq!(env.sim.requests(), vec![]);

    // A fresh process (a new client, no token) sends nothing either.
    let fresh = OpenSpecimenSink::with_password(&os_config(&env.sim), SecretString::from(PASSWORD))
        .unwrap();
    let third = write_with(&env.db.pool, &fresh, &batch).await.unwrap();
    assert_eq!(third.counts.form_records, counts(0, 0, 8, 0));
    assert_eq!(env.sim.requests(), vec![]);
    assert_eq!(env.sim.logins(), 1);
}

#[tokio::test]
async fn a_changed_record_is_one_put_and_the_rest_is_untouched() {
    let env = env().await;
    let mut batch = vec![subject("S1", 2), subject("S2", 2)];
    write(&env, &batch).await;
    env.sim.clear_requests();

    batch[1].visits[0].visit_date = s("2022-05-01");
    batch[0].form_records[1]
        .values
        .insert("I_HR".into(), s("80"));
    let out = write(&env, &batch).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.counts.participants, counts(0, 0, 2, 0));
    assert_eq!(out.counts.visits, counts(0, 1, 3, 0));
    assert_eq!(out.counts.specimens, counts(0, 0, 4, 0));
    assert_eq!(out.counts.form_records, counts(0, 1, 5, 0));

    let requests = env.sim.requests();
    assert_headers(&requests);
    let visit = by_key(&env.sim.visits(), "name", "S2-v1").clone();
    let visit_id = visit["id"].as_i64().unwrap();
    assert_eq!(visit["visitDate"], "2022-05-01");
    // Subjects are written concurrently: compare without their order.
    let mut calls = api_calls(&requests);
    calls.sort();
    assert_eq!(
        calls,
        vec![
            ("PUT".to_owned(), "/forms/101/data".to_owned()),
            ("PUT".to_owned(), format!("/visits/{visit_id}")),
        ]
    );
    let body_of = |p: &str| {
        requests
            .iter()
            .find(|r| r.api_path() == p)
            .and_then(|r| r.body.clone())
            .unwrap()
    };
    assert_eq!(body_of(&format!("/visits/{visit_id}"))["id"], visit_id);
    let put_form = &body_of("/forms/101/data");
    assert!(put_form["id"].is_i64());
    assert_eq!(put_form["heart_rate"], "80");
    assert_eq!(put_form["appData"]["formCtxtId"], 201);
    let (_, stored) = env
        .sim
        .form_records()
        .into_iter()
        .find(|(_, r)| r["id"] == put_form["id"])
        .unwrap();
    assert_eq!(stored["heart_rate"], "80");
    assert_eq!(
        env.sim.form_records().len(),
        6,
        "updated in place, not added"
    );
}

#[tokio::test]
async fn openspecimen_400s_become_error_rows_and_children_fail_with_their_parent() {
    let env = env().await;
    env.sim
        .reject_ppid("PPID-S2", "Participant PPID-S2 has withdrawn consent");
    let mut batch = vec![subject("S1", 1), subject("S2", 2), subject("S3", 2)];
    batch[2].visits[1].site = s("Nowhere");
    let out = write(&env, &batch).await;

    assert_eq!(out.counts.participants, counts(2, 0, 0, 1));
    assert_eq!(out.counts.visits, counts(2, 0, 0, 3));
    assert_eq!(out.counts.specimens, counts(2, 0, 0, 3));
    assert_eq!(out.counts.form_records, counts(4, 0, 0, 4));
    assert_eq!(out.errors.len(), 1 + 3 + 3 + 4);
    assert!(out.errors.iter().all(|e| e.stage == Stage::Write));

    let p = out
        .errors
        .iter()
        .find(|e| e.subject_key.as_deref() == Some("S2") && e.event_oid.is_none())
        .unwrap();
    assert_eq!(p.ppid.as_deref(), Some("PPID-S2"));
    assert!(
        p.message
            .contains("Participant PPID-S2 has withdrawn consent"),
        "{}",
        p.message
    );
    assert!(p.message.contains("HTTP 400"), "{}", p.message);
    let s2_children: Vec<_> = out
        .errors
        .iter()
        .filter(|e| e.subject_key.as_deref() == Some("S2") && e.event_oid.is_some())
        .collect();
    assert_eq!(s2_children.len(), 2 + 2 + 3);
    for e in &s2_children {
        assert!(
            e.message
                .contains("participant (PPID PPID-S2) was not written"),
            "{}",
            e.message
        );
    }

    let site = out
        .errors
        .iter()
        .find(|e| e.subject_key.as_deref() == Some("S3") && e.message.starts_with("visit"))
        .unwrap();
    assert_eq!(site.event_oid.as_deref(), Some("SE_VISIT"));
    assert_eq!(site.repeat.as_deref(), Some("2"));
    assert!(
        site.message.contains("Invalid site: Nowhere"),
        "{}",
        site.message
    );
    let under_visit: Vec<_> = out
        .errors
        .iter()
        .filter(|e| e.subject_key.as_deref() == Some("S3") && !e.message.starts_with("visit"))
        .collect();
    assert_eq!(under_visit.len(), 2, "{under_visit:?}");
    for e in under_visit {
        assert!(
            e.message
                .contains("its visit (event SE_VISIT, repeat '2') was not written"),
            "{}",
            e.message
        );
    }

    // OpenSpecimen holds the rest, and the failed records are retried next
    // time (nothing remembered for them).
    assert_eq!(env.sim.registrations().len(), 2);
    assert_eq!(env.sim.visits().len(), 2);
    assert_eq!(os_ids(&env.db.pool).await, 2 + 2 + 2 + 4);
    batch[2].visits[1].site = s("Main");
    let again = write(&env, &batch[2..]).await;
    assert!(again.errors.is_empty(), "{:?}", again.errors);
    assert_eq!(again.counts.visits, counts(1, 0, 1, 0));
    assert_eq!(again.counts.specimens, counts(1, 0, 1, 0));
    assert_eq!(again.counts.form_records, counts(1, 0, 2, 0));
}

#[tokio::test]
async fn an_expired_token_means_one_new_login_and_complete_data() {
    let env = env().await;
    write(&env, &[subject("S1", 1)]).await;
    env.sim.expire_tokens();
    let out = write(&env, &[subject("S2", 2)]).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.counts.visits, counts(2, 0, 0, 0));
    assert_eq!(env.sim.logins(), 2);
    assert_eq!(env.sink.client().logins().await, 2);
    assert_eq!(env.sim.registrations().len(), 2);
    assert_eq!(env.sim.visits().len(), 3);
    let requests = env.sim.requests();
    let refused: Vec<_> = requests.iter().filter(|r| r.status == 401).collect();
    assert_eq!(refused.len(), 1);
    // The refused request is repeated, with the new token, right after the
    // login.
    let i = requests.iter().position(|r| r.status == 401).unwrap();
    assert_eq!(requests[i + 1].api_path(), "/sessions");
    assert_eq!(requests[i + 2].path, requests[i].path);
    assert_eq!(requests[i + 2].status, 200);
    assert_ne!(
        requests[i + 2].header("x-os-api-token"),
        requests[i].header("x-os-api-token")
    );
}

// A current-thread runtime (the default): the subscriber set for this
// thread sees the sink, the client and the simulator alike.
#[tokio::test]
async fn a_wrong_password_is_one_login_and_a_permanent_error_without_the_password() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let env = env().await;
    let wrong = "wr0ng-Passw0rd-xyz";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("os-password");
    std::fs::write(&file, format!("{wrong}\n")).unwrap();
    let mut config = os_config(&env.sim);
    config.password = CredentialRef::File(file);
    let sink = OpenSpecimenSink::from_config(&config).unwrap();

    let err = write_with(&env.db.pool, &sink, &[subject("S1", 1), subject("S2", 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Refused(_)), "{err:?}");
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(msg.contains("login rejected for user ocsync"), "{msg}");
    assert!(msg.contains("incorrect login name or password"), "{msg}");
    assert!(msg.contains("/openspecimen/rest/ng/sessions"), "{msg}");
    assert_eq!(env.sim.logins(), 1, "a rejected login is never retried");
    assert!(env.sim.registrations().is_empty());

    // Retries and a re-login with the right password, for the logs.
    env.sim.fail_next(&[503]);
    write(&env, &[subject("S1", 1)]).await;
    env.sim.expire_tokens();
    write(&env, &[subject("S2", 1)]).await;

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("retrying"), "the retry is logged: {logs}");
    for secret in [wrong, PASSWORD] {
        assert!(!logs.contains(secret), "a password reached the logs");
        assert!(!msg.contains(secret));
        assert!(!format!("{err:?}").contains(secret));
    }
    for r in env.sim.requests() {
        if let Some(token) = r.header("x-os-api-token") {
            assert!(!logs.contains(token), "a token reached the logs");
        }
        assert!(!format!("{r:?}").contains(PASSWORD));
    }
}

#[tokio::test]
async fn transient_failures_are_retried_and_persistent_ones_fail_the_batch() {
    let env = env().await;
    env.sim.fail_next(&[503, 500, 429]);
    let out = write(&env, &[subject("S1", 1)]).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.counts.participants, counts(1, 0, 0, 0));
    assert_eq!(out.counts.form_records, counts(2, 0, 0, 0));
    assert_eq!(env.sim.registrations().len(), 1);
    let statuses: Vec<u16> = env
        .sim
        .requests()
        .iter()
        .take(4)
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [503, 500, 429, 200]);

    // Failing longer than the retries: the batch fails, transient, and the
    // caller's rollback leaves no bookkeeping behind.
    let before = os_ids(&env.db.pool).await;
    env.sim.fail_next(&[502; 4]);
    let mut tx = env.db.pool.begin().await.unwrap();
    let err = env
        .sink
        .write_batch(&mut tx, CP, &[subject("S2", 1)])
        .await
        .unwrap_err();
    tx.rollback().await.unwrap();
    assert!(matches!(err, SinkError::Remote(_)), "{err:?}");
    assert!(err.is_transient());
    let msg = err.to_string();
    assert!(msg.contains(&format!("http://{}", env.sim.addr)), "{msg}");
    assert!(
        msg.contains("GET /openspecimen/rest/ng/collection-protocol-registrations"),
        "{msg}"
    );
    assert!(msg.contains("HTTP 502"), "{msg}");
    assert!(msg.contains("attempt 4/4"), "{msg}");
    assert!(!msg.contains("PPID-S2"), "no query in messages: {msg}");
    assert_eq!(os_ids(&env.db.pool).await, before);

    // The retry of the batch later finds nothing duplicated.
    let out = write(&env, &[subject("S2", 1)]).await;
    assert_eq!(out.counts.participants, counts(1, 0, 0, 0));
    assert_eq!(env.sim.registrations().len(), 2);
}

#[tokio::test]
async fn removed_records_are_disabled_in_openspecimen() {
    let env = env().await;
    let mut batch = vec![subject("S1", 2)];
    write(&env, &batch).await;
    env.sim.clear_requests();

    batch[0].visits[1].status = RecordStatus::Removed;
    batch[0].specimens[1].status = RecordStatus::Removed;
    batch[0].form_records[2].status = RecordStatus::Removed;
    let out = write(&env, &batch).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.counts.visits, counts(0, 1, 1, 0));
    assert_eq!(out.counts.specimens, counts(0, 1, 1, 0));
    assert_eq!(out.counts.form_records, counts(0, 1, 2, 0));

    let visit = by_key(&env.sim.visits(), "name", "S1-v2").clone();
    assert_eq!(visit["activityStatus"], "Disabled");
    let specimen = by_key(&env.sim.specimens(), "label", "S1-S2").clone();
    assert_eq!(specimen["activityStatus"], "Disabled");
    let disabled_forms: Vec<_> = env
        .sim
        .form_records()
        .into_iter()
        .filter(|(_, r)| r["activityStatus"] == "Disabled")
        .collect();
    assert_eq!(disabled_forms.len(), 1);
    assert_eq!(disabled_forms[0].1["appData"]["objectId"], visit["id"]);
    let calls = api_calls(&env.sim.requests());
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(
        calls[0],
        ("PUT".to_owned(), format!("/visits/{}", visit["id"]))
    );
    assert_eq!(
        calls[1],
        ("PUT".to_owned(), format!("/specimens/{}", specimen["id"]))
    );
    assert_eq!(
        calls[2],
        (
            "DELETE".to_owned(),
            format!("/forms/101/data/{}", disabled_forms[0].1["id"])
        )
    );

    // Removed again: nothing to do. A subject removed before it ever
    // reached OpenSpecimen is not created at all.
    env.sim.clear_requests();
    let mut gone = subject("S9", 1);
    gone.participant.status = RecordStatus::Removed;
    gone.visits[0].status = RecordStatus::Removed;
    gone.specimens[0].status = RecordStatus::Removed;
    for f in &mut gone.form_records {
        f.status = RecordStatus::Removed;
    }
    batch.push(gone);
    let out = write(&env, &batch).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.counts.participants, counts(0, 0, 2, 0));
    assert!(
        env.sim.requests().iter().all(|r| r.method == "GET"),
        "only S9's lookups: {:?}",
        api_calls(&env.sim.requests())
    );
    assert!(
        env.sim
            .registrations()
            .iter()
            .all(|c| c["ppid"] != "PPID-S9")
    );
}

#[tokio::test]
async fn lost_bookkeeping_is_recovered_by_lookup_without_duplicates() {
    let env = env().await;
    let mut subject1 = subject("S1", 2);
    subject1.form_records.clear();
    // OpenSpecimen accepts the batch, but the run's transaction rolls back.
    let mut tx = env.db.pool.begin().await.unwrap();
    env.sink
        .write_batch(&mut tx, CP, std::slice::from_ref(&subject1))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(os_ids(&env.db.pool).await, 0);
    env.sim.clear_requests();

    subject1.visits[0].visit_date = s("2022-06-01");
    let out = write(&env, std::slice::from_ref(&subject1)).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.counts.participants, counts(0, 0, 1, 0));
    assert_eq!(out.counts.visits, counts(0, 1, 1, 0));
    assert_eq!(out.counts.specimens, counts(0, 0, 2, 0));
    assert_eq!(env.sim.registrations().len(), 1);
    assert_eq!(env.sim.visits().len(), 2);
    assert_eq!(env.sim.specimens().len(), 2);
    assert!(env.sim.requests().iter().all(|r| r.method != "POST"));
    assert_eq!(os_ids(&env.db.pool).await, 5);
}
