//! The outbox: every result, made durable in sled (flushed and fdatasynced, see
//! [`rota_common::group_commit`]) before its job is acked, kept until the scheduler's receipt.
//! A crash, a power loss or a broker outage therefore never loses a finished result; it is
//! sent again after a restart or a reconnect.
//!
//! A failed write (a full disk) leaves sled refusing every later write until it is opened
//! again, so [`Outbox::reopen`] does that once the agent has stopped taking jobs.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use rota_common::group_commit::{FileSync, GroupCommit, Room};
use rota_common::wire::JobId;

use crate::fit::Sealed;

/// Results not yet receipted, keyed by job id and attempt.
#[derive(Clone)]
pub struct Outbox {
    dir: PathBuf,
    open: Arc<RwLock<Option<Arc<Open>>>>,
    /// Set when a write failed: sled then refuses writes until it is reopened.
    failed: Arc<AtomicBool>,
    room: Arc<Room>,
}

/// The outbox cannot be closed to be reopened: this process must end, and a new one opens it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the outbox did not close after a failed write (sled hangs in its flush); only a restart can reopen it"
)]
pub struct Stuck;

/// The database while it is open.
struct Open {
    results: sled::Tree,
    durable: GroupCommit,
}

fn key(uuid: JobId, attempt: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(uuid.as_bytes());
    k[16..].copy_from_slice(&attempt.to_be_bytes());
    k
}

/// Where a page of [`Outbox::page`] starts: after this job id and attempt.
pub type Cursor = (JobId, u32);

