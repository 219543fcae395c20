//! The `ocsync` command: one binary, one subcommand per role.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ocsync::config::{Config, ConfigError, TelemetryConfig};
use ocsync::{api, db, odm, telemetry};

/// Keeps OpenSpecimen collection protocols in step with OpenClinica studies.
///
/// Configuration comes from environment variables (DATABASE_URL, RUST_LOG,
/// LOG_FORMAT, OTEL_*, …); the README lists them all with their defaults.
#[derive(Parser)]
#[command(name = "ocsync", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the database schema (job queue and ocsync tables).
    ///
    /// Idempotent, and safe to run from several pods at once: one applies the
    /// migrations under an advisory lock while the others wait, then find
    /// nothing left to do. Run it before starting new API or worker versions
    /// (the Kubernetes manifests run it as a Job).
    Migrate {
        /// Create the database named in DATABASE_URL first if it does not
        /// exist (needs the CREATEDB privilege; meant for development).
        #[arg(long)]
        create_database: bool,
    },
    /// Serve the HTTP API (health and readiness probes; see the README).
    ///
    /// Binds API_LISTEN (default 0.0.0.0:8080). /readyz answers 503 until the
    /// database is reachable and migrated. SIGTERM or Ctrl-C stops accepting
    /// connections and finishes the requests in flight.
    Api,
    /// Read OpenClinica ODM 1.3 files: counts, or every item value.
    #[command(subcommand)]
    Odm(OdmCommand),
    /// Run an OpenClinica 3.x/4.x simulator in the foreground: seeded,
    /// generated studies behind both URL schemes with their real auth flows,
    /// and fault injection (latency, 5xx, 429, truncated and slow bodies,
    /// session expiry). The password comes from --password-env
    /// (OC_SIM_PASSWORD). Prints the URLs to point a client at.
    OcSim(ocsync::openclinica::sim::cli::SimArgs),
    /// Manage collection protocol (CP) configurations: add, show, edit,
    /// validate, list.
    #[command(subcommand)]
    Cp(ocsync::cp::cli::CpCommand),
    /// Run sync runs from the job queue until SIGTERM (then finish the
    /// current batch of each run, checkpoint, give it back, and exit).
    ///
    /// Any number of workers on any number of machines share the queue;
    /// WORKER_CONCURRENCY runs at once per process. Also fires the Study
    /// Data Importer schedule (SCHEDULE_CRON; one replica wins each tick),
    /// prunes runs older than RETENTION_DAYS, and delivers the emails and
    /// webhooks of ended runs (SMTP_*, PUBLIC_URL, a CP's [notify]).
    Worker(ocsync::queue::cli::WorkerArgs),
    /// The API, a worker, the schedule, retention and notifications in one
    /// process.
    Serve,
    /// Enqueue a sync run of a CP and print its id. With --wait, show its
    /// progress until it ends; exit status 0 Success, 1 Failed (or refused:
    /// the CP already has an active run), 3 Aborted.
    Sync(ocsync::queue::cli::SyncArgs),
    /// The Import Logs: list runs, show one, or print its error report (CSV).
    #[command(subcommand)]
    Runs(ocsync::queue::cli::RunsCommand),
    /// Abort a run: a queued one ends at once, a running one at its next
    /// batch boundary (keeping what it committed).
    Abort {
        /// The run's id.
        id: String,
    },
    /// Manage API tokens: create (prints the token once), list, revoke.
    #[command(subcommand)]
    Token(ocsync::api::tokens::TokenCommand),
}

#[derive(Subcommand)]
enum OdmCommand {
    /// Print one JSON object with the counts of subjects, study events, forms,
    /// item groups, items and null items (ODM-namespace elements only).
    ///
    /// Reads FILE, or standard input when FILE is `-`. On bad input: exit
    /// status 1, the error (with line and column) on stderr, nothing on stdout.
    Stats {
        /// ODM file to read, or `-` for standard input.
        file: PathBuf,
    },
    /// Print one JSON object per ItemData (NDJSON), in document order, with
    /// study_oid, subject_key, event_oid, event_repeat_key, form_oid,
    /// item_group_oid, item_group_repeat_key, item_oid and value (null when
    /// IsNull="Yes" or when there is no Value attribute).
    ///
    /// Reads FILE, or standard input when FILE is `-`. Output is held back until
    /// the whole document has been read: on bad input stdout stays empty, the
    /// error goes to stderr and the exit status is 1.
    Dump {
        /// ODM file to read, or `-` for standard input.
        file: PathBuf,
    },
    /// Write a seeded, OpenClinica-style ODM 1.3 study to stdout: metadata,
    /// one ClinicalData block per site, repeating visits and specimen item
    /// groups, audit logs, and the quirks real exports carry ("null" strings,
    /// untrimmed values, partial dates, comma lists, empty values, nulls,
    /// removed subjects, invalid forms). The same seed gives the same bytes.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of subjects (ignored with --size-mb).
    #[arg(long, default_value_t = 10)]
    subjects: u32,
    /// Aim for a document of about this many megabytes instead.
    #[arg(long)]
    size_mb: Option<u64>,
    /// Number of sites (0: all subjects in the parent study's block).
    #[arg(long, default_value_t = 2)]
    sites: u32,
    /// Study OID of the parent study.
    #[arg(long, default_value = "S_GEN")]
    study_oid: String,
    /// Leave out audit logs and discrepancy notes.
    #[arg(long)]
    no_audit_logs: bool,
    /// Leave out the Study metadata.
    #[arg(long)]
    no_metadata: bool,
    /// Write OpenClinica 4.x style forms (CRF OIDs, CreatedDate/UpdatedDate).
    #[arg(long)]
    oc4: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Odm(cmd) => run_odm(cmd),
        Command::OcSim(args) => run_oc_sim(args),
        Command::Cp(cmd) => ocsync::cp::cli::main(cmd),
        Command::Migrate { create_database } => with_runtime(|config| async move {
            if create_database && db::create_database_if_missing(&config.database).await? {
                tracing::info!(
                    database = config.database.database_name(),
                    "database created"
                );
            }
            let pool = db::connect(&config.database).await?;
            db::migrate(&pool).await?;
            let status = db::schema_status(&pool).await?;
            tracing::info!(schema_version = status.expected, "database migrated");
            Ok(())
        }),
        Command::Api => with_runtime(|config| async move {
            let pool = db::connect(&config.database).await?;
            let listener = tokio::net::TcpListener::bind(config.api.listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot bind API_LISTEN={}: {e}", config.api.listen)
                })?;
            let _metrics = with_metrics(&config).await?.drop_guard();
            api::serve(listener, api::AppState { pool }, &config, shutdown_signal()).await?;
            Ok(())
        }),
        Command::Worker(args) => with_exit_code(|config| async move {
            let _metrics = with_metrics(&config).await?.drop_guard();
            ocsync::queue::cli::worker(config, args, shutdown_signal()).await
        }),
        Command::Serve => with_exit_code(|config| async move {
            let _metrics = with_metrics(&config).await?.drop_guard();
            ocsync::queue::cli::serve(config, shutdown_signal()).await
        }),
        Command::Sync(args) => with_exit_code(|config| ocsync::queue::cli::sync(config, args)),
        Command::Runs(cmd) => with_exit_code(|config| ocsync::queue::cli::runs_cmd(config, cmd)),
        Command::Abort { id } => with_exit_code(|config| ocsync::queue::cli::abort(config, id)),
        Command::Token(cmd) => with_exit_code(|config| ocsync::api::tokens::cli(config, cmd)),
    }
}

