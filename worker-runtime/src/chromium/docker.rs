//! Chromium in a container of its own (`--chromium-mode docker`), started through bollard:
//! the configured image, unprivileged on a read-only root, with the pool's environment, on
//! the Docker network `--chromium-docker-network` (made if missing), never the host's:
//! Chromium loads pages through that network, and cannot reach the host's loopback (the
//! broker, other browsers' DevTools). DevTools listens on the container's own loopback
//! (Chromium binds nowhere else); `socat` in the image forwards the container's
//! [`FORWARD_PORT`] on that network to it, and the worker connects there, at the container's
//! address. The endpoint is read from the container's log. The container is removed when
//! its browser ends; containers whose owner process is gone are removed by the next one that
//! starts on this host.
//!
//! A worker inside a `docker` worker's container uses Chromium beside it instead (the image
//! `rota-worker-chromium`, `--chromium-mode local`): DevTools on that container's loopback.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
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

/// Chromium's DevTools port, on the container's loopback.
const DEVTOOLS_PORT: u16 = 9222;
/// Where the container's forwarder listens, on its network, for the worker.
pub const FORWARD_PORT: u16 = 9223;

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
        let network = network(&docker, &settings.chromium_docker_network).await?;
        // The forwarder, then Chromium in its place (the container's init reaps both).
        let mut cmd: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "socat TCP-LISTEN:{FORWARD_PORT},fork,reuseaddr TCP:127.0.0.1:{DEVTOOLS_PORT} & exec /usr/bin/chromium \"$@\""
            ),
            "chromium".into(),
        ];
        cmd.extend(
            FLAGS
                .iter()
                .filter(|f| !f.starts_with("--remote-debugging-port"))
                .map(|f| (*f).to_owned()),
        );
        cmd.push(format!("--remote-debugging-port={DEVTOOLS_PORT}"));
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
            env: Some(settings.work_env().container()),
            host_config: Some(HostConfig {
                network_mode: Some(network.clone()),
                init: Some(true),
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
        match container.open(settings, &network).await {
            Ok(url) => Ok((container, url)),
            Err(e) => {
                container.remove().await;
                Err(e)
            }
        }
    }

    /// Starts the container, follows its log to the `DevTools listening on` line, and
    /// returns that endpoint as the worker reaches it: through the forwarder, at the
    /// container's address on `network`.
    async fn open(&self, settings: &ChromiumArgs, network: &str) -> anyhow::Result<String> {
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
            Ok(Some(url)) => {
                let address = self.address(network).await?;
                let inside = format!("ws://127.0.0.1:{DEVTOOLS_PORT}/");
                let path = url.strip_prefix(&inside).with_context(|| {
                    format!(
                        "Chromium in container {} listens at {url}, not at {inside}…",
                        self.name
                    )
                })?;
                Ok(format!("ws://{address}:{FORWARD_PORT}/{path}"))
            }
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

    /// The container's address on `network`.
    async fn address(&self, network: &str) -> anyhow::Result<String> {
        let info = self
            .docker
            .inspect_container(&self.name, None)
            .await
            .with_context(|| format!("cannot inspect the Chromium container {}", self.name))?;
        info.network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(network))
            .and_then(|e| e.ip_address)
            .filter(|ip| !ip.is_empty())
            .with_context(|| {
                format!(
                    "the Chromium container {} has no address on the Docker network {network}",
                    self.name
                )
            })
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

/// Makes the Docker network `name` unless it is there (another worker may make it at the same
/// time); returns its name. `host` and `none` are refused: one gives Chromium the host's
/// loopback, the other leaves the worker no way to reach it.
async fn network(docker: &Docker, name: &str) -> anyhow::Result<String> {
    if matches!(name, "host" | "none" | "") {
        bail!(
            "--chromium-docker-network {name:?}: give the name of a Docker network (the default, \
             rota-chromium, is made when missing); `host` would put Chromium on the host's \
             loopback with the broker, `none` leaves the worker no way to reach it"
        );
    }
    if docker.inspect_network(name, None).await.is_ok() {
        return Ok(name.to_owned());
    }
    let request = NetworkCreateRequest {
        name: name.to_owned(),
        driver: Some("bridge".into()),
        labels: Some(HashMap::from([(ROLE_LABEL.to_owned(), ROLE.to_owned())])),
        ..Default::default()
    };
    match docker.create_network(request).await {
        Ok(_) => Ok(name.to_owned()),
        // Made by another worker meanwhile.
        Err(_) if docker.inspect_network(name, None).await.is_ok() => Ok(name.to_owned()),
        Err(e) => Err(anyhow::anyhow!(
            "cannot make the Docker network {name} for Chromium: {e}; make it (docker network create {name}) \
             or name another with --chromium-docker-network"
        )),
    }
}

/// This host's address on the Docker network `name` (its gateway), the network made if
/// missing: where a browser or a worker on that network reaches a page this host serves.
pub async fn host_address(name: &str) -> anyhow::Result<String> {
    let docker = connect().await?;
    network(&docker, name).await?;
    let info = docker
        .inspect_network(name, None)
        .await
        .with_context(|| format!("cannot inspect the Docker network {name}"))?;
    info.ipam
        .and_then(|ipam| ipam.config)
        .into_iter()
        .flatten()
        .find_map(|c| c.gateway.filter(|g| !g.is_empty()))
        .with_context(|| format!("the Docker network {name} has no gateway"))
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
