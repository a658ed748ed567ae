//! The broker users of each role and their permissions (`scheduler setup-users`), made through
//! RabbitMQ's management API. RabbitMQ grants a user three regular expressions over the names
//! of a virtual host's exchanges and queues: `configure` (declare, delete), `write` (publish to
//! an exchange, bind a queue) and `read` (consume a queue, bind from an exchange). Each role
//! gets the names it declares, publishes to and reads, and nothing else (see the README's
//! trust model for what that leaves open: publishing to the default exchange reaches every
//! queue, which is why receivers check each message's `user_id`).

use anyhow::{Context, bail};
use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

use crate::roles::UserRole;

/// A role's permissions in the virtual host: three regular expressions over names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// The permissions of `role` over the namespaces that `namespaces` (a regular expression;
/// a namespace's own name with its dots escaped for one) matches.
pub fn permissions(role: UserRole, namespaces: &str) -> Permissions {
    let ns = format!("(?:{namespaces})");
    // Names every part declares (Topology::core): exchanges and queues alike.
    let core = format!("^{ns}\\.(jobs|dead|heartbeats|events|control|results|rpc)$");
    let jobs = format!("^{ns}\\.jobs\\..+$");
    let agents = format!("^{ns}\\.agent\\..+$");
    // A process's own auto-deleted queues: replies, and event and heartbeat listeners.
    let private = |purposes: &str| format!("^{ns}\\.({purposes})\\.[0-9a-f]{{32}}$");
    let any = |parts: &[&str]| parts.join("|");
    match role {
        UserRole::Producer => {
            // Its own queues: Rota's client names them; other clients let RabbitMQ name them
            // (exclusive to their connection).
            let own = format!("{}|^amq\\.gen-.+$", private("reply|watch|heartbeats"));
            Permissions {
                configure: any(&[&core, &jobs, &own]),
                write: any(&[
                    "^amq\\.default$",
                    &format!("^{ns}\\.(jobs|dead)$"),
                    &jobs,
                    &own,
                ]),
                // Jobs queues too: RabbitMQ lets only a user that may read a queue declare it
                // with a dead-letter exchange, as a producer does before a queue's first job.
                read: any(&[
                    &format!("^{ns}\\.(jobs|dead|events|heartbeats)$"),
                    &jobs,
                    &own,
                ]),
            }
        }
        UserRole::Agent => {
            let own = private("reply");
            Permissions {
                configure: any(&[&core, &jobs, &agents, &own]),
                write: any(&[
                    "^amq\\.default$",
                    &format!("^{ns}\\.(dead|events|heartbeats)$"),
                    &jobs,
                    &agents,
                    &own,
                ]),
                read: any(&[
                    &format!("^{ns}\\.(jobs|dead|control)$"),
                    &jobs,
                    &agents,
                    &own,
                ]),
            }
        }
        UserRole::Scheduler => Permissions {
            configure: format!("^{ns}\\..+$"),
            write: format!("^amq\\.default$|^{ns}\\..+$"),
            read: format!("^{ns}\\..+$"),
        },
        UserRole::Viewer => Permissions {
            configure: "^$".into(),
            write: "^$".into(),
            read: "^$".into(),
        },
    }
}

/// The management tags of `role`'s user: the viewer reads the management UI and API.
pub fn tags(role: UserRole) -> &'static str {
    match role {
        UserRole::Viewer => "monitoring",
        _ => "",
    }
}

/// One user to make.
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub role: UserRole,
    pub name: String,
    /// Set when given; else an existing user keeps its password, and a new one gets a
    /// generated one.
    pub password: Option<String>,
}

/// What [`setup`] did for one user.
#[derive(Debug, Clone)]
pub struct Made {
    pub role: UserRole,
    pub name: String,
    pub created: bool,
    /// The password it generated (shown once; never logged).
    pub generated: Option<String>,
    pub permissions: Permissions,
}

/// The management API of a broker, as an administrator.
#[derive(Debug, Clone)]
pub struct Management {
    /// `http://host:port`, without a trailing slash.
    base: String,
    authorization: String,
}

impl Management {
    pub fn new(url: &str, user: &str, password: &str) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            bail!(
                "the management API's URL must be http://HOST:PORT (got {base:?}); reach an https-only \
                 one through a local port-forward"
            );
        }
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(Self {
            base,
            authorization: format!("Basic {token}"),
        })
    }

    /// Sends one request; the status and the JSON body (Null when empty).
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let url: hyper::Uri = format!("{}{path}", self.base).parse()?;
        let host = url.host().context("the management URL names no host")?;
        let port = url.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .with_context(|| format!("cannot reach RabbitMQ's management API at {}", self.base))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(url.path())
            .header("host", format!("{host}:{port}"))
            .header("authorization", &self.authorization)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload)))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status == 401 {
            bail!(
                "the management API at {} refused the administrator's user and password (HTTP 401)",
                self.base
            );
        }
        Ok((status, value))
    }

    /// Sends one request that must succeed.
    async fn expect(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let (status, value) = self.call(method, path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path} on RabbitMQ's management API answered {status}: {value}");
        }
        Ok(value)
    }
}

