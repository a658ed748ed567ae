//! Where a pool's Chromium lives, as flags (`ROTA_CHROMIUM_…` variables, config keys): one
//! [`ChromiumArgs`] flattened into `pool-agent run`, `worker-runtime serve|run` and the demo,
//! and handed on from an agent to its worker processes with [`ChromiumArgs::to_args`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use rota_common::config::parse_duration;

use super::policy::Policy;
use crate::WorkEnv;

/// Where each worker's browser comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The worker starts `--chromium-binary` itself, with a fresh profile folder. Inside a
    /// `docker` worker's container this is Chromium beside `worker-runtime` in the image.
    Local,
    /// The worker starts a container of `--chromium-image` (on `--chromium-docker-network`,
    /// never the host's network) and removes it when the worker is replaced or stops.
    Docker,
    /// The worker connects to the Chromium already running at `--chromium-url`, which it never
    /// closes.
    Url,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Docker => "docker",
            Mode::Url => "url",
        }
    }
}

/// How Work gets its browser (see the README's Chromium section).
#[derive(Debug, Clone, Args)]
pub struct ChromiumArgs {
    /// Where Chromium lives: `local` (a process per worker), `docker` (a container per
    /// worker) or `url` (an endpoint already running).
    #[arg(long, env = "ROTA_CHROMIUM_MODE", value_enum, default_value_t = Mode::Local)]
    pub chromium_mode: Mode,

    /// The Chromium program for `local` (a name on PATH or a path).
    #[arg(long, env = "ROTA_CHROMIUM_BINARY", default_value = "chromium")]
    pub chromium_binary: PathBuf,

    /// The image for `docker` (built by deploy/images/chromium/build.sh).
    #[arg(
        long,
        env = "ROTA_CHROMIUM_IMAGE",
        default_value = "rota-chromium:latest"
    )]
    pub chromium_image: String,

    /// The DevTools endpoint for `url`: `http://host:port` (its /json/version is read) or the
    /// browser's `ws://…` address.
    #[arg(long, env = "ROTA_CHROMIUM_URL")]
    pub chromium_url: Option<String>,

    /// An extra Chromium flag without its leading `--`, e.g. `lang=de` (repeatable; separated
    /// by spaces in the environment). Applies to `local` and `docker`.
    #[arg(
        long = "chromium-arg",
        env = "ROTA_CHROMIUM_ARGS",
        value_delimiter = ' '
    )]
    pub chromium_args: Vec<String>,

    /// Where `local` browsers get their profile folders (default: the system's temporary
    /// folder). Each browser gets a fresh one, removed when the browser ends.
    #[arg(long, env = "ROTA_CHROMIUM_PROFILE_ROOT")]
    pub chromium_profile_root: Option<PathBuf>,

    /// How long a browser may take to start and say where its DevTools endpoint is.
    #[arg(long, env = "ROTA_CHROMIUM_START_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub chromium_start_timeout: Duration,

    /// A host Chromium may load pages and resources from (repeatable; comma-separated in the
    /// environment): a name (`reports.example.com`), `*.example.com` for its subdomains, an
    /// address, or `*` for any host but loopback. None by default: every URL is refused until
    /// the pool lists its hosts. Loopback (127.0.0.1, localhost) only when named here;
    /// link-local and cloud metadata addresses and the broker's ports never.
    #[arg(
        long = "chromium-allow-host",
        env = "ROTA_CHROMIUM_ALLOW_HOSTS",
        value_delimiter = ','
    )]
    pub chromium_allow_hosts: Vec<String>,

    /// A scheme Chromium may load (repeatable): http, https, ws, wss. file:, data: and the
    /// others never.
    #[arg(
        long = "chromium-allow-scheme",
        env = "ROTA_CHROMIUM_ALLOW_SCHEMES",
        value_delimiter = ',',
        default_values = ["http", "https"]
    )]
    pub chromium_allow_schemes: Vec<String>,

    /// A port Chromium never loads from, on any host, besides RabbitMQ's own (4369, 5671,
    /// 5672, 15671, 15672, 25672, …): the broker's, when it listens elsewhere (repeatable).
    #[arg(
        long = "chromium-deny-port",
        env = "ROTA_CHROMIUM_DENY_PORTS",
        value_delimiter = ','
    )]
    pub chromium_deny_ports: Vec<u16>,

    /// A readiness condition NAME=EXPRESSION that payloads may name (`"ready": "NAME"`): the
    /// page is ready once the JavaScript EXPRESSION is truthy, checked every 50 ms
    /// (repeatable; one per line in the environment). Payloads never carry JavaScript.
    #[arg(
        long = "chromium-ready",
        env = "ROTA_CHROMIUM_READY",
        value_delimiter = '\n'
    )]
    pub chromium_ready: Vec<String>,

    /// The Docker network of `docker` browsers (made if missing): they load pages through it,
    /// never through the host's network, and the worker reaches DevTools at the container's
    /// address on it.
    #[arg(
        long,
        env = "ROTA_CHROMIUM_DOCKER_NETWORK",
        default_value = "rota-chromium"
    )]
    pub chromium_docker_network: String,

    /// The browser's environment: set by an agent for the browsers of its in-process
    /// workers; unset, a browser gets this process's (a worker runtime's, which its agent
    /// made).
    #[arg(skip)]
    pub env: Option<WorkEnv>,
}

