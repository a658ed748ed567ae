//! The scheduler's store, on fjall (an LSM tree: see "The store engine" in the README): every
//! job's record, every result (with its logs), the jobs recorded but not yet confirmed by
//! RabbitMQ, an index by creation time for listing, and what the scheduler's clock needs: the
//! schedules, the timers of held jobs (delayed jobs and retries), the unique keys of unfinished
//! jobs, the children of each job, the paused queues, which waiting job waits for which (see
//! [`crate::groups`]) and the limits (see [`crate::limits`]).
//!
//! Every change is one fjall single-writer transaction, across keyspaces: one write
//! transaction at a time (a lock is held from its start to its commit), which reads what was
//! committed before it and its own writes. A check and the writes that depend on it (is this
//! run recorded already? is this unique key free?) are therefore one atomic step, whatever
//! thread makes them, and whatever arrives twice is recorded once.
//! Each attempt waiting to be published is claimed by one publishing pass at a time
//! ([`PublishClaim`]). Listing and logs are read in pages. A write that fails is typed
//! ([`StoreError::Unwritable`]); the database is then reopened from disk ([`Store::probe`]),
//! since fjall refuses every write after an I/O error. A sled store left by an older version
//! is moved over on first start ([`migrate_from_sled`]).

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, mpsc};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use fjall::config::{PartitioningPolicy, PinningPolicy};
use fjall::{
    KeyspaceCreateOptions, KvSeparationOptions, PersistMode, Readable, SingleWriterTxDatabase,
    SingleWriterTxKeyspace, SingleWriterWriteTx,
};
use rota_common::group_commit::GroupCommit;
use rota_common::wire::{
    AgentId, Attempt, ErrorInfo, Event, Job, JobId, JobRecord, JobResult, JobState, Limit,
    LimitInfo, LimitKind, LimitScope, LogLine, MAX_LIMITS, PausedQueues, ScheduleInfo, Status,
};
use serde::{Deserialize, Serialize};

use crate::groups;
use crate::journal::JournalSync;
use crate::limits::{self, Gate, Spaces};
use crate::retries::RetryPolicy;

#[derive(Clone)]
pub struct Store {
    /// The open database, swapped for a fresh one by [`Store::reopen`] (None meanwhile).
    db: Arc<RwLock<Option<Arc<Trees>>>>,
    /// Where the database lives (`<dir>/store`).
    path: PathBuf,
    /// Where each job's folder goes.
    work_root: PathBuf,
    /// How failed jobs are retried.
    policy: RetryPolicy,
    /// The attempts being published right now, each by the one pass that claimed it.
    publishing: Arc<Mutex<HashSet<(JobId, u32)>>>,
    /// The runs recorded first whose durability is not yet known ([`Undurable`]).
    undurable: Arc<Mutex<Undurable>>,
    /// See `--store-cache-mib`.
    cache_bytes: u64,
    /// The thread that makes the frequent writes ([`Store::write`]).
    writer: Arc<Writer>,
    /// Waiting jobs that a committed write moved on ([`groups::ended`]): for the server to
    /// publish or announce, once durable ([`Store::take_moved`]).
    moved: Arc<Mutex<Vec<JobRecord>>>,
}

/// The runs (uuid, attempt) recorded first since the last flush, and those whose flush
/// failed. A flush that fails may still have put some of its writes on disk, to be read back
/// when the store is reopened; the results of those runs come again (none was acked), and
/// the first copy to come is then reported as [`Recorded::New`], as it would be had nothing
/// reached the disk: its run is announced, counted and receipted once it is durable.
#[derive(Default)]
struct Undurable {
    /// Recorded first since the last flush that covers them.
    fresh: HashSet<(JobId, u32)>,
    /// Recorded, but the flush that covered them failed.
    owed: HashSet<(JobId, u32)>,
    /// How many flushes failed: a run committed while one failed is owed, not fresh.
    failures: u64,
}

/// A write to make on the writer thread.
type WriteOp = Box<dyn FnOnce() + Send>;

/// The one thread that makes the frequent writes (results, started events), so that they do
/// not hold up the async runtime and need no blocking pool.
struct Writer {
    tx: Mutex<mpsc::Sender<WriteOp>>,
}

impl Writer {
    fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<WriteOp>();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                // Ends when the last store clone is gone. A write that panics fails alone
                // (its caller hears that the writer failed), not every write after it.
                while let Ok(op) = rx.recv() {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(op));
                }
            })?;
        Ok(Self { tx: Mutex::new(tx) })
    }
}

/// The keyspaces of one open database (sled's trees of older versions, the same keys and
/// values).
pub(crate) struct Trees {
    db: SingleWriterTxDatabase,
    /// uuid → JobRecord
    jobs: Keyspace,
    /// uuid + attempt → JobResult
    results: Keyspace,
    /// uuid → the attempt waiting to be published and since when ([`pending`]), for jobs
    /// recorded but not yet confirmed by the broker (an empty value: written by an older version)
    unpublished: Keyspace,
    /// created-at (ns, big-endian) + uuid → () for listing newest first
    by_time: Keyspace,
    /// due time (ns, big-endian) + uuid → () for jobs held in state `scheduled`
    timers: Keyspace,
    /// unique key → uuid of the job that holds it (while that job is not over)
    unique: Keyspace,
    /// parent uuid + child uuid → ()
    children: Keyspace,
    /// name → ScheduleInfo
    schedules: Keyspace,
    /// One key, rewritten by [`Store::probe`] to learn whether the store writes again.
    probe: Keyspace,
    /// One key, [`PAUSED`] → the paused queues ([`PausedQueues`]), with what the limits
    /// apply to
    paused: Keyspace,
    /// awaited uuid + waiting uuid → () while a `waiting` job waits for that job
    pub(crate) awaited: Keyspace,
    /// The limits and the jobs they hold (see [`crate::limits`]).
    limits: Keyspace,
    limit_waiting: Keyspace,
    limit_running: Keyspace,
    limit_windows: Keyspace,
    /// Makes the journal durable for every writer at once; last, so that the keyspaces are
    /// gone when its thread, which owns a handle on the database, ends.
    durable: GroupCommit,
}

pub(crate) type Keyspace = SingleWriterTxKeyspace;
pub(crate) type WriteTx<'a> = SingleWriterWriteTx<'a>;

/// The keyspaces, by name: the trees of a sled store, too.
const KEYSPACES: [&str; 15] = [
    "jobs",
    "results",
    "unpublished",
    "by_time",
    "timers",
    "unique",
    "children",
    "schedules",
    "probe",
    "paused",
    "awaited",
    "limits",
    "limit_waiting",
    "limit_running",
    "limit_windows",
];

/// The key of the paused queues in their keyspace.
const PAUSED: &str = "queues";

/// The least the journal may hold before fjall writes its memtables out (fjall's minimum).
const JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// The keyspaces written for every job recorded; the others stay small.
const BUSY: [&str; 4] = ["jobs", "results", "by_time", "unpublished"];

/// The memtable of a keyspace that is not [`BUSY`] (fjall's least).
const SMALL_MEMTABLE: u64 = 1024 * 1024;

/// The keyspaces whose values (a job's record, a result) are kept apart from their keys.
const SEPARATED: [&str; 2] = ["jobs", "results"];

/// The smallest value kept apart from its key, in bytes: nearly every record and result.
const SEPARATED_FROM: u32 = 256;

impl Trees {
    /// Opens (or creates) the database in `path`, in about `cache_bytes` of memory: a quarter
    /// of it is the block cache; the memtables (what was written and not yet in a table on
    /// disk) hold at most a sixteenth each for the [`BUSY`] keyspaces, 1 MiB for the others;
    /// the rest is for what fjall's flushes and compactions hold meanwhile. (With half of it
    /// as the cache and an eighth per memtable, the scheduler held 83 MiB after 1,000,000
    /// results at the default 32 MiB, and recorded no faster.)
    fn open(path: &Path, cache_bytes: u64) -> anyhow::Result<Self> {
        let db = SingleWriterTxDatabase::builder(path)
            .cache_size(cache_bytes / 4)
            // The group commit makes the journal durable; a transaction only appends to it.
            .manual_journal_persist(true)
            .max_journaling_size(JOURNAL_BYTES)
            .open()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the scheduler's store {}: {e} (is another scheduler using this --data-dir?)",
                    path.display()
                )
            })?;
        let busy = (cache_bytes / 16).max(SMALL_MEMTABLE);
        let memtables =
            busy * BUSY.len() as u64 + SMALL_MEMTABLE * (KEYSPACES.len() - BUSY.len()) as u64;
        let open = |name: &str| {
            let memtable = if BUSY.contains(&name) {
                busy
            } else {
                SMALL_MEMTABLE
            };
            db.keyspace(name, || {
                // Index and filter blocks go through the cache too: pinned, they would take
                // memory that grows with the store.
                let options = KeyspaceCreateOptions::default()
                    .max_memtable_size(memtable)
                    .index_block_pinning_policy(PinningPolicy::all(false))
                    .filter_block_pinning_policy(PinningPolicy::all(false));
                // Keyed by random uuids, every batch written out overlaps the whole keyspace,
                // so each compaction rewrote all of it: compactions took more CPU the larger
                // the store, 20-40 ms at a time on both cores. Values kept in blob files of
                // their own, written once, leave only keys and pointers to compact. A
                // keyspace keeps the options it was made with: this applies to new stores.
                if SEPARATED.contains(&name) {
                    // A table of keys and pointers holds many keys: its whole filter and index
                    // would be megabytes read (and checksummed) through the cache for each
                    // lookup. Partitioned, a lookup reads one small part of each.
                    options
                        .with_kv_separation(Some(
                            KvSeparationOptions::default().separation_threshold(SEPARATED_FROM),
                        ))
                        .filter_block_partitioning_policy(PartitioningPolicy::all(true))
                        .index_block_partitioning_policy(PartitioningPolicy::all(true))
                } else {
                    options
                }
            })
        };
        Ok(Self {
            jobs: open("jobs")?,
            results: open("results")?,
            unpublished: open("unpublished")?,
            by_time: open("by_time")?,
            timers: open("timers")?,
            unique: open("unique")?,
            children: open("children")?,
            schedules: open("schedules")?,
            probe: open("probe")?,
            paused: open("paused")?,
            awaited: open("awaited")?,
            limits: open("limits")?,
            limit_waiting: open("limit_waiting")?,
            limit_running: open("limit_running")?,
            limit_windows: open("limit_windows")?,
            durable: {
                let db = db.clone();
                let journal = JournalSync::new(path);
                let failed = |e: fjall::Error| format!("cannot write the store's journal: {e}");
                GroupCommit::start("store", move || {
                    // Hands the journal's buffer to the kernel (under fjall's lock, one
                    // write), then syncs its data (`fdatasync`) without the lock, while
                    // transactions go on: what a transaction committed before survives a
                    // power cut.
                    db.persist(PersistMode::Buffer).map_err(failed)?;
                    journal.sync()?;
                    // fjall writes memtables out on its own threads, and does not hold writers
                    // back until they have: a writer that outpaces them waits here, so that
                    // memory stays bounded. Whenever the memtables hold more than their
                    // limits add up to, one of them is due to be written out, so this ends
                    // (or fails, once fjall stopped on an error).
                    while db.write_buffer_size() > memtables {
                        std::thread::sleep(Duration::from_millis(1));
                        db.persist(PersistMode::Buffer).map_err(failed)?;
                    }
                    Ok(())
                })?
            },
            db,
        })
    }

    /// The keyspace named `name` (one of [`KEYSPACES`]).
    fn named(&self, name: &str) -> Option<&Keyspace> {
        Some(match name {
            "jobs" => &self.jobs,
            "results" => &self.results,
            "unpublished" => &self.unpublished,
            "by_time" => &self.by_time,
            "timers" => &self.timers,
            "unique" => &self.unique,
            "children" => &self.children,
            "schedules" => &self.schedules,
            "probe" => &self.probe,
            "paused" => &self.paused,
            "awaited" => &self.awaited,
            "limits" => &self.limits,
            "limit_waiting" => &self.limit_waiting,
            "limit_running" => &self.limit_running,
            "limit_windows" => &self.limit_windows,
            _ => return None,
        })
    }

    /// The keyspaces of the limits.
    fn limit_spaces(&self) -> Spaces<'_> {
        Spaces {
            limits: &self.limits,
            waiting: &self.limit_waiting,
            running: &self.limit_running,
            windows: &self.limit_windows,
        }
    }
}

/// Now, in milliseconds since 1970: the version of a change of the paused queues.
fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

