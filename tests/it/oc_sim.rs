//! The real OpenClinica client (`ocsync::openclinica::Source`) against the
//! simulator (`ocsync::openclinica::sim`) on loopback: every auth flow and
//! every fault, asserting either complete data (the bytes, and the records
//! the ODM reader makes of them, equal what the generator writes for the
//! same study) or a clear error after the configured retries; edits for
//! incremental sync; and that the password reaches no log and no error.
//!
//! Nothing here sleeps to wait for work: a test that needs time to pass
//! (`Retry-After`, latency) measures that the client waited.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ocsync::odm::generate::{
    GeneratorConfig, generate, site_range, subject_key, subject_label, subject_status,
};
use ocsync::odm::{OdmReader, Record, Study, Subject};
use ocsync::openclinica::sim::{AuthConfig, Faults, Scheme, SimConfig, SimHandle, Simulator};
use ocsync::openclinica::{
    Body, CredentialRef, NetworkConfig, Oc3Config, Oc4Config, OcError, QueryFlags, Scope, Source,
    SourceConfig, Subjects, is_transient_io,
};
use secrecy::SecretString;

use crate::harness;
use crate::harness::Captured;
use crate::openclinica::{net, one, read_all};

const STUDY: &str = "S_SIM";
const USER: &str = "ocsync";
const PASSWORD: &str = "sim-Pw-7731-never-log-me";

fn study(subjects: u32) -> GeneratorConfig {
    GeneratorConfig {
        seed: 11,
        study_oid: STUDY.into(),
        subjects,
        sites: 2,
        ..GeneratorConfig::default()
    }
}

fn config(subjects: u32) -> SimConfig {
    SimConfig::new(study(subjects), USER, SecretString::from(PASSWORD))
}

/// A running simulator and a folder of password files.
struct Sim {
    handle: SimHandle,
    dir: tempfile::TempDir,
}

async fn start(config: SimConfig) -> Sim {
    let handle = Simulator::start(config).await.unwrap();
    Sim {
        handle,
        dir: tempfile::tempdir().unwrap(),
    }
}

/// What a client is built with.
struct Client<'a> {
    scheme: Scheme,
    study: &'a str,
    password: &'a str,
    flags: QueryFlags,
    net: NetworkConfig,
}

impl Default for Client<'_> {
    fn default() -> Self {
        Self {
            scheme: Scheme::Oc3,
            study: STUDY,
            password: PASSWORD,
            flags: QueryFlags::default(),
            net: net(3, 4),
        }
    }
}

impl Sim {
    fn password_file(&self, password: &str) -> CredentialRef {
        let path: PathBuf = self.dir.path().join(format!("pw{}", rand::random::<u32>()));
        std::fs::write(&path, format!("{password}\n")).unwrap();
        CredentialRef::File(path)
    }

    fn source(&self, c: Client<'_>) -> Source {
        Source::new(&self.source_config(c)).unwrap()
    }

    fn source_config(&self, c: Client<'_>) -> SourceConfig {
        let password = self.password_file(c.password);
        match c.scheme {
            Scheme::Oc3 => SourceConfig::Oc3(Oc3Config {
                base_url: self.handle.base_url_oc3(),
                study_oid: c.study.into(),
                username: USER.into(),
                password,
                query: c.flags,
                network: c.net,
            }),
            Scheme::Oc4 => SourceConfig::Oc4(Oc4Config {
                base_url: self.handle.base_url_oc4(),
                auth_url: self.handle.auth_url(),
                study_oid: c.study.into(),
                username: USER.into(),
                password,
                query: c.flags,
                network: c.net,
                whole_study: true,
            }),
        }
    }

    fn oc3(&self) -> Source {
        self.source(Client::default())
    }

    fn oc4(&self) -> Source {
        self.source(Client {
            scheme: Scheme::Oc4,
            ..Client::default()
        })
    }

    fn faults(&self, faults: Faults) {
        self.handle.set_faults(faults).unwrap();
    }

