//! Configuration: every setting is a flag, an environment variable (`ROTA_…`) and a key of an
//! optional TOML file (`--config FILE` or `ROTA_CONFIG`), in that order of precedence.
//!
//! The file's keys are the long flag names (`pool-max-size = 4`, `pool_max_size` works too;
//! lists for repeatable flags: `queue = ["default", "reports"]`). Keys that no flag of the
//! command knows are an error, so a typo does not pass silently.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser};

use crate::Names;
use crate::names::QueueType;
use crate::roles::RoleArgs;
use crate::telemetry::LogFormat;

/// Tables of the config file that are not flags: each is read by the part that owns it
/// (`[[schedule]]`: the scheduler's schedules). Parts that do not own one ignore it, so one
/// file can serve every part.
pub const SECTIONS: &[&str] = &["schedule"];

/// Where the broker is, how to reach it, which namespace to use and who is who: shared by
/// every binary.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL, or the URLs of a cluster's nodes separated by commas: a part connects to
    /// the first that answers, and after a failure to the next. `amqps://` for TLS. Add
    /// `?heartbeat=N` to change the 10 s heartbeat. Each part should connect as the user of its
    /// role (see `scheduler setup-users`).
    #[arg(
        id = "amqp_url",
        long = "amqp-url",
        env = "ROTA_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    url: String,

    /// PEM file of the CA (or CAs) that signed the broker's TLS certificate, trusted besides
    /// the public roots (`amqps://` to a broker with a private CA).
    #[arg(long, env = "ROTA_AMQP_CA_FILE", global = true)]
    pub amqp_ca_file: Option<PathBuf>,

    /// PEM file of a client certificate (X.509 v3) to present over `amqps://` (with
    /// --amqp-key-file), for RabbitMQ's EXTERNAL authentication: add `?auth_mechanism=external` to the URL and name
    /// the certificate's user in it (`amqps://rota-agent@host/%2f?auth_mechanism=external`).
    #[arg(
        long,
        env = "ROTA_AMQP_CERT_FILE",
        requires = "amqp_key_file",
        global = true
    )]
    pub amqp_cert_file: Option<PathBuf>,

    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "ROTA_AMQP_KEY_FILE",
        requires = "amqp_cert_file",
        global = true
    )]
    pub amqp_key_file: Option<PathBuf>,

    /// Prefix of every exchange and queue name, so deployments can share a broker.
    #[arg(long, env = "ROTA_NAMESPACE", default_value = "rota", global = true)]
    pub namespace: String,

    /// Log lines as text or JSON (filter with RUST_LOG, e.g. RUST_LOG=info,rota_pool_agent=debug).
    #[arg(long, env = "ROTA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// The kind of the jobs queues: classic (priorities 0-9), quorum (replicated; two
    /// priority levels on RabbitMQ 4), or auto: quorum on RabbitMQ 4 and later, classic on 3.x.
    /// Every part of a deployment must use the same.
    #[arg(long, env = "ROTA_QUEUE_TYPE", value_enum, default_value_t = QueueType::Auto, global = true)]
    pub queue_type: QueueType,

    #[command(flatten)]
    pub roles: RoleArgs,
}

impl BrokerArgs {
    pub fn names(&self) -> anyhow::Result<Names> {
        Ok(Names::new(&self.namespace)
            .map_err(anyhow::Error::msg)?
            .with_jobs_queue_type(self.queue_type)
            .with_roles(self.roles.roles()))
    }

