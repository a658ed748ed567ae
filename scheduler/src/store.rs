//! The scheduler's sled store: every job's record, every result (with its logs), the jobs
//! recorded but not yet confirmed by RabbitMQ, and an index by creation time for listing.
//! Recording a result is one transaction that checks whether that run was recorded already,
//! so whatever arrives twice is recorded once.

use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Utc;
use rota_common::group_commit::GroupCommit;
use rota_common::wire::{Attempt, Event, Job, JobId, JobRecord, JobResult, JobState, LogLine};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

#[derive(Clone)]
pub struct Store {
    /// Flushes the database for every writer at once.
    durable: GroupCommit,
    /// uuid → JobRecord
    jobs: sled::Tree,
    /// uuid + attempt → JobResult
    results: sled::Tree,
    /// uuid → () for jobs recorded but not yet confirmed by the broker
    unpublished: sled::Tree,
    /// created-at (ns, big-endian) + uuid → () for listing newest first
    by_time: sled::Tree,
    /// Where each job's folder goes.
    work_root: PathBuf,
}

/// What recording a result did.
#[derive(Debug)]
pub enum Recorded {
    /// First time this run was recorded: the job's record after it.
    New(Box<JobRecord>),
    /// This run was recorded before; nothing changed.
    Duplicate,
}

fn result_key(uuid: JobId, attempt: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(uuid.as_bytes());
    k[16..].copy_from_slice(&attempt.to_be_bytes());
    k
}

fn time_key(record: &JobRecord) -> Vec<u8> {
    let nanos = record.created_at.timestamp_nanos_opt().unwrap_or_default();
    let mut k = nanos.to_be_bytes().to_vec();
    k.extend_from_slice(record.uuid.as_bytes());
    k
}

fn encode<T: serde::Serialize>(
    v: &T,
) -> Result<Vec<u8>, ConflictableTransactionError<anyhow::Error>> {
    serde_json::to_vec(v).map_err(|e| ConflictableTransactionError::Abort(e.into()))
}

fn decode<T: serde::de::DeserializeOwned>(
    b: &[u8],
) -> Result<T, ConflictableTransactionError<anyhow::Error>> {
    serde_json::from_slice(b).map_err(|e| ConflictableTransactionError::Abort(e.into()))
}

fn flatten<T>(r: Result<T, TransactionError<anyhow::Error>>) -> anyhow::Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

