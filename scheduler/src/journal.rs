//! Syncing the store's journal without holding up its writers.
//!
//! fjall's own `persist(SyncData)` holds the journal's lock through the `fdatasync`, so every
//! transaction waits for the disk while the group commit syncs: a result's write, and with it
//! its `job.finished`, waited up to a sync's time (5 ms at times on this machine, more when
//! RabbitMQ syncs the same disk). [`JournalSync`] splits the two: the caller moves the
//! journal's buffer to the kernel under the lock (`persist(Buffer)`, one `write`), then this
//! syncs the file's data through a descriptor of its own, while transactions go on.
//!
//! What is synced: fjall keeps its journal in files `<store>/<id>.jnl`, the active one the
//! highest id; when it moves on to the next, it syncs the old one whole first (`rotate`). So
//! after the buffer is handed to the kernel, every byte written so far is in a synced file or
//! in the active one at that moment, and syncing the active one (or a later one: the one
//! active then was synced when it was left) covers them all. Each journal file is sized when
//! fjall makes it, so `fdatasync` has no size to record. This reads fjall 3.1's layout and
//! order of work (`journal/writer.rs`: `rotate` syncs, then makes the next file): a fjall
//! upgrade must check both still hold.
//!
//! A sync that failed fails every later one too, as fjall's own does (it poisons itself):
//! after a failed `fdatasync` the kernel may have dropped the pages it could not write, and
//! a later sync that succeeds would not bring them back. The store is reopened from disk then
//! ([`crate::store::Store::probe`]), which makes a new `JournalSync`.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Syncs the active journal file of the fjall database in `dir` (see the module's text).
pub struct JournalSync {
    dir: PathBuf,
    state: Mutex<State>,
}

struct State {
    /// The journal file synced last, by id, and an open descriptor of it.
    active: Option<(u64, File)>,
    /// Why a sync failed: every later one fails with it.
    failed: Option<String>,
}

impl JournalSync {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            state: Mutex::new(State {
                active: None,
                failed: None,
            }),
        }
    }

    /// Syncs the data of the active journal file: everything fjall handed to the kernel
    /// before this call is on disk when it returns `Ok`.
    pub fn sync(&self) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &state.failed {
            return Err(format!(
                "an earlier sync of the store's journal failed ({why}); the store must be reopened"
            ));
        }
        let synced = self
            .find_active(&mut state.active)
            .and_then(|file| file.sync_data());
        synced.map_err(|e| {
            let why = format!(
                "cannot sync the store's journal in {}: {e}",
                self.dir.display()
            );
            state.failed = Some(why.clone());
            why
        })
    }

    /// The active journal file: the one synced last, or the next ones fjall has made since.
    fn find_active<'a>(&self, active: &'a mut Option<(u64, File)>) -> std::io::Result<&'a File> {
        let stale = match active {
            // Deleted: fjall moved on more than once since, and removed the files between.
            Some((_, file)) => file.metadata()?.nlink() == 0,
            None => true,
        };
        if stale {
            let id = self.highest_id()?;
            *active = Some((id, File::open(self.path(id))?));
        }
        let (id, file) = active.as_mut().expect("set above");
        loop {
            match File::open(self.path(*id + 1)) {
                Ok(next) => {
                    *id += 1;
                    *file = next;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(file),
                Err(e) => return Err(e),
            }
        }
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.jnl"))
    }

    /// The highest id of the journal files in the folder.
    fn highest_id(&self) -> std::io::Result<u64> {
        let mut highest = None;
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(".jnl"))
                .and_then(|n| n.parse::<u64>().ok());
            highest = highest.max(id);
        }
        highest.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no journal file (*.jnl) in {}", self.dir.display()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(sync: &JournalSync) -> Option<u64> {
        sync.state.lock().ok()?.active.as_ref().map(|(id, _)| *id)
    }

    fn make(dir: &Path, ids: &[u64]) -> std::io::Result<()> {
        ids.iter()
            .try_for_each(|id| std::fs::write(dir.join(format!("{id}.jnl")), b"x"))
    }

    #[test]
    fn follows_the_journal_to_its_next_files() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        make(dir.path(), &[3, 4])?;
        std::fs::write(dir.path().join("lock"), b"")?;
        let sync = JournalSync::new(dir.path());
        assert_eq!(sync.sync(), Ok(()));
        assert_eq!(active(&sync), Some(4));
        // fjall moves on to 5, then 6.
        make(dir.path(), &[5, 6])?;
        assert_eq!(sync.sync(), Ok(()));
        assert_eq!(active(&sync), Some(6));
        // It moves on twice more and deletes the files before: the folder is read again.
        make(dir.path(), &[7, 8])?;
        for id in [3, 4, 5, 6, 7] {
            std::fs::remove_file(dir.path().join(format!("{id}.jnl")))?;
        }
        assert_eq!(sync.sync(), Ok(()));
        assert_eq!(active(&sync), Some(8));
        Ok(())
    }

    #[test]
    fn a_failed_sync_fails_every_later_one() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let sync = JournalSync::new(dir.path());
        let first = sync.sync().err().unwrap_or_default();
        assert!(first.contains("no journal file"), "{first}");
        make(dir.path(), &[0])?;
        let later = sync.sync().err().unwrap_or_default();
        assert!(later.contains("must be reopened"), "{later}");
        Ok(())
    }
}
