//! Group commit: many tasks ask for their writes to be made durable; one thread flushes once
//! for all who asked before it started. This is how the stores flush sled, whose own
//! `flush_async` deadlocks when called concurrently (sled issue #1308, in 0.34.7).
//!
//! sled's `flush` writes its log with `sync_file_range`, which survives a process crash but
//! not a power loss: neither the file's size nor the data reach the journal, and large
//! values ("blobs", over about 128 KiB) are written to files of their own without any sync.
//! [`FileSync`] finishes the job with `fdatasync`/`fsync`, once per group.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), String>>;

/// A flushing thread shared by everyone who writes to one store.
#[derive(Clone)]
pub struct GroupCommit {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// Stops the thread and waits for it, so whatever the flush closure owns (the database)
    /// is closed when the last clone is gone.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl GroupCommit {
    /// Starts the thread; `flush` makes every earlier write durable.
    pub fn start(
        name: &str,
        flush: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-flush"))
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let result = flush();
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                tx: Some(tx),
                thread: Some(thread),
            }),
        })
    }

    /// Returns once everything written before this call is flushed.
    pub async fn commit(&self) -> Result<(), String> {
        let gone = || "the flushing thread is gone".to_owned();
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .as_ref()
            .ok_or_else(gone)?
            .send(tx)
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Makes a sled database folder durable after `Db::flush`: `fdatasync` of the log file `db`,
/// `fsync` of every blob file written since the last call, and of the folders whose entries
/// changed. One call costs one `fdatasync` when no blob was written.
pub struct FileSync {
    dir: PathBuf,
    log: Mutex<Option<std::fs::File>>,
    /// Blob files already made durable (sled never rewrites one; it removes old ones).
    synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
}

impl FileSync {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            log: Mutex::new(None),
            synced_blobs: Mutex::new(HashSet::new()),
        }
    }

    /// Syncs what sled's flush left in the page cache.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut log = self
            .log
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        if log.is_none() {
            // First call: the files and the folder entries sled created come with it.
            *log = Some(std::fs::File::open(self.dir.join("db"))?);
            sync_dir(&self.dir)?;
        }
        if let Some(f) = log.as_ref() {
            f.sync_data()?;
        }
        drop(log);
        let blobs = self.dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&blobs) else {
            return Ok(()); // no blob written yet
        };
        let mut synced = self
            .synced_blobs
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Removed by sled's own clean-up since it was listed.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            sync_dir(&blobs)?;
        }
        *synced = present;
        Ok(())
    }
}

/// What a store needs free on its filesystem beyond the bytes it writes: sled's log grows by
/// segments of 512 KiB, and each large value is a file of its own.
pub const RESERVE: u64 = 16 * 1024 * 1024;

/// What is left above [`RESERVE`] once `bytes` are written, or why there is not enough
/// (saying how much is free).
fn room_left(dir: &Path, bytes: u64) -> Result<u64, String> {
    let stat = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| format!("cannot read the free space of {}: {e}", dir.display()))?;
    let free = stat.blocks_available().saturating_mul(stat.fragment_size());
    let needed = RESERVE.saturating_add(bytes);
    if free < needed {
        return Err(format!(
            "only {} KiB free on the filesystem of {}; writing needs {} KiB",
            free / 1024,
            dir.display(),
            needed / 1024
        ));
    }
    Ok(free - needed)
}

/// Room on a store's filesystem for what it writes, plus [`RESERVE`]. Stores check before they
/// write, because a write that fails for want of space leaves sled refusing every later write
/// until it is reopened, and a flush in flight then can hang for ever. A store writes for every
/// job, so the free space is read again only when its writes since the last look may have used
/// what was left above [`RESERVE`], or [`Room::FRESH`] later (other processes use the disk
/// too). A write the reserve does not cover fails, and the store reopens: this only makes that
/// rarer.
pub struct Room {
    dir: PathBuf,
    /// When the free space was last read, and how much may still be written since.
    seen: Mutex<Option<(std::time::Instant, u64)>>,
}

impl Room {
    pub const FRESH: std::time::Duration = std::time::Duration::from_millis(100);

    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            seen: Mutex::new(None),
        }
    }

    pub fn ensure(&self, bytes: u64) -> Result<(), String> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, left)) = *seen
            && at.elapsed() < Self::FRESH
            && left >= bytes
        {
            *seen = Some((at, left - bytes));
            return Ok(());
        }
        let left = room_left(&self.dir, bytes);
        *seen = left.as_ref().ok().map(|l| (std::time::Instant::now(), *l));
        left.map(|_| ())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn room_is_read_again_when_the_last_look_does_not_cover_a_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let room = Room::new(dir.path());
        room.ensure(1).expect("a byte fits");
        room.ensure(1).expect("a byte still fits, without a look");
        let err = room
            .ensure(u64::MAX / 2)
            .expect_err("no disk is that large");
        assert!(err.contains("KiB free"), "{err}");
        room.ensure(1).expect("small writes go on after a refusal");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_concurrent_commits_all_complete_with_fewer_flushes() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let counter = flushes.clone();
        let gc = GroupCommit::start("test", move || {
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        })
        .expect("thread starts");
        let all: Vec<_> = (0..200)
            .map(|_| {
                let gc = gc.clone();
                tokio::spawn(async move { gc.commit().await })
            })
            .collect();
        for h in all {
            h.await.expect("task").expect("flushed");
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!((1..200).contains(&n), "{n} flushes for 200 commits");
    }
}
