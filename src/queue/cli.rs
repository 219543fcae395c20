//! The queue's commands: `ocsync worker`, `ocsync serve`, `ocsync sync`,
//! `ocsync runs`, `ocsync abort`. `main.rs` only dispatches here.
//!
//! Output: data (run ids, lists, JSON, CSV) on stdout; progress and logs on
//! stderr. `ocsync sync --wait` exits 0 when the run ends Success, 1 when it
//! ends Failed (or cannot be enqueued), 3 when it ends Aborted.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use super::{EnqueueRequest, RunFilter, RunInfo, RunStatus, Trigger, runs};
use crate::config::Config;
use crate::sync::{Mode, parse_subject_list};

/// Exit status of `sync --wait` for a run that ended Aborted.
pub const EXIT_ABORTED: u8 = 3;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Do not fire the Study Data Importer schedule from this process.
    #[arg(long)]
    pub no_schedule: bool,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The CP (its OpenSpecimen short title).
    pub cp: String,
    /// incremental, all or subjects.
    #[arg(long, default_value = "incremental")]
    pub mode: String,
    /// Subject ids (SubjectKey or label) separated by commas, tabs or
    /// newlines; implies --mode subjects.
    #[arg(long)]
    pub subjects: Option<String>,
    /// Stay until the run ends, showing its progress; the exit status says
    /// how it ended (0 Success, 1 Failed, 3 Aborted).
    #[arg(long)]
    pub wait: bool,
}

