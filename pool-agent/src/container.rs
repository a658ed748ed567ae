//! `docker` workers: the worker runtime inside a container of its own, started through the
//! Docker engine (bollard), attached over stdin/stdout and spoken to with the same protocol as
//! `process` workers (see [`crate::process`]).
//!
//! Containers are hardened by default: no network (or a Docker network, or the host's, when
//! configured), the pool's environment only (see [`rota_worker_runtime::WorkEnv`]), a
//! non-root user, every capability dropped, `no-new-privileges`, a read-only root filesystem
//! with a small tmpfs `/tmp`, and memory (swap included), CPU and process-count limits. The
//! alias folders and the agent's job folders are bind-mounted at the same paths, so a path
//! means the same file inside and outside. Every container carries the label
//! `rota.agent=<namespace>/<agent id>`; an agent removes the ones of a previous run of itself
//! when it starts, and its own when it stops.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context as _;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptions,
};
use futures::StreamExt;
use tokio::io::AsyncWrite;

/// The label naming the agent that owns a container: `<namespace>/<agent id>`.
pub const OWNER_LABEL: &str = "rota.agent";
/// The label naming the deployment (namespace) a container belongs to.
pub const NAMESPACE_LABEL: &str = "rota.namespace";

/// The network a worker container gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// No network at all (only the container's own loopback): Work reaches nothing.
    None,
    /// The host's network, loopback included: Work reaches whatever the host reaches, the
    /// broker and every local service among them.
    Host,
    /// A Docker network by name (e.g. one made with `docker network create`): Work reaches
    /// what that network routes to.
    Named(String),
}

impl Network {
    /// Parses `--docker-network`: `none`, `host`, or a Docker network's name.
    pub fn parse(value: &str) -> Result<Network, String> {
        match value {
            "none" => Ok(Network::None),
            "host" => Ok(Network::Host),
            "" => Err("give none, host, or the name of a Docker network".into()),
            name => Ok(Network::Named(name.to_owned())),
        }
    }

    /// Docker's `network_mode`.
    pub fn mode(&self) -> &str {
        match self {
            Network::None => "none",
            Network::Host => "host",
            Network::Named(name) => name,
        }
    }
}

/// How a pool's containers are made.
#[derive(Debug, Clone)]
pub struct DockerSpec {
    /// The image; its entrypoint is a worker runtime (see `deploy/images/worker/build.sh`).
    pub image: String,
    pub network: Network,
    /// `uid:gid` the runtime runs as.
    pub user: String,
    /// The runtime's whole environment, `KEY=VALUE` (see [`rota_worker_runtime::WorkEnv`]).
    pub env: Vec<String>,
    /// Memory limit in bytes, swap included (0: none).
    pub memory: u64,
    /// CPUs, e.g. 1.5 (0: no limit).
    pub cpus: f64,
    /// Most processes (threads included) at once (0: no limit).
    pub pids: u32,
    /// Size of the tmpfs `/tmp`, in bytes.
    pub tmp_size: u64,
    /// Host folders mounted read-write at the same path: the aliases and the job folders.
    pub mounts: Vec<PathBuf>,
    /// The value of [`OWNER_LABEL`]: `<namespace>/<agent id>`.
    pub owner: String,
    /// The value of [`NAMESPACE_LABEL`].
    pub namespace: String,
    /// Container names are `<name_prefix>-<worker id>`.
    pub name_prefix: String,
}

/// The Docker engine, with the spec of this pool's containers.
pub struct Engine {
    docker: Docker,
    spec: DockerSpec,
}

/// A started container and its attached standard streams.
pub struct Attached {
    pub container: Container,
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    pub output:
        Pin<Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
}

impl Engine {
    /// Connects to the engine (`DOCKER_HOST`, else the local socket), agrees on an API
    /// version, and checks that the image is there.
    pub async fn connect(spec: DockerSpec) -> anyhow::Result<Engine> {
        let unreachable = "cannot reach a Docker engine (DOCKER_HOST, else /var/run/docker.sock); start one \
             (deploy/setup.sh does) or choose another --worker-location";
        let docker = Docker::connect_with_defaults()
            .context(unreachable)?
            .negotiate_version()
            .await
            .context(unreachable)?;
        docker.ping().await.context(unreachable)?;
        docker.inspect_image(&spec.image).await.with_context(|| {
            format!(
                "the Docker image {} is not on this engine; build it with deploy/images/worker/build.sh \
                 (images are built locally, no registry is used) or set --docker-image",
                spec.image
            )
        })?;
        Ok(Engine { docker, spec })
    }