    /// What the generator writes for this request, computed without the
    /// simulator's routing: the study as configured (with its edits).
    fn expected(&self, scheme: Scheme, subject: Option<u32>, flags: QueryFlags) -> Vec<u8> {
        let mut c = self.handle.study(STUDY).unwrap();
        c.subject_range = subject.map(|i| i..i + 1);
        c.include_metadata = flags.include_metadata;
        c.audit_logs = flags.include_audits;
        c.discrepancy_notes = false;
        c.oc4_dates = scheme == Scheme::Oc4;
        let mut out = Vec::new();
        generate(&c, &mut out).unwrap();
        out
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.handle.addr())
    }
}

async fn fetch(source: &Source, key: &str) -> Vec<u8> {
    read_all(one(source, Scope::Subject(key.into())).await.unwrap())
        .await
        .unwrap()
}

/// Every subject's document, one request each, in order.
async fn fetch_each(source: &Source, n: u32) -> Vec<Vec<u8>> {
    let keys: Vec<String> = (0..n).map(subject_key).collect();
    let mut bodies = source.clinical_data(Scope::Subjects(keys.clone()));
    let mut out = Vec::new();
    for key in &keys {
        let body = bodies.next().await.unwrap().unwrap();
        assert_eq!(body.subject(), Some(key.as_str()));
        out.push(read_all(body).await.unwrap());
    }
    assert!(bodies.next().await.is_none());
    out
}

/// The records of a document, read as the sync reads a body: streaming,
/// with the async ODM reader.
async fn records(body: Body) -> Vec<Record> {
    let mut reader = OdmReader::new(body);
    let mut out = Vec::new();
    while let Some(r) = reader.next_record_async().await.unwrap() {
        out.push(r);
    }
    out
}

fn parse(bytes: &[u8]) -> Vec<Record> {
    OdmReader::new(bytes).collect::<Result<_, _>>().unwrap()
}

fn subjects(records: &[Record]) -> Vec<Subject> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Subject(s) => Some((**s).clone()),
            Record::Study(_) => None,
        })
        .collect()
}

fn studies(records: &[Record]) -> Vec<Study> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Study(s) => Some((**s).clone()),
            Record::Subject(_) => None,
        })
        .collect()
}

fn admin_client() -> reqwest::Client {
    ocsync::install_crypto_provider();
    reqwest::Client::new()
}

// ---- data completeness ----

#[tokio::test]
async fn oc3_data_is_complete_and_one_login_serves_every_call() {
    let sim = start(config(6)).await;
    let source = sim.oc3();
    let flags = QueryFlags::default();

    let meta = read_all(source.metadata().await.unwrap()).await.unwrap();
    let mut c = sim.handle.study(STUDY).unwrap();
    c.subject_range = Some(0..0);
    let mut want = Vec::new();
    generate(&c, &mut want).unwrap();
    assert_eq!(meta, want, "metadata");

    let whole = read_all(one(&source, Scope::Study).await.unwrap())
        .await
        .unwrap();
    assert_eq!(whole, sim.expected(Scheme::Oc3, None, flags));
    assert_eq!(subjects(&parse(&whole)).len(), 6);

    for (i, doc) in fetch_each(&source, 6).await.into_iter().enumerate() {
        assert_eq!(doc, sim.expected(Scheme::Oc3, Some(i as u32), flags), "{i}");
    }
    // A label finds the subject too.
    assert_eq!(
        fetch(&source, &subject_label(2)).await,
        sim.expected(Scheme::Oc3, Some(2), flags)
    );

    let c = sim.handle.counters();
    assert_eq!((c.logins, c.logins_ok), (1, 1));
    assert_eq!(c.count("oc3.clinicaldata", 200), 8);
    assert_eq!(c.count("oc3.metadata", 200), 1);
    assert_eq!(c.in_flight, 0);
}

