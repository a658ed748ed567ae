//! The environment a Work runs with. A worker process, a worker container and a worker's
//! Chromium never inherit the agent's environment, which holds its broker credentials
//! (`ROTA_AMQP_URL`): they start from an empty one, with the variables of [`ALLOWED`] (and
//! `LC_*`) copied from the agent, plus what the pool adds with `--work-env KEY=VALUE` and
//! `--work-env-pass KEY`. In a container, `PATH` is the image's and `HOME` and `TMPDIR` are
//! `/tmp` (the only place there a Work may write besides its folders).
//!
//! A `local` or `thread` Work runs inside the agent's process and can read its environment
//! whatever this module does; only its Chromium is started with this environment.

use std::collections::BTreeMap;

/// The variables copied from the agent's environment (and every `LC_*`).
pub const ALLOWED: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
];

/// The variables a container gets from its image or from [`WorkEnv::container`], not from the
/// agent's host.
const HOST_ONLY: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "TMPDIR"];

/// Whether `key` is copied from the agent's environment.
pub fn allowed(key: &str) -> bool {
    ALLOWED.contains(&key) || key.starts_with("LC_")
}

/// The environment of a pool's Work: name → value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkEnv {
    vars: BTreeMap<String, String>,
}

impl WorkEnv {
    /// The allow-listed variables of this process's environment, plus `set` (`KEY=VALUE`, as
    /// given to `--work-env`) and the variables named in `pass` (as given to
    /// `--work-env-pass`) with their values here. A variable to pass that is not set is left
    /// out with a warning.
    pub fn build(set: &[String], pass: &[String]) -> anyhow::Result<WorkEnv> {
        Self::check(set, pass)?;
        let mut vars: BTreeMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| allowed(k))
            .collect();
        for key in pass {
            match std::env::var(key) {
                Ok(value) => {
                    vars.insert(key.clone(), value);
                }
                Err(_) => tracing::warn!(
                    variable = %key,
                    "--work-env-pass names a variable this agent does not have (or not in UTF-8); Work runs without it"
                ),
            }
        }
        for (key, value) in set.iter().filter_map(|spec| spec.split_once('=')) {
            vars.insert(key.to_owned(), value.to_owned());
        }
        Ok(WorkEnv { vars })
    }

    /// Checks `--work-env` and `--work-env-pass` (see [`WorkEnv::build`]); the message says
    /// what to change.
    pub fn check(set: &[String], pass: &[String]) -> anyhow::Result<()> {
        for key in pass {
            check_key(key, "--work-env-pass")?;
        }
        for spec in set {
            let (key, _) = spec.split_once('=').ok_or_else(|| {
                anyhow::anyhow!(
                    "--work-env {spec:?} is not KEY=VALUE (e.g. --work-env LANG=C.UTF-8)"
                )
            })?;
            check_key(key, "--work-env")?;
        }
        Ok(())
    }

    /// This process's whole environment: that of a worker runtime, which its agent made.
    pub fn inherited() -> WorkEnv {
        WorkEnv {
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }

    /// The variables, for `Command::envs`.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The environment of a container, as `KEY=VALUE`: these variables but those that name
    /// places on the host, with `HOME` and `TMPDIR` set to the container's `/tmp`.
    pub fn container(&self) -> Vec<String> {
        self.vars
            .iter()
            .filter(|(k, _)| !HOST_ONLY.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .chain(["HOME=/tmp".to_owned(), "TMPDIR=/tmp".to_owned()])
            .collect()
    }
}

/// Refuses a variable name that is not one, or that would hand Work the agent's broker
/// credentials.
fn check_key(key: &str, flag: &str) -> anyhow::Result<()> {
    if key.is_empty() || key.contains(['=', '\0']) {
        anyhow::bail!("{flag} {key:?} is not a variable name");
    }
    if key.starts_with("ROTA_AMQP") {
        anyhow::bail!(
            "{flag} {key}: the agent's broker settings are never given to Work (they hold its \
             credentials); remove it"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allow_list_and_the_pools_additions() {
        // PATH is set in any test run; ROTA_AMQP_URL may be.
        let env =
            WorkEnv::build(&["GREETING=hello=world".into()], &["PATH".into()]).expect("valid");
        let vars: BTreeMap<_, _> = env.vars().collect();
        assert_eq!(vars.get("GREETING"), Some(&"hello=world"));
        assert!(vars.contains_key("PATH"));
        assert!(
            vars.keys().all(|k| allowed(k) || *k == "GREETING"),
            "{vars:?}"
        );
        let container = env.container();
        assert!(container.contains(&"HOME=/tmp".to_owned()));
        assert!(!container.iter().any(|v| v.starts_with("PATH=")));
    }

    #[test]
    fn refuses_broker_settings_and_bad_names() {
        assert!(WorkEnv::build(&[], &["ROTA_AMQP_URL".into()]).is_err());
        assert!(WorkEnv::build(&["ROTA_AMQP_URL=amqp://x".into()], &[]).is_err());
        assert!(WorkEnv::build(&["NOVALUE".into()], &[]).is_err());
        assert!(WorkEnv::build(&["=x".into()], &[]).is_err());
    }
}
