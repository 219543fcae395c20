//! The `ocsync cp` commands: add, show, edit, validate and list CP
//! configurations.
//!
//! Exit status: 0 done; 1 the command failed or `validate` found errors;
//! 2 a configuration error (a TOML file that cannot be read, a bad
//! environment variable, an id that does not match its file).

use std::collections::BTreeSet;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sqlx::PgPool;

use super::model::{CpConfig, CpId};
use super::store::{self, StoreError};
use super::validate::{ConfigProblem, Severity, validate_with_sites};
use crate::config::{Config, TelemetryConfig};
use crate::odm::{OdmError, OdmReader, Record, Study};
use crate::openclinica::Source;
use crate::{db, telemetry};

#[derive(Debug, clap::Subcommand)]
pub enum CpCommand {
    /// Store a new CP configuration read from a TOML file (refused when the
    /// id exists).
    Add {
        /// The configuration (TOML).
        file: PathBuf,
    },
    /// Print a stored CP configuration as TOML, with its version.
    Show {
        /// CP id (OpenSpecimen short title).
        id: String,
    },
    /// Replace a stored CP configuration with a TOML file's. Refused while
    /// the CP has an active run, and when it changed since --expected-version.
    Edit {
        /// CP id; must match the file's `id`.
        id: String,
        /// The new configuration (TOML).
        file: PathBuf,
        /// The version the edit started from (see `cp show`); default: the
        /// current one.
        #[arg(long)]
        expected_version: Option<i32>,
    },
    /// Check every OID a configuration names against the study's metadata.
    ///
    /// TARGET is a TOML file or the id of a stored CP. The metadata comes
    /// from the CP's source, or from --metadata FILE (an ODM file). Prints
    /// one problem per line; exit status 1 when there are errors.
    Validate {
        /// A TOML file, or a stored CP's id.
        target: String,
        /// Read the study metadata from this ODM file instead of the source.
        #[arg(long)]
        metadata: Option<PathBuf>,
    },
    /// List stored CPs: id, enabled, version, source, last update.
    List,
}

/// A failure with its exit status.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn config(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
    fn failed(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self::failed(e.to_string())
    }
}

/// Runs one `ocsync cp` command to its exit status.
pub fn main(cmd: CpCommand) -> ExitCode {
    match TelemetryConfig::from_env()
        .map_err(|e| e.to_string())
        .and_then(|c| telemetry::init(&c).map_err(|e| e.to_string()))
    {
        // Kept for the life of the process, as `ocsync odm` does.
        Ok(t) => std::mem::forget(t),
        Err(e) => {
            eprintln!("ocsync: {e}");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ocsync: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cmd));
    drop(runtime);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("ocsync: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn pool() -> Result<PgPool, Failure> {
    let config = Config::from_env().map_err(|e| Failure::config(e.to_string()))?;
    db::connect(&config.database)
        .await
        .map_err(|e| Failure::failed(e.to_string()))
}

fn load(file: &Path) -> Result<CpConfig, Failure> {
    CpConfig::load(file).map_err(|e| Failure::config(e.to_string()))
}

fn parse_id(id: &str) -> Result<CpId, Failure> {
    CpId::parse(id).map_err(Failure::config)
}

async fn run(cmd: CpCommand) -> Result<u8, Failure> {
    match cmd {
        CpCommand::Add { file } => {
            let config = load(&file)?;
            let stored = store::add(&pool().await?, &config).await?;
            println!("added CP {} (version {})", stored.config.id, stored.version);
            Ok(0)
        }
        CpCommand::Show { id } => {
            let stored = store::get(&pool().await?, &parse_id(&id)?).await?;
            println!(
                "# version {}, updated {}",
                stored.version,
                stored.updated_at.to_rfc3339()
            );
            print!("{}", stored.config.to_toml());
            Ok(0)
        }
        CpCommand::Edit {
            id,
            file,
            expected_version,
        } => {
            let id = parse_id(&id)?;
            let config = load(&file)?;
            if config.id != id {
                return Err(Failure::config(format!(
                    "{}: the file configures CP {}, not {id}",
                    file.display(),
                    config.id
                )));
            }
            let pool = pool().await?;
            let expected = match expected_version {
                Some(v) => v,
                None => store::get(&pool, &id).await?.version,
            };
            let stored = store::update(&pool, &config, expected).await?;
            println!(
                "updated CP {} (version {})",
                stored.config.id, stored.version
            );
            Ok(0)
        }
        CpCommand::Validate { target, metadata } => {
            let config = if Path::new(&target).is_file() {
                load(Path::new(&target))?
            } else {
                store::get(&pool().await?, &parse_id(&target)?)
                    .await?
                    .config
            };
            let (studies, seen) = match metadata {
                Some(file) => read_metadata_file(&file)?,
                None => fetch_metadata(&config).await?,
            };
            let problems = validate_with_sites(&config, &studies, &seen);
            Ok(report(&config, &problems))
        }
        CpCommand::List => {
            for cp in store::list(&pool().await?).await? {
                let source = match cp.config.study_oid() {
                    Some(oid) => format!("{} {oid}", source_kind(&cp.config)),
                    None => source_kind(&cp.config).to_owned(),
                };
                println!(
                    "{}\t{}\tv{}\t{source}\t{}",
                    cp.config.id,
                    if cp.config.enabled {
                        "enabled"
                    } else {
                        "disabled"
                    },
                    cp.version,
                    cp.updated_at.to_rfc3339()
                );
            }
            Ok(0)
        }
    }
}

fn source_kind(config: &CpConfig) -> &'static str {
    match config.source {
        crate::openclinica::SourceConfig::Oc3(_) => "oc3",
        crate::openclinica::SourceConfig::Oc4(_) => "oc4",
        crate::openclinica::SourceConfig::File(_) => "file",
    }
}

