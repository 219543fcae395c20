//! `make bench`: throughput and peak memory of the ODM reader.
//!
//! Generates (once, cached by seed and size under `target/bench-data/`) an
//! OpenClinica-style ODM file of `ODM_BENCH_MB` megabytes (default 128),
//! in two flavours: a full extract with audit logs and discrepancy notes,
//! and a lean REST-style document without them. On one thread, best of
//! `ODM_BENCH_RUNS` (default 5), it measures over the same bytes:
//!
//! - bare quick-xml event loops (the ceiling): events only, with namespace
//!   resolution (`NsReader`), and with every attribute value normalised;
//! - `odm stats` (counting);
//! - typed records (every subject built, every value touched);
//!
//! and prints MB/s and each figure as a ratio to the bare loop. Peak RSS is
//! measured in a child process (this executable re-run with `--child`)
//! that runs stats or typed records alone over the file and reports its
//! `VmHWM`.

use std::fs::File;
use std::hint::black_box;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ocsync::odm::generate::{self, GeneratorConfig};
use ocsync::odm::{self, OdmReader, Record};
use quick_xml::events::Event;

const SEED: u64 = 42;
const READ_BUFFER: usize = 1 << 16;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], Path::new(&args[i + 2]));
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then a 1 MB smoke run proves the benchmark still works without
    // spending minutes in an unoptimised build.
    let measuring = args.iter().any(|a| a == "--bench");
    let mb: u64 = env_or("ODM_BENCH_MB", if measuring { 128 } else { 1 });
    let runs: usize = env_or("ODM_BENCH_RUNS", if measuring { 5 } else { 1 });
    for audits in [true, false] {
        let path = data_file(mb, audits);
        report(&path, runs);
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The cached data file for this size and flavour, generated if missing.
fn data_file(mb: u64, audits: bool) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let flavour = if audits { "full" } else { "lean" };
    let mut config = GeneratorConfig {
        seed: SEED,
        sites: 4,
        audit_logs: audits,
        discrepancy_notes: audits,
        ..GeneratorConfig::default()
    };
    config.subjects = generate::subjects_for_size(&config, mb << 20).unwrap();
    // The subject count is in the name: a change to the generator's
    // calibration gives a new file rather than a stale one.
    let path = dir.join(format!(
        "odm-s{SEED}-{mb}mb-{flavour}-{}subjects.xml",
        config.subjects
    ));
    if !path.exists() {
        eprintln!("generating {} ...", path.display());
        let tmp = path.with_extension("tmp");
        let out = BufWriter::new(File::create(&tmp).unwrap());
        generate::generate(&config, out).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

fn open(path: &Path) -> BufReader<File> {
    BufReader::with_capacity(READ_BUFFER, File::open(path).unwrap())
}

/// Best wall time of `runs` runs of `f`.
fn best<F: FnMut() -> u64>(runs: usize, mut f: F) -> (Duration, u64) {
    let mut best = Duration::MAX;
    let mut out = 0;
    for _ in 0..runs {
        let t = Instant::now();
        out = black_box(f());
        best = best.min(t.elapsed());
    }
    (best, out)
}

fn bare(path: &Path) -> u64 {
    let mut reader = quick_xml::Reader::from_reader(open(path));
    let mut buf = Vec::with_capacity(4096);
    let mut events = 0u64;
    loop {
        match reader.read_event_into(&mut buf).unwrap() {
            Event::Eof => return events,
            _ => events += 1,
        }
        buf.clear();
    }
}

fn bare_ns(path: &Path) -> u64 {
    let mut reader = quick_xml::NsReader::from_reader(open(path));
    let mut buf = Vec::with_capacity(4096);
    let mut odm = 0u64;
    loop {
        let (ns, event) = reader.read_resolved_event_into(&mut buf).unwrap();
        match event {
            Event::Eof => return odm,
            Event::Start(_) | Event::Empty(_) => {
                if matches!(ns, quick_xml::name::ResolveResult::Bound(n) if n.as_ref() == odm::ODM_13)
                {
                    odm += 1;
                }
            }
            _ => {}
        }
        buf.clear();
    }
}

fn bare_ns_attrs(path: &Path) -> u64 {
    let mut reader = quick_xml::NsReader::from_reader(open(path));
    let mut buf = Vec::with_capacity(4096);
    let mut total = 0u64;
    loop {
        let (_, event) = reader.read_resolved_event_into(&mut buf).unwrap();
        match event {
            Event::Eof => return total,
            Event::Start(e) | Event::Empty(e) => {
                for a in e.attributes() {
                    let a = a.unwrap();
                    let v = a
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .unwrap();
                    total += v.len() as u64;
                }
            }
            _ => {}
        }
        buf.clear();
    }
}

fn stats(path: &Path) -> u64 {
    odm::count(open(path)).unwrap().items
}

fn len(s: &Option<String>) -> u64 {
    s.as_ref().map_or(0, |s| s.len() as u64)
}

fn typed(path: &Path) -> u64 {
    let mut total = 0u64;
    for record in OdmReader::new(open(path)) {
        match record.unwrap() {
            Record::Study(s) => total += s.oid.len() as u64,
            Record::Subject(s) => {
                total += (s.subject_key.len() + s.study_oid.len()) as u64
                    + len(&s.study_subject_id)
                    + len(&s.status)
                    + len(&s.sex);
                for (event, form, group, item) in s.items() {
                    total += (event.oid.len() + form.oid.len() + group.oid.len() + item.oid.len())
                        as u64
                        + len(&item.value);
                }
            }
        }
    }
    total
}

/// Child mode: run one reader over the file and print peak RSS in KiB.
fn child(mode: &str, path: &Path) {
    let out = match mode {
        "stats" => stats(path),
        "typed" => typed(path),
        _ => bare(path),
    };
    black_box(out);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    println!("{hwm}");
}

fn peak_rss_mib(mode: &str, path: &Path) -> f64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--child", mode, path.to_str().unwrap()])
        .output()
        .unwrap();
    let kib: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn report(path: &Path, runs: usize) {
    let bytes = std::fs::metadata(path).unwrap().len();
    let mb = bytes as f64 / 1e6;
    let counts = odm::count(open(path)).unwrap();
    // Warm the page cache so every mode reads from memory.
    black_box(bare(path));
    println!();
    println!(
        "ODM reader on {} ({:.1} MB; {} subjects, {} items, {} audit-log entries; one thread, best of {runs})",
        path.file_name().unwrap().to_string_lossy(),
        mb,
        counts.subjects,
        counts.items,
        counts.audit_logs,
    );
    type Mode = fn(&Path) -> u64;
    let modes: [(&str, Mode); 5] = [
        ("bare quick-xml event loop (ceiling)", bare),
        ("quick-xml NsReader, names resolved", bare_ns),
        ("  + every attribute value normalised", bare_ns_attrs),
        ("odm stats", stats),
        ("odm typed records (all values touched)", typed),
    ];
    let mut ceiling = 0.0;
    println!("{:<42} {:>10} {:>14}", "mode", "MB/s", "vs bare loop");
    for (i, (name, f)) in modes.iter().enumerate() {
        let (time, _) = best(runs, || f(path));
        let rate = mb / time.as_secs_f64();
        if i == 0 {
            ceiling = rate;
        }
        println!("{name:<42} {rate:>10.1} {:>14.2}", rate / ceiling);
    }
    println!(
        "peak RSS (VmHWM, separate process): stats {:.1} MiB, typed records {:.1} MiB, bare loop {:.1} MiB",
        peak_rss_mib("stats", path),
        peak_rss_mib("typed", path),
        peak_rss_mib("bare", path),
    );
    std::io::stdout().flush().unwrap();
}