impl Open {
    fn at(dir: &Path) -> anyhow::Result<Self> {
        // No background flusher: every write that matters is flushed by the group commit, and
        // without that thread the database closes (and unlocks) as soon as it is dropped.
        let db = sled::Config::new().path(dir).flush_every_ms(None).open().map_err(|e| {
            if e.to_string().contains("lock") || e.to_string().contains("WouldBlock") {
                anyhow::anyhow!(
                    "the outbox {} is in use by another process (another pool agent with the same --id and \
                     --data-dir?); stop it or choose another --id",
                    dir.display()
                )
            } else {
                anyhow::anyhow!("cannot open the outbox {}: {e}", dir.display())
            }
        })?;
        let results = db
            .open_tree("results")
            .context("cannot open the outbox's results tree")?;
        let files = FileSync::new(dir);
        let durable = GroupCommit::start("outbox", move || {
            db.flush().map_err(|e| e.to_string())?;
            files
                .sync()
                .map_err(|e| format!("cannot sync the outbox's files: {e}"))
        })?;
        Ok(Self { results, durable })
    }
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`. Fails if another process has it open.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let open = Open::at(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            open: Arc::new(RwLock::new(Some(Arc::new(open)))),
            failed: Arc::default(),
            room: Arc::new(Room::new(dir)),
        })
    }

    fn current(&self) -> anyhow::Result<Arc<Open>> {
        self.open
            .read()
            .ok()
            .and_then(|o| o.clone())
            .ok_or_else(|| anyhow::anyhow!("the outbox {} is being reopened", self.dir.display()))
    }

    /// Closes and opens the database again, after a failed write left it refusing writes.
    /// What was flushed is kept; what was not is written again by whoever wrote it. Fails
    /// with [`Stuck`] when the old database does not close (sled can hang in a flush after a
    /// failed write): only a new process can open it then.
    pub async fn reopen(&self) -> anyhow::Result<()> {
        let old = self.open.write().ok().and_then(|mut slot| slot.take());
        if let Some(mut old) = old {
            // Readers hold it for one operation; a failing disk makes those quick.
            let mut waited = 0;
            let open = loop {
                match Arc::try_unwrap(old) {
                    Ok(open) => break open,
                    Err(shared) if waited < 100 => {
                        old = shared;
                        waited += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(shared) => {
                        self.put_back(shared);
                        return Err(Stuck.into());
                    }
                }
            };
            // Closing joins the flushing thread: off the runtime, and not for ever.
            let closed = tokio::task::spawn_blocking(move || drop(open));
            if tokio::time::timeout(Duration::from_secs(10), closed)
                .await
                .is_err()
            {
                return Err(Stuck.into());
            }
        }
        let dir = self.dir.clone();
        let open = tokio::task::spawn_blocking(move || Open::at(&dir)).await??;
        self.put_back(Arc::new(open));
        self.failed.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn put_back(&self, open: Arc<Open>) {
        if let Ok(mut slot) = self.open.write() {
            *slot = Some(open);
        }
    }

    /// Whether a write failed since the database was opened (it must be reopened).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Stores a result and waits until it is on disk.
    pub async fn put(&self, result: &Sealed) -> anyhow::Result<()> {
        self.write(result)?;
        self.commit().await
    }

    /// Writes a result without waiting for the disk: a later [`Outbox::commit`] makes it
    /// durable. It can be read (and removed) at once.
    pub fn write(&self, result: &Sealed) -> anyhow::Result<()> {
        // Not even tried without room: see `Room`.
        self.room
            .ensure(result.body.len() as u64)
            .map_err(anyhow::Error::msg)?;
        let written = self
            .current()?
            .results
            .insert(key(result.uuid, result.attempt), result.body.as_slice())
            .with_context(|| format!("cannot write to the outbox {}", self.dir.display()));
        if written.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        written.map(|_| ())
    }

    /// Waits until every earlier write is on disk (one flush for all who wait at once).
    pub async fn commit(&self) -> anyhow::Result<()> {
        let flushed =
            self.current()?.durable.commit().await.map_err(|e| {
                anyhow::anyhow!("cannot flush the outbox {}: {e}", self.dir.display())
            });
        if flushed.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        flushed
    }

    pub fn get(&self, uuid: JobId, attempt: u32) -> anyhow::Result<Option<Sealed>> {
        Ok(self
            .current()?
            .results
            .get(key(uuid, attempt))?
            .map(|body| Sealed {
                uuid,
                attempt,
                body: body.to_vec(),
            }))
    }

    /// Forgets a receipted result. Flushed lazily: after a crash it may come back and be
    /// sent again, which the scheduler ignores.
    pub fn remove(&self, uuid: JobId, attempt: u32) -> anyhow::Result<bool> {
        Ok(self
            .current()?
            .results
            .remove(key(uuid, attempt))?
            .is_some())
    }

    pub fn len(&self) -> usize {
        self.current().map(|o| o.results.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `n` keys of stored results after `after`, with the cursor of the next page.
    pub fn keys(&self, after: Option<Cursor>, n: usize) -> (Vec<Cursor>, Option<Cursor>) {
        let Ok(open) = self.current() else {
            return (Vec::new(), None);
        };
        let start = match after {
            Some((uuid, attempt)) => Bound::Excluded(key(uuid, attempt).to_vec()),
            None => Bound::Unbounded,
        };
        let keys: Vec<Cursor> = open
            .results
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .keys()
            .filter_map(|k| {
                let k = k.ok()?;
                let uuid = JobId(uuid::Uuid::from_bytes(k.get(..16)?.try_into().ok()?));
                let attempt = u32::from_be_bytes(k.get(16..20)?.try_into().ok()?);
                Some((uuid, attempt))
            })
            .take(n)
            .collect();
        let next = if keys.len() == n {
            keys.last().copied()
        } else {
            None
        };
        (keys, next)
    }

    /// When the oldest stored result was finished (for the metrics).
    pub fn oldest(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        #[derive(serde::Deserialize)]
        struct Finished {
            finished_at: chrono::DateTime<chrono::Utc>,
        }
        self.current()
            .ok()?
            .results
            .iter()
            .values()
            .filter_map(|v| serde_json::from_slice::<Finished>(&v.ok()?).ok())
            .map(|f| f.finished_at)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use rota_common::wire::{AgentId, Job, JobResult, Status};
    use serde_json::Value;

    use super::*;

    fn sealed(r: &JobResult) -> Sealed {
        Sealed::of(r).expect("encodes")
    }

    fn result(attempt: u32) -> JobResult {
        let mut job = Job::new("demo.echo", Value::Null);
        job.uuid = Some(JobId::random());
        JobResult {
            uuid: job.uuid.expect("set above"),
            attempt,
            work_type: job.work_type.clone(),
            agent: AgentId::new("a").expect("valid"),
            worker: "local-0".into(),
            status: Status::Succeeded,
            error: None,
            output: Value::Null,
            logs: vec![],
            logs_dropped: 0,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            job,
        }
    }

    #[tokio::test]
    async fn keeps_results_across_reopen_until_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = result(1);
        {
            let outbox = Outbox::open(dir.path()).expect("opens");
            outbox.put(&sealed(&r)).await.expect("stores");
        }
        let outbox = Outbox::open(dir.path()).expect("reopens");
        assert_eq!(outbox.get(r.uuid, 1).expect("reads"), Some(sealed(&r)));
        assert_eq!(outbox.get(r.uuid, 2).expect("reads"), None);
        assert_eq!(outbox.keys(None, 10), (vec![(r.uuid, 1)], None));
        assert!(outbox.remove(r.uuid, 1).expect("removes"));
        assert!(outbox.is_empty());
    }

    #[tokio::test]
    async fn pages_cover_every_result_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path()).expect("opens");
        for _ in 0..25 {
            outbox.put(&sealed(&result(1))).await.expect("stores");
        }
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let (page, next) = outbox.keys(after, 10);
            assert!(page.len() <= 10);
            seen.extend(page.into_iter().map(|(uuid, _)| uuid));
            match next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 25);
    }

    #[tokio::test]
    async fn a_reopened_outbox_keeps_what_was_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path()).expect("opens");
        let r = result(1);
        outbox.put(&sealed(&r)).await.expect("stores");
        outbox.reopen().await.expect("reopens in the same process");
        assert_eq!(outbox.get(r.uuid, 1).expect("reads"), Some(sealed(&r)));
        // A big value goes to a blob file of its own, which the flush syncs too.
        let mut big = result(2);
        big.output = Value::String("x".repeat(300 * 1024));
        outbox.put(&sealed(&big)).await.expect("stores a blob");
        assert!(
            dir.path()
                .join("blobs")
                .read_dir()
                .expect("blobs")
                .next()
                .is_some()
        );
    }
}