impl Store {
    /// Opens the store in `dir` (`dir/store`, job folders in `dir/work`).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("store");
        // No background flusher: the group commit flushes what must be durable, and without that
        // thread the database closes (and unlocks) as soon as it is dropped.
        let db = sled::Config::new().path(&path).flush_every_ms(None).open().map_err(|e| {
            anyhow::anyhow!(
                "cannot open the scheduler's store {}: {e} (is another scheduler using this --data-dir?)",
                path.display()
            )
        })?;
        Ok(Self {
            jobs: db.open_tree("jobs")?,
            results: db.open_tree("results")?,
            unpublished: db.open_tree("unpublished")?,
            by_time: db.open_tree("by_time")?,
            work_root: dir.join("work"),
            durable: GroupCommit::start("store", move || {
                db.flush().map(|_| ()).map_err(|e| e.to_string())
            })?,
        })
    }

    /// The folder of one job.
    pub fn job_dir(&self, uuid: JobId) -> PathBuf {
        self.work_root.join(uuid.to_string())
    }

    fn new_record(&self, job: Job, uuid: JobId, state: JobState) -> JobRecord {
        let now = Utc::now();
        JobRecord {
            uuid,
            state,
            job,
            created_at: now,
            updated_at: now,
            attempts: Vec::new(),
            dir: self.job_dir(uuid).display().to_string(),
            cancel_requested: false,
        }
    }

    /// Records a submitted job (its uuid set) as queued and not yet published. Returns the
    /// existing record instead if the uuid is known, and whether it is new.
    pub async fn submit(&self, job: Job) -> anyhow::Result<(JobRecord, bool)> {
        let uuid = job.uuid.context("a submitted job needs its uuid")?;
        let fresh = self.new_record(job, uuid, JobState::Queued);
        let r = (&self.jobs, &self.unpublished, &self.by_time).transaction(
            |(jobs, unpublished, by_time)| {
                if let Some(old) = jobs.get(uuid.as_bytes())? {
                    return Ok((decode::<JobRecord>(&old)?, false));
                }
                jobs.insert(uuid.as_bytes(), encode(&fresh)?)?;
                unpublished.insert(uuid.as_bytes(), &[])?;
                by_time.insert(time_key(&fresh), &[])?;
                Ok((fresh.clone(), true))
            },
        );
        let out = flatten(r)?;
        if out.1 {
            self.flush().await?;
        }
        Ok(out)
    }

    /// The broker confirmed the job: it no longer needs publishing.
    pub fn published(&self, uuid: JobId) -> anyhow::Result<()> {
        self.unpublished.remove(uuid.as_bytes())?;
        Ok(())
    }

    /// Jobs recorded but not confirmed by the broker (to publish after a crash or outage).
    pub fn unpublished(&self) -> anyhow::Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for key in self.unpublished.iter().keys() {
            if let Some(bytes) = self.jobs.get(key?)? {
                out.push(serde_json::from_slice(&bytes)?);
            }
        }
        Ok(out)
    }

    /// Applies `change` to the record of `uuid` atomically (creating it from `fresh` when
    /// absent); `change` returns false to leave the record as it is.
    fn update(
        &self,
        uuid: JobId,
        fresh: &JobRecord,
        change: impl Fn(&mut JobRecord) -> bool,
    ) -> anyhow::Result<JobRecord> {
        let after = self.jobs.update_and_fetch(uuid.as_bytes(), |old| {
            let mut record = match old.map(serde_json::from_slice::<JobRecord>) {
                Some(Ok(r)) => r,
                Some(Err(_)) => return old.map(<[u8]>::to_vec), // unreadable: leave it
                None => fresh.clone(),
            };
            if !change(&mut record) && old.is_some() {
                return old.map(<[u8]>::to_vec);
            }
            record.updated_at = Utc::now();
            serde_json::to_vec(&record)
                .ok()
                .or_else(|| old.map(<[u8]>::to_vec))
        })?;
        let record: JobRecord = serde_json::from_slice(&after.context("the record vanished")?)?;
        // Every time, not only when created: a crash between the two writes must not leave a
        // record that `list` cannot find (the key never changes, so this is idempotent).
        self.by_time.insert(time_key(&record), &[])?;
        Ok(record)
    }

    /// Notes that a run started (from a `job.started` event). Creates the record of a job
    /// published straight to RabbitMQ; never moves a finished job back. Returns the record.
    pub fn started(&self, event: &Event) -> anyhow::Result<Option<JobRecord>> {
        let Some(job) = &event.job else {
            return Ok(None);
        };
        let fresh = self.new_record(job.clone(), event.uuid, JobState::Running);
        self.update(event.uuid, &fresh, |record| {
            if record.state.is_final() || record.attempts.iter().any(|a| a.attempt == event.attempt)
            {
                return false;
            }
            record.state = JobState::Running;
            record.attempts.push(Attempt {
                attempt: event.attempt,
                agent: event.agent.clone(),
                worker: None,
                status: None,
                error: None,
                output: serde_json::Value::Null,
                started_at: Some(event.time),
                finished_at: None,
                log_lines: 0,
            });
            true
        })
        .map(Some)
    }

    /// Records a result once: a run already recorded is a [`Recorded::Duplicate`]. Not
    /// durable until [`Store::flush`] (callers flush once for a batch).
    ///
    /// The result is kept first, with an atomic insert-if-absent that decides which copy
    /// wins; the job's record is then brought in line with the winner. A crash in between
    /// is mended when the result comes again (the agent resends until receipted).
    pub fn record(&self, result: &JobResult) -> anyhow::Result<Recorded> {
        let key = result_key(result.uuid, result.attempt);
        let won = self
            .results
            .compare_and_swap(
                key,
                None as Option<&[u8]>,
                Some(serde_json::to_vec(result)?),
            )?
            .is_ok();
        let winner = if won {
            result.clone()
        } else {
            self.result(result.uuid, result.attempt)?
                .context("the stored result vanished")?
        };
        let fresh = self.new_record(winner.job.clone(), winner.uuid, JobState::Queued);
        let record = self.update(winner.uuid, &fresh, |record| {
            let attempt = Attempt {
                attempt: winner.attempt,
                agent: Some(winner.agent.clone()),
                worker: Some(winner.worker.clone()),
                status: Some(winner.status),
                error: winner.error.clone(),
                output: winner.output.clone(),
                started_at: Some(winner.started_at),
                finished_at: Some(winner.finished_at),
                log_lines: winner.logs.len(),
            };
            match record
                .attempts
                .iter_mut()
                .find(|a| a.attempt == winner.attempt)
            {
                Some(a) if a.status.is_some() => return false, // already in line
                Some(a) => *a = attempt,
                None => {
                    record.attempts.push(attempt);
                    record.attempts.sort_by_key(|a| a.attempt);
                }
            }
            // A late result of an older attempt is kept but does not change the state.
            if record.attempts.iter().all(|a| a.attempt <= winner.attempt) {
                record.state = winner.status.into();
            }
            true
        })?;
        // It ran, so it was published, whatever the broker's confirm said.
        self.unpublished.remove(result.uuid.as_bytes())?;
        Ok(if won {
            Recorded::New(Box::new(record))
        } else {
            Recorded::Duplicate
        })
    }

    /// Marks a job as to be cancelled; returns its record.
    pub fn request_cancel(&self, uuid: JobId, fresh: &JobRecord) -> anyhow::Result<JobRecord> {
        self.update(uuid, fresh, |record| {
            let change = !record.cancel_requested;
            record.cancel_requested = true;
            change
        })
    }

    pub fn get(&self, uuid: JobId) -> anyhow::Result<Option<JobRecord>> {
        match self.jobs.get(uuid.as_bytes())? {
            Some(b) => Ok(Some(serde_json::from_slice(&b)?)),
            None => Ok(None),
        }
    }

    /// The recorded result of one run.
    pub fn result(&self, uuid: JobId, attempt: u32) -> anyhow::Result<Option<JobResult>> {
        match self.results.get(result_key(uuid, attempt))? {
            Some(b) => Ok(Some(serde_json::from_slice(&b)?)),
            None => Ok(None),
        }
    }

    /// The log lines of every recorded run of a job.
    pub fn logs(&self, uuid: JobId) -> anyhow::Result<Vec<(u32, Vec<LogLine>)>> {
        let mut out = Vec::new();
        for item in self.results.scan_prefix(uuid.as_bytes()) {
            let (_, v) = item?;
            let r: JobResult = serde_json::from_slice(&v)?;
            out.push((r.attempt, r.logs));
        }
        Ok(out)
    }

    /// Newest jobs first, optionally only those in `state`.
    pub fn list(&self, state: Option<JobState>, limit: usize) -> anyhow::Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for key in self.by_time.iter().keys().rev() {
            if out.len() >= limit {
                break;
            }
            let key = key?;
            let Some(bytes) = self.jobs.get(&key[8..])? else {
                continue;
            };
            let record: JobRecord = serde_json::from_slice(&bytes)?;
            if state.is_none_or(|s| s == record.state) {
                out.push(record);
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Waits until every earlier write is on disk.
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.durable
            .commit()
            .await
            .map_err(|e| anyhow::anyhow!("cannot flush the store: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use rota_common::wire::{AgentId, Level, Status};
    use serde_json::Value;

    use super::*;

    fn result_of(job: &Job, attempt: u32, status: Status) -> JobResult {
        JobResult {
            uuid: job.uuid.expect("has uuid"),
            attempt,
            work_type: job.work_type.clone(),
            agent: AgentId::new("a").expect("valid"),
            worker: "local-0".into(),
            status,
            error: None,
            output: Value::Null,
            logs: vec![LogLine {
                time: Utc::now(),
                level: Level::Info,
                message: format!("run {attempt}"),
            }],
            logs_dropped: 0,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            job: job.clone(),
        }
    }

    #[tokio::test]
    async fn a_result_is_recorded_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let mut job = Job::new("demo.echo", Value::Null);
        job.uuid = Some(JobId::random());
        let (rec, new) = store.submit(job.clone()).await.expect("submits");
        assert!(new);
        assert_eq!(rec.state, JobState::Queued);
        assert_eq!(store.unpublished().expect("reads").len(), 1);
        assert!(
            !store.submit(job.clone()).await.expect("submits").1,
            "same uuid is not new"
        );

        let first = result_of(&job, 1, Status::Succeeded);
        assert!(matches!(
            store.record(&first).expect("records"),
            Recorded::New(_)
        ));
        let mut again = result_of(&job, 1, Status::Failed);
        again.logs.clear();
        assert!(matches!(
            store.record(&again).expect("records"),
            Recorded::Duplicate
        ));
        let rec = store
            .get(job.uuid.expect("uuid"))
            .expect("reads")
            .expect("exists");
        assert_eq!(rec.state, JobState::Succeeded);
        assert_eq!(rec.attempts.len(), 1);
        assert!(store.unpublished().expect("reads").is_empty());
        assert_eq!(
            store.logs(rec.uuid).expect("reads")[0].1[0].message,
            "run 1"
        );
    }

    #[tokio::test]
    async fn a_job_seen_only_through_events_and_results_is_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let mut job = Job::new("demo.echo", Value::Null);
        job.uuid = Some(JobId::random());
        let uuid = job.uuid.expect("uuid");
        let result = result_of(&job, 1, Status::Succeeded);
        store.record(&result).expect("records");
        // A started event that arrives after the result does not move the job back.
        let started = Event {
            event: rota_common::wire::EventKind::Started,
            uuid,
            attempt: 1,
            work_type: job.work_type.clone(),
            agent: None,
            time: Utc::now(),
            status: None,
            progress: None,
            job: Some(job.clone()),
        };
        store.started(&started).expect("notes");
        let rec = store.get(uuid).expect("reads").expect("exists");
        assert_eq!(rec.state, JobState::Succeeded);
        assert_eq!(store.list(None, 10).expect("lists").len(), 1);
        assert_eq!(
            store.list(Some(JobState::Failed), 10).expect("lists").len(),
            0
        );
    }
}