#[tokio::test]
async fn per_subject_documents_make_up_the_whole_study_in_both_schemes() {
    let sim = start(config(5)).await;
    let flags = QueryFlags {
        include_metadata: true,
        include_audits: true,
        show_archived: false,
    };
    for scheme in [Scheme::Oc3, Scheme::Oc4] {
        let source = sim.source(Client {
            scheme,
            flags,
            ..Client::default()
        });
        let whole = records(one(&source, Scope::Study).await.unwrap()).await;
        assert_eq!(whole, parse(&sim.expected(scheme, None, flags)));
        let keys: Vec<String> = (0..5).map(subject_key).collect();
        let mut bodies = source.clinical_data(Scope::Subjects(keys));
        let mut each = Vec::new();
        while let Some(body) = bodies.next().await {
            let recs = records(body.unwrap()).await;
            // Every one-subject document ships the same metadata.
            assert_eq!(studies(&recs), studies(&whole));
            each.extend(subjects(&recs));
        }
        assert_eq!(each, subjects(&whole), "{scheme:?}");
        assert!(each.iter().all(|s| s.audit.entries > 0));
        let forms = each.iter().flat_map(|s| &s.events).flat_map(|e| &e.forms);
        let oc4 = scheme == Scheme::Oc4;
        assert!(forms.clone().all(|f| f.updated_date.is_some() == oc4));
        // 3.x names CRF versions (`F_DEMOG_V1`), 4.x CRFs (`F_DEMOG`).
        let versioned = |oid: &str| {
            oid.rsplit_once("_V")
                .is_some_and(|(_, v)| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        };
        assert!(forms.clone().all(|f| versioned(&f.oid) != oc4));
    }
}

#[tokio::test]
async fn a_site_oid_serves_that_site_only() {
    let sim = start(config(7)).await;
    let site = "S_SIM_SITE2";
    let source = sim.source(Client {
        study: site,
        ..Client::default()
    });
    let got = subjects(&records(one(&source, Scope::Study).await.unwrap()).await);
    let range = site_range(&study(7), 1);
    let keys: Vec<String> = got.iter().map(|s| s.subject_key.clone()).collect();
    assert_eq!(keys, range.clone().map(subject_key).collect::<Vec<_>>());
    assert!(got.iter().all(|s| s.study_oid == site));
    // A subject of the other site is not found there.
    let outside = fetch(&source, &subject_key(0)).await;
    assert!(subjects(&parse(&outside)).is_empty());
}

#[tokio::test]
async fn unknown_subjects_and_studies_answer_as_documented() {
    let sim = start(config(2)).await;
    // 3.x: 200 with a document that names no subject.
    let doc = fetch(&sim.oc3(), "SS_GEN999999").await;
    assert!(subjects(&parse(&doc)).is_empty());
    // 4.x: 404, not retried.
    let err = one(&sim.oc4(), Scope::Subject("SS_GEN999999".into()))
        .await
        .unwrap_err();
    assert!(
        !err.is_transient() && err.to_string().contains("404"),
        "{err}"
    );
    // An unknown study: 404 in both.
    for scheme in [Scheme::Oc3, Scheme::Oc4] {
        let source = sim.source(Client {
            scheme,
            study: "S_NOPE",
            ..Client::default()
        });
        let err = one(&source, Scope::Study).await.unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
    }
}

// ---- 3.x authentication ----

#[tokio::test]
async fn oc3_session_expiry_every_n_requests_means_a_transparent_relogin() {
    let sim = start(config(6)).await;
    sim.faults(Faults {
        session_expiry_every: 2,
        ..Faults::default()
    });
    let source = sim.source(Client {
        net: net(3, 1),
        ..Client::default()
    });
    for (i, doc) in fetch_each(&source, 6).await.into_iter().enumerate() {
        assert_eq!(
            doc,
            sim.expected(Scheme::Oc3, Some(i as u32), QueryFlags::default())
        );
    }
    let c = sim.handle.counters();
    assert_eq!(c.logins_ok, 3);
    assert_eq!(c.sessions_expired, 2);
    assert_eq!(c.count("oc3.clinicaldata", 302), 2);
}

#[tokio::test]
async fn oc3_one_session_per_user_and_expired_sessions_are_replaced() {
    let sim = start(config(4)).await;
    let flags = QueryFlags::default();
    let (a, b) = (sim.oc3(), sim.oc3());
    assert_eq!(
        fetch(&a, &subject_key(0)).await,
        sim.expected(Scheme::Oc3, Some(0), flags)
    );
    // B's login ends A's session, as OC does: A logs in again.
    assert_eq!(
        fetch(&b, &subject_key(1)).await,
        sim.expected(Scheme::Oc3, Some(1), flags)
    );
    assert_eq!(
        fetch(&a, &subject_key(2)).await,
        sim.expected(Scheme::Oc3, Some(2), flags)
    );
    assert_eq!(sim.handle.counters().logins_ok, 3);
    // Every session ends (an OC restart): the next call logs in again.
    sim.handle.expire_sessions();
    assert_eq!(
        fetch(&a, &subject_key(3)).await,
        sim.expected(Scheme::Oc3, Some(3), flags)
    );
    assert_eq!(sim.handle.counters().logins_ok, 4);
}

#[tokio::test]
async fn oc3_wrong_password_is_one_login_and_three_lock_the_account() {
    let sim = start(config(1)).await;
    let bad = sim.source(Client {
        password: "wrong",
        ..Client::default()
    });
    for _ in 0..3 {
        let err = one(&bad, Scope::Study).await.unwrap_err();
        assert!(matches!(err, OcError::AuthRejected { .. }), "{err:?}");
        assert!(!err.is_transient());
    }
    assert_eq!(
        sim.handle.counters().logins,
        1,
        "a rejected password is never retried"
    );
    // Two more clients with the wrong password: the third failure locks.
    for _ in 0..2 {
        let other = sim.source(Client {
            password: "wrong",
            ..Client::default()
        });
        assert!(other.metadata().await.is_err());
    }
    let err = sim.oc3().metadata().await.unwrap_err();
    assert!(err.to_string().contains("locked"), "{err}");
    let c = sim.handle.counters();
    assert_eq!((c.logins, c.logins_ok, c.locked_refusals), (4, 0, 1));
    sim.handle.unlock();
    assert!(sim.oc3().metadata().await.is_ok());
}

// ---- 4.x authentication ----

#[tokio::test]
async fn oc4_token_is_cached_and_replaced_when_refused() {
    let sim = start(config(5)).await;
    let source = sim.oc4();
    let flags = QueryFlags::default();
    read_all(source.metadata().await.unwrap()).await.unwrap();
    for i in 0..3 {
        assert_eq!(
            fetch(&source, &subject_key(i)).await,
            sim.expected(Scheme::Oc4, Some(i), flags)
        );
    }
    assert_eq!(sim.handle.counters().tokens_issued, 1);
    // The token has served 4 requests: from now on 2 is its limit.
    sim.faults(Faults {
        token_expiry_every: 2,
        ..Faults::default()
    });
    for i in 3..5 {
        assert_eq!(
            fetch(&source, &subject_key(i)).await,
            sim.expected(Scheme::Oc4, Some(i), flags)
        );
    }
    let c = sim.handle.counters();
    assert_eq!(c.tokens_issued, 2);
    assert_eq!(c.count("oc4.clinicaldata", 401), 1);
}

#[tokio::test]
async fn runs_one_after_another_share_the_token_until_the_password_changes() {
    let sim = start(config(3)).await;
    let registry = ocsync::openclinica::SourceRegistry::new();
    let config = sim.source_config(Client {
        scheme: Scheme::Oc4,
        ..Client::default()
    });
    for i in 0..3 {
        // Each "run" takes its source and drops it when done.
        let source = registry.source(&config).unwrap();
        fetch(&source, &subject_key(i)).await;
    }
    assert_eq!(sim.handle.counters().tokens_issued, 1);

    // A rotated secret: the next source logs in afresh with the new one.
    let SourceConfig::Oc4(c) = &config else {
        unreachable!()
    };
    let ocsync::openclinica::CredentialRef::File(path) = &c.password else {
        unreachable!()
    };
    std::fs::write(path, "not-the-password\n").unwrap();
    let source = registry.source(&config).unwrap();
    let err = source.metadata().await.unwrap_err();
    assert!(err.to_string().contains("login rejected"), "{err}");
    assert_eq!(sim.handle.counters().tokens_issued, 1);
}

#[tokio::test]
async fn oc4_expired_tokens_are_refused_then_replaced() {
    let sim = start(config(2)).await;
    let source = sim.oc4();
    fetch(&source, &subject_key(0)).await;
    sim.handle.expire_sessions();
    assert_eq!(
        fetch(&source, &subject_key(1)).await,
        sim.expected(Scheme::Oc4, Some(1), QueryFlags::default())
    );
    let c = sim.handle.counters();
    assert_eq!((c.tokens_issued, c.count("oc4.clinicaldata", 401)), (2, 1));
}

#[tokio::test]
async fn oc4_token_rate_limit_is_honoured() {
    let sim = start(SimConfig {
        auth: AuthConfig {
            token_window: Duration::from_secs(2),
            ..AuthConfig::default()
        },
        ..config(1)
    })
    .await;
    // Three clients from one address, each with a pacer of its own: the
    // third meets the user service's limit and waits as told.
    for _ in 0..2 {
        read_all(sim.oc4().metadata().await.unwrap()).await.unwrap();
    }
    let started = Instant::now();
    let doc = fetch(&sim.oc4(), &subject_key(0)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        doc,
        sim.expected(Scheme::Oc4, Some(0), QueryFlags::default())
    );
    let c = sim.handle.counters();
    assert_eq!((c.tokens_issued, c.token_rate_limited), (3, 1));
    assert_eq!(c.count("oc4.token", 429), 1);
}

#[tokio::test]
async fn oc4_wrong_password_is_one_token_request() {
    let sim = start(config(1)).await;
    let bad = sim.source(Client {
        scheme: Scheme::Oc4,
        password: "wrong",
        ..Client::default()
    });
    for _ in 0..2 {
        let err = bad.metadata().await.unwrap_err();
        assert!(matches!(err, OcError::AuthRejected { .. }), "{err:?}");
    }
    let c = sim.handle.counters();
    assert_eq!((c.token_requests, c.count("oc4.token", 401)), (1, 1));
}

#[tokio::test]
async fn oc4_participants_list_every_subject_and_follow_edits() {
    let sim = start(config(6)).await;
    let source = sim.oc4();
    let list = |s: Subjects| match s {
        Subjects::Listed(l) => l,
        Subjects::InDocument(_) => panic!("4.x lists participants"),
    };
    let before = list(source.subjects().await.unwrap());
    let keys: Vec<&str> = before.iter().map(|p| p.subject_key.as_str()).collect();
    assert_eq!(keys, (0..6).map(subject_key).collect::<Vec<_>>());
    for (i, p) in before.iter().enumerate() {
        assert_eq!(
            p.status.as_deref(),
            Some(subject_status(&study(6), i as u32))
        );
    }
    let edited = sim
        .handle
        .edit_subjects(STUDY, &["SS_GEN000002", "GEN-00005"])
        .unwrap();
    assert_eq!(edited, ["SS_GEN000002", "SS_GEN000005"]);
    let after = list(source.subjects().await.unwrap());
    let newest_before = before.iter().filter_map(|p| p.last_modified.clone()).max();
    for (b, a) in before.iter().zip(&after) {
        if edited.contains(&a.subject_key) {
            assert!(a.last_modified > newest_before, "{a:?}");
            // The edited subject's forms carry the same UpdatedDate.
            let doc = fetch(&source, &a.subject_key).await;
            let s = &subjects(&parse(&doc))[0];
            let forms = s.events.iter().flat_map(|e| &e.forms);
            assert!(forms.clone().all(|f| f.updated_date == a.last_modified));
        } else {
            assert_eq!(a, b);
        }
    }
}

// ---- faults ----

#[tokio::test]
async fn latency_is_waited_out() {
    let sim = start(config(1)).await;
    sim.faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });
    let started = Instant::now();
    let doc = fetch(&sim.oc3(), &subject_key(0)).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        doc,
        sim.expected(Scheme::Oc3, Some(0), QueryFlags::default())
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_the_data_is_complete() {
    let sim = start(config(8)).await;
    sim.faults(Faults {
        error_next: 2,
        ..Faults::default()
    });
    let flags = QueryFlags::default();
    for scheme in [Scheme::Oc3, Scheme::Oc4] {
        let source = sim.source(Client {
            scheme,
            ..Client::default()
        });
        assert_eq!(
            fetch(&source, &subject_key(0)).await,
            sim.expected(scheme, Some(0), flags)
        );
    }
    assert_eq!(sim.handle.counters().count("oc3.clinicaldata", 503), 2);
    // A seeded error rate: every subject still arrives whole.
    sim.faults(Faults {
        error_rate: 0.3,
        error_status: 500,
        ..Faults::default()
    });
    let source = sim.source(Client {
        net: net(10, 2),
        ..Client::default()
    });
    for (i, doc) in fetch_each(&source, 8).await.into_iter().enumerate() {
        assert_eq!(doc, sim.expected(Scheme::Oc3, Some(i as u32), flags));
    }
    assert!(sim.handle.counters().count("oc3.clinicaldata", 500) > 0);
}