    /// Removes the containers a previous run of this agent left behind (running or not).
    pub async fn remove_all(&self) -> anyhow::Result<usize> {
        let filters =
            HashMap::from([("label", vec![format!("{OWNER_LABEL}={}", self.spec.owner)])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let found = self.docker.list_containers(Some(options)).await?;
        for c in &found {
            if let Some(id) = &c.id {
                remove(&self.docker, id).await;
            }
        }
        Ok(found.len())
    }

    /// Creates, attaches to and starts the container of worker `worker`, whose runtime is
    /// started with `args` (after the image's entrypoint).
    pub async fn start(&self, worker: &str, args: Vec<String>) -> anyhow::Result<Attached> {
        let spec = &self.spec;
        let name = format!("{}-{worker}", spec.name_prefix);
        let host = HostConfig {
            network_mode: Some(spec.network.mode().to_owned()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".into(),
                format!("rw,nosuid,nodev,size={}", spec.tmp_size),
            )])),
            memory: (spec.memory > 0).then_some(spec.memory as i64),
            memory_swap: (spec.memory > 0).then_some(spec.memory as i64),
            nano_cpus: (spec.cpus > 0.0).then_some((spec.cpus * 1e9) as i64),
            pids_limit: (spec.pids > 0).then_some(i64::from(spec.pids)),
            // A tiny init as PID 1 passes SIGTERM on to the runtime and reaps orphans.
            init: Some(true),
            binds: Some(
                spec.mounts
                    .iter()
                    .map(|dir| format!("{0}:{0}:rw", dir.display()))
                    .collect(),
            ),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(args),
            user: Some(spec.user.clone()),
            env: Some(spec.env.clone()),
            labels: Some(HashMap::from([
                (OWNER_LABEL.into(), spec.owner.clone()),
                (NAMESPACE_LABEL.into(), spec.namespace.clone()),
                ("rota.worker".into(), worker.into()),
            ])),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            // The runtime's stdin closes when the agent goes away, so it ends too.
            stdin_once: Some(true),
            tty: Some(false),
            host_config: Some(host),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await
            .with_context(|| format!("cannot create the worker container {name}"))?;
        let container = Container {
            docker: self.docker.clone(),
            id: created.id,
            name,
        };
        let attach = AttachContainerOptionsBuilder::new()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let attached = self
            .docker
            .attach_container(&container.id, Some(attach))
            .await
            .with_context(|| format!("cannot attach to the worker container {}", container.name))?;
        self.docker
            .start_container(&container.id, None)
            .await
            .with_context(|| format!("cannot start the worker container {}", container.name))?;
        Ok(Attached {
            container,
            stdin: attached.input,
            output: attached.output,
        })
    }
}

/// One worker's container. Dropping it removes the container (in the background).
pub struct Container {
    docker: Docker,
    pub id: String,
    pub name: String,
}

impl Container {
    /// The host's pid of the runtime (the child of the container's init), for its memory.
    pub async fn runtime_pid(&self) -> Option<u32> {
        let state = self
            .docker
            .inspect_container(&self.id, None)
            .await
            .ok()?
            .state?;
        let init = state.pid.filter(|p| *p > 0)?;
        let children =
            std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Stops the container (SIGTERM, then SIGKILL after `grace`) and removes it.
    pub async fn stop(&self, grace: Duration) {
        let t = i32::try_from(grace.as_secs().max(1)).unwrap_or(i32::MAX);
        let _ = self
            .docker
            .stop_container(
                &self.id,
                Some(StopContainerOptionsBuilder::new().t(t).build()),
            )
            .await;
        remove(&self.docker, &self.id).await;
    }

    /// How the container ended (waits for it to end, at most `within`).
    pub async fn how_it_ended(&self, within: Duration) -> String {
        let mut wait = self
            .docker
            .wait_container(&self.id, None::<WaitContainerOptions>);
        // A non-zero exit arrives as an error value: the state below tells it either way.
        let _ = tokio::time::timeout(within, wait.next()).await;
        // The engine may learn of an out-of-memory kill just after the exit itself.
        let mut tries = 0;
        let (info, state) = loop {
            let Ok(info) = self.docker.inspect_container(&self.id, None).await else {
                return "no exit status (the container is gone)".into();
            };
            let state = info.state.clone().unwrap_or_default();
            tries += 1;
            let killed = state.exit_code == Some(128 + 9);
            if state.oom_killed == Some(true) || !killed || tries == 10 {
                break (info, state);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let limit = info
            .host_config
            .and_then(|h| h.memory)
            .filter(|m| *m > 0)
            .map(|m| format!(" of {} MiB", m / (1024 * 1024)))
            .unwrap_or_default();
        match (state.oom_killed, state.exit_code) {
            (Some(true), _) => format!("killed for using more than its memory limit{limit}"),
            // The init reports a runtime killed by signal N as 128 + N.
            (_, Some(code)) if code > 128 => {
                let sig = (code - 128) as i32;
                let name = nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str())
                    .unwrap_or("?");
                format!("killed by signal {sig} ({name})")
            }
            (_, Some(code)) => format!("exit status {code}"),
            _ => "no exit status".into(),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let (docker, id) = (self.docker.clone(), self.id.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { remove(&docker, &id).await });
        }
    }
}

/// Removes a container, killing it first if it runs; a container already gone is fine.
async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptionsBuilder::new().force(true).build();
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => {}
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }) => {}
        Err(e) => tracing::warn!(container = id, error = %e, "cannot remove a worker container"),
    }
}
