//! Group commit: many tasks ask for their writes to be made durable; one thread flushes once
//! for all who asked before it started. This is how the stores flush sled, whose own
//! `flush_async` deadlocks when called concurrently (sled issue #1308, in 0.34.7).

use std::sync::{Arc, mpsc};

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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

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