/// Starts the metrics and probe server (METRICS_LISTEN) of a long-running
/// command; cancelling the token stops it. It has a pool of its own (two
/// connections), so scrapes never wait behind the work they observe.
async fn with_metrics(config: &Config) -> anyhow::Result<tokio_util::sync::CancellationToken> {
    let mut db = config.database.clone();
    db.max_connections = 2;
    let pool = db::connect(&db).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    ocsync::metrics::spawn(config, pool, stop.clone());
    Ok(stop)
}

/// [`with_runtime`] for commands whose success has several exit statuses
/// (`sync --wait`: 0 Success, 1 Failed, 3 Aborted).
fn with_exit_code<F, Fut>(body: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<u8>>,
{
    let code = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    let set = code.clone();
    let exit = with_runtime(|config| async move {
        set.store(body(config).await?, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    match code.load(std::sync::atomic::Ordering::Relaxed) {
        0 => exit,
        n => ExitCode::from(n),
    }
}

/// Loads the configuration, starts telemetry, then runs `body` on a
/// multi-threaded runtime. Telemetry starts outside the runtime because its
/// exporter thread owns a blocking HTTP client.
fn with_runtime<F, Fut>(body: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let _telemetry = match telemetry::init(&config.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ocsync: cannot start telemetry: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(body(config));
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ocsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("ocsync: {e}");
    ExitCode::from(2)
}

fn run_odm(cmd: OdmCommand) -> ExitCode {
    if let Err(e) = TelemetryConfig::from_env().and_then(|c| {
        telemetry::init(&c)
            .map(std::mem::forget)
            .map_err(|e| ConfigError {
                var: "RUST_LOG",
                reason: e.to_string(),
            })
    }) {
        return config_failure(&e);
    }
    let (file, dump) = match cmd {
        OdmCommand::Stats { file } => (file, false),
        OdmCommand::Dump { file } => (file, true),
        OdmCommand::Generate(args) => return run_generate(args),
    };
    let name = file.display().to_string();
    let input: Box<dyn BufRead> = if name == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(&file) {
            Ok(f) => Box::new(BufReader::with_capacity(256 * 1024, f)),
            Err(e) => {
                eprintln!("ocsync: {name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let out = std::io::stdout().lock();
    let result = if dump {
        odm::cli::dump(input, out)
    } else {
        odm::cli::stats(input, out)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let shown = if name == "-" { "<stdin>" } else { &name };
            eprintln!("ocsync: {shown}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_generate(args: GenerateArgs) -> ExitCode {
    use odm::generate::{GeneratorConfig, generate, subjects_for_size};
    let mut config = GeneratorConfig {
        seed: args.seed,
        study_oid: args.study_oid,
        subjects: args.subjects,
        sites: args.sites,
        audit_logs: !args.no_audit_logs,
        discrepancy_notes: !args.no_audit_logs,
        include_metadata: !args.no_metadata,
        oc4_dates: args.oc4,
        ..GeneratorConfig::default()
    };
    let result = (|| {
        if let Some(mb) = args.size_mb {
            config.subjects = subjects_for_size(&config, mb * 1_000_000)?;
        }
        generate(&config, std::io::stdout().lock())
    })();
    match result {
        Ok(_) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ocsync: odm generate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ocsync oc-sim`: needs no database, only RUST_LOG and LOG_FORMAT.
fn run_oc_sim(args: ocsync::openclinica::sim::cli::SimArgs) -> ExitCode {
    if let Err(e) = TelemetryConfig::from_env().and_then(|c| {
        telemetry::init(&c)
            .map(std::mem::forget)
            .map_err(|e| ConfigError {
                var: "RUST_LOG",
                reason: e.to_string(),
            })
    }) {
        return config_failure(&e);
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(ocsync::openclinica::sim::cli::run(args, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ocsync oc-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before a pod stops).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested");
}