/// Moves a sled store left in `path` by an older version to fjall, once: every tree is
/// copied as it is into the keyspace of its name, in `<path>.migrating`, made durable, then
/// put in the store's place; the sled folder is kept as `<path>.sled`. A start cut short
/// anywhere redoes the copy, or finishes the renames.
pub fn migrate_from_sled(path: &Path) -> anyhow::Result<()> {
    let migrating = path.with_extension("migrating");
    let kept = path.with_extension("sled");
    if !path.exists() && migrating.exists() && kept.exists() {
        // Cut short between the two renames: the copy is whole.
        std::fs::rename(&migrating, path)?;
        return sync_parent(path);
    }
    // sled's folder has its `conf` file; fjall's has none.
    if !path.join("conf").is_file() {
        return Ok(());
    }
    anyhow::ensure!(
        !kept.exists(),
        "cannot move the sled store {} to fjall: {} is in the way (an older copy of it?); move it elsewhere and start again",
        path.display(),
        kept.display()
    );
    tracing::info!(store = %path.display(), "moving the store from sled to fjall (once)");
    let started = std::time::Instant::now();
    if migrating.exists() {
        std::fs::remove_dir_all(&migrating)?;
    }
    let old = sled::Config::new()
        .path(path)
        .flush_every_ms(None)
        .open()
        .with_context(|| format!("cannot open the sled store {} to move it", path.display()))?;
    let new = Trees::open(&migrating, 32 * 1024 * 1024)?;
    let mut copied = 0u64;
    for name in KEYSPACES {
        let keyspace = new.named(name).context("a keyspace of every tree")?;
        let mut tx = new.db.write_tx();
        for item in old.open_tree(name)?.iter() {
            let (key, value) = item?;
            tx.insert(keyspace, key.as_ref(), value.as_ref());
            copied += 1;
            if copied.is_multiple_of(10_000) {
                tx.commit()?;
                tx = new.db.write_tx();
            }
        }
        tx.commit()?;
    }
    new.db.persist(PersistMode::SyncAll)?;
    drop((new, old));
    std::fs::rename(path, &kept)?;
    std::fs::rename(&migrating, path)?;
    sync_parent(path)?;
    tracing::info!(
        store = %path.display(),
        entries = copied,
        seconds = started.elapsed().as_secs_f64(),
        sled_copy = %kept.display(),
        "moved the store from sled to fjall; the sled folder is kept (delete it once you no longer need it)"
    );
    Ok(())
}

/// Makes the renames in the folder of `path` durable.
fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let parent = path.parent().context("the store has a parent folder")?;
    std::fs::File::open(parent)?.sync_all()?;
    Ok(())
}

/// The right to publish one attempt of a job, held by one pass at a time (the clock, a
/// submission, a retry by hand or the republish of unconfirmed jobs), so that no two of them
/// publish it; let go when dropped, whether the publish worked or not.
#[derive(Debug)]
pub struct PublishClaim {
    uuid: JobId,
    attempt: u32,
    publishing: Arc<Mutex<HashSet<(JobId, u32)>>>,
}

impl Drop for PublishClaim {
    fn drop(&mut self) {
        self.publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(self.uuid, self.attempt));
    }
}

/// The value of an `unpublished` entry: the attempt to publish, and when it was handed over
/// to be published (not the job's creation: a retry is handed over long after that).
fn pending(attempt: u32, since: DateTime<Utc>) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&attempt.to_be_bytes());
    v[4..].copy_from_slice(
        &since
            .timestamp_nanos_opt()
            .unwrap_or_default()
            .to_be_bytes(),
    );
    v
}

/// Reads a [`pending`] value; None for the empty values of older versions.
fn read_pending(v: &[u8]) -> Option<(u32, DateTime<Utc>)> {
    let attempt = u32::from_be_bytes(v.get(..4)?.try_into().ok()?);
    let nanos = i64::from_be_bytes(v.get(4..12)?.try_into().ok()?);
    Some((attempt, DateTime::from_timestamp_nanos(nanos)))
}

/// Whether an `unpublished` entry is the one of `attempt` (an entry of an older version
/// names none and counts for any).
fn pending_is(v: &[u8], attempt: u32) -> bool {
    read_pending(v).is_none_or(|(a, _)| a == attempt)
}

/// What recording a new job did.
#[derive(Debug)]
pub struct Inserted {
    /// The job's record; or the job that holds its unique key, when it was not recorded.
    pub record: JobRecord,
    /// Whether it was recorded (false: its uuid was known, or its unique key held).
    pub new: bool,
    /// A job held for its `debounce_s` that this one replaced: it ended `superseded`.
    pub superseded: Option<JobRecord>,
    /// The waiting jobs that the end of `superseded` moved on (see [`groups::ended`]).
    pub follow_ups: Vec<JobRecord>,
}

/// Whether `holder`, the job that holds a unique key, keeps the key from a new job at `now`:
/// while it is not over, and for its `unique_for_s` after it ended.
fn holds_key(holder: &JobRecord, now: DateTime<Utc>) -> bool {
    !holder.state.is_final()
        || holder.job.unique_for_s.is_some_and(|window| {
            i64::try_from(window)
                .ok()
                .and_then(chrono::Duration::try_seconds)
                .and_then(|w| holder.updated_at.checked_add_signed(w))
                .is_none_or(|until| now < until)
        })
}

/// `now` plus `seconds` (bounded by the job checks to a year).
fn after(now: DateTime<Utc>, seconds: u64) -> DateTime<Utc> {
    let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
    chrono::Duration::try_seconds(seconds)
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Records `fresh` in `tx`: queued; or scheduled while its `run_at` or `debounce_s` holds it;
/// or `expired` at once when it cannot start by its deadline. Not recorded when its uuid is
/// known or a job holds its unique key ([`holds_key`]): then that job. A debounced job
/// replaces the held job with its key, which ends `superseded`.
fn insert_new(
    tx: &mut WriteTx,
    t: &Trees,
    mut fresh: JobRecord,
    now: DateTime<Utc>,
) -> anyhow::Result<Inserted> {
    let uuid = fresh.uuid;
    if let Some(old) = tx.get(&t.jobs, uuid.as_bytes())? {
        return Ok(Inserted {
            record: serde_json::from_slice(&old)?,
            new: false,
            superseded: None,
            follow_ups: Vec::new(),
        });
    }
    let mut superseded = None;
    if let Some(key) = &fresh.job.unique_key
        && let Some(holder) = tx.get(&t.unique, key.as_bytes())?
        && let Some(record) = tx.get(&t.jobs, &holder)?
    {
        let mut holder: JobRecord = serde_json::from_slice(&record)?;
        if fresh.job.debounce_s.is_none() {
            if holds_key(&holder, now) {
                return Ok(Inserted {
                    record: holder,
                    new: false,
                    superseded: None,
                    follow_ups: Vec::new(),
                });
            }
        } else if holder.state == JobState::Scheduled && holder.attempts.is_empty() {
            // Held for its debounce (or its run_at): this newer job takes its place.
            if let Some(at) = holder.next_run_at.take() {
                tx.remove(&t.timers, timer_key(at, holder.uuid));
            }
            holder.state = JobState::Superseded;
            holder.superseded_by = Some(uuid);
            holder.reason = Some(format!(
                "replaced by job {uuid}, submitted at {now} with the same unique key within \
                 its debounce window"
            ));
            holder.updated_at = now;
            tx.insert(
                &t.jobs,
                holder.uuid.as_bytes().as_slice(),
                serde_json::to_vec(&holder)?,
            );
            superseded = Some(holder);
        }
    }
    let mut follow_ups = Vec::new();
    if let Some(old) = &superseded {
        follow_ups = groups::ended(tx, t, old, now)?;
    }
    if !groups::hold(tx, t, &mut fresh)? {
        place(tx, t, &mut fresh, now)?;
    }
    tx.insert(
        &t.jobs,
        uuid.as_bytes().as_slice(),
        serde_json::to_vec(&fresh)?,
    );
    tx.insert(&t.by_time, time_key(&fresh), EMPTY);
    if let Some(key) = &fresh.job.unique_key
        && !fresh.state.is_final()
    {
        tx.insert(&t.unique, key.as_str(), uuid.as_bytes().as_slice());
    }
    if let Some(parent) = fresh.job.parent {
        tx.insert(&t.children, pair_key(parent, uuid).as_slice(), EMPTY);
    }
    Ok(Inserted {
        record: fresh,
        new: true,
        superseded,
        follow_ups,
    })
}

/// Places `record`, a job free to run from `now` on, in `tx`: queued (to publish), or
/// throttled while a limit holds it; or scheduled while its `run_at` or `debounce_s` holds
/// it; or `expired` at once when it cannot start by its deadline.
pub(crate) fn place(
    tx: &mut WriteTx,
    t: &Trees,
    record: &mut JobRecord,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let uuid = record.uuid;
    let held_until = [
        record.job.run_at.filter(|at| *at > now),
        record.job.debounce_s.map(|s| after(now, s)),
    ]
    .into_iter()
    .flatten()
    .max();
    match (held_until, record.job.expires_at) {
        (_, Some(deadline)) if deadline <= now => {
            record.state = JobState::Expired;
            record.reason = Some(format!(
                "its deadline {deadline} had passed when it was free to run at {now}: not run"
            ));
        }
        (Some(at), Some(deadline)) if at >= deadline => {
            record.state = JobState::Expired;
            record.reason = Some(format!(
                "held until {at}, not before its deadline {deadline} (looked at {now}): not run"
            ));
        }
        (Some(at), _) => {
            record.state = JobState::Scheduled;
            record.next_run_at = Some(at);
            tx.insert(&t.timers, timer_key(at, uuid), EMPTY);
        }
        (None, _) => {
            let limits = limits::all(tx, &t.limit_spaces())?;
            queue_or_hold(tx, t, &limits, record, None, now)?;
        }
    }
    Ok(())
}

/// The record of `uuid` as `tx` sees it.
pub(crate) fn read(tx: &WriteTx, t: &Trees, uuid: JobId) -> anyhow::Result<Option<JobRecord>> {
    match tx.get(&t.jobs, uuid.as_bytes())? {
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("the stored record of job {uuid} is unreadable")
        })?)),
        None => Ok(None),
    }
}

/// Writes `record` in `tx`.
pub(crate) fn write(tx: &mut WriteTx, t: &Trees, record: &JobRecord) -> anyhow::Result<()> {
    tx.insert(
        &t.jobs,
        record.uuid.as_bytes().as_slice(),
        serde_json::to_vec(record)?,
    );
    Ok(())
}

/// The children of `parent` as `tx` sees them.
pub(crate) fn children(tx: &WriteTx, t: &Trees, parent: JobId) -> anyhow::Result<Vec<JobId>> {
    let mut out = Vec::new();
    for item in tx.prefix(&t.children, parent.as_bytes()) {
        out.extend(id_from(&item.key()?[16..]));
    }
    Ok(out)
}

/// Queues `record` (an `unpublished` entry: to publish) when its limits allow it, or holds
/// it `throttled` (see [`limits::gate`]; with a timer at its deadline, if it has one, for the
/// clock to end it `expired`). `waiting_at` is its entry in a limit's queue, if it waits in
/// one. The caller writes the record.
fn queue_or_hold(
    tx: &mut WriteTx,
    t: &Trees,
    limits: &[Limit],
    record: &mut JobRecord,
    waiting_at: Option<&[u8]>,
    now: DateTime<Utc>,
) -> anyhow::Result<Gate> {
    let gate = limits::gate(tx, &t.limit_spaces(), limits, record, waiting_at, now)?;
    match &gate {
        Gate::Open => {
            if record.state == JobState::Throttled {
                record.reason = None;
            }
            record.state = JobState::Queued;
            tx.insert(
                &t.unpublished,
                record.uuid.as_bytes().as_slice(),
                pending(record.job.attempt, now).as_slice(),
            );
        }
        Gate::Held { reason, .. } => {
            if record.state != JobState::Throttled
                && let Some(deadline) = record.job.expires_at
            {
                tx.insert(&t.timers, timer_key(deadline, record.uuid), EMPTY);
            }
            record.state = JobState::Throttled;
            record.reason = Some(reason.clone());
        }
    }
    Ok(gate)
}

/// Gives back the unique key of `record`, a job that is over, if it holds it and no window
/// keeps it (see [`holds_key`]; a window is checked when the key is asked for again).
pub(crate) fn free_key(tx: &mut WriteTx, t: &Trees, record: &JobRecord) -> anyhow::Result<()> {
    if let Some(key) = &record.job.unique_key
        && record.job.unique_for_s.is_none()
        && tx.get(&t.unique, key.as_bytes())?.as_deref() == Some(record.uuid.as_bytes().as_slice())
    {
        tx.remove(&t.unique, key.as_str());
    }
    Ok(())
}

/// The value of the keys that are an index alone.
pub(crate) const EMPTY: &[u8] = &[];