/// Makes (or brings up to date) each user of `users` with its role's permissions over
/// `namespaces` in virtual host `vhost`. Idempotent: an existing user keeps its password
/// unless one is given.
pub async fn setup(
    api: &Management,
    vhost: &str,
    namespaces: &str,
    users: &[UserSpec],
) -> anyhow::Result<Vec<Made>> {
    let vhost_path = crate::amqp::percent_encode(vhost).replace('/', "%2F");
    let (status, _) = api
        .call("GET", &format!("/api/vhosts/{vhost_path}"), None)
        .await?;
    if status == 404 {
        bail!("the broker has no virtual host {vhost:?} (the one --amqp-url names)");
    }
    let mut made = Vec::new();
    for spec in users {
        let user_path = crate::amqp::percent_encode(&spec.name).replace('/', "%2F");
        let (status, existing) = api
            .call("GET", &format!("/api/users/{user_path}"), None)
            .await?;
        let created = status == 404;
        let mut body = json!({ "tags": tags(spec.role) });
        let mut generated = None;
        match (&spec.password, created) {
            (Some(password), _) => body["password"] = json!(password),
            (None, true) => {
                let password = new_password();
                body["password"] = json!(password);
                generated = Some(password);
            }
            (None, false) => {
                // Kept as it is: PUT replaces the user, so its hash goes back.
                body["password_hash"] = existing["password_hash"].clone();
                body["hashing_algorithm"] = existing["hashing_algorithm"].clone();
            }
        }
        api.expect("PUT", &format!("/api/users/{user_path}"), Some(body))
            .await?;
        let permissions = permissions(spec.role, namespaces);
        let body = json!({
            "configure": permissions.configure,
            "write": permissions.write,
            "read": permissions.read,
        });
        api.expect(
            "PUT",
            &format!("/api/permissions/{vhost_path}/{user_path}"),
            Some(body),
        )
        .await?;
        made.push(Made {
            role: spec.role,
            name: spec.name.clone(),
            created,
            generated,
            permissions,
        });
    }
    Ok(made)
}

/// 24 random letters and digits.
fn new_password() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

/// A namespace's name as a regular expression that matches only it.
pub fn exactly(namespace: &str) -> String {
    namespace.replace('.', "\\.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Names;

    /// Whether `name` is granted by permission regex `pattern` (RabbitMQ matches a name
    /// anywhere, so the patterns anchor themselves).
    fn grants(pattern: &str, name: &str) -> bool {
        regex::Regex::new(pattern).expect("valid").is_match(name)
    }

    #[test]
    fn each_role_gets_the_names_it_uses_and_no_more() {
        let n = Names::new("rota.eu").expect("valid");
        let id = "0123456789abcdef0123456789abcdef";
        let p = |role| permissions(role, &exactly(n.namespace()));
        let (producer, agent, scheduler) = (
            p(UserRole::Producer),
            p(UserRole::Agent),
            p(UserRole::Scheduler),
        );
        let core = [
            n.jobs_exchange(),
            n.dead(),
            n.heartbeats(),
            n.events(),
            n.control(),
            n.results(),
            n.rpc(),
        ];
        for name in &core {
            for perms in [&producer, &agent, &scheduler] {
                assert!(grants(&perms.configure, name), "{name} {perms:?}");
            }
        }
        let jobs = n.jobs_queue("reports.eu");
        let agent_queue = n.agent_queue("a-1");
        let reply = n.private_queue("reply", id);
        // Producer: declares and binds jobs queues, publishes jobs and RPC, reads its replies.
        for name in [&jobs, &reply, &n.private_queue("watch", id)] {
            assert!(grants(&producer.configure, name), "{name}");
            assert!(grants(&producer.write, name), "{name}");
        }
        assert!(grants(&producer.write, "amq.default"));
        assert!(grants(&producer.read, "amq.gen-JzTY20BRgKO-HjmUJj0wLg"));
        assert!(grants(&producer.write, &n.jobs_exchange()));
        assert!(grants(&producer.read, &reply));
        assert!(grants(&producer.read, &n.events()));
        assert!(grants(&producer.read, &jobs));
        for name in [&n.rpc(), &n.results(), &agent_queue] {
            assert!(!grants(&producer.read, name), "a producer reads {name}");
        }
        assert!(!grants(&producer.write, &n.events()));
        assert!(!grants(&producer.configure, &agent_queue));
        // Agent: its queue and its lock queue, jobs queues; never requests nor results.
        let lock = format!("{agent_queue}.exclusive");
        for name in [&agent_queue, &lock, &jobs, &reply] {
            assert!(grants(&agent.configure, name), "{name}");
        }
        for name in [&agent_queue, &jobs, &reply, &n.control()] {
            assert!(grants(&agent.read, name), "{name}");
        }
        for name in ["amq.default", &n.events(), &n.heartbeats(), &n.dead()] {
            assert!(grants(&agent.write, name), "{name}");
        }
        for name in [&n.rpc(), &n.results(), &n.scheduler_events(), &n.events()] {
            assert!(!grants(&agent.read, name), "an agent reads {name}");
        }
        assert!(!grants(&agent.write, &n.jobs_exchange()));
        assert!(!grants(&agent.write, &n.control()));
        // Scheduler: the whole namespace, and only it.
        for name in [
            &n.scheduler_events(),
            &lock,
            &n.private_queue("scheduler.heartbeats", id),
        ] {
            assert!(grants(&scheduler.configure, name), "{name}");
            assert!(grants(&scheduler.read, name), "{name}");
        }
        for perms in [&producer, &agent, &scheduler] {
            assert!(!grants(&perms.read, "rotaXeu.rpc"), "{perms:?}");
            assert!(!grants(&perms.configure, "other.rpc"), "{perms:?}");
        }
        let viewer = p(UserRole::Viewer);
        assert!(!grants(&viewer.read, &n.rpc()) && !grants(&viewer.write, "amq.default"));
    }
}