/// Prints the problems and a summary; 1 when any is an error.
fn report(config: &CpConfig, problems: &[ConfigProblem]) -> u8 {
    for p in problems {
        println!("{p}");
    }
    let errors = problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .count();
    let warnings = problems.len() - errors;
    println!("CP {}: {errors} error(s), {warnings} warning(s)", config.id);
    u8::from(errors > 0)
}

/// Every `Study` in an ODM file and every `ClinicalData@StudyOID` (site
/// OIDs) seen with subjects.
fn read_metadata_file(file: &Path) -> Result<(Vec<Study>, BTreeSet<String>), Failure> {
    let name = file.display().to_string();
    let input = std::fs::File::open(file).map_err(|e| Failure::failed(format!("{name}: {e}")))?;
    let mut reader = OdmReader::new(BufReader::with_capacity(256 * 1024, input));
    let mut studies = Vec::new();
    let mut seen = BTreeSet::new();
    loop {
        match reader.next_record() {
            Ok(Some(record)) => collect(record, &mut studies, &mut seen),
            Ok(None) => break,
            Err(e) => return Err(Failure::failed(format!("{name}: {e}"))),
        }
    }
    Ok((studies, seen))
}

fn collect(record: Record, studies: &mut Vec<Study>, seen: &mut BTreeSet<String>) {
    match record {
        Record::Study(s) => studies.push(*s),
        Record::Subject(s) => {
            if !seen.contains(&s.study_oid) {
                seen.insert(s.study_oid);
            }
        }
    }
}

/// The study metadata from the CP's own source.
async fn fetch_metadata(config: &CpConfig) -> Result<(Vec<Study>, BTreeSet<String>), Failure> {
    let source = Source::new(&config.source).map_err(|e| Failure::failed(e.to_string()))?;
    let body = source
        .metadata()
        .await
        .map_err(|e| Failure::failed(format!("{}: {e}", source.describe())))?;
    let mut reader = OdmReader::new(body);
    let mut studies = Vec::new();
    let mut seen = BTreeSet::new();
    loop {
        let next: Result<Option<Record>, OdmError> = reader.next_record_async().await;
        match next {
            Ok(Some(record)) => collect(record, &mut studies, &mut seen),
            Ok(None) => break,
            Err(e) => {
                return Err(Failure::failed(format!(
                    "{}: metadata: {e}",
                    source.describe()
                )));
            }
        }
    }
    Ok((studies, seen))
}
