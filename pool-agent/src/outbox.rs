//! The outbox: every result, flushed to sled before its job is acked, kept until the
//! scheduler's receipt. A crash or a broker outage therefore never loses a finished result;
//! it is sent again after a restart or a reconnect.

use std::path::Path;

use anyhow::Context;
use rota_common::group_commit::GroupCommit;
use rota_common::wire::{JobId, JobResult};

/// Results not yet receipted, keyed by job id and attempt.
#[derive(Clone)]
pub struct Outbox {
    results: sled::Tree,
    durable: GroupCommit,
}

fn key(uuid: JobId, attempt: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(uuid.as_bytes());
    k[16..].copy_from_slice(&attempt.to_be_bytes());
    k
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`. Fails if another process has it open.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
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
        let durable = GroupCommit::start("outbox", move || {
            db.flush().map(|_| ()).map_err(|e| e.to_string())
        })?;
        Ok(Self { results, durable })
    }

    /// Stores `result` and waits until it is on disk.
    pub async fn put(&self, result: &JobResult) -> anyhow::Result<()> {
        let value = serde_json::to_vec(result)?;
        self.results
            .insert(key(result.uuid, result.attempt), value)?;
        self.flush().await
    }

    pub fn get(&self, uuid: JobId, attempt: u32) -> anyhow::Result<Option<JobResult>> {
        match self.results.get(key(uuid, attempt))? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Forgets a receipted result. Flushed lazily: after a crash it may come back and be
    /// sent again, which the scheduler ignores.
    pub fn remove(&self, uuid: JobId, attempt: u32) -> anyhow::Result<bool> {
        Ok(self.results.remove(key(uuid, attempt))?.is_some())
    }

    pub fn len(&self) -> usize {
        self.results.len()
    }

    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// Every stored result (unreadable entries are skipped and logged).
    pub fn all(&self) -> Vec<JobResult> {
        self.results
            .iter()
            .values()
            .filter_map(|v| {
                match v
                    .map_err(anyhow::Error::from)
                    .and_then(|b| Ok(serde_json::from_slice(&b)?))
                {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::error!(error = %e, "skipping an unreadable outbox entry");
                        None
                    }
                }
            })
            .collect()
    }

    /// When the oldest stored result was finished (for the metrics).
    pub fn oldest(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        #[derive(serde::Deserialize)]
        struct Finished {
            finished_at: chrono::DateTime<chrono::Utc>,
        }
        self.results
            .iter()
            .values()
            .filter_map(|v| serde_json::from_slice::<Finished>(&v.ok()?).ok())
            .map(|f| f.finished_at)
            .min()
    }

    /// Waits until every earlier write is on disk.
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.durable
            .commit()
            .await
            .map_err(|e| anyhow::anyhow!("cannot flush the outbox: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use rota_common::wire::{AgentId, Job, Status};
    use serde_json::Value;

    use super::*;

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
            outbox.put(&r).await.expect("stores");
        }
        let outbox = Outbox::open(dir.path()).expect("reopens");
        assert_eq!(outbox.get(r.uuid, 1).expect("reads"), Some(r.clone()));
        assert_eq!(outbox.get(r.uuid, 2).expect("reads"), None);
        assert_eq!(outbox.all(), vec![r.clone()]);
        assert!(outbox.remove(r.uuid, 1).expect("removes"));
        assert!(outbox.is_empty());
    }
}
