//! One run, batch by batch.

use std::future::Future;

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cp::CpConfig;
use crate::mapping::{self, InputKey, MetadataIndex, RecordError, Stage, SubjectRecords};
use crate::odm::{OdmError, Subject};
use crate::openclinica::{OcError, SourceRegistry};
use crate::sink::{Counts, Sink, SinkError};

use super::feed::{Feed, Item, SourceKind, read_metadata};
use super::mode::Mode;
use super::state::{self, RecordCounts, Watermark, Written};

/// Where a run is: how far, what it wrote, where to resume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Subjects taken from the feed so far (written, unchanged or failed).
    pub subjects_done: u64,
    /// Subjects expected in all, when the source lists them up front.
    pub subjects_total: Option<u64>,
    pub counts: Counts,
    /// Error rows recorded so far.
    pub errors: u64,
    pub cursor: Cursor,
}

/// Where a resumed attempt starts: subjects are fed in a stable order (the
/// document's, or the list's), so skipping the first `subjects_done` of
/// them resumes exactly after the last committed batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub subjects_done: u64,
    pub last_subject_key: Option<String>,
    /// How the first attempt read the study (OC 4.x full runs): `true` one
    /// whole-study document, `false` a document per participant. A resumed
    /// attempt reads the same way, so skipping `subjects_done` subjects
    /// lands where the committed ones end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_study: Option<bool>,
}

/// What the runner says at a batch boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop after this batch (abort, or shutdown): the batch commits, the
    /// run ends here.
    Stop,
}

/// What a run needs from whoever runs it (the job queue, or a test).
pub trait RunContext: Send {
    /// The run's id: error rows and fingerprints carry it.
    fn run_id(&self) -> &str;

    /// The last checkpoint of an earlier attempt of this run, if any.
    fn resume(&self) -> Option<Progress>;

    /// Called at each batch boundary inside the batch's transaction, so
    /// progress and data commit together. Says whether to go on.
    fn checkpoint(
        &mut self,
        tx: &mut PgConnection,
        progress: &Progress,
    ) -> impl Future<Output = Result<Control, sqlx::Error>> + Send;

    /// Cancelled when the run must stop at once (abort): in-flight
    /// OpenClinica requests are dropped and the batch being gathered is
    /// discarded; what was committed stays.
    fn cancellation(&self) -> CancellationToken;
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    Success,
    /// The run went through but left error rows.
    Failed,
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub result: RunResult,
    pub progress: Progress,
}

/// A run that could not go on. Per-record problems are error rows, not
/// this.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Source(#[from] OcError),
    #[error("the study's ODM is not valid: {0}")]
    Parse(#[from] OdmError),
    /// A document broke off in transit (and a fresh fetch did not help).
    #[error("reading from OpenClinica was interrupted: {0}")]
    Interrupted(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("writing the batch: {0}")]
    Sink(#[from] SinkError),
    #[error("{0}")]
    Config(String),
}

impl SyncError {
    /// Whether running again later (from the checkpoint) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Source(e) => e.is_transient(),
            Self::Interrupted(_) => true,
            Self::Database(e) => crate::sink::is_transient_sqlx(e),
            Self::Sink(e) => e.is_transient(),
            Self::Parse(_) | Self::Config(_) => false,
        }
    }
}