/// Applies `change` to the record of `uuid` in `tx` (creating it from `fresh` when absent);
/// `change` returns false to leave the record as it is. Returns the record after.
fn update(
    tx: &mut WriteTx,
    t: &Trees,
    uuid: JobId,
    fresh: impl FnOnce() -> JobRecord,
    change: impl FnOnce(&mut JobRecord) -> bool,
) -> anyhow::Result<JobRecord> {
    let old = tx.get(&t.jobs, uuid.as_bytes())?;
    let mut record = match &old {
        Some(bytes) => serde_json::from_slice(bytes)
            .with_context(|| format!("the stored record of job {uuid} is unreadable"))?,
        None => fresh(),
    };
    if !change(&mut record) && old.is_some() {
        return Ok(record);
    }
    record.updated_at = Utc::now();
    tx.insert(
        &t.jobs,
        uuid.as_bytes().as_slice(),
        serde_json::to_vec(&record)?,
    );
    tx.insert(&t.by_time, time_key(&record), EMPTY);
    Ok(record)
}

/// Removes the `unpublished` entry of `uuid` in `tx` if the attempt it names passes `which`.
fn clear_pending(
    tx: &mut WriteTx,
    t: &Trees,
    uuid: JobId,
    which: impl Fn(u32) -> bool,
) -> anyhow::Result<()> {
    let Some(old) = tx.get(&t.unpublished, uuid.as_bytes())? else {
        return Ok(());
    };
    if read_pending(&old).is_none_or(|(attempt, _)| which(attempt)) {
        tx.remove(&t.unpublished, uuid.as_bytes().as_slice());
    }
    Ok(())
}

/// A store failure that its callers decide on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A write or a flush did not reach the disk (full, read-only, failing): the same write
    /// fails again until something changes outside, so input that needs a write must wait.
    #[error("the store cannot write: {0}")]
    Unwritable(String),
}

/// Whether `e` is the store failing to write (as opposed to refusing what it was given),
/// judged by the error's types along its chain.
pub fn is_unwritable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<StoreError>(),
            Some(StoreError::Unwritable(_))
        ) || matches!(
            cause.downcast_ref::<fjall::Error>(),
            Some(
                fjall::Error::Io(_)
                    | fjall::Error::Poisoned
                    | fjall::Error::Storage(fjall::LsmError::Io(_))
            )
        )
    })
}

/// A log line too long for a reply, cut to fit `budget` bytes, with a mark that says so and
/// where the whole line is.
fn cut_line(mut line: LogLine, budget: usize, whole: &Path) -> LogLine {
    let total = line.message.len();
    // Escaping may make the JSON up to six times the text: cut until it fits.
    let mut keep = budget / 2;
    loop {
        let mut end = keep.min(total);
        while !line.message.is_char_boundary(end) {
            end -= 1;
        }
        let mut message = line.message[..end].to_owned();
        message.push_str(&format!(
            " … [rota: line cut after {end} of {total} bytes to fit the reply; the whole line is in {}]",
            whole.display()
        ));
        let fits = serde_json::to_vec(&LogLine {
            message: message.clone(),
            ..line.clone()
        })
        .map_or(true, |v| v.len() < budget);
        if fits || keep == 0 {
            line.message = message;
            return line;
        }
        keep /= 2;
    }
}

/// What [`Store::probe`] writes beside the database to learn whether the disk has room: room
/// for a journal's buffer and a memtable written out, and some.
const PROBE_BYTES: usize = 1024 * 1024;

fn timer_key(at: DateTime<Utc>, uuid: JobId) -> Vec<u8> {
    let nanos = at.timestamp_nanos_opt().unwrap_or_default().max(0);
    let mut k = nanos.to_be_bytes().to_vec();
    k.extend_from_slice(uuid.as_bytes());
    k
}

pub(crate) fn pair_key(a: JobId, b: JobId) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(a.as_bytes());
    k[16..].copy_from_slice(b.as_bytes());
    k
}

pub(crate) fn id_from(bytes: &[u8]) -> Option<JobId> {
    uuid::Uuid::from_slice(bytes).ok().map(JobId)
}

/// A page of log lines by attempt, and where the next page starts (attempt, line) when
/// more follow.
pub type LogsPage = (Vec<(u32, Vec<LogLine>)>, Option<(u32, usize)>);

/// What recording a result did.
#[derive(Debug)]
pub enum Recorded {
    /// First time this run was recorded (or its first copy since a flush that failed, see
    /// [`Undurable`]): the job's record after it.
    New(Box<JobRecord>),
    /// This run was recorded before; nothing changed.
    Duplicate,
}

/// A result as the store keeps it: the job it carries is left out, since the job's record
/// holds it (results stored by older versions carry it; it is read when there).
#[derive(Serialize, Deserialize)]
struct KeptResult<'a> {
    uuid: JobId,
    attempt: u32,
    #[serde(rename = "type")]
    work_type: Cow<'a, str>,
    agent: Cow<'a, AgentId>,
    worker: Cow<'a, str>,
    status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<Cow<'a, ErrorInfo>>,
    #[serde(default)]
    output: Cow<'a, serde_json::Value>,
    #[serde(default)]
    logs: Cow<'a, [LogLine]>,
    #[serde(default)]
    logs_dropped: u64,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    #[serde(default, skip_serializing)]
    job: Option<Job>,
}

impl<'a> KeptResult<'a> {
    fn of(r: &'a JobResult) -> Self {
        Self {
            uuid: r.uuid,
            attempt: r.attempt,
            work_type: Cow::Borrowed(&r.work_type),
            agent: Cow::Borrowed(&r.agent),
            worker: Cow::Borrowed(&r.worker),
            status: r.status,
            error: r.error.as_ref().map(Cow::Borrowed),
            output: Cow::Borrowed(&r.output),
            logs: Cow::Borrowed(&r.logs),
            logs_dropped: r.logs_dropped,
            started_at: r.started_at,
            finished_at: r.finished_at,
            job: None,
        }
    }

    /// The whole result again, with its job: the one it was stored with, or else `job` (the
    /// job of its record) as it was for this attempt.
    fn into_result(self, job: impl FnOnce() -> anyhow::Result<Job>) -> anyhow::Result<JobResult> {
        let job = match self.job {
            Some(job) => job,
            None => {
                let mut job = job()?;
                job.attempt = self.attempt;
                job
            }
        };
        Ok(JobResult {
            uuid: self.uuid,
            attempt: self.attempt,
            work_type: self.work_type.into_owned(),
            agent: self.agent.into_owned(),
            worker: self.worker.into_owned(),
            status: self.status,
            error: self.error.map(Cow::into_owned),
            output: self.output.into_owned(),
            logs: self.logs.into_owned(),
            logs_dropped: self.logs_dropped,
            started_at: self.started_at,
            finished_at: self.finished_at,
            job,
        })
    }
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

impl Store {
    /// Opens the store in `dir` (`dir/store`, job folders in `dir/work`), with a cache of
    /// about `cache_bytes`, first moving a sled store of an older version to fjall.
    pub fn open(dir: &Path, policy: RetryPolicy, cache_bytes: u64) -> anyhow::Result<Self> {
        let path = dir.join("store");
        migrate_from_sled(&path)?;
        let trees = Trees::open(&path, cache_bytes)?;
        if trees.paused.get(PAUSED)?.is_none() {
            // A new store's set is newer than any an agent kept from an earlier one.
            let first = PausedQueues {
                version: now_ms(),
                queues: Vec::new(),
                limited: Vec::new(),
            };
            let mut tx = trees.db.write_tx();
            tx.insert(&trees.paused, PAUSED, serde_json::to_vec(&first)?);
            tx.commit()?;
        }
        Ok(Self {
            db: Arc::new(RwLock::new(Some(Arc::new(trees)))),
            path,
            work_root: dir.join("work"),
            policy,
            publishing: Arc::default(),
            undurable: Arc::default(),
            cache_bytes,
            writer: Arc::new(Writer::start()?),
            moved: Arc::default(),
        })
    }

