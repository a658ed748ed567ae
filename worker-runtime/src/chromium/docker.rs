//! Chromium in a container of its own (`--chromium-mode docker`), started through bollard:
//! the configured image, network `host` (so it reaches the pages the Work names, and the
//! worker reaches its DevTools port), unprivileged on a read-only root, the endpoint read
//! from the container's log. The
//! container is removed when its browser ends; containers whose owner process is gone are
//! removed by the next one that starts on this host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
};
use futures::StreamExt;

use super::ChromiumArgs;
use super::local::{FLAGS, process_alive, tail};

/// Labels that mark our containers, so leftovers can be found.
const ROLE_LABEL: &str = "rota.role";
const ROLE: &str = "chromium";
const OWNER_LABEL: &str = "rota.owner-pid";
const HOST_LABEL: &str = "rota.owner-host";

/// A running Chromium container.
pub(super) struct DockerChromium {
    docker: Docker,
    pub name: String,
    /// Set once removed, so that dropping it does not try again.
    removed: std::sync::atomic::AtomicBool,
}

impl DockerChromium {
    /// Starts a container and returns it with the browser's DevTools WebSocket address.
    pub async fn start(settings: &ChromiumArgs) -> anyhow::Result<(DockerChromium, String)> {
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let docker = connect().await?;
        remove_stale(&docker).await;
        let name = format!(
            "rota-chromium-{}-{}-{}",
            host(),
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd: Vec<String> = vec!["/usr/bin/chromium".into()];
        cmd.extend(FLAGS.iter().map(|f| (*f).to_owned()));
        // Root in a container: the container is the sandbox; /dev/shm is small there.
        cmd.extend(
            [
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--user-data-dir=/tmp/rota-profile",
            ]
            .map(str::to_owned),
        );
        cmd.extend(settings.chromium_args.iter().map(|a| format!("--{a}")));
        cmd.push("about:blank".into());
        let labels = HashMap::from([
            (ROLE_LABEL.to_owned(), ROLE.to_owned()),
            (OWNER_LABEL.to_owned(), std::process::id().to_string()),
            (HOST_LABEL.to_owned(), host()),
        ]);
        let body = ContainerCreateBody {
            image: Some(settings.chromium_image.clone()),
            cmd: Some(cmd),
            labels: Some(labels),
            // Unprivileged, on a read-only root with a writable /tmp (profile, shared memory).
            user: Some("65534:65534".into()),
            env: Some(vec!["HOME=/tmp".into()]),
            host_config: Some(HostConfig {
                network_mode: Some("host".into()),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                readonly_rootfs: Some(true),
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_owned(),
                    "rw,nosuid,nodev,size=512m".to_owned(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot create a Chromium container from image {:?}: {e}; build it with \
                     deploy/images/chromium/build.sh, or set --chromium-image (ROTA_CHROMIUM_IMAGE)",
                    settings.chromium_image
                )
            })?;
        let container = DockerChromium {
            docker,
            name,
            removed: Default::default(),
        };
        match container.open(settings).await {
            Ok(url) => Ok((container, url)),
            Err(e) => {
                container.remove().await;
                Err(e)
            }
        }
    }

    /// Starts the container and follows its log to the `DevTools listening on` line.
    async fn open(&self, settings: &ChromiumArgs) -> anyhow::Result<String> {
        self.docker
            .start_container(
                &self.name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .with_context(|| format!("cannot start the Chromium container {}", self.name))?;
        let options = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let mut logs = self.docker.logs(&self.name, Some(options));
        let mut said = Vec::new();
        let found = tokio::time::timeout(settings.chromium_start_timeout, async {
            while let Some(Ok(chunk)) = logs.next().await {
                for line in String::from_utf8_lossy(&chunk.into_bytes()).lines() {
                    if let Some(url) = line.split("DevTools listening on ").nth(1) {
                        return Some(url.trim().to_owned());
                    }
                    said.push(line.to_owned());
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(url)) => Ok(url),
            Ok(None) => bail!(
                "Chromium in container {} exited before it was ready; it said: {}",
                self.name,
                tail(&said)
            ),
            Err(_) => bail!(
                "Chromium in container {} did not open its DevTools endpoint within {} s \
                 (--chromium-start-timeout); it said: {}",
                self.name,
                settings.chromium_start_timeout.as_secs_f64(),
                tail(&said)
            ),
        }
    }

    /// Removes the container (killing Chromium if it still runs).
    pub async fn remove(&self) {
        self.removed.store(true, Ordering::Relaxed);
        if let Err(e) = self
            .docker
            .remove_container(&self.name, Some(force()))
            .await
        {
            tracing::warn!(container = %self.name, error = %e, "cannot remove a Chromium container");
        }
    }
}

impl Drop for DockerChromium {
    fn drop(&mut self) {
        // Dropped without `remove` (a worker dropped at once): remove it in the background
        // while the runtime still runs; otherwise the next container started here does.
        if self.removed.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (docker, name) = (self.docker.clone(), self.name.clone());
            runtime.spawn(async move {
                let _ = docker.remove_container(&name, Some(force())).await;
            });
        }
    }
}

fn force() -> RemoveContainerOptions {
    RemoveContainerOptions {
        force: true,
        ..Default::default()
    }
}

async fn connect() -> anyhow::Result<Docker> {
    let docker = Docker::connect_with_local_defaults().context(
        "cannot reach the Docker engine (is dockerd running? deploy/setup.sh starts it)",
    )?;
    docker
        .negotiate_version()
        .await
        .context("cannot reach the Docker engine (is dockerd running? deploy/setup.sh starts it)")
}

/// Removes the Chromium containers of this host whose owner process is gone (an owner that
/// was killed could not remove its own).
async fn remove_stale(docker: &Docker) {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![
            format!("{ROLE_LABEL}={ROLE}"),
            format!("{HOST_LABEL}={}", host()),
        ],
    )]);
    let options = ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    let Ok(containers) = docker.list_containers(Some(options)).await else {
        return;
    };
    for c in containers {
        let owner = c
            .labels
            .as_ref()
            .and_then(|l| l.get(OWNER_LABEL))
            .and_then(|p| p.parse::<u32>().ok());
        if let (Some(owner), Some(id)) = (owner, c.id)
            && !process_alive(owner)
        {
            tracing::info!(container = %id, owner, "removing a Chromium container whose owner is gone");
            let _ = docker.remove_container(&id, Some(force())).await;
        }
    }
}

/// This host's name, as labels and container names may hold it.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect()
        })
        .unwrap_or_else(|_| "host".into())
}
