//! Who may send what. Each part connects to RabbitMQ as a user of its role (see
//! `scheduler setup-users`), sets the AMQP `user_id` property on everything it publishes, and
//! RabbitMQ refuses a `user_id` that is not the publishing connection's user. So a receiver
//! knows who sent a message, and takes what changes state only from the role that may send it:
//! results, started events and agents' heartbeats from agent users; receipts, cancels and the
//! scheduler's heartbeats from scheduler users; RPC requests from producers and schedulers
//! (and from agents, the child jobs their Work submits).

/// What a broker user may do in a namespace (its permissions: see `scheduler setup-users`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum UserRole {
    /// Publishes jobs; RPC (submit, status, cancel, …); watches events and heartbeats.
    Producer,
    /// Records results; receipts and cancels to agents; answers RPC.
    Scheduler,
    /// Runs jobs; publishes results, started events and heartbeats; submits child jobs.
    Agent,
    /// Reads the management UI and API (tag `monitoring`); nothing over AMQP.
    Viewer,
}

impl UserRole {
    pub const ALL: [UserRole; 4] = [
        UserRole::Producer,
        UserRole::Scheduler,
        UserRole::Agent,
        UserRole::Viewer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UserRole::Producer => "producer",
            UserRole::Scheduler => "scheduler",
            UserRole::Agent => "agent",
            UserRole::Viewer => "viewer",
        }
    }

    /// The user name `scheduler setup-users` gives this role, and every part expects by
    /// default (`rota-agent`, …).
    pub fn default_user(self) -> String {
        format!("rota-{}", self.as_str())
    }
}

/// The users of each role, from the command line (`--agent-users`, …); every part of a
/// deployment must be given the same.
#[derive(Debug, Clone, clap::Args)]
pub struct RoleArgs {
    /// Broker users whose messages are taken as a producer's (RPC requests), separated by commas.
    #[arg(
        long,
        env = "ROTA_PRODUCER_USERS",
        value_delimiter = ',',
        default_value = "rota-producer",
        global = true
    )]
    pub producer_users: Vec<String>,

    /// Broker users whose messages are taken as the scheduler's (receipts, cancels), separated by commas.
    #[arg(
        long,
        env = "ROTA_SCHEDULER_USERS",
        value_delimiter = ',',
        default_value = "rota-scheduler",
        global = true
    )]
    pub scheduler_users: Vec<String>,

    /// Broker users whose messages are taken as a pool agent's (results, started events,
    /// heartbeats), separated by commas.
    #[arg(
        long,
        env = "ROTA_AGENT_USERS",
        value_delimiter = ',',
        default_value = "rota-agent",
        global = true
    )]
    pub agent_users: Vec<String>,

    /// Take every message from any broker user, whatever its role: for a development broker
    /// where every part shares one user. Anyone with that user's password can then forge
    /// results, receipts and cancels.
    #[arg(long, env = "ROTA_TRUST_ANY_USER", global = true,
          value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub trust_any_user: bool,
}

impl RoleArgs {
    pub fn roles(&self) -> Roles {
        Roles {
            users: vec![
                (UserRole::Producer, self.producer_users.clone()),
                (UserRole::Scheduler, self.scheduler_users.clone()),
                (UserRole::Agent, self.agent_users.clone()),
            ],
            trust_any: self.trust_any_user,
        }
    }
}

/// Which broker users have which role, to check the `user_id` of what arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roles {
    users: Vec<(UserRole, Vec<String>)>,
    trust_any: bool,
}

impl Default for Roles {
    /// Each role's default user (see [`UserRole::default_user`]).
    fn default() -> Self {
        Roles {
            users: [UserRole::Producer, UserRole::Scheduler, UserRole::Agent]
                .into_iter()
                .map(|r| (r, vec![r.default_user()]))
                .collect(),
            trust_any: false,
        }
    }
}

impl Roles {
    /// Roles that take every message from anyone (`--trust-any-user`).
    pub fn trust_any() -> Self {
        Roles {
            trust_any: true,
            ..Roles::default()
        }
    }

    pub fn trusts_any(&self) -> bool {
        self.trust_any
    }

    /// Says, once at start, that messages are not checked (`--trust-any-user`).
    pub fn warn_if_open(&self) {
        if self.trust_any {
            tracing::warn!(
                "--trust-any-user: taking results, receipts, cancels and RPC from any broker user; \
                 anyone who can publish on this broker can forge them. Give each part its own user \
                 (scheduler setup-users) and drop the flag"
            );
        }
    }

    /// Ok when the sender of `what`, the broker user `user` (the message's `user_id`), has
    /// one of `roles`; else why the message is refused.
    pub fn check(&self, user: Option<&str>, what: &str, roles: &[UserRole]) -> Result<(), String> {
        if self.trust_any {
            return Ok(());
        }
        let allowed = || {
            roles
                .iter()
                .map(|r| {
                    let users = self
                        .users
                        .iter()
                        .find(|(role, _)| role == r)
                        .map(|(_, u)| u.join(", "))
                        .unwrap_or_default();
                    format!("{} ({users})", r.as_str())
                })
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let Some(user) = user else {
            return Err(format!(
                "a {what} without a user_id property: only a user of role {} may send one, and \
                 Rota's parts set it (a single-user development broker: --trust-any-user)",
                allowed()
            ));
        };
        let ok = self
            .users
            .iter()
            .any(|(role, users)| roles.contains(role) && users.iter().any(|u| u == user));
        if ok {
            return Ok(());
        }
        Err(format!(
            "a {what} from broker user {user:?}: only a user of role {} may send one (each \
             role's users: --producer-users, --scheduler-users, --agent-users)",
            allowed()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_roles_named_pass() {
        let roles = Roles::default();
        let agent = [UserRole::Agent];
        assert!(roles.check(Some("rota-agent"), "result", &agent).is_ok());
        let refused = roles
            .check(Some("rota-producer"), "result", &agent)
            .expect_err("a producer sends no results");
        assert!(refused.contains("\"rota-producer\""), "{refused}");
        assert!(refused.contains("agent (rota-agent)"), "{refused}");
        let refused = roles
            .check(None, "receipt", &[UserRole::Scheduler])
            .expect_err("no user_id");
        assert!(refused.contains("without a user_id"), "{refused}");
        let both = [UserRole::Producer, UserRole::Scheduler];
        assert!(
            roles
                .check(Some("rota-scheduler"), "request", &both)
                .is_ok()
        );
        assert!(Roles::trust_any().check(None, "result", &agent).is_ok());
    }
}