impl Default for ChromiumArgs {
    fn default() -> Self {
        Self {
            chromium_mode: Mode::Local,
            chromium_binary: PathBuf::from("chromium"),
            chromium_image: "rota-chromium:latest".into(),
            chromium_url: None,
            chromium_args: Vec::new(),
            chromium_profile_root: None,
            chromium_start_timeout: Duration::from_secs(30),
            chromium_allow_hosts: Vec::new(),
            chromium_allow_schemes: vec!["http".into(), "https".into()],
            chromium_deny_ports: Vec::new(),
            chromium_ready: Vec::new(),
            chromium_docker_network: "rota-chromium".into(),
            env: None,
        }
    }
}

impl ChromiumArgs {
    /// The same settings as `worker-runtime serve` arguments, for the agent to pass to the
    /// worker processes (and containers) it starts.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--chromium-mode={}", self.chromium_mode.as_str()),
            format!("--chromium-binary={}", self.chromium_binary.display()),
            format!("--chromium-image={}", self.chromium_image),
            format!(
                "--chromium-start-timeout={}ms",
                self.chromium_start_timeout.as_millis()
            ),
        ];
        if let Some(url) = &self.chromium_url {
            args.push(format!("--chromium-url={url}"));
        }
        if let Some(root) = &self.chromium_profile_root {
            args.push(format!("--chromium-profile-root={}", root.display()));
        }
        args.extend(
            self.chromium_args
                .iter()
                .map(|a| format!("--chromium-arg={a}")),
        );
        args.push(format!(
            "--chromium-docker-network={}",
            self.chromium_docker_network
        ));
        let each = [
            ("allow-host", &self.chromium_allow_hosts),
            ("allow-scheme", &self.chromium_allow_schemes),
            ("ready", &self.chromium_ready),
        ];
        for (flag, values) in each {
            args.extend(values.iter().map(|v| format!("--chromium-{flag}={v}")));
        }
        args.extend(
            self.chromium_deny_ports
                .iter()
                .map(|p| format!("--chromium-deny-port={p}")),
        );
        args
    }

    /// Adds the port of the broker at `amqp_url` to `--chromium-deny-port`, for a broker that
    /// listens on one of its own.
    pub fn deny_broker_port(&mut self, amqp_url: &str) {
        let port = url::Url::parse(amqp_url).ok().and_then(|u| u.port());
        if let Some(port) = port
            && !self.chromium_deny_ports.contains(&port)
        {
            self.chromium_deny_ports.push(port);
        }
    }

    /// The pool's readiness conditions by name (`--chromium-ready NAME=EXPRESSION`).
    pub fn ready_expression(&self, name: &str) -> anyhow::Result<&str> {
        let found = self.chromium_ready.iter().find_map(|spec| {
            spec.split_once('=')
                .filter(|(n, _)| *n == name)
                .map(|(_, expr)| expr)
        });
        found.ok_or_else(|| {
            let names: Vec<&str> = self
                .chromium_ready
                .iter()
                .filter_map(|s| s.split_once('=').map(|(n, _)| n))
                .collect();
            anyhow::anyhow!(
                "this pool has no ready condition named {name:?} ({}); define it with --chromium-ready {name}=EXPRESSION",
                if names.is_empty() {
                    "it has none".to_owned()
                } else {
                    format!("it has {}", names.join(", "))
                }
            )
        })
    }

    /// The environment a browser starts with (see [`ChromiumArgs::env`]).
    pub fn work_env(&self) -> WorkEnv {
        self.env.clone().unwrap_or_else(WorkEnv::inherited)
    }

    /// The folder under which `local` browsers get their profile folders.
    pub fn profile_root(&self) -> PathBuf {
        self.chromium_profile_root
            .clone()
            .unwrap_or_else(std::env::temp_dir)
    }

    /// Checks what clap cannot; the message says what to change.
    pub fn check(&self) -> anyhow::Result<()> {
        Policy::new(self)?;
        for spec in &self.chromium_ready {
            match spec.split_once('=') {
                Some((name, expr)) if !name.is_empty() && !expr.trim().is_empty() => {}
                _ => anyhow::bail!(
                    "--chromium-ready {spec:?} is not NAME=EXPRESSION (e.g. --chromium-ready 'table=document.querySelector(\"#total\") !== null')"
                ),
            }
        }
        if self.chromium_mode == Mode::Url && self.chromium_url.is_none() {
            anyhow::bail!(
                "--chromium-mode url needs --chromium-url (ROTA_CHROMIUM_URL), e.g. http://127.0.0.1:9222"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        chromium: ChromiumArgs,
    }

    #[test]
    fn to_args_parses_back_to_the_same_settings() {
        let original = Cli::parse_from([
            "x",
            "--chromium-mode",
            "url",
            "--chromium-url",
            "http://127.0.0.1:9222",
            "--chromium-arg",
            "lang=de",
            "--chromium-arg",
            "disable-features=A,B",
            "--chromium-profile-root",
            "/tmp/p",
            "--chromium-start-timeout",
            "5s",
            "--chromium-allow-host",
            "127.0.0.1,*.example.com",
            "--chromium-deny-port",
            "5673",
            "--chromium-ready",
            "done=window.done === true",
            "--chromium-docker-network",
            "pages",
        ])
        .chromium;
        let mut argv = vec!["x".to_owned()];
        argv.extend(original.to_args());
        let again = Cli::parse_from(argv).chromium;
        assert_eq!(again.chromium_mode, Mode::Url);
        assert_eq!(again.chromium_url.as_deref(), Some("http://127.0.0.1:9222"));
        assert_eq!(again.chromium_args, ["lang=de", "disable-features=A,B"]);
        assert_eq!(again.chromium_profile_root, Some(PathBuf::from("/tmp/p")));
        assert_eq!(again.chromium_start_timeout, Duration::from_secs(5));
        assert_eq!(again.chromium_allow_hosts, ["127.0.0.1", "*.example.com"]);
        assert_eq!(again.chromium_allow_schemes, ["http", "https"]);
        assert_eq!(again.chromium_deny_ports, [5673]);
        assert_eq!(again.chromium_ready, ["done=window.done === true"]);
        assert_eq!(again.chromium_docker_network, "pages");
        assert!(again.check().is_ok());
    }
}