    /// The URL to connect with: `--amqp-url`, with the TLS files of `--amqp-ca-file`,
    /// `--amqp-cert-file` and `--amqp-key-file` added to each node's URL (as the query
    /// parameters `cacertfile`, `certfile` and `keyfile`, which a URL may also carry itself).
    pub fn amqp_url(&self) -> String {
        let files = [
            ("cacertfile", &self.amqp_ca_file),
            ("certfile", &self.amqp_cert_file),
            ("keyfile", &self.amqp_key_file),
        ];
        self.url
            .split(',')
            .map(|node| {
                let mut node = node.trim().to_owned();
                for (key, file) in files {
                    if let Some(file) = file
                        && crate::amqp::url_param(&node, key).is_none()
                    {
                        let sep = if node.contains('?') { '&' } else { '?' };
                        let value = crate::amqp::percent_encode(&file.to_string_lossy());
                        node = format!("{node}{sep}{key}={value}");
                    }
                }
                node
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The entries of section `name` (`[[name]]` tables) of a config file, each read as a `T`.
pub fn section<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    name: &str,
) -> anyhow::Result<Vec<T>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let Some(value) = table.get(name) else {
        return Ok(Vec::new());
    };
    let toml::Value::Array(items) = value else {
        bail!(
            "in {}: `{name}` must be a list of tables, written [[{name}]]",
            path.display()
        );
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.clone().try_into().with_context(|| {
                format!(
                    "in {}: [[{name}]] number {} is not valid",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Parses a duration such as `500ms`, `5s`, `2m` or `6h` (for flags).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (write durations like 500ms, 5s, 2m, 6h)"))
}

/// Parses the command line of `T`, using the TOML file named by `--config` or `ROTA_CONFIG`
/// (if any) for settings given neither as flags nor in the environment.
pub fn parse<T: Parser>() -> anyhow::Result<T> {
    let args: Vec<OsString> = std::env::args_os().collect();
    parse_from(args)
}

/// [`parse`] with explicit arguments (the first is the program name).
pub fn parse_from<T: Parser>(args: Vec<OsString>) -> anyhow::Result<T> {
    let mut command = T::command();
    if let Some(path) = config_path(&args) {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        command = apply_defaults(command, &table)
            .with_context(|| format!("in the config file {}", path.display()))?;
    }
    let matches = command
        .try_get_matches_from(args)
        .unwrap_or_else(|e| e.exit());
    Ok(T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(v) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("ROTA_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Sets the file's values as the defaults of the matching flags, in the command and in every
/// subcommand; a key that matches no flag anywhere is refused.
fn apply_defaults(command: clap::Command, table: &toml::Table) -> anyhow::Result<clap::Command> {
    let mut unknown: Vec<String> = Vec::new();
    let mut command = command;
    for (key, value) in table {
        if SECTIONS.contains(&key.as_str()) {
            continue;
        }
        let long = key.replace('_', "-");
        let values = toml_values(key, value)?;
        let (next, found) = set_default(command, &long, &values);
        command = next;
        if !found {
            unknown.push(key.clone());
        }
    }
    if !unknown.is_empty() {
        bail!(
            "unknown settings {unknown:?}: each key must be the long name of a flag (see --help)"
        );
    }
    Ok(command)
}

fn set_default(mut command: clap::Command, long: &str, values: &[String]) -> (clap::Command, bool) {
    let mut found = false;
    let ids: Vec<String> = command
        .get_arguments()
        .filter(|a| a.get_long() == Some(long))
        .map(|a| a.get_id().to_string())
        .collect();
    for id in ids {
        found = true;
        let values = values.to_vec();
        command = command.mut_arg(id, move |a| a.default_values(values));
    }
    let subs: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for sub in subs {
        let mut sub_found = false;
        command = command.mut_subcommand(sub, |s| {
            let (s, f) = set_default(s, long, values);
            sub_found = f;
            s
        });
        found |= sub_found;
    }
    (command, found)
}

fn toml_values(key: &str, value: &toml::Value) -> anyhow::Result<Vec<String>> {
    Ok(match value {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Array(items) => items
            .iter()
            .map(|v| toml_values(key, v).map(|mut v| v.remove(0)))
            .collect::<anyhow::Result<_>>()?,
        _ => bail!("setting {key:?} must be a string, number, boolean or a list of them"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(long, default_value_t = 1)]
        pool_max_size: usize,
        #[arg(long)]
        queue: Vec<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    }

    fn run(file: &str, args: &[&str]) -> anyhow::Result<Cli> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("rota.toml");
        std::fs::write(&path, file)?;
        let mut argv: Vec<OsString> = vec!["x".into(), "--config".into(), path.into()];
        argv.extend(args.iter().map(OsString::from));
        parse_from::<Cli>(argv)
    }

    #[test]
    fn the_file_fills_in_what_flags_do_not_say() {
        let cli = run(
            "pool_max_size = 7\nqueue = [\"a\", \"b\"]\nnamespace = \"t\"",
            &[],
        )
        .expect("parses");
        assert_eq!(cli.pool_max_size, 7);
        assert_eq!(cli.queue, ["a", "b"]);
        assert_eq!(cli.broker.namespace, "t");
        let cli = run("pool-max-size = 7", &["--pool-max-size", "3"]).expect("parses");
        assert_eq!(cli.pool_max_size, 3, "a flag beats the file");
    }

    #[test]
    fn sections_are_left_to_their_owner_and_read_as_tables() {
        let text = "pool_max_size = 2\n[[schedule]]\nname = \"a\"\n[[schedule]]\nname = \"b\"\n";
        let cli = run(text, &[]).expect("a section is not a flag");
        assert_eq!(cli.pool_max_size, 2);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rota.toml");
        std::fs::write(&path, text).expect("writes");
        #[derive(Debug, serde::Deserialize)]
        struct Named {
            name: String,
        }
        let named: Vec<Named> = section(&path, "schedule").expect("reads");
        let names: Vec<&str> = named.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        std::fs::write(&path, "schedule = 3").expect("writes");
        let err = section::<Named>(&path, "schedule").expect_err("not tables");
        assert!(format!("{err:#}").contains("[[schedule]]"), "{err:#}");
    }

    #[test]
    fn the_tls_files_join_each_node_s_url_unless_it_names_them() {
        let cli = Cli::try_parse_from([
            "x",
            "--amqp-url",
            "amqps://a@h/%2f?auth_mechanism=external, amqps://a@g/%2f?keyfile=%2Fk&certfile=%2Fc",
            "--amqp-ca-file",
            "/ca.pem",
            "--amqp-cert-file",
            "/c.pem",
            "--amqp-key-file",
            "/k.pem",
        ])
        .expect("parses");
        assert_eq!(
            cli.broker.amqp_url(),
            "amqps://a@h/%2f?auth_mechanism=external&cacertfile=/ca.pem&certfile=/c.pem&keyfile=/k.pem,\
             amqps://a@g/%2f?keyfile=%2Fk&certfile=%2Fc&cacertfile=/ca.pem"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = run("pool_max_sise = 7", &[]).expect_err("typo must fail");
        assert!(format!("{err:#}").contains("pool_max_sise"), "{err:#}");
    }
}
