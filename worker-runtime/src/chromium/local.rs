//! A Chromium process started by the worker (`--chromium-mode local`): the configured binary,
//! a fresh profile folder per browser, the DevTools endpoint read from its stderr. Ending it
//! kills the process and its helpers, waits until they are gone, and removes the folder;
//! folders left by owners that were killed are removed by the next browser that starts under
//! the same root.

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
/// The DevTools port stays on the browser's loopback (Chromium ignores another address).
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
    // Frames of other sites stay in the page's process, where the pool's policy sees their
    // requests (an out-of-process frame's would escape the page's interception).
    "--disable-site-isolation-trials",
    "--disable-features=IsolateOrigins,site-per-process",
];

/// Profile folders are named `rota-chromium-<owner pid>-<n>`.
const PROFILE_PREFIX: &str = "rota-chromium-";
/// Chromium's folder for a browser's process-singleton socket (see [`remove_singleton_folder`]).
const SINGLETON_PREFIX: &str = "org.chromium.Chromium.";

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
        cmd.env_clear()
            .envs(settings.work_env().vars())
            .args(FLAGS)
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

    /// Kills the browser (if still running) and its helper processes, waits until they are
    /// gone, and removes its profile folder.
    pub async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        // The helpers (zygotes, renderers, GPU…) die asynchronously once the browser is gone,
        // and may still write to the profile meanwhile: end them and wait for it.
        let gone = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let helpers = kill_helpers(&self.profile);
                if helpers.is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if gone.is_err() {
            tracing::warn!(
                profile = %self.profile.display(),
                helpers = ?kill_helpers(&self.profile),
                "Chromium's helper processes did not end within 10 s of SIGKILL"
            );
        }
        remove_profile(&self.profile);
    }
}

impl Drop for LocalChromium {
    fn drop(&mut self) {
        // kill_on_drop ends the process; its helpers are killed too, and the folder goes (a
        // helper that is still writing may leave a file, which the next sweep removes).
        let _ = self.child.start_kill();
        kill_helpers(&self.profile);
        remove_profile(&self.profile);
    }
}

/// Sends SIGKILL to each live process of the Chromium whose profile is `profile` (each one
/// has `--user-data-dir=<profile>` on its command line); returns their pids. They stay in
/// the group of the process that started Chromium, so an agent ending a worker's process
/// group ends its Chromium too.
fn kill_helpers(profile: &Path) -> Vec<u32> {
    use nix::sys::signal::{Signal, kill};
    let flag = format!("--user-data-dir={}", profile.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|raw| has_arg(&raw, flag.as_bytes()))
                && process_alive(*pid)
        })
        .collect();
    for pid in &pids {
        if let Ok(pid) = i32::try_from(*pid) {
            let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    pids
}

/// Whether the command line `raw` (/proc/PID/cmdline) holds the argument `arg`. Chromium's
/// helpers rewrite theirs into one string of arguments separated by spaces, so an argument
/// ends at a NUL, a space or the end.
fn has_arg(raw: &[u8], arg: &[u8]) -> bool {
    let bound = |b: Option<&u8>| b.is_none_or(|b| *b == 0 || *b == b' ');
    (0..raw.len().saturating_sub(arg.len()) + 1).any(|at| {
        raw[at..].starts_with(arg)
            && bound(at.checked_sub(1).and_then(|i| raw.get(i)))
            && bound(raw.get(at + arg.len()))
    })
}

fn remove_profile(profile: &Path) {
    remove_singleton_folder(profile);
    // A helper may still have created a file while the folder was being removed.
    for _ in 0..3 {
        match std::fs::remove_dir_all(profile) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => continue,
            _ => return,
        }
    }
}

/// Removes the folder of the profile's process-singleton socket. Chromium makes it under the
/// temporary folder (`/tmp/org.chromium.Chromium.XXXXXX`, as a socket's path must be short)
/// and links it from the profile as `SingletonSocket`; it removes it when it exits, but a
/// killed browser leaves it, one folder for each browser ever stopped.
fn remove_singleton_folder(profile: &Path) {
    let Ok(socket) = std::fs::read_link(profile.join("SingletonSocket")) else {
        return;
    };
    if let Some(folder) = socket.parent()
        && folder
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(SINGLETON_PREFIX))
    {
        let _ = std::fs::remove_dir_all(folder);
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

#[cfg(test)]
mod tests {
    use super::has_arg;

    #[test]
    fn an_argument_is_found_in_the_browsers_and_the_helpers_command_lines() {
        let arg = b"--user-data-dir=/tmp/p/rota-chromium-7-1";
        // The browser's: one argument per NUL.
        assert!(has_arg(
            b"chromium\0--headless\0--user-data-dir=/tmp/p/rota-chromium-7-1\0about:blank\0",
            arg
        ));
        // A helper's: rewritten into one string, separated by spaces.
        assert!(has_arg(
            b"/usr/lib/chromium/chromium --type=renderer --user-data-dir=/tmp/p/rota-chromium-7-1 --lang=en\0",
            arg
        ));
        assert!(has_arg(b"--user-data-dir=/tmp/p/rota-chromium-7-1", arg));
        // Another browser's profile, whose name only starts the same.
        assert!(!has_arg(
            b"chromium\0--user-data-dir=/tmp/p/rota-chromium-7-10\0",
            arg
        ));
        assert!(!has_arg(b"chromium\0", arg));
    }
}
