//! Where a pool's Chromium lives, as flags (`ROTA_CHROMIUM_…` variables, config keys): one
//! [`ChromiumArgs`] flattened into `pool-agent run`, `worker-runtime serve|run` and the demo,
//! and handed on from an agent to its worker processes with [`ChromiumArgs::to_args`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use rota_common::config::parse_duration;

use crate::WorkEnv;

/// Where each worker's browser comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The worker starts `--chromium-binary` itself, with a fresh profile folder. Inside a
    /// `docker` worker's container this is Chromium beside `worker-runtime` in the image.
    Local,
    /// The worker starts a container of `--chromium-image` (network `host`) and removes it
    /// when the worker is replaced or stops.
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
        args
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
        assert!(again.check().is_ok());
    }
}