/// Runs one sync of `cp` in `mode`, writing through `sink`.
///
/// Returns how the run ended, or an error when it could not go on (the
/// runner retries transient ones from the last checkpoint).
pub async fn run<S: Sink, C: RunContext>(
    pool: &PgPool,
    sources: &SourceRegistry,
    cp: &CpConfig,
    mode: &Mode,
    sink: &S,
    ctx: &mut C,
) -> Result<RunOutcome, SyncError> {
    let cp_id = cp.id.as_str().to_owned();
    let span =
        tracing::info_span!("sync.run", cp.id = %cp_id, run.id = %ctx.run_id(), mode = %mode);
    async move {
        let cancel = ctx.cancellation();
        let mut progress = ctx.resume().unwrap_or_default();
        let source = sources.source(&cp.source)?;
        let kind = SourceKind::of(&cp.source);

        let study = tokio::select! {
            () = cancel.cancelled() => return Ok(aborted(progress)),
            r = read_metadata(&source).instrument(tracing::info_span!("oc.metadata")) => r?,
        };
        let index = MetadataIndex::new(&study);
        let input_key = InputKey::new(cp, &study);
        let watermark = state::load_watermark(pool, &cp_id).await?;
        let feed = tokio::select! {
            () = cancel.cancelled() => return Ok(aborted(progress)),
            r = Feed::open(&source, kind, mode, &watermark, &progress.cursor) => r?,
        };
        progress.cursor.whole_study = feed.whole_study;
        if progress.subjects_total.is_none() {
            progress.subjects_total = feed.total;
        }
        let batch_size = cp.batch_size.max(1) as usize;

        // Reading, parsing and mapping the next batch overlaps writing this
        // one: the producer runs on its own task and hands prepared batches
        // over a channel of one, so at most three batches are in memory.
        let (batches, mut prepared) = tokio::sync::mpsc::channel(1);
        let producer = Producer {
            pool: pool.clone(),
            cp: cp.clone(),
            index,
            input_key,
            incremental: matches!(mode, Mode::Incremental),
            batch_size,
            cancel: cancel.clone(),
        };
        let _producer = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            tracing::Instrument::in_current_span(producer.run(feed, batches)),
        ));

        let (seen, listed_last_modified) = loop {
            let message = tokio::select! {
                () = cancel.cancelled() => return Ok(aborted(progress)),
                m = prepared.recv() => m,
            };
            match message {
                Some(Prepared::Batch(batch)) => {
                    let control =
                        commit_batch(pool, cp_id.as_str(), sink, ctx, &mut progress, *batch)
                            .instrument(tracing::info_span!("sync.batch"))
                            .await?;
                    if control == Control::Stop {
                        return Ok(aborted(progress));
                    }
                }
                Some(Prepared::Failed(e)) => {
                    if !e.is_transient() {
                        record_run_error(pool, ctx, &cp_id, &e, &mut progress).await?;
                    }
                    return Err(e);
                }
                Some(Prepared::End {
                    seen,
                    listed_last_modified,
                }) => break (seen, listed_last_modified),
                // The producer stopped without a word: only on cancellation.
                None => return Ok(aborted(progress)),
            }
        };

        let result = if progress.errors == 0 {
            RunResult::Success
        } else {
            RunResult::Failed
        };
        let mut tx = pool.begin().await?;
        if result == RunResult::Success && !matches!(mode, Mode::Subjects { .. }) {
            let mark = Watermark {
                audit_max_id: seen.audit_max_id,
                last_modified: listed_last_modified.or(seen.last_modified),
            };
            state::advance_watermark(&mut tx, &cp_id, ctx.run_id(), &mark).await?;
        }
        ctx.checkpoint(&mut tx, &progress).await?;
        tx.commit().await?;
        tracing::info!(
            subjects = progress.subjects_done,
            errors = progress.errors,
            result = ?result,
            "run finished"
        );
        Ok(RunOutcome { result, progress })
    }
    .instrument(span)
    .await
}

fn aborted(progress: Progress) -> RunOutcome {
    tracing::info!(subjects = progress.subjects_done, "run aborted");
    RunOutcome {
        result: RunResult::Aborted,
        progress,
    }
}

/// The greatest high-water marks seen in this run's subjects.
#[derive(Debug, Default)]
struct SeenMarks {
    audit_max_id: Option<i64>,
    last_modified: Option<String>,
}

/// What the producer hands the writer.
enum Prepared {
    Batch(Box<PreparedBatch>),
    /// The feed failed; everything gathered before it came as a batch.
    Failed(SyncError),
    /// The feed ended: the high-water marks seen on the way.
    End {
        seen: SeenMarks,
        listed_last_modified: Option<String>,
    },
}

/// One batch, mapped and sorted, ready for its transaction.
#[derive(Default)]
struct PreparedBatch {
    /// Subjects taken from the feed (written, unchanged or failed).
    taken: u64,
    last_key: Option<String>,
    to_write: Vec<SubjectRecords>,
    /// Fingerprints to keep once the batch is written.
    written: Vec<Written>,
    /// Subjects whose fingerprint must go (so they are tried again).
    failed_keys: Vec<String>,
    errors: Vec<RecordError>,
    /// Unchanged and failed-before-writing subjects, counted here.
    counts: Counts,
}

/// Reads the feed, maps each subject, and sends batches to the writer.
struct Producer {
    pool: PgPool,
    cp: CpConfig,
    index: MetadataIndex,
    input_key: InputKey,
    incremental: bool,
    batch_size: usize,
    cancel: CancellationToken,
}

