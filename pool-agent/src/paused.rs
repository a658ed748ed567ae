//! The paused queues (`scheduler pause`) and what the limits apply to (`scheduler limit`), as
//! this agent last heard them from the scheduler, on
//! its own queue (at each change, and again whenever its heartbeats show it behind). Kept in a
//! file of the agent's data folder, so that an agent restarted while the scheduler is away
//! takes no job from a queue paused before.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rota_common::wire::{Job, PausedQueues};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// The paused queues heard last; None until this agent (its data folder) first hears them.
#[derive(Clone)]
pub struct Paused {
    file: PathBuf,
    heard: watch::Sender<Option<PausedQueues>>,
}

impl Paused {
    /// The set kept in `dir` by an earlier run, if any. A file that cannot be read counts as
    /// none: the scheduler's next heartbeat says it again.
    pub fn open(dir: &Path) -> Self {
        let file = dir.join("paused.json");
        let kept = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<PausedQueues>(&bytes) {
                Ok(p) if p.check().is_ok() => Some(p),
                _ => {
                    warn!(file = %file.display(), "ignoring an unreadable file of paused queues; the scheduler says them again");
                    None
                }
            },
            Err(_) => None,
        };
        Self {
            file,
            heard: watch::Sender::new(kept),
        }
    }

    /// Takes `paused` when it is newer than what was heard before, and keeps it on disk.
    pub fn hear(&self, paused: PausedQueues) {
        let newer = self.heard.send_if_modified(|heard| {
            if heard.as_ref().is_some_and(|h| h.version >= paused.version) {
                return false;
            }
            *heard = Some(paused.clone());
            true
        });
        if !newer {
            return;
        }
        info!(queues = ?paused.queues, version = paused.version, "paused queues heard from the scheduler");
        if let Err(e) = self.save(&paused) {
            error!(file = %self.file.display(), error = %e,
                "cannot keep the paused queues on disk; they hold until this agent restarts, and after it once it hears the scheduler");
        }
    }

    /// Writes the set to a new file, made durable, then put in the old one's place.
    fn save(&self, paused: &PausedQueues) -> anyhow::Result<()> {
        let new = self.file.with_extension("json.new");
        let mut f = std::fs::File::create(&new)?;
        f.write_all(&serde_json::to_vec(paused)?)?;
        f.sync_all()?;
        std::fs::rename(&new, &self.file)?;
        let dir = self.file.parent().context("the file has a folder")?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// Whether jobs of `queue` wait: it was heard paused.
    pub fn contains(&self, queue: &str) -> bool {
        self.heard
            .borrow()
            .as_ref()
            .is_some_and(|p| p.contains(queue))
    }

    /// Resolves once `queue` is heard paused (at once if it is).
    pub async fn until_paused(&self, queue: &str) {
        let mut heard = self.heard.subscribe();
        // The sender lives as long as `self`, so the wait ends only with a pause.
        let _ = heard
            .wait_for(|p| p.as_ref().is_some_and(|p| p.contains(queue)))
            .await;
    }

    /// Whether a limit applies to `job`: published straight to the jobs exchange, it goes to
    /// the scheduler, which publishes it when its limits allow.
    pub fn limits(&self, job: &Job) -> bool {
        self.heard.borrow().as_ref().is_some_and(|p| p.limits(job))
    }

    /// The set heard last, if any was.
    pub fn heard(&self) -> Option<PausedQueues> {
        self.heard.borrow().clone()
    }

    /// Changes to the set.
    pub fn subscribe(&self) -> watch::Receiver<Option<PausedQueues>> {
        self.heard.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(version: u64, queues: &[&str]) -> PausedQueues {
        PausedQueues {
            version,
            queues: queues.iter().map(|q| q.to_string()).collect(),
            limited: Vec::new(),
        }
    }

    #[test]
    fn the_newest_set_wins_and_is_kept_across_restarts() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let paused = Paused::open(dir.path());
        assert!(paused.heard().is_none(), "a new agent has heard nothing");
        paused.hear(set(5, &["mail"]));
        // An older set (sent before the change, come after it) changes nothing.
        paused.hear(set(4, &[]));
        assert!(paused.contains("mail"));
        let again = Paused::open(dir.path());
        assert_eq!(again.heard(), Some(set(5, &["mail"])));
        again.hear(set(6, &[]));
        assert!(!again.contains("mail"));
        assert_eq!(Paused::open(dir.path()).heard(), Some(set(6, &[])));
    }
}
