//! A Chromium process started by the worker (`--chromium-mode local`): the configured binary,
//! a fresh profile folder per browser, the DevTools endpoint read from its stderr. Ending it
//! kills the process and removes the folder; folders left by owners that were killed are
//! removed by the next browser that starts under the same root.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::ChromiumArgs;

/// Flags every browser gets. Without the background-networking ones, Chromium's own
/// connections (updates, sync, metrics…) would fail on a closed network and slow it down.
pub(super) const FLAGS: &[&str] = &[
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-breakpad",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--password-store=basic",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
];

/// Profile folders are named `rota-chromium-<owner pid>-<n>`.
const PROFILE_PREFIX: &str = "rota-chromium-";

/// A running local Chromium.
pub(super) struct LocalChromium {
    child: Child,
    profile: PathBuf,
    pub pid: u32,
}

impl LocalChromium {
    /// Starts Chromium and returns it with its DevTools WebSocket address.
    pub async fn start(settings: &ChromiumArgs) -> anyhow::Result<(LocalChromium, String)> {
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let root = settings.profile_root();
        sweep_stale_profiles(&root);
        let profile = root.join(format!(
            "{PROFILE_PREFIX}{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&profile).with_context(|| {
            format!(
                "cannot create the Chromium profile folder {} (set --chromium-profile-root)",
                profile.display()
            )
        })?;
        let binary = &settings.chromium_binary;
        let mut cmd = Command::new(binary);
        cmd.args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(settings.chromium_args.iter().map(|a| format!("--{a}")));
        if in_container() {
            // The container is the sandbox (Chromium's own needs privileges it lacks there),
            // and its /dev/shm is small.
            cmd.args(["--no-sandbox", "--disable-dev-shm-usage"]);
        } else if running_as_root() {
            // Chromium refuses to run its sandbox as root.
            cmd.arg("--no-sandbox");
        }
        cmd.arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&profile);
                bail!(
                    "cannot start Chromium {:?}: {e}; install it (deploy/setup.sh installs Debian's chromium) \
                     or point --chromium-binary (ROTA_CHROMIUM_BINARY) at it",
                    binary.display()
                );
            }
        };
        let pid = child.id().unwrap_or(0);
        let mut running = LocalChromium {
            child,
            profile,
            pid,
        };
        match running.endpoint(settings.chromium_start_timeout).await {
            Ok(url) => Ok((running, url)),
            Err(e) => {
                running.stop().await;
                Err(e)
            }
        }
    }

    /// Reads stderr up to the `DevTools listening on ws://…` line; the rest of stderr is
    /// drained in the background (a full pipe would block Chromium).
    async fn endpoint(&mut self, limit: Duration) -> anyhow::Result<String> {
        let stderr = self.child.stderr.take().context("Chromium has no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut said = Vec::new();
        let found = tokio::time::timeout(limit, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    return Some(url.trim().to_owned());
                }
                said.push(line);
            }
            None
        })
        .await;
        let binary = self.pid;
        match found {
            Ok(Some(url)) => {
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::trace!(chromium = binary, "{line}");
                    }
                });
                Ok(url)
            }
            Ok(None) => {
                let status = self.child.wait().await.ok();
                bail!(
                    "Chromium exited before it was ready ({}); it said: {}",
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    tail(&said)
                )
            }
            Err(_) => bail!(
                "Chromium did not open its DevTools endpoint within {} s (--chromium-start-timeout); it said: {}",
                limit.as_secs_f64(),
                tail(&said)
            ),
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the browser (if still running), waits for it, and removes its profile folder.
    pub async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        remove_profile(&self.profile);
    }
}

impl Drop for LocalChromium {
    fn drop(&mut self) {
        // kill_on_drop ends the process; the folder goes too (a renderer that is still
        // writing may leave a file, which the next sweep removes).
        let _ = self.child.start_kill();
        remove_profile(&self.profile);
    }
}

fn remove_profile(profile: &Path) {
    // Chromium's helper processes may still be writing for a moment after the browser exits.
    for _ in 0..3 {
        match std::fs::remove_dir_all(profile) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => continue,
            _ => return,
        }
    }
}

/// Removes the profile folders under `root` whose owner process is gone.
fn sweep_stale_profiles(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PROFILE_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !process_alive(owner) {
            tracing::info!(folder = %entry.path().display(), owner, "removing the profile folder of a Chromium whose owner is gone");
            remove_profile(&entry.path());
        }
    }
}

/// Whether a process exists (a zombie counts as gone).
pub(super) fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s != "Z"))
        })
        .unwrap_or(false)
}

/// Whether this process runs in a Docker container (a `docker` worker's).
fn in_container() -> bool {
    Path::new("/.dockerenv").exists()
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The last lines Chromium wrote, for an error message.
pub(super) fn tail(lines: &[String]) -> String {
    let start = lines.len().saturating_sub(5);
    let text = lines[start..].join(" | ");
    if text.is_empty() {
        "nothing".into()
    } else {
        text
    }
}