#[tokio::test]
async fn server_errors_beyond_the_retries_end_in_a_clear_error() {
    let sim = start(config(1)).await;
    sim.faults(Faults {
        error_every: 1,
        ..Faults::default()
    });
    let err = one(&sim.oc3(), Scope::Subject(subject_key(0)))
        .await
        .unwrap_err();
    assert!(err.is_transient());
    let msg = err.to_string();
    let origin = format!("http://{}", sim.handle.addr());
    for part in [
        origin.as_str(),
        "/OpenClinica/rest/clinicaldata/xml/view/S_SIM/SS_GEN000001/*/*",
        "503",
        "attempt 3/3",
    ] {
        assert!(msg.contains(part), "{part:?} missing from {msg}");
    }
    assert_eq!(sim.handle.counters().count("oc3.clinicaldata", 503), 3);
}

#[tokio::test]
async fn a_429_burst_is_waited_out() {
    let sim = start(config(1)).await;
    sim.faults(Faults {
        too_many_next: 2,
        retry_after_secs: 1,
        ..Faults::default()
    });
    let started = Instant::now();
    let doc = fetch(&sim.oc4(), &subject_key(0)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        doc,
        sim.expected(Scheme::Oc4, Some(0), QueryFlags::default())
    );
    assert_eq!(sim.handle.counters().count("oc4.clinicaldata", 429), 2);
}