impl Producer {
    async fn run(self, mut feed: Feed, out: tokio::sync::mpsc::Sender<Prepared>) {
        let mut seen = SeenMarks::default();
        loop {
            let mut items = Vec::with_capacity(self.batch_size);
            let mut failure = None;
            while items.len() < self.batch_size {
                let next = tokio::select! {
                    () = self.cancel.cancelled() => return,
                    r = feed.next() => r,
                };
                match next {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let ended = items.len() < self.batch_size;
            if !items.is_empty() {
                let batch = match self.prepare(items, &mut seen).await {
                    Ok(b) => Prepared::Batch(Box::new(b)),
                    Err(e) => Prepared::Failed(e),
                };
                let stop = matches!(batch, Prepared::Failed(_));
                if out.send(batch).await.is_err() || stop {
                    return;
                }
            }
            if let Some(e) = failure {
                let _ = out.send(Prepared::Failed(e)).await;
                return;
            }
            if ended {
                let listed_last_modified = feed.listed_last_modified.take();
                let _ = out
                    .send(Prepared::End {
                        seen,
                        listed_last_modified,
                    })
                    .await;
                return;
            }
        }
    }

    /// Maps one batch's subjects and sorts them: unchanged, to write, failed.
    async fn prepare(
        &self,
        items: Vec<Item>,
        seen: &mut SeenMarks,
    ) -> Result<PreparedBatch, SyncError> {
        let cp_id = self.cp.id.as_str();
        let known = if self.incremental {
            let keys: Vec<String> = items
                .iter()
                .filter_map(|i| match i {
                    Item::Subject { subject, .. } => Some(subject.subject_key.clone()),
                    Item::Failed(_) => None,
                })
                .collect();
            state::load_subject_states(&self.pool, cp_id, &keys).await?
        } else {
            Default::default()
        };

        let mut b = PreparedBatch {
            taken: items.len() as u64,
            ..PreparedBatch::default()
        };
        for item in items {
            let (subject, last_modified) = match item {
                Item::Failed(e) => {
                    b.counts.participants.failed += 1;
                    if let Some(key) = &e.subject_key {
                        b.failed_keys.push(key.clone());
                    }
                    b.errors.push(*e);
                    continue;
                }
                Item::Subject {
                    subject,
                    last_modified,
                } => (subject, last_modified),
            };
            let audit = subject
                .audit
                .max_id_number
                .and_then(|n| i64::try_from(n).ok());
            seen.audit_max_id = seen.audit_max_id.max(audit);
            if let Some(m) = &last_modified
                && seen.last_modified.as_ref().is_none_or(|s| m > s)
            {
                seen.last_modified = Some(m.clone());
            }
            b.last_key = Some(subject.subject_key.clone());
            let prior = known.get(&subject.subject_key);
            let input = Input {
                subject: &subject,
                fingerprint: mapping::input_fingerprint(self.input_key, &subject),
                audit,
                last_modified,
            };
            match outcome(&self.cp, &self.index, input, prior, self.incremental) {
                Outcome::Unchanged(c, refresh) => {
                    b.counts.add(&c.unchanged());
                    b.written.extend(refresh);
                }
                Outcome::Failed(e) => {
                    b.counts.participants.failed += 1;
                    b.errors.extend(e);
                    b.failed_keys.push(subject.subject_key.clone());
                }
                Outcome::Write {
                    records,
                    state,
                    errors,
                } => {
                    if errors.is_empty() {
                        b.written.push(state);
                    } else {
                        b.errors.extend(errors);
                        b.failed_keys.push(subject.subject_key.clone());
                    }
                    b.to_write.push(*records);
                }
            }
        }
        Ok(b)
    }
}

/// One subject as the feed gave it, with what is known of it.
struct Input<'a> {
    subject: &'a Subject,
    /// [`mapping::input_fingerprint`].
    fingerprint: String,
    audit: Option<i64>,
    last_modified: Option<String>,
}

/// What one subject of a batch comes to.
enum Outcome {
    /// Unchanged since its last write (incremental): counted, not written;
    /// with its state to keep when its input fingerprint is new.
    Unchanged(RecordCounts, Option<Written>),
    Write {
        records: Box<SubjectRecords>,
        /// The subject's state once written.
        state: Written,
        /// Mapping errors: the records are written, but the subject's
        /// fingerprint is not kept, so it is tried again next time.
        errors: Vec<RecordError>,
    },
    Failed(Vec<RecordError>),
}

/// Writes and checkpoints one prepared batch in one transaction.
async fn commit_batch<S: Sink, C: RunContext>(
    pool: &PgPool,
    cp_id: &str,
    sink: &S,
    ctx: &mut C,
    progress: &mut Progress,
    batch: PreparedBatch,
) -> Result<Control, SyncError> {
    let batch_started = std::time::Instant::now();
    let PreparedBatch {
        taken,
        last_key,
        to_write,
        mut written,
        mut failed_keys,
        mut errors,
        mut counts,
    } = batch;

    let mut tx = pool.begin().await?;
    // A batch's commit need not wait for its WAL to reach the disk: should
    // PostgreSQL crash, it loses the newest commits whole (data and
    // checkpoint together, never one without the other) and the run
    // resumes from the last checkpoint that survived. The run's last
    // transaction commits synchronously, which flushes every batch's WAL
    // before the run can be seen to end.
    sqlx::raw_sql("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    let outcome = sink
        .write_batch(&mut tx, cp_id, &to_write)
        .instrument(tracing::info_span!("sink.write", subjects = to_write.len()))
        .await?;
    counts.add(&outcome.counts);
    if !outcome.errors.is_empty() {
        let bad: std::collections::HashSet<&str> = outcome
            .errors
            .iter()
            .filter_map(|e| e.subject_key.as_deref())
            .collect();
        written.retain(|w| {
            let ok = !bad.contains(w.subject_key.as_str());
            if !ok {
                failed_keys.push(w.subject_key.clone());
            }
            ok
        });
        errors.extend(outcome.errors);
    }
    state::save_subject_states(&mut tx, cp_id, ctx.run_id(), &written).await?;
    state::forget_subject_states(&mut tx, cp_id, &failed_keys).await?;
    state::insert_errors(&mut tx, ctx.run_id(), cp_id, &errors).await?;

    progress.subjects_done += taken;
    progress.counts.add(&counts);
    progress.errors += errors.len() as u64;
    progress.cursor = Cursor {
        subjects_done: progress.cursor.subjects_done + taken,
        last_subject_key: last_key.or(progress.cursor.last_subject_key.take()),
        whole_study: progress.cursor.whole_study,
    };
    let control = ctx.checkpoint(&mut tx, progress).await?;
    tx.commit().await?;
    crate::metrics::batch_committed(cp_id, taken, &counts, batch_started.elapsed());
    tracing::debug!(
        subjects.done = progress.subjects_done,
        errors = progress.errors,
        "batch committed"
    );
    Ok(control)
}

/// Decides what one subject comes to: skipped as unchanged, written, or
/// failed.
fn outcome(
    cp: &CpConfig,
    index: &MetadataIndex,
    input: Input<'_>,
    prior: Option<&state::SubjectState>,
    incremental: bool,
) -> Outcome {
    let subject = input.subject;
    // The subject reads exactly as it did at its last write, under the
    // same configuration and metadata: it maps to the same records. (Its
    // audit trail alone would not do: a new mapping changes records whose
    // OpenClinica data did not change.)
    if incremental
        && let Some(p) = prior
        && p.input_hash.as_deref() == Some(input.fingerprint.as_str())
    {
        return Outcome::Unchanged(p.counts, None);
    }
    let mapped = mapping::map_subject(cp, index, subject);
    let Some(records) = mapped.records else {
        let mut errors = mapped.errors;
        if errors.is_empty() {
            errors.push(RecordError::subject(
                &subject.subject_key,
                subject.study_subject_id.as_deref(),
                Stage::Map,
                "the subject could not be mapped",
            ));
        }
        return Outcome::Failed(errors);
    };
    let state = Written {
        subject_key: subject.subject_key.clone(),
        content_hash: mapping::content_hash(&records),
        input_hash: Some(input.fingerprint),
        audit_max_id: input.audit,
        last_modified: input.last_modified,
        counts: RecordCounts::of(&records),
    };
    if incremental
        && mapped.errors.is_empty()
        && let Some(p) = prior
        && p.content_hash == state.content_hash
    {
        // Same records from a different reading (a new configuration or
        // metadata that changes nothing here): keep the new fingerprint so
        // the next run skips it without mapping.
        return Outcome::Unchanged(p.counts, Some(state));
    }
    Outcome::Write {
        records: Box::new(records),
        state,
        errors: mapped.errors,
    }
}

/// A run-stopping failure also belongs in the error report, so the data
/// manager sees it next to the record errors.
async fn record_run_error<C: RunContext>(
    pool: &PgPool,
    ctx: &mut C,
    cp_id: &str,
    e: &SyncError,
    progress: &mut Progress,
) -> Result<(), SyncError> {
    let row = RecordError {
        subject_key: None,
        ppid: None,
        event_oid: None,
        repeat: None,
        form_oid: None,
        item_group_oid: None,
        item_oid: None,
        stage: match e {
            SyncError::Parse(_) => Stage::Parse,
            SyncError::Source(_) | SyncError::Interrupted(_) => Stage::Fetch,
            _ => Stage::Write,
        },
        message: e.to_string(),
    };
    let mut tx = pool.begin().await?;
    state::insert_errors(&mut tx, ctx.run_id(), cp_id, std::slice::from_ref(&row)).await?;
    progress.errors += 1;
    ctx.checkpoint(&mut tx, progress).await?;
    tx.commit().await?;
    Ok(())
}