    /// Runs `op` on the writer thread and returns what it returns.
    pub async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let store = self.clone();
        let op: WriteOp = Box::new(move || {
            let _ = tx.send(op(&store));
        });
        let gone = || anyhow::anyhow!("the store's writer thread failed on this write");
        self.writer
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(op)
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// The open database's trees.
    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                StoreError::Unwritable("the store is closed until it writes again".into())
            })
    }

    /// Notes waiting jobs that a committed write moved on.
    fn moved_on(&self, records: Vec<JobRecord>) {
        if !records.is_empty() {
            self.moved
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(records);
        }
    }

    /// The waiting jobs moved on since the last call (queued, held, or ended), each as it was
    /// then: durable after the next [`Store::flush`].
    pub fn take_moved(&self) -> Vec<JobRecord> {
        std::mem::take(&mut *self.moved.lock().unwrap_or_else(PoisonError::into_inner))
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
            next_run_at: None,
            children: Vec::new(),
            reason: None,
            superseded_by: None,
            waiting_for: Vec::new(),
        }
    }

    /// Records a submitted job (its uuid set): queued and not yet published, or held, or
    /// expired (see [`insert_new`]). Returns the existing record instead if the uuid is known
    /// or a job holds its unique key, whether it is new, and the job it superseded.
    pub async fn submit(&self, job: Job) -> anyhow::Result<Inserted> {
        let t = self.trees()?;
        let uuid = job.uuid.context("a submitted job needs its uuid")?;
        let fresh = self.new_record(job, uuid, JobState::Queued);
        // The transaction (its lock) ends before the flush is awaited.
        let mut out = {
            let mut tx = t.db.write_tx();
            let out = insert_new(&mut tx, &t, fresh, Utc::now())?;
            tx.commit()?;
            out
        };
        self.moved_on(std::mem::take(&mut out.follow_ups));
        if out.new {
            self.flush().await?;
        }
        Ok(out)
    }

    /// Records submitted jobs (their uuids set) at once, in order, as [`Store::submit`]
    /// does; `link` may change each job before it is recorded, from the records of the jobs
    /// before it (a group's callback or a chain's link set to wait for them). Nothing is
    /// recorded if one cannot be.
    pub async fn submit_all(
        &self,
        jobs: Vec<Job>,
        link: impl Fn(&[Inserted], &mut Job),
    ) -> anyhow::Result<Vec<Inserted>> {
        let t = self.trees()?;
        let now = Utc::now();
        // The transaction (its lock) ends before the flush is awaited.
        let mut out: Vec<Inserted> = Vec::with_capacity(jobs.len());
        {
            let mut tx = t.db.write_tx();
            for mut job in jobs {
                link(&out, &mut job);
                let uuid = job.uuid.context("a submitted job needs its uuid")?;
                let fresh = self.new_record(job, uuid, JobState::Queued);
                out.push(insert_new(&mut tx, &t, fresh, now)?);
            }
            tx.commit()?;
        }
        for inserted in &mut out {
            self.moved_on(std::mem::take(&mut inserted.follow_ups));
        }
        if out.iter().any(|i| i.new) {
            self.flush().await?;
        }
        Ok(out)
    }

    /// Records the jobs of a schedule's fire times `instants` (those after its last fire
    /// time), and moves the schedule on to `through` and `next`, in one transaction: a fire
    /// time is handled once, whatever crashes or runs twice. Returns the new jobs' records.
    pub async fn fire(
        &self,
        name: &str,
        instants: &[DateTime<Utc>],
        through: DateTime<Utc>,
        next: Option<DateTime<Utc>>,
    ) -> anyhow::Result<Vec<JobRecord>> {
        let t = self.trees()?;
        let now = Utc::now();
        // The transaction (its lock) ends before the flush is awaited.
        let out = {
            let mut tx = t.db.write_tx();
            let Some(bytes) = tx.get(&t.schedules, name)? else {
                return Ok(Vec::new()); // removed meanwhile
            };
            let mut info: ScheduleInfo = serde_json::from_slice(&bytes)?;
            if info.paused || info.last_fire.is_some_and(|last| last >= through) {
                return Ok(Vec::new()); // paused meanwhile, or handled already
            }
            let mut out = Vec::new();
            let mut moved = Vec::new();
            for at in instants {
                if info.last_fire.is_some_and(|last| last >= *at) {
                    continue;
                }
                let uuid = JobId::random();
                let mut job = info.spec.job();
                job.uuid = Some(uuid);
                job.run_at = Some(*at);
                let mut inserted = insert_new(
                    &mut tx,
                    &t,
                    self.new_record(job, uuid, JobState::Queued),
                    now,
                )?;
                moved.append(&mut inserted.follow_ups);
                info.last_job = Some(inserted.record.uuid);
                if inserted.new {
                    out.push(inserted.record);
                }
            }
            info.last_fire = Some(through);
            info.next_fire = next;
            tx.insert(&t.schedules, name, serde_json::to_vec(&info)?);
            tx.commit()?;
            self.moved_on(moved);
            out
        };
        self.flush().await?;
        Ok(out)
    }

    /// The held jobs whose time has come (at most `limit`), oldest first.
    pub fn due(&self, now: DateTime<Utc>, limit: usize) -> anyhow::Result<Vec<JobId>> {
        let t = self.trees()?;
        let end = timer_key(now, JobId(uuid::Uuid::max()));
        let mut out = Vec::new();
        for item in t.db.read_tx().range(&t.timers, ..=end).take(limit) {
            let key = item.key()?;
            out.extend(id_from(&key[8..]));
        }
        Ok(out)
    }

    /// When the next held job is due.
    pub fn next_due(&self) -> anyhow::Result<Option<DateTime<Utc>>> {
        let t = self.trees()?;
        let Some(first) = t.timers.first_key_value() else {
            return Ok(None);
        };
        let key = first.key()?;
        let nanos = key.get(..8).context("a timer's key starts with its time")?;
        Ok(Some(DateTime::from_timestamp_nanos(i64::from_be_bytes(
            nanos.try_into()?,
        ))))
    }

    /// Moves a held job whose time has come to `queued` (to publish) or `throttled` (see
    /// [`queue_or_hold`]), or to `expired` when its deadline has passed (a throttled job too),
    /// and drops its timers. Returns its record if it changed: to publish now when `queued`.
    pub async fn release(
        &self,
        uuid: JobId,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Option<JobRecord>> {
        let t = self.trees()?;
        // The transaction (its lock) ends before the flush is awaited.
        let out = {
            let mut tx = t.db.write_tx();
            // The job's due timers go (a job held for later keeps its later one).
            let end = timer_key(now, JobId(uuid::Uuid::max()));
            let mut due = Vec::new();
            for item in tx.range(&t.timers, ..=end) {
                let key = item.key()?;
                if id_from(&key[8..]) == Some(uuid) {
                    due.push(key);
                }
            }
            for key in due {
                tx.remove(&t.timers, key);
            }
            let out = match tx.get(&t.jobs, uuid.as_bytes())? {
                Some(bytes) => {
                    let mut record: JobRecord = serde_json::from_slice(&bytes)?;
                    let limits = limits::all(&tx, &t.limit_spaces())?;
                    let deadline = record.job.expires_at.filter(|d| *d <= now);
                    let due = record.state == JobState::Scheduled
                        && record.next_run_at.is_some_and(|at| at <= now);
                    let expired = record.state == JobState::Throttled && deadline.is_some();
                    if due || expired {
                        let due_at = record.next_run_at.take();
                        record.updated_at = now;
                        match deadline {
                            Some(deadline) => {
                                record.reason = Some(match due_at {
                                    Some(at) => format!(
                                        "due at {at} and looked at {now}, past its deadline \
                                         {deadline}: not run"
                                    ),
                                    None => format!(
                                        "{} until {now}, past its deadline {deadline}: not run",
                                        record.reason.as_deref().unwrap_or("throttled")
                                    ),
                                });
                                limits::forget(&mut tx, &t.limit_spaces(), &limits, &record)?;
                                record.state = JobState::Expired;
                                free_key(&mut tx, &t, &record)?;
                            }
                            None => {
                                queue_or_hold(&mut tx, &t, &limits, &mut record, None, now)?;
                            }
                        }
                        Some(record)
                    } else {
                        None
                    }
                }
                None => None,
            };
            let mut moved = Vec::new();
            if let Some(record) = &out {
                tx.insert(
                    &t.jobs,
                    uuid.as_bytes().as_slice(),
                    serde_json::to_vec(record)?,
                );
                // Queued (to publish) or throttled by `queue_or_hold`, or ended (expired).
                if record.state.is_final() {
                    moved = groups::ended(&mut tx, &t, record, now)?;
                }
            }
            tx.commit()?;
            self.moved_on(moved);
            out
        };
        self.flush().await?;
        Ok(out)
    }

    /// Cancels a job held in `scheduled`, `throttled` or `waiting`: it ends `cancelled`
    /// without running (again, for a job whose Work ended and waits for its children).
    /// Returns None if the job is not held (then agents must be told).
    pub async fn cancel_scheduled(&self, uuid: JobId) -> anyhow::Result<Option<JobRecord>> {
        let t = self.trees()?;
        // The transaction (its lock) ends before the flush is awaited.
        let record = {
            let mut tx = t.db.write_tx();
            let Some(bytes) = tx.get(&t.jobs, uuid.as_bytes())? else {
                return Ok(None);
            };
            let mut record: JobRecord = serde_json::from_slice(&bytes)?;
            if !matches!(
                record.state,
                JobState::Scheduled | JobState::Throttled | JobState::Waiting
            ) {
                return Ok(None);
            }
            let limits = limits::all(&tx, &t.limit_spaces())?;
            limits::forget(&mut tx, &t.limit_spaces(), &limits, &record)?;
            if let Some(at) = record.next_run_at.take() {
                tx.remove(&t.timers, timer_key(at, uuid));
            }
            groups::stop_waiting(&mut tx, &t, &mut record);
            record.state = JobState::Cancelled;
            record.cancel_requested = true;
            record.updated_at = Utc::now();
            if let Some(key) = &record.job.unique_key
                && tx.get(&t.unique, key.as_bytes())?.as_deref() == Some(uuid.as_bytes().as_slice())
            {
                tx.remove(&t.unique, key.as_str());
            }
            tx.insert(
                &t.jobs,
                uuid.as_bytes().as_slice(),
                serde_json::to_vec(&record)?,
            );
            let moved = groups::ended(&mut tx, &t, &record, record.updated_at)?;
            tx.commit()?;
            self.moved_on(moved);
            record
        };
        self.flush().await?;
        Ok(Some(record))
    }

    /// Queues a job that ended without success once more, as its next attempt (or holds it
    /// for its limits).
    pub async fn retry(&self, uuid: JobId) -> anyhow::Result<JobRecord> {
        let t = self.trees()?;
        // The transaction (its lock) ends before the flush is awaited.
        let record = {
            let mut tx = t.db.write_tx();
            let Some(bytes) = tx.get(&t.jobs, uuid.as_bytes())? else {
                anyhow::bail!("no job {uuid} is recorded");
            };
            let mut record: JobRecord = serde_json::from_slice(&bytes)?;
            if !record.state.is_final() {
                anyhow::bail!(
                    "job {uuid} is {}, not over: there is nothing to retry yet",
                    record.state
                );
            }
            if record.state == JobState::Succeeded {
                anyhow::bail!(
                    "job {uuid} succeeded: there is nothing to retry (submit it again instead)"
                );
            }
            let last = record.attempts.iter().map(|a| a.attempt).max().unwrap_or(0);
            let Some(next) = last.max(record.job.attempt).checked_add(1) else {
                anyhow::bail!("job {uuid} has used every attempt number: submit it again instead");
            };
            record.job.attempt = next;
            record.cancel_requested = false;
            record.next_run_at = None;
            record.updated_at = Utc::now();
            if let Some(key) = &record.job.unique_key {
                let free = match tx.get(&t.unique, key.as_bytes())? {
                    None => true,
                    Some(holder) => match tx.get(&t.jobs, &holder)? {
                        Some(b) => serde_json::from_slice::<JobRecord>(&b)?.state.is_final(),
                        None => true,
                    },
                };
                if free {
                    tx.insert(&t.unique, key.as_str(), uuid.as_bytes().as_slice());
                }
            }
            let limits = limits::all(&tx, &t.limit_spaces())?;
            let now = record.updated_at;
            queue_or_hold(&mut tx, &t, &limits, &mut record, None, now)?;
            tx.insert(
                &t.jobs,
                uuid.as_bytes().as_slice(),
                serde_json::to_vec(&record)?,
            );
            tx.commit()?;
            record
        };
        self.flush().await?;
        Ok(record)
    }

    /// The jobs that `parent`'s Work submitted.
    pub fn children_of(&self, parent: JobId) -> anyhow::Result<Vec<JobId>> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for item in t.db.read_tx().prefix(&t.children, parent.as_bytes()) {
            out.extend(id_from(&item.key()?[16..]));
        }
        Ok(out)
    }

    /// Every schedule, by name.
    pub fn schedules(&self) -> anyhow::Result<Vec<ScheduleInfo>> {
        let t = self.trees()?;
        t.db.read_tx()
            .iter(&t.schedules)
            .map(|item| Ok(serde_json::from_slice(&item.value()?)?))
            .collect()
    }

    pub fn schedule(&self, name: &str) -> anyhow::Result<Option<ScheduleInfo>> {
        let t = self.trees()?;
        match t.schedules.get(name)? {
            Some(b) => Ok(Some(serde_json::from_slice(&b)?)),
            None => Ok(None),
        }
    }

    /// Replaces schedule `name` with what `change` makes of it (None removes it), atomically;
    /// `change` may refuse with a message.
    pub async fn update_schedule(
        &self,
        name: &str,
        change: impl Fn(Option<ScheduleInfo>) -> Result<Option<ScheduleInfo>, String>,
    ) -> anyhow::Result<Option<ScheduleInfo>> {
        let t = self.trees()?;
        // The transaction (its lock) ends before the flush is awaited.
        let out = {
            let mut tx = t.db.write_tx();
            let old = match tx.get(&t.schedules, name)? {
                Some(b) => Some(serde_json::from_slice::<ScheduleInfo>(&b)?),
                None => None,
            };
            let out = change(old).map_err(anyhow::Error::msg)?;
            match &out {
                Some(info) => tx.insert(&t.schedules, name, serde_json::to_vec(info)?),
                None => tx.remove(&t.schedules, name),
            }
            tx.commit()?;
            out
        };
        self.flush().await?;
        Ok(out)
    }

    /// The paused queues.
    pub fn paused(&self) -> anyhow::Result<PausedQueues> {
        let t = self.trees()?;
        let bytes = t
            .paused
            .get(PAUSED)?
            .context("the paused queues are missing")?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Pauses `queue` (`pause`), or resumes it, durably; returns the paused queues and
    /// whether they changed (a new version).
    pub async fn set_paused(
        &self,
        queue: &str,
        pause: bool,
    ) -> anyhow::Result<(PausedQueues, bool)> {
        let t = self.trees()?;
        // The transaction (its lock) ends before the flush is awaited.
        let (paused, changed) = {
            let mut tx = t.db.write_tx();
            let bytes = tx
                .get(&t.paused, PAUSED)?
                .context("the paused queues are missing")?;
            let mut paused: PausedQueues = serde_json::from_slice(&bytes)?;
            let was = paused.contains(queue);
            if was == pause {
                return Ok((paused, false));
            }
            anyhow::ensure!(
                !pause || paused.queues.len() < rota_common::wire::MAX_PAUSED,
                "{} queues are paused already, the most there may be: resume some first",
                paused.queues.len()
            );
            if pause {
                paused.queues.push(queue.to_owned());
                paused.queues.sort();
            } else {
                paused.queues.retain(|q| q != queue);
            }
            paused.version = now_ms().max(paused.version + 1);
            tx.insert(&t.paused, PAUSED, serde_json::to_vec(&paused)?);
            tx.commit()?;
            (paused, true)
        };
        self.flush().await?;
        Ok((paused, changed))
    }

    /// Sets the rate, the concurrency or both of the limit on `limit.scope` (what `limit` does
    /// not give stays as it was), durably, and makes the paused queues' version newer when
    /// the scopes that agents must know change. Returns the limits and whether they changed.
    pub async fn set_limit(&self, limit: Limit) -> anyhow::Result<(Vec<LimitInfo>, bool)> {
        self.change_limit(&limit.scope.clone(), |old| {
            let mut new = old.cloned().unwrap_or_else(|| Limit {
                scope: limit.scope.clone(),
                rate: None,
                concurrency: None,
            });
            new.rate = limit.rate.or(new.rate);
            new.concurrency = limit.concurrency.or(new.concurrency);
            Some(new)
        })
        .await
    }

    /// Clears the limit on `scope` (only its `kind` when given), durably: what it counted is
    /// forgotten, and the jobs it holds are for the clock to release.
    pub async fn clear_limit(
        &self,
        scope: &LimitScope,
        kind: Option<LimitKind>,
    ) -> anyhow::Result<(Vec<LimitInfo>, bool)> {
        self.change_limit(scope, |old| {
            let mut new = old?.clone();
            match kind {
                Some(LimitKind::Rate) => new.rate = None,
                Some(LimitKind::Concurrency) => new.concurrency = None,
                None => return None,
            }
            (new.rate.is_some() || new.concurrency.is_some()).then_some(new)
        })
        .await
    }

    /// Replaces the limit on `scope` with what `change` makes of it (None: no limit).
    async fn change_limit(
        &self,
        scope: &LimitScope,
        change: impl FnOnce(Option<&Limit>) -> Option<Limit>,
    ) -> anyhow::Result<(Vec<LimitInfo>, bool)> {
        let t = self.trees()?;
        let s = t.limit_spaces();
        let key = limits::scope_key(scope);
        // The transaction (its lock) ends before the flush is awaited.
        let changed = {
            let mut tx = t.db.write_tx();
            let old: Option<Limit> = match tx.get(&t.limits, &key)? {
                Some(b) => Some(serde_json::from_slice(&b)?),
                None => None,
            };
            let new = change(old.as_ref());
            if new == old {
                false
            } else {
                if let Some(old) = &old {
                    limits::cleared(&mut tx, &s, old, new.as_ref())?;
                }
                match &new {
                    Some(limit) => {
                        anyhow::ensure!(
                            old.is_some() || tx.iter(&t.limits).count() < MAX_LIMITS,
                            "{MAX_LIMITS} limits are set already, the most there may be: clear some first"
                        );
                        tx.insert(&t.limits, &key, serde_json::to_vec(limit)?)
                    }
                    None => tx.remove(&t.limits, key),
                }
                if old.is_none() || new.is_none() {
                    // What agents hand to the scheduler changed: they hear it with the
                    // paused queues, as a new version.
                    let bytes = tx
                        .get(&t.paused, PAUSED)?
                        .context("the paused queues are missing")?;
                    let mut paused: PausedQueues = serde_json::from_slice(&bytes)?;
                    paused.limited = limits::all(&tx, &s)?.into_iter().map(|l| l.scope).collect();
                    paused.version = now_ms().max(paused.version + 1);
                    tx.insert(&t.paused, PAUSED, serde_json::to_vec(&paused)?);
                }
                tx.commit()?;
                true
            }
        };
        if changed {
            self.flush().await?;
        }
        Ok((self.limits()?, changed))
    }

    /// Every limit, with the jobs it holds.
    pub fn limits(&self) -> anyhow::Result<Vec<LimitInfo>> {
        let t = self.trees()?;
        limits::usage(&t.db.read_tx(), &t.limit_spaces())
    }

    /// Whether any job is held `throttled`.
    pub fn throttling(&self) -> bool {
        self.trees()
            .is_ok_and(|t| t.limit_waiting.first_key_value().is_some())
    }

    /// Publishes (moves to `queued`, at most `max` of them) the throttled jobs that their
    /// limits allow now, each queue's jobs in the order they came; a job that a limit no
    /// longer holds goes too. Returns them (more may follow when there are `max`), and when a
    /// rate allows the next of those it looked at.
    pub async fn admit_throttled(
        &self,
        max: usize,
    ) -> anyhow::Result<(Vec<JobRecord>, Option<DateTime<Utc>>)> {
        if !self.throttling() {
            return Ok((Vec::new(), None));
        }
        let t = self.trees()?;
        let s = t.limit_spaces();
        let mut admitted = Vec::new();
        let mut wake = None;
        // The transaction (its lock) ends before the flush is awaited.
        let changed = {
            let mut tx = t.db.write_tx();
            // Taken with the lock: a rate counts the time the admission is made.
            let now = Utc::now();
            let limits = limits::all(&tx, &s)?;
            let mut changed = false;
            let mut after: Option<Vec<u8>> = None;
            while let Some(limits::Head { key, queue, uuid }) =
                limits::next_head(&tx, &s, after.as_deref())?
            {
                if admitted.len() >= max {
                    break;
                }
                let record = match uuid {
                    Some(uuid) => tx.get(&t.jobs, uuid.as_bytes())?,
                    None => None,
                };
                let record = record
                    .map(|b| serde_json::from_slice::<JobRecord>(&b))
                    .transpose()?;
                let Some(mut record) = record.filter(|r| r.state == JobState::Throttled) else {
                    // Over meanwhile (cancelled, expired).
                    tx.remove(&t.limit_waiting, key);
                    changed = true;
                    continue;
                };
                let reason = record.reason.clone();
                match queue_or_hold(&mut tx, &t, &limits, &mut record, Some(&key), now)? {
                    Gate::Open => admitted.push(record.clone()),
                    Gate::Held { retry_at, .. } => {
                        if let Some(at) = retry_at {
                            wake = Some(wake.map_or(at, |w: DateTime<Utc>| w.min(at)));
                        }
                        if tx.get(&t.limit_waiting, &key)?.is_some() {
                            // Still first of its queue: the next queue.
                            after = Some(limits::queue_end(&queue));
                        }
                        if record.reason == reason {
                            continue;
                        }
                    }
                }
                record.updated_at = now;
                tx.insert(
                    &t.jobs,
                    record.uuid.as_bytes().as_slice(),
                    serde_json::to_vec(&record)?,
                );
                changed = true;
            }
            if changed {
                tx.commit()?;
            }
            changed
        };
        if changed {
            self.flush().await?;
        }
        Ok((admitted, wake))
    }

    /// Removes the finished jobs last changed before `cutoff`: their records, results and
    /// index entries (at most `limit` jobs). Returns their folders, to delete once the store
    /// is flushed. Nothing that is not over is touched.
    pub fn purge(&self, cutoff: DateTime<Utc>, limit: usize) -> anyhow::Result<Vec<PathBuf>> {
        let t = self.trees()?;
        // Created before the cutoff is necessary (a record changes only after it is created).
        let end = timer_key(cutoff, JobId(uuid::Uuid::nil()));
        let mut dirs = Vec::new();
        for item in t.db.read_tx().range(&t.by_time, ..end) {
            if dirs.len() >= limit {
                break;
            }
            let key = item.key()?;
            let Some(uuid) = id_from(&key[8..]) else {
                continue;
            };
            // One job at a time, each whole or not at all.
            let mut tx = t.db.write_tx();
            if let Some(bytes) = tx.get(&t.jobs, uuid.as_bytes())? {
                let record: JobRecord = serde_json::from_slice(&bytes)?;
                if !record.state.is_final() || record.updated_at >= cutoff {
                    continue;
                }
                let mut gone = Vec::new();
                for item in tx.prefix(&t.results, uuid.as_bytes()) {
                    gone.push((&t.results, item.key()?));
                }
                for item in tx.prefix(&t.children, uuid.as_bytes()) {
                    gone.push((&t.children, item.key()?));
                }
                for (keyspace, key) in gone {
                    tx.remove(keyspace, key);
                }
                if let Some(parent) = record.job.parent {
                    tx.remove(&t.children, pair_key(parent, uuid).as_slice());
                }
                if let Some(unique) = &record.job.unique_key
                    && tx.get(&t.unique, unique.as_bytes())?.as_deref()
                        == Some(uuid.as_bytes().as_slice())
                {
                    tx.remove(&t.unique, unique.as_str());
                }
                tx.remove(&t.unpublished, uuid.as_bytes().as_slice());
                tx.remove(&t.jobs, uuid.as_bytes().as_slice());
            }
            tx.remove(&t.by_time, key);
            tx.commit()?;
            dirs.push(self.job_dir(uuid));
        }
        Ok(dirs)
    }

    /// Claims the publish of attempt `attempt` of job `uuid`: None when another pass holds
    /// it, or when that attempt no longer waits to be published (published meanwhile, or
    /// superseded). Only the holder of the claim publishes.
    pub fn claim(&self, uuid: JobId, attempt: u32) -> anyhow::Result<Option<PublishClaim>> {
        let t = self.trees()?;
        // Held across the check and the insert (no await inside): two passes cannot both
        // find the attempt waiting and unclaimed.
        let mut held = self
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if held.contains(&(uuid, attempt)) {
            return Ok(None);
        }
        let waiting = t
            .unpublished
            .get(uuid.as_bytes())?
            .is_some_and(|v| pending_is(&v, attempt));
        if !waiting {
            return Ok(None);
        }
        held.insert((uuid, attempt));
        Ok(Some(PublishClaim {
            uuid,
            attempt,
            publishing: self.publishing.clone(),
        }))
    }

    /// The broker confirmed the claimed attempt: it no longer needs publishing (a later
    /// attempt that waits meanwhile stays waiting).
    pub fn published(&self, claim: &PublishClaim) -> anyhow::Result<()> {
        let t = self.trees()?;
        let mut tx = t.db.write_tx();
        clear_pending(&mut tx, &t, claim.uuid, |attempt| attempt == claim.attempt)?;
        tx.commit()?;
        Ok(())
    }

    /// The jobs the republish pass should queue: recorded but not confirmed, handed over to
    /// be published before `cutoff`, and not being published by another pass right now.
    pub fn republishable(&self, cutoff: DateTime<Utc>) -> anyhow::Result<Vec<JobRecord>> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for item in t.db.read_tx().iter(&t.unpublished) {
            let (key, value) = item.into_inner()?;
            let Some(uuid) = id_from(&key) else {
                continue;
            };
            let Some(record) = self.get(uuid)? else {
                continue;
            };
            let (attempt, since) =
                read_pending(&value).unwrap_or((record.job.attempt, record.updated_at));
            let claimed = self
                .publishing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&(uuid, attempt));
            if since <= cutoff && !claimed && record.job.attempt == attempt {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Jobs recorded but not confirmed by the broker (to publish after a crash or outage).
    pub fn unpublished(&self) -> anyhow::Result<Vec<JobRecord>> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for item in t.db.read_tx().iter(&t.unpublished) {
            if let Some(bytes) = t.jobs.get(item.key()?)? {
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
        fresh: impl FnOnce() -> JobRecord,
        change: impl FnOnce(&mut JobRecord) -> bool,
    ) -> anyhow::Result<JobRecord> {
        let t = self.trees()?;
        let mut tx = t.db.write_tx();
        let record = update(&mut tx, &t, uuid, fresh, change)?;
        tx.commit()?;
        Ok(record)
    }

    /// Notes that a run started (from a `job.started` event). Creates the record of a job
    /// published straight to RabbitMQ; never moves a finished job back. Returns the record.
    pub fn started(&self, event: &Event) -> anyhow::Result<Option<JobRecord>> {
        let Some(job) = &event.job else {
            return Ok(None);
        };
        let fresh = || self.new_record(job.clone(), event.uuid, JobState::Running);
        self.update(event.uuid, fresh, |record| {
            // Over, already noted, or an older attempt than the one the record waits for.
            if record.state.is_final()
                || event.attempt < record.job.attempt
                || record.attempts.iter().any(|a| a.attempt == event.attempt)
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
    /// One transaction keeps the result if this run has none yet, brings the job's record and
    /// its indexes in line with the result kept, and clears the job's wait to be published.
    /// It runs alone (fjall's single writer) and sees every transaction committed before it,
    /// so two copies of a result, on whatever threads, cannot both find the run unrecorded.
    pub fn record(&self, result: &JobResult) -> anyhow::Result<Recorded> {
        let t = self.trees()?;
        let key = result_key(result.uuid, result.attempt);
        let mut tx = t.db.write_tx();
        let stored;
        let (won, winner) = match tx.get(&t.results, key)? {
            None => {
                let kept = serde_json::to_vec(&KeptResult::of(result))?;
                tx.insert(&t.results, key.as_slice(), kept);
                (true, result)
            }
            Some(bytes) => {
                // The job of a run is the same in every copy of its result.
                let kept: KeptResult = serde_json::from_slice(&bytes)?;
                stored = kept.into_result(|| Ok(result.job.clone()))?;
                (false, &stored)
            }
        };
        // A job first seen through its result (published straight to RabbitMQ): its record
        // is made from the job the result carries.
        let fresh = || self.new_record(winner.job.clone(), winner.uuid, JobState::Queued);
        let mut settled = false;
        let mut record = update(&mut tx, &t, winner.uuid, fresh, |record| {
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
            if winner.attempt >= record.job.attempt
                && record.attempts.iter().all(|a| a.attempt <= winner.attempt)
            {
                record.job.attempt = winner.attempt;
                self.policy.settle(record, winner.status, Utc::now());
                settled = true;
            }
            true
        })?;
        // A run that ended its job moves on the jobs waiting for it; a Work may ask that
        // its job wait for its children first.
        let mut moved = Vec::new();
        if settled {
            if groups::after_run(&mut tx, &t, &mut record)? {
                write(&mut tx, &t, &record)?;
            }
            if record.state.is_final() {
                moved = groups::ended(&mut tx, &t, &record, Utc::now())?;
            }
        }
        // The indexes that follow a record's state: a held job has its timer; a job that is
        // over gives back its unique key (or keeps it for its `unique_for_s`).
        if record.state == JobState::Scheduled
            && let Some(at) = record.next_run_at
        {
            tx.insert(&t.timers, timer_key(at, record.uuid), EMPTY);
        }
        if record.state.is_final() {
            free_key(&mut tx, &t, &record)?;
        }
        // Over, waiting for a retry (which comes through the limits again) or for its
        // children (its Work ended; were it to keep its slot, children under the same limit
        // could never start): its slots go.
        if record.state.is_final()
            || matches!(record.state, JobState::Scheduled | JobState::Waiting)
        {
            let limits = limits::all(&tx, &t.limit_spaces())?;
            limits::give_back(&mut tx, &t.limit_spaces(), &limits, &record)?;
        }
        // It ran, so it was published, whatever the broker's confirm said (a later attempt
        // that waits to be published still does).
        clear_pending(&mut tx, &t, result.uuid, |attempt| {
            attempt <= result.attempt
        })?;
        // A flush that fails between this commit and the note below owes the fresh runs, but
        // not yet this one: such a run is owed here at once. (Noted as fresh, its next copy,
        // read back from disk, would be a duplicate, never announced nor counted.)
        let failures = self.undurable().failures;
        tx.commit()?;
        self.moved_on(moved);
        let run = (result.uuid, result.attempt);
        let mut undurable = self.undurable();
        let missed = undurable.failures != failures;
        // Recorded before a flush that failed: this copy is the first one to count.
        let first = won || undurable.owed.remove(&run);
        if first && missed {
            undurable.owed.insert(run);
        } else if first {
            undurable.fresh.insert(run);
        }
        Ok(if first {
            Recorded::New(Box::new(record))
        } else {
            Recorded::Duplicate
        })
    }

    /// Marks a job as to be cancelled; returns its record.
    pub fn request_cancel(&self, uuid: JobId, fresh: &JobRecord) -> anyhow::Result<JobRecord> {
        self.update(
            uuid,
            || fresh.clone(),
            |record| {
                let change = !record.cancel_requested;
                record.cancel_requested = true;
                change
            },
        )
    }

    pub fn get(&self, uuid: JobId) -> anyhow::Result<Option<JobRecord>> {
        let t = self.trees()?;
        match t.jobs.get(uuid.as_bytes())? {
            Some(b) => Ok(Some(serde_json::from_slice(&b)?)),
            None => Ok(None),
        }
    }

    /// The recorded result of one run.
    pub fn result(&self, uuid: JobId, attempt: u32) -> anyhow::Result<Option<JobResult>> {
        let t = self.trees()?;
        let Some(bytes) = t.results.get(result_key(uuid, attempt))? else {
            return Ok(None);
        };
        let kept: KeptResult = serde_json::from_slice(&bytes)?;
        let job = || {
            let record = self.get(uuid)?;
            Ok(record.context("the result's job has no record")?.job)
        };
        kept.into_result(job).map(Some)
    }

    /// The log lines of every recorded run of a job.
    pub fn logs(&self, uuid: JobId) -> anyhow::Result<Vec<(u32, Vec<LogLine>)>> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for item in t.db.read_tx().prefix(&t.results, uuid.as_bytes()) {
            let v = item.value()?;
            let r: KeptResult = serde_json::from_slice(&v)?;
            out.push((r.attempt, r.logs.into_owned()));
        }
        Ok(out)
    }

    /// A page of jobs, newest first, optionally only those in `state`: those listed before
    /// the by-time key `before` (from the start when None), at most `limit` of them and no
    /// more stored bytes than `budget` (but at least one). Returns the page and, when more
    /// may follow, the key to continue before.
    pub fn list_page(
        &self,
        state: Option<JobState>,
        limit: usize,
        before: Option<&[u8]>,
        budget: usize,
    ) -> anyhow::Result<(Vec<JobRecord>, Option<Vec<u8>>)> {
        let t = self.trees()?;
        let snapshot = t.db.read_tx();
        let keys = match before {
            Some(key) => snapshot.range(&t.by_time, ..key),
            None => snapshot.iter(&t.by_time),
        };
        let mut out = Vec::new();
        let mut used = 0usize;
        let mut last: Option<Vec<u8>> = None;
        for item in keys.rev() {
            let key = item.key()?;
            if out.len() >= limit {
                return Ok((out, last));
            }
            let Some(bytes) = t.jobs.get(key.get(8..).unwrap_or_default())? else {
                continue;
            };
            let record: JobRecord = serde_json::from_slice(&bytes)?;
            if state.is_some_and(|s| s != record.state) {
                last = Some(key.to_vec());
                continue;
            }
            let size = bytes.len().saturating_add(1);
            if !out.is_empty() && used.saturating_add(size) > budget {
                return Ok((out, last));
            }
            used = used.saturating_add(size);
            out.push(record);
            last = Some(key.to_vec());
        }
        Ok((out, None))
    }

    /// A page of the log lines of job `uuid`, from line `from.1` of attempt `from.0` on: at
    /// most `limit` lines and about `budget` bytes of them (but at least one line; a line
    /// alone over the budget is cut, with a mark that says where the whole line is).
    /// Returns the lines by attempt and, when more follow, where the next page starts.
    pub fn logs_page(
        &self,
        uuid: JobId,
        from: (u32, usize),
        limit: usize,
        budget: usize,
    ) -> anyhow::Result<LogsPage> {
        let t = self.trees()?;
        let mut out = Vec::new();
        let mut used = 0usize;
        let mut count = 0usize;
        let range = result_key(uuid, from.0)..=result_key(uuid, u32::MAX);
        for item in t.db.read_tx().range(&t.results, range) {
            let v = item.value()?;
            let r: KeptResult = serde_json::from_slice(&v)?;
            let skip = if r.attempt == from.0 { from.1 } else { 0 };
            let mut lines = Vec::new();
            for (i, line) in r.logs.into_owned().into_iter().enumerate().skip(skip) {
                let size = serde_json::to_vec(&line)?.len().saturating_add(1);
                if count >= limit || (count > 0 && used.saturating_add(size) > budget) {
                    out.push((r.attempt, lines));
                    return Ok((out, Some((r.attempt, i))));
                }
                let line = if size > budget {
                    let whole = self.job_dir(uuid).join(format!("attempt-{}", r.attempt));
                    cut_line(line, budget, &whole.join("logs.txt"))
                } else {
                    line
                };
                used = used.saturating_add(size.min(budget));
                count += 1;
                lines.push(line);
            }
            out.push((r.attempt, lines));
        }
        Ok((out, None))
    }

    /// Newest jobs first, optionally only those in `state`.
    pub fn list(&self, state: Option<JobState>, limit: usize) -> anyhow::Result<Vec<JobRecord>> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for item in t.db.read_tx().iter(&t.by_time).rev() {
            if out.len() >= limit {
                break;
            }
            let key = item.key()?;
            let Some(bytes) = t.jobs.get(&key[8..])? else {
                continue;
            };
            let record: JobRecord = serde_json::from_slice(&bytes)?;
            if state.is_none_or(|s| s == record.state) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// About how many jobs are recorded: fjall's estimate, which counts a record rewritten
    /// (or removed) more than once until its tables are compacted.
    pub fn len(&self) -> usize {
        self.trees().map_or(0, |t| t.jobs.approximate_len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes the database and opens it again from disk. Needed after a write failed: fjall
    /// then refuses every later write (it is "poisoned"), and what it holds in memory may
    /// not be on disk; the database read back holds exactly what is, as after a crash.
    pub async fn reopen(&self) -> Result<(), StoreError> {
        let old = self
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut old) = old {
            // Callers hold the trees for one operation; a failing disk makes those quick.
            for _ in 0..100 {
                match Arc::try_unwrap(old) {
                    Ok(trees) => {
                        // Joins the flushing thread and fjall's workers: not on the runtime.
                        let _ = tokio::task::spawn_blocking(move || drop(trees)).await;
                        break;
                    }
                    Err(shared) => {
                        old = shared;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        // Jobs moved on by writes that may not have reached the disk: what did is in the
        // store read back (a released job waits in `unpublished`).
        self.take_moved();
        let (path, cache_bytes) = (self.path.clone(), self.cache_bytes);
        let trees = tokio::task::spawn_blocking(move || Trees::open(&path, cache_bytes))
            .await
            .map_err(|e| StoreError::Unwritable(format!("cannot reopen the store: {e}")))?
            .map_err(|e| StoreError::Unwritable(format!("{e:#}")))?;
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(trees));
        Ok(())
    }

    /// Whether the store writes again: a space check beside the database, then the database
    /// reopened (see [`Store::reopen`]) and one small write made durable.
    pub async fn probe(&self) -> Result<(), StoreError> {
        // A journal buffer's and a memtable's worth of bytes must fit, or reopening only
        // fails again.
        let room = self.path.with_extension("probe");
        let fits = tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            let written = std::fs::File::create(&room).and_then(|mut f| {
                f.write_all(&vec![0u8; PROBE_BYTES])?;
                f.sync_data()
            });
            let _ = std::fs::remove_file(&room);
            written
        })
        .await
        .map_err(|e| StoreError::Unwritable(e.to_string()))?;
        fits.map_err(|e| StoreError::Unwritable(format!("no room beside the store: {e}")))?;
        self.reopen().await?;
        let t = self.trees()?;
        let now = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        t.probe
            .insert("probe", now.to_be_bytes().as_slice())
            .map_err(|e| StoreError::Unwritable(e.to_string()))?;
        drop(t);
        self.flush()
            .await
            .map_err(|e| match e.downcast::<StoreError>() {
                Ok(e) => e,
                Err(e) => StoreError::Unwritable(format!("{e:#}")),
            })
    }

    /// Waits until every earlier write is on disk.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let t = self.trees()?;
        let covered: Vec<(JobId, u32)> = self.undurable().fresh.iter().copied().collect();
        let flushed = t.durable.commit().await;
        let mut undurable = self.undurable();
        match flushed {
            Ok(()) => {
                for run in &covered {
                    undurable.fresh.remove(run);
                }
                Ok(())
            }
            Err(e) => {
                let fresh = std::mem::take(&mut undurable.fresh);
                undurable.owed.extend(fresh);
                undurable.failures += 1;
                Err(StoreError::Unwritable(format!("cannot flush the store: {e}")).into())
            }
        }
    }

    fn undurable(&self) -> std::sync::MutexGuard<'_, Undurable> {
        self.undurable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use rota_common::wire::{AgentId, Level, Status};
    use serde_json::Value;

    use super::*;

    const CACHE: u64 = 8 * 1024 * 1024;

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
        let store = Store::open(dir.path(), RetryPolicy::default(), CACHE).expect("opens");
        let mut job = Job::new("demo.echo", Value::Null);
        job.uuid = Some(JobId::random());
        let Inserted {
            record: rec, new, ..
        } = store.submit(job.clone()).await.expect("submits");
        assert!(new);
        assert_eq!(rec.state, JobState::Queued);
        assert_eq!(store.unpublished().expect("reads").len(), 1);
        assert!(
            !store.submit(job.clone()).await.expect("submits").new,
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
        let store = Store::open(dir.path(), RetryPolicy::default(), CACHE).expect("opens");
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
            state: None,
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

    #[tokio::test]
    async fn a_job_first_seen_through_its_result_is_recorded_whole_from_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let mut job = job_with_id("demo.echo");
        job.payload = serde_json::json!({"n": 7});
        let uuid = job.uuid.expect("uuid");
        let result = result_of(&job, 1, Status::Succeeded);
        let Recorded::New(record) = store.record(&result).expect("records") else {
            panic!("a first result is new");
        };
        assert_eq!(record.state, JobState::Succeeded);
        assert_eq!(record.job.payload, job.payload);
        assert_eq!(store.list(None, 10).expect("lists")[0].uuid, uuid);
        // The stored result leaves its job out (the record has it) and gets it back.
        let t = store.trees().expect("open");
        let kept = t
            .results
            .get(result_key(uuid, 1))
            .expect("reads")
            .expect("kept");
        assert!(!String::from_utf8_lossy(&kept).contains("payload"));
        assert_eq!(store.result(uuid, 1).expect("reads"), Some(result.clone()));
        assert!(matches!(
            store.record(&result).expect("records"),
            Recorded::Duplicate
        ));
    }

    #[tokio::test]
    async fn a_result_stored_whole_by_an_older_version_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let job = job_with_id("demo.echo");
        let uuid = job.uuid.expect("uuid");
        store.submit(job.clone()).await.expect("submits");
        let old = result_of(&job, 1, Status::Succeeded);
        let t = store.trees().expect("open");
        let whole = serde_json::to_vec(&old).expect("json");
        t.results
            .insert(result_key(uuid, 1).as_slice(), whole)
            .expect("writes");
        assert_eq!(store.result(uuid, 1).expect("reads"), Some(old.clone()));
        assert_eq!(store.logs(uuid).expect("reads")[0].1, old.logs);
        // Its copy coming again is a duplicate, and brings the record in line.
        assert!(matches!(
            store.record(&old).expect("records"),
            Recorded::Duplicate
        ));
        let rec = store.get(uuid).expect("reads").expect("exists");
        assert_eq!(rec.state, JobState::Succeeded);
    }

    #[tokio::test]
    async fn the_writer_thread_records_for_every_clone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let job = job_with_id("demo.echo");
        let result = result_of(&job, 1, Status::Succeeded);
        let recorded = store
            .clone()
            .write(move |s| s.record(&result))
            .await
            .expect("the writer runs")
            .expect("records");
        assert!(matches!(recorded, Recorded::New(_)));
        store.flush().await.expect("flushes");
        assert!(store.get(job.uuid.expect("uuid")).expect("reads").is_some());
    }

    /// Pausing twice or resuming what is not paused changes nothing; each change has a higher
    /// version, and the set survives a reopen.
    #[tokio::test]
    async fn paused_queues_change_once_and_are_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(&dir);
        let first = store.paused().expect("reads");
        assert!(first.queues.is_empty() && first.version > 0);
        let (paused, changed) = store.set_paused("mail", true).await.expect("pauses");
        assert!(changed && paused.version > first.version);
        assert_eq!(paused.queues, ["mail"]);
        let (again, changed) = store.set_paused("mail", true).await.expect("pauses");
        assert!(!changed);
        assert_eq!(again, paused);
        let (_, changed) = store.set_paused("other", false).await.expect("resumes");
        assert!(!changed);
        drop(store);
        let store = open(&dir);
        assert_eq!(store.paused().expect("reads"), paused);
        let (resumed, changed) = store.set_paused("mail", false).await.expect("resumes");
        assert!(changed && resumed.version > paused.version && resumed.queues.is_empty());
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        Store::open(dir.path(), policy, CACHE).expect("opens")
    }

    fn job_with_id(work_type: &str) -> Job {
        let mut job = Job::new(work_type, Value::Null);
        job.uuid = Some(JobId::random());
        job
    }

    #[tokio::test]
    async fn a_sled_store_of_an_older_version_is_moved_to_fjall_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        // What an older version leaves: its trees, with what this version writes in them.
        let other = tempfile::tempdir().expect("tempdir");
        let source = open(&other);
        let job = job_with_id("demo.echo");
        let uuid = job.uuid.expect("uuid");
        source.submit(job.clone()).await.expect("submits");
        let result = result_of(&job, 1, Status::Succeeded);
        source.record(&result).expect("records");
        let mut held = job_with_id("demo.echo");
        held.run_at = Some(Utc::now() + chrono::Duration::hours(1));
        held.unique_key = Some("nightly".into());
        source.submit(held.clone()).await.expect("submits");
        // Without sled's background flusher, whose thread would hold the store (and its file
        // lock) for a while after the drop below.
        let sled = sled::Config::new()
            .path(&path)
            .flush_every_ms(None)
            .open()
            .expect("sled opens");
        let t = source.trees().expect("open");
        for name in KEYSPACES {
            let tree = sled.open_tree(name).expect("a tree");
            let keyspace = t.named(name).expect("a keyspace");
            for item in t.db.read_tx().iter(keyspace) {
                let (key, value) = item.into_inner().expect("reads");
                tree.insert(key.as_ref(), value.as_ref()).expect("writes");
            }
        }
        sled.flush().expect("flushes");
        drop((sled, t));
        // sled's I/O threads may hold the database (and its file lock) a moment after the
        // drop: wait for the lock, as the store's open would not.
        let db = std::fs::File::open(path.join("db")).expect("sled's file");
        db.lock().expect("sled lets go of its lock");
        drop(db);

        let store = open(&dir);
        let record = store.get(uuid).expect("reads").expect("moved");
        assert_eq!(record.state, JobState::Succeeded);
        assert_eq!(store.result(uuid, 1).expect("reads"), Some(result));
        assert_eq!(store.list(None, 10).expect("lists").len(), 2);
        assert!(
            store.next_due().expect("reads").is_some(),
            "the timer moved"
        );
        let mut twin = job_with_id("demo.echo");
        twin.unique_key = Some("nightly".into());
        assert!(
            !store.submit(twin).await.expect("submits").new,
            "the key moved"
        );
        assert!(
            dir.path().join("store.sled/conf").is_file(),
            "sled's folder is kept"
        );
        drop(store);

        // Opened again: nothing to move. A start cut short between the two renames is
        // finished by the next one.
        std::fs::rename(&path, path.with_extension("migrating")).expect("renames");
        let store = open(&dir);
        assert!(store.get(uuid).expect("reads").is_some());
        assert!(!path.with_extension("migrating").exists());
    }

    #[tokio::test]
    async fn a_late_result_of_an_older_attempt_is_recorded_but_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let job = job_with_id("demo.fail");
        let uuid = job.uuid.expect("uuid");
        store.submit(job.clone()).await.expect("submits");
        store
            .record(&result_of(&job, 1, Status::Failed))
            .expect("records");
        let held = store.get(uuid).expect("reads").expect("exists");
        assert_eq!((held.state, held.job.attempt), (JobState::Scheduled, 2));
        assert_eq!(
            store
                .due(Utc::now() + chrono::Duration::hours(2), 10)
                .expect("due"),
            [uuid]
        );
        let later = Utc::now() + chrono::Duration::hours(2);
        let queued = store
            .release(uuid, later)
            .await
            .expect("releases")
            .expect("due");
        assert_eq!(queued.state, JobState::Queued);
        assert!(store.next_due().expect("reads").is_none());
        let mut second = job.clone();
        second.attempt = 2;
        store
            .record(&result_of(&second, 2, Status::Succeeded))
            .expect("records");
        // Attempt 1's result comes again, late: kept once, and the job stays succeeded.
        assert!(matches!(
            store
                .record(&result_of(&job, 1, Status::Crashed))
                .expect("records"),
            Recorded::Duplicate
        ));
        let rec = store.get(uuid).expect("reads").expect("exists");
        assert_eq!(rec.state, JobState::Succeeded);
        assert_eq!(rec.attempts.len(), 2);
    }

    /// The one limit's usage of `store` for `value`: (waiting, running).
    fn usage(store: &Store, value: &str) -> (u64, u64) {
        let limits = store.limits().expect("reads");
        limits[0]
            .values
            .iter()
            .find(|u| u.value == value)
            .map_or((0, 0), |u| (u.waiting, u.running))
    }

    #[tokio::test]
    async fn a_concurrency_limit_holds_jobs_in_order_across_a_reopen_and_counts_each_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let scope = LimitScope::Label("customer".into());
        let limit = Limit {
            scope: scope.clone(),
            rate: None,
            concurrency: Some(1),
        };
        let (_, changed) = store.set_limit(limit).await.expect("sets");
        assert!(changed);
        assert_eq!(store.paused().expect("reads").limited, vec![scope.clone()]);
        let mut jobs = Vec::new();
        for _ in 0..3 {
            let mut job = job_with_id("demo.echo");
            job.labels.insert("customer".into(), "acme".into());
            let Inserted { record, .. } = store.submit(job.clone()).await.expect("submits");
            jobs.push((job, record));
        }
        let states: Vec<_> = jobs.iter().map(|(_, r)| r.state).collect();
        assert_eq!(
            states,
            [JobState::Queued, JobState::Throttled, JobState::Throttled]
        );
        assert_eq!(
            jobs[1].1.reason.as_deref(),
            Some("waiting for concurrency limit customer=acme (1 running)")
        );
        assert_eq!(usage(&store, "acme"), (2, 1));
        // The result comes twice: the slot is given back once, the next job takes it.
        let first = result_of(&jobs[0].0, 1, Status::Succeeded);
        store.record(&first).expect("records");
        store.record(&first).expect("records again");
        let (admitted, wake) = store.admit_throttled(10).await.expect("admits");
        assert_eq!(wake, None, "a slot wakes the clock, not a time");
        assert_eq!(
            admitted.iter().map(|r| r.uuid).collect::<Vec<_>>(),
            [jobs[1].1.uuid],
            "the older of the two waiting"
        );
        assert_eq!(admitted[0].state, JobState::Queued);
        drop(store);
        // As after a kill: the count is what the store holds.
        let store = open(&dir);
        assert_eq!(usage(&store, "acme"), (1, 1));
        let (admitted, _) = store.admit_throttled(10).await.expect("admits");
        assert!(admitted.is_empty(), "the slot is taken");
        let cancelled = store
            .cancel_scheduled(jobs[2].1.uuid)
            .await
            .expect("cancels")
            .expect("was held");
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert_eq!(usage(&store, "acme"), (0, 1));
        store
            .record(&result_of(&jobs[1].0, 1, Status::Succeeded))
            .expect("records");
        assert_eq!(usage(&store, "acme"), (0, 0));
        let (_, changed) = store.clear_limit(&scope, None).await.expect("clears");
        assert!(changed);
        assert!(store.limits().expect("reads").is_empty());
        assert!(store.paused().expect("reads").limited.is_empty());
    }

    #[tokio::test]
    async fn a_retry_gives_its_slot_back_and_comes_through_the_limit_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let limit = Limit {
            scope: LimitScope::WorkType("demo.fail".into()),
            rate: None,
            concurrency: Some(1),
        };
        store.set_limit(limit).await.expect("sets");
        let mut a = job_with_id("demo.fail");
        a.max_attempts = Some(2);
        let first = store.submit(a.clone()).await.expect("submits").record;
        let b = store
            .submit(job_with_id("demo.fail"))
            .await
            .expect("submits")
            .record;
        assert_eq!(
            (first.state, b.state),
            (JobState::Queued, JobState::Throttled)
        );
        let Recorded::New(failed) = store
            .record(&result_of(&a, 1, Status::Failed))
            .expect("records")
        else {
            panic!("recorded first");
        };
        assert_eq!(failed.state, JobState::Scheduled, "a retry follows");
        let (admitted, _) = store.admit_throttled(10).await.expect("admits");
        assert_eq!(
            admitted.len(),
            1,
            "the retry's wait gave the slot to the other job"
        );
        assert_eq!(admitted[0].uuid, b.uuid);
        let due = failed.next_run_at.expect("a retry time");
        let again = store
            .release(first.uuid, due)
            .await
            .expect("releases")
            .expect("changed");
        assert_eq!(
            (again.state, again.job.attempt),
            (JobState::Throttled, 2),
            "the retry waits for the slot"
        );
        store
            .record(&result_of(&b.job, 1, Status::Succeeded))
            .expect("records");
        let (admitted, _) = store.admit_throttled(10).await.expect("admits");
        assert_eq!(admitted.len(), 1);
        assert_eq!((admitted[0].uuid, admitted[0].job.attempt), (first.uuid, 2));
    }

    #[tokio::test]
    async fn a_rate_holds_a_job_until_its_window_and_a_deadline_ends_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let rate = "1/1h".parse().expect("a rate");
        let limit = Limit {
            scope: LimitScope::WorkType("demo.echo".into()),
            rate: Some(rate),
            concurrency: None,
        };
        store.set_limit(limit).await.expect("sets");
        let first = store
            .submit(job_with_id("demo.echo"))
            .await
            .expect("submits");
        assert_eq!(first.record.state, JobState::Queued);
        let mut late = job_with_id("demo.echo");
        let deadline = Utc::now() + chrono::Duration::seconds(1);
        late.expires_at = Some(deadline);
        let held = store.submit(late).await.expect("submits").record;
        assert_eq!(held.state, JobState::Throttled);
        let (admitted, wake) = store.admit_throttled(10).await.expect("admits");
        assert!(admitted.is_empty());
        let wake = wake.expect("the rate says when");
        assert!(wake > Utc::now() + chrono::Duration::minutes(59), "{wake}");
        assert_eq!(store.next_due().expect("reads"), Some(deadline));
        let after = deadline + chrono::Duration::milliseconds(1);
        let expired = store
            .release(held.uuid, after)
            .await
            .expect("releases")
            .expect("changed");
        assert_eq!(expired.state, JobState::Expired);
        assert!(
            expired
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("rate limit")),
            "{expired:?}"
        );
        assert!(store.limits().expect("reads")[0].values.is_empty());
    }

    #[tokio::test]
    async fn a_delayed_job_is_held_then_released_and_a_unique_key_makes_one_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let mut job = job_with_id("demo.echo");
        job.run_at = Some(Utc::now() + chrono::Duration::hours(1));
        job.unique_key = Some("report-42".into());
        let Inserted {
            record: rec, new, ..
        } = store.submit(job.clone()).await.expect("submits");
        assert!(new);
        assert_eq!(rec.state, JobState::Scheduled);
        assert!(
            store.unpublished().expect("reads").is_empty(),
            "not queued yet"
        );
        assert!(store.due(Utc::now(), 10).expect("reads").is_empty());

        let mut twin = job_with_id("demo.echo");
        twin.unique_key = Some("report-42".into());
        let Inserted {
            record: same, new, ..
        } = store.submit(twin.clone()).await.expect("submits");
        assert!(!new);
        assert_eq!(
            same.uuid, rec.uuid,
            "the unfinished job with the key is returned"
        );

        let cancelled = store
            .cancel_scheduled(rec.uuid)
            .await
            .expect("cancels")
            .expect("was held");
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert!(store.next_due().expect("reads").is_none());
        let Inserted {
            record: other, new, ..
        } = store.submit(twin).await.expect("submits");
        assert!(new, "the key is free once its job is over");
        assert_ne!(other.uuid, rec.uuid);
    }

    #[tokio::test]
    async fn a_unique_window_holds_the_key_after_the_job_ended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let keyed = || {
            let mut job = job_with_id("demo.echo");
            job.unique_key = Some("digest".into());
            job.unique_for_s = Some(3600);
            job
        };
        let first = store.submit(keyed()).await.expect("submits").record;
        let ok = result_of(&first.job, 1, Status::Succeeded);
        store.record(&ok).expect("records");
        let second = store.submit(keyed()).await.expect("submits");
        assert!(!second.new, "the window holds the key");
        assert_eq!(second.record.uuid, first.uuid);
        // Reopened (a restart), the window still holds; once it is over, a new job is taken.
        drop(store);
        let store = open(&dir);
        assert!(!store.submit(keyed()).await.expect("submits").new);
        let later = keyed();
        let fresh = store.new_record(later.clone(), later.uuid.expect("set"), JobState::Queued);
        let t = store.trees().expect("open");
        let mut tx = t.db.write_tx();
        let after_window = Utc::now() + chrono::Duration::hours(2);
        let inserted = insert_new(&mut tx, &t, fresh, after_window).expect("inserts");
        assert!(
            inserted.new,
            "past the window of the job that holds the key"
        );
    }

    #[tokio::test]
    async fn a_debounced_job_replaces_the_held_one_with_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let debounced = || {
            let mut job = job_with_id("demo.echo");
            job.unique_key = Some("reindex".into());
            job.debounce_s = Some(60);
            job
        };
        let first = store.submit(debounced()).await.expect("submits");
        assert_eq!(first.record.state, JobState::Scheduled);
        assert!(first.superseded.is_none());
        let second = store.submit(debounced()).await.expect("submits");
        assert!(second.new);
        let old = second.superseded.expect("the held job is replaced");
        assert_eq!(
            (old.uuid, old.state, old.superseded_by),
            (
                first.record.uuid,
                JobState::Superseded,
                Some(second.record.uuid)
            )
        );
        let stored = store.get(first.record.uuid).expect("reads").expect("kept");
        assert_eq!(stored.state, JobState::Superseded);
        let due = store
            .due(Utc::now() + chrono::Duration::hours(1), 10)
            .expect("reads");
        assert_eq!(due, [second.record.uuid], "only the newest is held");
    }

    #[tokio::test]
    async fn a_job_that_cannot_start_by_its_deadline_ends_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let now = Utc::now();
        let mut late = job_with_id("demo.echo");
        late.run_at = Some(now + chrono::Duration::hours(2));
        late.expires_at = Some(now + chrono::Duration::hours(1));
        let record = store.submit(late).await.expect("submits").record;
        assert_eq!(record.state, JobState::Expired);
        assert!(
            record
                .reason
                .expect("why")
                .contains("not before its deadline")
        );
        assert!(store.next_due().expect("reads").is_none(), "not held");

        let mut held = job_with_id("demo.echo");
        held.run_at = Some(now + chrono::Duration::hours(1));
        held.expires_at = Some(now + chrono::Duration::hours(2));
        let uuid = held.uuid.expect("set");
        store.submit(held).await.expect("submits");
        // The scheduler was down past the deadline: released late, it is not queued.
        let released = store
            .release(uuid, now + chrono::Duration::hours(3))
            .await
            .expect("releases")
            .expect("due");
        assert_eq!(released.state, JobState::Expired);
        assert!(store.unpublished().expect("reads").is_empty());
    }

    #[tokio::test]
    async fn the_purge_removes_old_finished_jobs_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let done = job_with_id("demo.echo");
        store.submit(done.clone()).await.expect("submits");
        store
            .record(&result_of(&done, 1, Status::Succeeded))
            .expect("records");
        let waiting = job_with_id("demo.echo");
        store.submit(waiting.clone()).await.expect("submits");
        let mut child = job_with_id("demo.echo");
        child.parent = done.uuid;
        store.submit(child.clone()).await.expect("submits");
        assert_eq!(
            store.children_of(done.uuid.expect("uuid")).expect("reads"),
            [child.uuid.expect("uuid")]
        );

        assert!(
            store
                .purge(Utc::now() - chrono::Duration::hours(1), 100)
                .expect("purges")
                .is_empty()
        );
        let dirs = store
            .purge(Utc::now() + chrono::Duration::seconds(1), 100)
            .expect("purges");
        assert_eq!(dirs, [store.job_dir(done.uuid.expect("uuid"))]);
        assert!(
            store
                .get(done.uuid.expect("uuid"))
                .expect("reads")
                .is_none()
        );
        assert!(
            store
                .logs(done.uuid.expect("uuid"))
                .expect("reads")
                .is_empty()
        );
        assert!(
            store
                .get(waiting.uuid.expect("uuid"))
                .expect("reads")
                .is_some()
        );
        assert_eq!(store.list(None, 10).expect("lists").len(), 2);
    }

    #[tokio::test]
    async fn a_dead_job_can_be_retried_by_hand_but_a_succeeded_one_cannot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let mut job = job_with_id("demo.fail");
        job.max_attempts = Some(1);
        let uuid = job.uuid.expect("uuid");
        store.submit(job.clone()).await.expect("submits");
        let err = store.retry(uuid).await.expect_err("still queued");
        assert!(err.to_string().contains("not over"), "{err}");
        store
            .record(&result_of(&job, 1, Status::Failed))
            .expect("records");
        let again = store.retry(uuid).await.expect("retries");
        assert_eq!((again.state, again.job.attempt), (JobState::Queued, 2));
        assert_eq!(store.unpublished().expect("reads").len(), 1);
        let mut second = job.clone();
        second.attempt = 2;
        store
            .record(&result_of(&second, 2, Status::Succeeded))
            .expect("records");
        let err = store.retry(uuid).await.expect_err("succeeded");
        assert!(err.to_string().contains("succeeded"), "{err}");
    }

    #[tokio::test]
    async fn a_retry_released_by_the_clock_is_not_offered_to_the_republish_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let job = job_with_id("demo.fail");
        let uuid = job.uuid.expect("uuid");
        store.submit(job.clone()).await.expect("submits");
        let first = store.claim(uuid, 1).expect("reads").expect("waits");
        store.published(&first).expect("confirmed");
        drop(first);
        store
            .record(&result_of(&job, 1, Status::Failed))
            .expect("records");
        // The retry comes due long after the job was created; the clock releases it.
        let later = Utc::now() + chrono::Duration::hours(2);
        let released = store
            .release(uuid, later)
            .await
            .expect("releases")
            .expect("due");
        assert_eq!(released.job.attempt, 2);
        // The republish pass runs a moment later, with its 30 s margin for publishes on
        // their way: attempt 2 was handed to the clock's publish only now, so it is not
        // the pass's to publish (the job's creation time is old, which must not matter).
        let pass = later + chrono::Duration::seconds(1) - chrono::Duration::seconds(30);
        assert!(
            store.republishable(pass).expect("reads").is_empty(),
            "the republish pass would publish attempt 2 a second time"
        );
        // Whatever the timing, one pass at a time holds the attempt: the clock claims it,
        // and the pass, run later while the clock still publishes, gets nothing.
        let clock = store.claim(uuid, 2).expect("reads").expect("waits");
        let much_later = later + chrono::Duration::hours(1);
        assert!(store.republishable(much_later).expect("reads").is_empty());
        assert!(store.claim(uuid, 2).expect("reads").is_none());
        // A late confirm of attempt 1 does not clear attempt 2.
        let stale = PublishClaim {
            uuid,
            attempt: 1,
            publishing: Arc::default(),
        };
        store.published(&stale).expect("no-op");
        assert_eq!(store.unpublished().expect("reads").len(), 1);
        // The clock's publish is confirmed: nobody publishes attempt 2 again.
        store.published(&clock).expect("confirmed");
        drop(clock);
        assert!(store.republishable(much_later).expect("reads").is_empty());
        assert!(store.claim(uuid, 2).expect("reads").is_none());
    }

    #[tokio::test]
    async fn a_publish_that_failed_is_left_to_the_republish_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let job = job_with_id("demo.echo");
        let uuid = job.uuid.expect("uuid");
        store.submit(job.clone()).await.expect("submits");
        let submit = store.claim(uuid, 1).expect("reads").expect("waits");
        // The submission's publish fails: its claim goes, the job still waits.
        drop(submit);
        let pass = Utc::now() + chrono::Duration::minutes(1);
        let offered = store.republishable(pass).expect("reads");
        assert_eq!(offered.len(), 1);
        let retry = store.claim(uuid, 1).expect("reads").expect("waits");
        store.published(&retry).expect("confirmed");
        drop(retry);
        assert!(store.republishable(pass).expect("reads").is_empty());
    }

    #[tokio::test]
    async fn the_last_attempt_number_cannot_be_retried_and_does_not_overflow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let mut job = job_with_id("demo.fail");
        job.attempt = u32::MAX;
        job.max_attempts = Some(u32::MAX);
        let uuid = job.uuid.expect("uuid");
        let recorded = store
            .record(&result_of(&job, u32::MAX, Status::Failed))
            .expect("records");
        let Recorded::New(record) = recorded else {
            panic!("a first result is new");
        };
        assert_eq!(record.state, JobState::Dead, "no attempt follows the last");
        let err = store
            .retry(uuid)
            .await
            .expect_err("no attempt number is left");
        assert!(err.to_string().contains("every attempt number"), "{err}");
    }

    #[tokio::test]
    async fn a_reopened_store_holds_what_was_flushed_and_writes_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let job = job_with_id("demo.echo");
        let uuid = job.uuid.expect("uuid");
        store.submit(job).await.expect("submits");
        // A clone held elsewhere (as the server's tasks do) sees the reopened database too.
        let elsewhere = store.clone();
        store.probe().await.expect("writes");
        assert!(elsewhere.get(uuid).expect("reads").is_some());
        let again = job_with_id("demo.echo");
        elsewhere.submit(again.clone()).await.expect("submits");
        assert_eq!(store.list(None, 10).expect("lists").len(), 2);
    }

    #[tokio::test]
    async fn pages_of_jobs_and_of_log_lines_hold_everything_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        for _ in 0..7 {
            store
                .submit(job_with_id("demo.echo"))
                .await
                .expect("submits");
        }
        let whole: Vec<JobId> = store
            .list(None, 100)
            .expect("lists")
            .iter()
            .map(|r| r.uuid)
            .collect();
        for (limit, budget, pages) in [(3, usize::MAX, 3), (100, 1, 7), (100, usize::MAX, 1)] {
            let (mut seen, mut before, mut n) = (Vec::new(), None::<Vec<u8>>, 0);
            loop {
                let (page, next) = store
                    .list_page(None, limit, before.as_deref(), budget)
                    .expect("lists");
                n += 1;
                seen.extend(page.iter().map(|r| r.uuid));
                match next {
                    Some(next) => before = Some(next),
                    None => break,
                }
            }
            assert_eq!(seen, whole, "limit {limit}, budget {budget}");
            assert!(
                n <= pages + 1,
                "{n} pages for limit {limit}, budget {budget}"
            );
        }

        let job = job_with_id("demo.log");
        let uuid = job.uuid.expect("uuid");
        let mut result = result_of(&job, 1, Status::Succeeded);
        result.logs = (0..250)
            .map(|i| LogLine {
                time: Utc::now(),
                level: Level::Info,
                message: format!("line {i}"),
            })
            .collect();
        result.logs[100].message = "x".repeat(100_000);
        store.record(&result).expect("records");
        let budget = 10_000;
        let (mut lines, mut from, mut pages) = (Vec::new(), (0, 0), 0);
        loop {
            let (page, next) = store.logs_page(uuid, from, 60, budget).expect("reads");
            pages += 1;
            let size: usize = page
                .iter()
                .flat_map(|(_, l)| l)
                .map(|l| serde_json::to_vec(l).expect("json").len())
                .sum();
            assert!(size <= budget, "a page of {size} bytes");
            lines.extend(page.into_iter().flat_map(|(_, l)| l));
            match next {
                Some(next) => from = next,
                None => break,
            }
        }
        assert!(pages >= 5, "{pages} pages");
        assert_eq!(lines.len(), 250, "every line once");
        assert_eq!(lines[99].message, "line 99");
        assert_eq!(lines[249].message, "line 249");
        let cut = &lines[100].message;
        assert!(
            cut.starts_with("xxx") && cut.contains("line cut after"),
            "{cut:.80}"
        );
        assert!(
            cut.contains("attempt-1/logs.txt"),
            "says where the whole line is"
        );
    }
}