#[tokio::test]
async fn a_truncated_body_is_a_transient_error_and_a_retry_completes() {
    let sim = start(config(3)).await;
    let flags = QueryFlags::default();
    // Cut at 1000 bytes; then with a limit beyond the document's end,
    // which must still cut (inside the last chunk).
    for after in [1_000, 100_000_000] {
        sim.faults(Faults {
            truncate_next: 1,
            truncate_after_bytes: after,
            ..Faults::default()
        });
        let source = sim.oc3();
        let body = one(&source, Scope::Subject(subject_key(1))).await.unwrap();
        let err = match read_all(body).await {
            Ok(all) => panic!("read all {} bytes without an error", all.len()),
            Err(e) => e,
        };
        assert!(is_transient_io(&err), "{err:?}");
        let inner = OcError::from_io(&err).unwrap().to_string();
        assert!(inner.contains("SS_GEN000002"), "{inner}");
        assert_eq!(
            fetch(&source, &subject_key(1)).await,
            sim.expected(Scheme::Oc3, Some(1), flags)
        );
    }
    // The reader of a cut body fails too, whatever it had read.
    sim.faults(Faults {
        truncate_next: 1,
        truncate_after_bytes: 5_000,
        ..Faults::default()
    });
    let body = one(&sim.oc4(), Scope::Study).await.unwrap();
    let mut reader = OdmReader::new(body);
    let err = loop {
        match reader.next_record_async().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("a cut document parsed whole"),
            Err(e) => break e,
        }
    };
    assert!(err.to_string().contains("broken off"), "{err}");
    assert_eq!(sim.handle.counters().bodies_truncated, 3);
}