#[derive(Subcommand, Debug)]
pub enum RunsCommand {
    /// The Import Logs, newest first.
    List {
        #[arg(long)]
        cp: Option<String>,
        /// queued, in_progress, success, failed or aborted.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One run as JSON, with its notifications.
    Show { id: String },
    /// A run's error report as CSV.
    Errors { id: String },
}

/// `ocsync worker`: runs syncs (and delivers notifications) until SIGTERM,
/// then drains.
pub async fn worker(
    config: Config,
    args: WorkerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<u8> {
    let pool = crate::db::connect(&config.database).await?;
    let stop = CancellationToken::new();
    let background = spawn_background(&pool, &config, !args.no_schedule, &stop)?;
    let result = super::run_worker(pool, config.queue.clone(), shutdown).await;
    stop.cancel();
    for h in background {
        let _ = h.await;
    }
    result.map(|()| 0)
}

/// `ocsync serve`: the API, a worker, the schedule, retention and the
/// notification dispatcher in one process.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<u8> {
    let pool = crate::db::connect(&config.database).await?;
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind API_LISTEN={}: {e}", config.api.listen))?;
    let stop = CancellationToken::new();
    let background = spawn_background(&pool, &config, true, &stop)?;
    let api_stop = stop.clone();
    let api = {
        let pool = pool.clone();
        let config = config.clone();
        tokio::spawn(async move {
            crate::api::serve(
                listener,
                crate::api::AppState { pool },
                &config,
                async move { api_stop.cancelled().await },
            )
            .await
        })
    };
    let worker_stop = stop.clone();
    let result = super::run_worker(pool, config.queue.clone(), async move {
        shutdown.await;
        worker_stop.cancel();
    })
    .await;
    stop.cancel();
    let _ = api.await;
    for h in background {
        let _ = h.await;
    }
    result.map(|()| 0)
}

fn spawn_background(
    pool: &sqlx::PgPool,
    config: &Config,
    schedule: bool,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let dispatcher = crate::notify::Dispatcher::new(pool.clone(), &config.notify)
        .map_err(|e| anyhow::anyhow!("notifications: {e}"))?;
    let mut handles = vec![
        tokio::spawn(super::retention::run_periodically(
            pool.clone(),
            config.queue.retention,
            stop.clone(),
        )),
        tokio::spawn(dispatcher.run(stop.clone())),
    ];
    if schedule {
        let cron = crate::schedule::Cron::new(&config.queue.schedule_cron)
            .map_err(|e| anyhow::anyhow!("SCHEDULE_CRON: {e}"))?;
        handles.push(tokio::spawn(crate::schedule::run(
            pool.clone(),
            cron,
            super::worker::worker_name(),
            config.queue.max_attempts,
            stop.clone(),
        )));
    }
    Ok(handles)
}

/// `ocsync sync CP`: enqueues a run, prints its id; with `--wait`, shows
/// its progress until it ends.
pub async fn sync(config: Config, args: SyncArgs) -> anyhow::Result<u8> {
    let mode = match (args.mode.as_str(), &args.subjects) {
        (_, Some(list)) => Mode::Subjects {
            subjects: parse_subject_list(list),
        },
        ("incremental", None) => Mode::Incremental,
        ("all", None) => Mode::All,
        ("subjects", None) => anyhow::bail!("--mode subjects needs --subjects"),
        (other, None) => {
            anyhow::bail!("unknown mode {other:?}: expected incremental, all or subjects")
        }
    };
    let pool = crate::db::connect(&config.database).await?;
    let requested_by = std::env::var("USER")
        .ok()
        .or_else(|| Some("cli".to_owned()));
    let req = EnqueueRequest {
        cp: args.cp,
        mode,
        trigger: Trigger::User,
        requested_by,
        max_attempts: config.queue.max_attempts,
    };
    let id = super::enqueue(&pool, &req).await?;
    println!("{id}");
    if !args.wait {
        return Ok(0);
    }
    let status = wait_for(&pool, &id).await?;
    Ok(match status {
        RunStatus::Success => 0,
        RunStatus::Aborted => EXIT_ABORTED,
        _ => 1,
    })
}

/// Polls the run until it ends; one updating line on a terminal, a plain
/// line per change otherwise (stderr).
async fn wait_for(pool: &sqlx::PgPool, id: &str) -> anyhow::Result<RunStatus> {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let Some(run) = runs::get(pool, id).await? else {
            anyhow::bail!("run {id} disappeared");
        };
        let line = progress_line(&run, started.elapsed());
        let shown = line.split(" | ").next().unwrap_or("").to_owned()
            + &run.subjects_done.unwrap_or(0).to_string();
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else if shown != last {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        last = shown;
        if run.status.is_terminal() {
            if tty {
                let _ = writeln!(err);
            }
            let when = run.finished_at.map(|t| t.to_rfc3339()).unwrap_or_default();
            let _ = writeln!(
                err,
                "run {id} ended {}{} at {when}; {} error rows",
                run.status,
                if run.status == RunStatus::Aborted {
                    " (Aborted)"
                } else {
                    ""
                },
                run.error_count
            );
            return Ok(run.status);
        }
        drop(err);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn progress_line(run: &RunInfo, elapsed: Duration) -> String {
    let done = run.subjects_done.unwrap_or(0);
    let total = run
        .subjects_total
        .map(|t| t.to_string())
        .unwrap_or_else(|| "?".to_owned());
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    let c = &run.counts;
    format!(
        "{} | {done}/{total} subjects | {rate:.1}/s | participants +{} ~{} ={} !{} | visits +{} ~{} ={} !{} | errors {}",
        run.status,
        c.participants.created,
        c.participants.updated,
        c.participants.unchanged,
        c.participants.failed,
        c.visits.created,
        c.visits.updated,
        c.visits.unchanged,
        c.visits.failed,
        run.error_count,
    )
}

/// `ocsync runs …`.
pub async fn runs_cmd(config: Config, cmd: RunsCommand) -> anyhow::Result<u8> {
    let pool = crate::db::connect(&config.database).await?;
    let mut out = std::io::stdout().lock();
    match cmd {
        RunsCommand::List {
            cp,
            status,
            limit,
            json,
        } => {
            let status = status
                .as_deref()
                .map(str::parse::<RunStatus>)
                .transpose()
                .map_err(|e| anyhow::anyhow!(e))?;
            let list = runs::list(
                &pool,
                &RunFilter {
                    cp,
                    status,
                    limit: Some(limit),
                    ..RunFilter::default()
                },
            )
            .await?;
            if json {
                for r in &list {
                    writeln!(out, "{}", serde_json::to_string(r)?)?;
                }
            } else {
                writeln!(
                    out,
                    "{:<26}  {:<16}  {:<11}  {:<11}  {:<8}  {:<20}  {:<20}  {:>9}  {:>6}",
                    "RUN",
                    "CP",
                    "STATUS",
                    "MODE",
                    "TRIGGER",
                    "STARTED",
                    "FINISHED",
                    "SUBJECTS",
                    "ERRORS"
                )?;
                for r in &list {
                    let t = |d: Option<sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>>| {
                        d.map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_default()
                    };
                    writeln!(
                        out,
                        "{:<26}  {:<16}  {:<11}  {:<11}  {:<8}  {:<20}  {:<20}  {:>9}  {:>6}",
                        r.id,
                        r.cp,
                        r.status.as_str(),
                        r.mode,
                        r.trigger,
                        t(r.started_at),
                        t(r.finished_at),
                        r.subjects_done.unwrap_or(0),
                        r.error_count
                    )?;
                }
            }
        }
        RunsCommand::Show { id } => match runs::get(&pool, &id).await? {
            Some(r) => {
                let mut shown = serde_json::to_value(&r)?;
                shown["notifications"] =
                    serde_json::to_value(crate::notify::outbox::for_run(&pool, &id).await?)?;
                writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?
            }
            None => anyhow::bail!("run {id} does not exist"),
        },
        RunsCommand::Errors { id } => {
            if runs::get(&pool, &id).await?.is_none() {
                anyhow::bail!("run {id} does not exist");
            }
            crate::sync::write_error_report(&pool, &id, &mut out).await?;
        }
    }
    Ok(0)
}

/// `ocsync abort ID`.
pub async fn abort(config: Config, id: String) -> anyhow::Result<u8> {
    let pool = crate::db::connect(&config.database).await?;
    let outcome = super::abort(&pool, &id).await?;
    match outcome {
        super::AbortOutcome::Aborted => println!("{id} Aborted"),
        super::AbortOutcome::Aborting => {
            println!("{id} Aborting (stops at its next batch boundary)")
        }
        super::AbortOutcome::AlreadyEnded(s) => println!("{id} already ended: {s}"),
    }
    Ok(0)
}
