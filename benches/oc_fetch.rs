//! `make bench` (second part): fetch + parse throughput of the OpenClinica
//! client against the simulator, in process, on loopback.
//!
//! Starts `ocsync::openclinica::sim` with a study of `OC_BENCH_SUBJECTS`
//! subjects (default 2,000; seed 42, 4 sites) and, through the real OC 3.x
//! client (session login, per-server concurrency limit, streaming bodies),
//! fetches every subject one request each and parses every document with
//! the async ODM reader, with 1 and with 4 requests in flight. Each parse
//! runs as a task of its own, so with 4 in flight parsing overlaps too, as
//! it would in a sync that hands documents to workers. Reports subjects/s
//! and MB/s (body bytes as sent) for each, the 4-vs-1 ratio, and as a
//! baseline the whole study in one request, fetched and parsed. Documents
//! are requested as the sync does by default: no metadata, no audits.
//!
//! The figures include the simulator's own work (the generator writes every
//! document as it is sent) on the same machine: they are a floor for the
//! client, not a model of a real OC server, which is far slower.
//!
//! Without `--bench` (under `cargo test --all-targets`) it does a smoke run
//! of 20 subjects.

use std::time::{Duration, Instant};

use futures::StreamExt;
use ocsync::odm::generate::{GeneratorConfig, subject_key};
use ocsync::odm::{OdmReader, Record};
use ocsync::openclinica::sim::{SimConfig, SimHandle, Simulator};
use ocsync::openclinica::{
    Body, CredentialRef, NetworkConfig, Oc3Config, QueryFlags, Scope, Source, SourceConfig,
};
use secrecy::SecretString;

const STUDY: &str = "S_BENCH";
const USER: &str = "bench";

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let subjects: u32 = std::env::var("OC_BENCH_SUBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measuring { 2_000 } else { 20 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(subjects));
}

/// One measured pass.
struct Pass {
    name: String,
    subjects: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Pass {
    fn print(&self, baseline: Option<&Pass>) {
        let secs = self.elapsed.as_secs_f64();
        let ratio = baseline.map_or(String::new(), |b| {
            format!(
                "  ×{:.2} vs 1 in flight",
                (self.subjects as f64 / secs) / (b.subjects as f64 / b.elapsed.as_secs_f64())
            )
        });
        println!(
            "{:<34} {:>6} subjects {:>8.1} MB {:>8.2} s {:>9.0} subjects/s {:>8.1} MB/s{ratio}",
            self.name,
            self.subjects,
            self.bytes as f64 / 1e6,
            secs,
            self.subjects as f64 / secs,
            self.bytes as f64 / 1e6 / secs,
        );
    }
}

async fn run(subjects: u32) {
    // A password only this run knows, handed to the client as a mounted
    // secret would be: a file its configuration names.
    let password = format!("bench-{:016x}", rand::random::<u64>());
    let dir = tempfile::tempdir().expect("temp dir");
    let pw_file = dir.path().join("password");
    std::fs::write(&pw_file, &password).expect("password file");

    let study = GeneratorConfig {
        seed: 42,
        study_oid: STUDY.into(),
        subjects,
        sites: 4,
        ..GeneratorConfig::default()
    };
    let sim = Simulator::start(SimConfig::new(study, USER, SecretString::from(password)))
        .await
        .expect("simulator");
    println!(
        "oc_fetch: {subjects} subjects, OC 3.x client against the simulator on {}",
        sim.addr()
    );

    let source = |concurrency: usize| {
        Source::new(&SourceConfig::Oc3(Oc3Config {
            base_url: sim.base_url_oc3(),
            study_oid: STUDY.into(),
            username: USER.into(),
            password: CredentialRef::File(pw_file.clone()),
            query: QueryFlags::default(),
            network: NetworkConfig {
                max_concurrency: concurrency,
                ..NetworkConfig::default()
            },
        }))
        .expect("source")
    };

    // Warm-up: login, connections, page cache of the code.
    let warm = source(1);
    let _ = per_subject(&sim, &warm, subjects.min(20), 1, "warm-up").await;

    let whole = whole_study(&sim, &source(1)).await;
    whole.print(None);
    let one = per_subject(&sim, &source(1), subjects, 1, "per subject, 1 in flight").await;
    one.print(None);
    let four = per_subject(&sim, &source(4), subjects, 4, "per subject, 4 in flight").await;
    four.print(Some(&one));
    sim.shutdown().await;
}

async fn parse(body: Body) -> u64 {
    let mut reader = OdmReader::new(body);
    let mut subjects = 0;
    while let Some(record) = reader.next_record_async().await.expect("a whole document") {
        if let Record::Subject(s) = record {
            subjects += 1;
            std::hint::black_box(s);
        }
    }
    subjects
}

async fn whole_study(sim: &SimHandle, source: &Source) -> Pass {
    let bytes = sim.counters().body_bytes;
    let started = Instant::now();
    let mut bodies = source.clinical_data(Scope::Study);
    let body = bodies.next().await.expect("one document").expect("fetched");
    let subjects = parse(body).await;
    Pass {
        name: "whole study, 1 request".into(),
        subjects,
        bytes: sim.counters().body_bytes - bytes,
        elapsed: started.elapsed(),
    }
}

async fn per_subject(
    sim: &SimHandle,
    source: &Source,
    n: u32,
    in_flight: usize,
    name: &str,
) -> Pass {
    let keys: Vec<String> = (0..n).map(subject_key).collect();
    let bytes = sim.counters().body_bytes;
    let started = Instant::now();
    // Each document is parsed by a task of its own as soon as it arrives;
    // `buffered` keeps `in_flight` of them going, which is also what holds
    // the client's concurrency slots.
    let subjects: u64 = source
        .clinical_data(Scope::Subjects(keys))
        .map(|body| tokio::spawn(parse(body.expect("fetched"))))
        .buffered(in_flight)
        .map(|parsed| parsed.expect("parse task"))
        .fold(0, |sum, n| async move { sum + n })
        .await;
    assert_eq!(subjects, u64::from(n), "every subject arrived");
    Pass {
        name: name.into(),
        subjects,
        bytes: sim.counters().body_bytes - bytes,
        elapsed: started.elapsed(),
    }
}