#[tokio::test]
async fn a_slow_drip_completes() {
    let sim = start(config(2)).await;
    sim.faults(Faults {
        drip_bytes: 1024,
        drip_delay_ms: 1,
        ..Faults::default()
    });
    let source = sim.source(Client {
        net: NetworkConfig {
            idle_timeout_ms: 500,
            ..net(3, 4)
        },
        ..Client::default()
    });
    let flags = QueryFlags::default();
    assert_eq!(
        fetch(&source, &subject_key(1)).await,
        sim.expected(Scheme::Oc3, Some(1), flags)
    );
    let whole = records(one(&source, Scope::Study).await.unwrap()).await;
    assert_eq!(whole, parse(&sim.expected(Scheme::Oc3, None, flags)));
}

#[tokio::test]
async fn concurrency_is_bounded_by_the_client() {
    let sim = start(config(8)).await;
    sim.faults(Faults {
        latency_ms: 30,
        ..Faults::default()
    });
    let source = sim.source(Client {
        net: net(3, 4),
        ..Client::default()
    });
    let docs = fetch_each(&source, 8).await;
    assert_eq!(docs.len(), 8);
    let max = sim.handle.counters().max_in_flight;
    assert!((2..=4).contains(&max), "max in flight {max}");
}

#[tokio::test]
async fn the_admin_endpoints_set_faults_edit_subjects_and_report_counters() {
    let sim = start(config(3)).await;
    let http = admin_client();
    let put = http
        .put(sim.url("/_sim/faults"))
        .body(r#"{"error_next": 1, "error_status": 502}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let refused = http
        .put(sim.url("/_sim/faults"))
        .body(r#"{"error_rate": 7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    fetch(&sim.oc3(), &subject_key(0)).await;
    let edited: serde_json::Value = http
        .post(sim.url("/_sim/studies/S_SIM/edit"))
        .body(r#"{"keys": ["GEN-00003"]}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(edited["edited"], serde_json::json!(["SS_GEN000003"]));
    let counters: serde_json::Value = http
        .get(sim.url("/_sim/counters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters["requests"]["oc3.clinicaldata"]["502"], 1);
    assert_eq!(counters["requests"]["oc3.clinicaldata"]["200"], 1);
    assert_eq!(counters["logins_ok"], 1);
    let unknown = http
        .post(sim.url("/_sim/studies/S_NOPE/edit"))
        .body(r#"{"subjects": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

// ---- edits for incremental sync ----

#[tokio::test]
async fn editing_k_subjects_changes_exactly_those_subjects() {
    let sim = start(config(12)).await;
    let flags = QueryFlags {
        include_audits: true,
        ..QueryFlags::default()
    };
    let source = sim.source(Client {
        flags,
        ..Client::default()
    });
    let before = fetch_each(&source, 12).await;
    let parsed_before: Vec<Subject> = before
        .iter()
        .map(|d| subjects(&parse(d))[0].clone())
        .collect();
    let max_id = parsed_before
        .iter()
        .filter_map(|s| s.audit.max_id_number)
        .max();
    let max_ts = parsed_before
        .iter()
        .filter_map(|s| s.audit.latest_timestamp.clone())
        .max();

    let response: serde_json::Value = admin_client()
        .post(sim.url("/_sim/studies/S_SIM/edit"))
        .body(r#"{"subjects": 3}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let edited: Vec<String> = serde_json::from_value(response["edited"].clone()).unwrap();
    assert_eq!(edited.len(), 3);

    let after = fetch_each(&source, 12).await;
    let mut edited_max = Vec::new();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let key = subject_key(i as u32);
        if !edited.contains(&key) {
            assert_eq!(a, b, "{key} was not edited and must not change");
            continue;
        }
        let (sb, sa) = (&parsed_before[i], &subjects(&parse(a))[0]);
        assert_ne!(sa, sb);
        let values = |s: &Subject| -> Vec<Option<String>> {
            s.items()
                .map(|(_, _, _, item)| item.value.clone())
                .collect()
        };
        assert_ne!(values(sa), values(sb), "{key}: some values change");
        assert_eq!(
            sa.events.len(),
            sb.events.len(),
            "{key}: the structure stays"
        );
        assert!(sa.audit.max_id_number > max_id, "{key}");
        assert!(sa.audit.latest_timestamp > max_ts, "{key}");
        edited_max.push(sa.audit.max_id_number);
    }
    // A second edit of one subject goes beyond the first edits.
    sim.handle
        .edit_subjects(STUDY, &[edited[0].as_str()])
        .unwrap();
    let again = subjects(&parse(&fetch(&source, &edited[0]).await))[0].clone();
    assert!(again.audit.max_id_number > edited_max.into_iter().max().unwrap());
    // The whole study agrees with the per-subject documents.
    let whole = read_all(one(&source, Scope::Study).await.unwrap())
        .await
        .unwrap();
    assert_eq!(whole, sim.expected(Scheme::Oc3, None, flags));
}

// ---- secrets ----

// A current-thread runtime (the default): the subscriber set for this
// thread sees the client, the simulator and hyper alike.
#[tokio::test]
async fn the_password_never_reaches_logs_or_errors() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut seen = Vec::new();

    // Enough token requests per minute for the four 4.x clients below.
    let sim = start(SimConfig {
        auth: AuthConfig {
            token_limit: 10,
            ..AuthConfig::default()
        },
        ..config(3)
    })
    .await;
    sim.faults(Faults {
        session_expiry_every: 2,
        error_next: 1,
        ..Faults::default()
    });
    // One request at a time: with several, a fresh session could be used
    // up by another request before this one gets to it.
    let source = sim.source(Client {
        net: net(3, 1),
        ..Client::default()
    });
    seen.push(format!("{source:?} {}", source.describe()));
    fetch_each(&source, 3).await;
    sim.faults(Faults {
        truncate_next: 1,
        ..Faults::default()
    });
    let err = read_all(one(&source, Scope::Study).await.unwrap())
        .await
        .unwrap_err();
    seen.push(format!("{err} {err:?}"));
    sim.faults(Faults {
        error_every: 1,
        ..Faults::default()
    });
    let err = one(&source, Scope::Study).await.unwrap_err();
    seen.push(format!("{err} {err:?}"));
    sim.faults(Faults::default());

    let oc4 = sim.oc4();
    fetch(&oc4, &subject_key(0)).await;
    sim.handle.expire_sessions();
    fetch(&oc4, &subject_key(1)).await;

    // Wrong passwords until the account locks, then the right one: the
    // password the simulator holds goes into the error path too.
    for scheme in [Scheme::Oc3, Scheme::Oc3, Scheme::Oc4, Scheme::Oc3] {
        let bad = sim.source(Client {
            scheme,
            password: "wrong-but-also-secret",
            ..Client::default()
        });
        let err = bad.metadata().await.unwrap_err();
        seen.push(format!("{err} {err:?}"));
    }
    let err = sim.oc3().metadata().await.unwrap_err();
    seen.push(format!("{err} {err:?}"));
    seen.push(format!("{:?}", sim.handle.counters()));

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for expected in [
        "oc-sim: 3.x login",
        "account now locked",
        "logging in again",
        "retrying",
    ] {
        assert!(logs.contains(expected), "{expected:?} not logged:\n{logs}");
    }
    let everything = format!("{logs}\n{}", seen.join("\n"));
    assert!(!everything.contains(PASSWORD), "password leaked");
    assert!(
        !everything.contains("wrong-but-also-secret"),
        "password leaked"
    );
    assert!(!everything.contains("eyJ"), "a token leaked");
    let session_id = everything.split(|c: char| !c.is_ascii_hexdigit()).any(|w| {
        w.len() == 32
            && w.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
    });
    assert!(!session_id, "a session id leaked");
}

// ---- the command ----

#[tokio::test]
async fn the_command_refuses_to_start_without_a_password() {
    let mut cmd = harness::ocsync();
    cmd.args(["oc-sim", "--listen", "127.0.0.1:0"]);
    let out = harness::output(cmd).await;
    assert!(!out.status.success());
    assert!(
        harness::stderr(&out).contains("OC_SIM_PASSWORD"),
        "{}",
        harness::stderr(&out)
    );
}
