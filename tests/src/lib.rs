//! The harness of Rota's whole-system tests: each test gets its own namespace on the real
//! broker and its own temporary folder, starts the real `scheduler` and `pool-agent`
//! binaries as child processes, and waits for events (results, heartbeats), never for time.
//! Everything it creates is removed when the [`System`] is dropped, even after a failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use rota_common::Names;
use rota_common::amqp::Topology;
use rota_common::client::{Client, Heartbeats};
use rota_common::names::QueueType;
use rota_common::roles::UserRole;
use rota_common::wire::{Heartbeat, JobId, Role, RpcReply, RpcRequest};
use std::collections::HashSet;

pub mod faults;

pub use rota_common::wire;

/// The broker the tests use, as an administrator: ROTA_AMQP_URL, else `rota-admin` with the
/// password `deploy/setup.sh` keeps in [`admin_password_file`], else `guest` (a broker
/// that still has it). The parts never use it: each connects as its role's test user
/// ([`System::url_of`]).
pub fn amqp_url() -> String {
    if let Ok(url) = std::env::var("ROTA_AMQP_URL") {
        return url;
    }
    match std::fs::read_to_string(admin_password_file()) {
        Ok(password) => format!("amqp://rota-admin:{}@127.0.0.1:5672/%2f", password.trim()),
        Err(_) => "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
    }
}

/// Where `deploy/setup.sh` keeps the password of the brokers' administrator `rota-admin`.
pub fn admin_password_file() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    state.join("rota/rabbitmq-admin-password")
}

/// The password of the tests' users of each role (test brokers only).
const TEST_PASSWORD: &str = "rota-test-password";

/// The tests' user of `role` (`rota-test-agent`, …), made on each broker by [`System::on`].
pub fn test_user(role: UserRole) -> String {
    format!("rota-test-{}", role.as_str())
}

/// Each node's URL of `url`, logged in as `user` with `password`.
pub fn url_as(url: &str, user: &str, password: &str) -> String {
    url.split(',')
        .map(|node| {
            let (scheme, rest) = node.trim().split_once("://").unwrap_or(("amqp", node));
            let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{user}:{password}@{rest}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The user (and password) an AMQP URL logs in as.
pub(crate) fn credentials(url: &str) -> (String, String) {
    let node = url.split(',').next().unwrap_or_default();
    let userinfo = node
        .split_once("://")
        .and_then(|(_, rest)| rest.rsplit_once('@'))
        .map_or("guest:guest", |(userinfo, _)| userinfo);
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (user.to_owned(), password.to_owned())
}

/// Properties of a message that a test publishes as the administrator of [`amqp_url`]:
/// its `user_id`, which the parts take in every role (see [`System::on`]), as a real part
/// of that role sets its own.
pub fn admin_props() -> lapin::BasicProperties {
    let (user, _) = credentials(&amqp_url());
    lapin::BasicProperties::default().with_user_id(user.into())
}

/// The management API of the broker at `url` (its first node): ROTA_MANAGEMENT_ADDR for the
/// tests' broker, else the AMQP port + 10000 (15672 for 5672, and so the RabbitMQ 4 nodes of
/// `deploy/rabbitmq/rabbitmq4.sh`).
pub fn management_url(url: &str) -> String {
    let host_port = |u: &str| {
        let node = u.split(',').next().unwrap_or_default();
        let rest = node.split_once("://").map_or(node, |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        rest.split(['/', '?']).next().unwrap_or_default().to_owned()
    };
    let addr = host_port(url);
    if addr == host_port(&amqp_url())
        && let Ok(management) = std::env::var("ROTA_MANAGEMENT_ADDR")
    {
        return format!("http://{management}");
    }
    let (host, port) = addr.rsplit_once(':').unwrap_or((&addr, "5672"));
    let port: u16 = port.parse().unwrap_or(5672);
    format!("http://{host}:{}", port + 10000)
}

/// Makes the tests' users of every role on the broker at `url` (an administrator's URL), once
/// per broker and test process, with `scheduler setup-users`: over every test namespace.
pub async fn test_users(url: &str) {
    static DONE: tokio::sync::Mutex<Vec<String>> = tokio::sync::Mutex::const_new(Vec::new());
    let management = management_url(url);
    let mut done = DONE.lock().await;
    if done.contains(&management) {
        return;
    }
    let (admin, password) = credentials(url);
    let mut cmd = tokio::process::Command::new(bin("scheduler"));
    cmd.args(["setup-users", "--namespaces", "t-[0-9a-f]{10}"])
        .env("ROTA_AMQP_URL", url)
        .env("ROTA_MANAGEMENT_URL", &management)
        .env("ROTA_ADMIN_USER", admin)
        .env("ROTA_ADMIN_PASSWORD", password)
        .env("ROTA_VIEWER_USER", test_user(UserRole::Viewer));
    for role in UserRole::ALL {
        let var = format!("ROTA_{}_PASSWORD", role.as_str().to_uppercase());
        cmd.env(var, TEST_PASSWORD);
    }
    for (var, role) in role_vars() {
        cmd.env(var, test_user(role));
    }
    let out = cmd.output().await.expect("scheduler setup-users runs");
    assert!(
        out.status.success(),
        "cannot make the tests' broker users on {management}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    done.push(management);
}

/// The variables that name each role's users.
fn role_vars() -> [(&'static str, UserRole); 3] {
    [
        ("ROTA_PRODUCER_USERS", UserRole::Producer),
        ("ROTA_SCHEDULER_USERS", UserRole::Scheduler),
        ("ROTA_AGENT_USERS", UserRole::Agent),
    ]
}

/// `rabbitmqctl` for the tests' broker: the command line in ROTA_RABBITMQCTL (`docker exec
/// rota-rabbitmq4 rabbitmqctl` for the RabbitMQ 4 node that `deploy/test.sh` also runs the suite
/// on), else the host's `rabbitmqctl`.
pub fn rabbitmqctl() -> std::process::Command {
    let line = std::env::var("ROTA_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = line.split_whitespace();
    let mut cmd = std::process::Command::new(words.next().unwrap_or("rabbitmqctl"));
    cmd.args(words);
    cmd
}

/// The log filter of the parts a test starts: ROTA_TEST_LOG (a `RUST_LOG` filter, e.g.
/// `info,rota_common=debug` to chase a flaky test), or info without lapin's own lines.
fn test_log_filter() -> String {
    std::env::var("ROTA_TEST_LOG").unwrap_or_else(|_| "info,lapin=warn".into())
}

/// A built binary of the workspace (`cargo build --workspace` puts them beside the tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// One test's world: a namespace, a folder, a client.
pub struct System {
    pub names: Names,
    pub dir: tempfile::TempDir,
    pub client: Client,
    /// The broker's URL (or its nodes' URLs, separated by commas), as its administrator;
    /// each part gets it with its role's user ([`System::url_of`]).
    pub url: String,
    /// Agent ids started, whose queues to delete at the end.
    agents: std::sync::Mutex<Vec<String>>,
    /// The jobs queues its agents served (`--queue`), deleted at the end.
    queues: std::sync::Mutex<Vec<String>>,
}

impl System {
    /// On the tests' broker, with the jobs queues of the default kind (auto).
    pub async fn new() -> System {
        System::on(&amqp_url(), QueueType::Auto).await
    }

    /// On the broker at `url` (one URL, or a cluster's nodes separated by commas), with jobs
    /// queues of kind `kind`: the test's client and every part it starts use them
    /// (ROTA_QUEUE_TYPE; a part's own `--queue-type` flag wins).
    pub async fn on(url: &str, kind: QueueType) -> System {
        let ns = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let names = Names::new(&ns)
            .expect("valid namespace")
            .with_jobs_queue_type(kind);
        test_users(url).await;
        let producer = url_as(url, &test_user(UserRole::Producer), TEST_PASSWORD);
        let client = Client::connect(&producer, names.clone(), "test")
            .await
            .expect("RabbitMQ must be running: deploy/setup.sh");
        System {
            names,
            dir: tempfile::tempdir().expect("temp dir"),
            client,
            url: url.to_owned(),
            agents: Default::default(),
            queues: Default::default(),
        }
    }

    /// The broker's URL as the tests' user of `role`.
    pub fn url_of(&self, role: UserRole) -> String {
        url_as(&self.url, &test_user(role), TEST_PASSWORD)
    }

    /// The environment of a part of role `role` (or of a client, a producer): its URL, the
    /// namespace, the kind of queues and each role's users, the administrator included in
    /// each (the tests publish what no part would as the administrator).
    pub fn part_env(&self, role: UserRole) -> Vec<(&'static str, String)> {
        let (admin, _) = credentials(&self.url);
        let mut env = vec![
            ("ROTA_AMQP_URL", self.url_of(role)),
            ("ROTA_NAMESPACE", self.names.namespace().to_owned()),
            ("ROTA_QUEUE_TYPE", self.queue_type().to_owned()),
        ];
        for (var, role) in role_vars() {
            env.push((var, format!("{},{admin}", test_user(role))));
        }
        env
    }

    /// The value of ROTA_QUEUE_TYPE for the parts.
    fn queue_type(&self) -> &'static str {
        self.names.jobs_queue_type().as_str()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `scheduler run` with fast heartbeats.
    pub fn scheduler(&self) -> Proc {
        self.scheduler_with(&[])
    }

    /// Starts `scheduler run` with fast heartbeats, plus `extra` flags.
    pub fn scheduler_with(&self, extra: &[&str]) -> Proc {
        let data = self.data_dir().display().to_string();
        let mut args = vec!["run", "--heartbeat-interval", "200ms", "--data-dir", &data];
        args.extend_from_slice(extra);
        Proc::start(self, "scheduler", &args)
    }

    /// Starts `pool-agent run --id ID` with fast heartbeats and resends, plus `extra` flags.
    pub fn agent(&self, id: &str, extra: &[&str]) -> Proc {
        self.owns_agent(id);
        if let Ok(mut q) = self.queues.lock() {
            let named = extra.windows(2).filter(|w| w[0] == "--queue");
            q.extend(named.flat_map(|w| w[1].split(',')).map(str::to_owned));
        }
        let data = self.data_dir().display().to_string();
        let mut args = vec!["run", "--id", id];
        for (flag, value) in [
            ("--data-dir", data.as_str()),
            ("--heartbeat-interval", "200ms"),
            ("--resend-interval", "2s"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        Proc::start(self, "pool-agent", &args)
    }

    /// Deletes the queue of agent `id` at the end (agents started by other means).
    pub fn owns_agent(&self, id: &str) {
        if let Ok(mut a) = self.agents.lock()
            && !a.iter().any(|x| x == id)
        {
            a.push(id.to_owned());
        }
    }

    /// Runs `scheduler ARGS…` (a client command) to completion.
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(bin("scheduler"))
            .args(args)
            .envs(self.part_env(UserRole::Producer))
            .output()
            .await
            .expect("scheduler CLI runs")
    }

    /// `scheduler submit ARGS… --wait --json`: the exit code and the job's record as JSON.
    pub async fn submit_wait(&self, args: &[&str]) -> (Option<i32>, serde_json::Value) {
        let mut all = vec!["submit"];
        all.extend_from_slice(args);
        all.extend(["--wait", "--json"]);
        let out = self.cli(&all).await;
        let record = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON record ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), record)
    }

    pub async fn heartbeats(&self) -> Heartbeats {
        self.client
            .heartbeats()
            .await
            .expect("listens to heartbeats")
    }

    /// Waits for a heartbeat of `role`/`id` that satisfies `pred`.
    pub async fn heartbeat_where(
        &self,
        beats: &mut Heartbeats,
        role: Role,
        id: &str,
        pred: impl Fn(&Heartbeat) -> bool,
    ) -> Heartbeat {
        loop {
            let hb = beats.next().await.expect("heartbeats keep coming");
            if hb.role == role && hb.id == id && pred(&hb) {
                return hb;
            }
        }
    }

    /// Waits until the scheduler reports agent `id` as alive (or lost, if `!alive`), asking it
    /// at each of its own heartbeats. Seeing an agent's heartbeat is not enough: the scheduler
    /// may have bound its heartbeat queue after that one.
    pub async fn scheduler_sees(&self, beats: &mut Heartbeats, id: &str, alive: bool) {
        loop {
            self.heartbeat_where(beats, Role::Scheduler, "scheduler", |_| true)
                .await;
            if let Ok(RpcReply::Agents { agents }) = self.client.call(&RpcRequest::Agents).await
                && agents
                    .iter()
                    .any(|a| a.heartbeat.id == id && a.alive == alive)
            {
                return;
            }
        }
    }

    /// Waits until the scheduler (if `scheduler`) and each agent of `agents` has sent a
    /// heartbeat: they are connected and serving, their queues declared.
    pub async fn ready(&self, scheduler: bool, agents: &[&str]) {
        let mut beats = self.heartbeats().await;
        let mut waiting: Vec<(Role, String)> = agents
            .iter()
            .map(|a| (Role::Agent, (*a).to_owned()))
            .collect();
        if scheduler {
            waiting.push((Role::Scheduler, "scheduler".to_owned()));
        }
        within(
            Duration::from_secs(60),
            "the parts' first heartbeats",
            async {
                while !waiting.is_empty() {
                    let hb = beats.next().await.expect("heartbeats keep coming");
                    waiting.retain(|(role, id)| !(*role == hb.role && *id == hb.id));
                }
            },
        )
        .await;
    }

    /// Waits until every job of `ids` is recorded with a final state and agent `id` holds
    /// nothing (no job, no unreceipted result). Checked at each of the agent's heartbeats.
    /// What it saw last goes to standard error whenever it changes, which a failed test
    /// shows: the agent still running jobs, or holding results the scheduler did not
    /// receipt, or the scheduler missing records.
    pub async fn settled(&self, beats: &mut Heartbeats, id: &str, ids: &HashSet<JobId>) {
        let mut said = String::new();
        let mut say = |now: String| {
            if now != said {
                eprintln!("{} settled? {now}", chrono::Utc::now().to_rfc3339());
                said = now;
            }
        };
        loop {
            let hb = self.heartbeat_where(beats, Role::Agent, id, |_| true).await;
            if !hb.running.is_empty() || hb.unreceipted > 0 {
                say(format!(
                    "agent {id}: {} running, {} results not receipted",
                    hb.running.len(),
                    hb.unreceipted
                ));
                continue;
            }
            let Ok(jobs) = self.list_all(None).await else {
                continue;
            };
            let done = jobs
                .iter()
                .filter(|j| ids.contains(&j.uuid) && j.state.is_final())
                .count();
            if done == ids.len() {
                return;
            }
            say(format!(
                "agent {id} idle; {done} of {} jobs recorded final",
                ids.len()
            ));
        }
    }

    async fn cleanup(
        url: String,
        names: Names,
        agents: Vec<String>,
        served: Vec<String>,
    ) -> anyhow::Result<()> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        // A plain connection (to the first node): a Rota client would first declare the
        // topology, which fails where a test made its queues of another type.
        let url = url.split(',').next().unwrap_or_default();
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
        // Everything the scheduler declares, the other jobs queues the tests use, and each
        // agent's queue.
        let shared = Topology::scheduler(&names);
        let mut queues: Vec<String> = shared.queue_names().map(str::to_owned).collect();
        queues.extend(["other", "hostnet"].map(|q| names.jobs_queue(q)));
        queues.extend(agents.iter().map(|a| names.agent_queue(a)));
        queues.extend(served.iter().map(|q| names.jobs_queue(q)));
        for q in queues {
            // A channel each: a failed delete closes its channel.
            let ch = conn.create_channel().await?;
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in shared.exchange_names() {
            let ch = conn.create_channel().await?;
            let _ = ch
                .exchange_delete(e.into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "done".into()).await;
        Ok(())
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the processes' logs of a failed test where a person can read them.
            let keep = std::env::temp_dir()
                .join("rota-test-logs")
                .join(self.names.namespace());
            if std::fs::create_dir_all(&keep).is_ok()
                && let Ok(entries) = std::fs::read_dir(self.dir.path())
            {
                for e in entries
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                {
                    let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                }
                eprintln!("logs of the failed test's processes: {}", keep.display());
            }
        }
        // Containers of agents that were killed before they could remove them.
        let left = containers(self.names.namespace());
        if !left.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(left.iter().map(|c| &c.id))
                .output();
        }
        let names = self.names.clone();
        let url = self.url.clone();
        let agents = self.agents.lock().map(|a| a.clone()).unwrap_or_default();
        let served = self.queues.lock().map(|q| q.clone()).unwrap_or_default();
        // Drop cannot await: clean up on a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(System::cleanup(url, names, agents, served))
        })
        .join();
    }
}

/// A child process of the system under test; killed when dropped. Its output goes to
/// `<test dir>/<name>.log`.
pub struct Proc {
    child: tokio::process::Child,
    pub log: PathBuf,
}

impl Proc {
    fn start(sys: &System, binary: &str, args: &[&str]) -> Proc {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = sys.dir.path().join(format!("{binary}-{n}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let role = match (binary, args.first()) {
            ("pool-agent", _) => UserRole::Agent,
            ("scheduler", Some(&"run")) => UserRole::Scheduler,
            _ => UserRole::Producer,
        };
        // A URL given on the command line (a relay's) is the part's with its role's user too.
        let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        for i in 1..args.len() {
            if args[i - 1] == "--amqp-url" {
                args[i] = url_as(&args[i], &test_user(role), TEST_PASSWORD);
            }
        }
        let child = tokio::process::Command::new(bin(binary))
            .args(&args)
            .envs(sys.part_env(role))
            .env("RUST_LOG", test_log_filter())
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("starts");
        Proc { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends a signal (`STOP`, `CONT`, …) and returns at once.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "kill -{name} {} failed",
            self.pid()
        );
    }

    /// SIGTERM, and wait (at most a minute) for it to exit.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.pid().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()?;
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("did not exit within 60 s of SIGTERM")?
            .map_err(Into::into)
    }

    /// Waits for the process to exit by itself (at most a minute).
    pub async fn exited(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!("still running after 60 s"),
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The image of `docker` workers in the tests: the `test-runtime` binary (the built-ins plus
/// the `probe.*` works) in the image `deploy/images/worker/build.sh` makes. Built once per
/// test binary, and reused while the runtime is unchanged.
pub async fn worker_image() -> &'static str {
    static IMAGE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/worker/build.sh");
            let out = tokio::process::Command::new(script)
                .arg(bin("test-runtime"))
                .arg("--name")
                .arg("rota-test-worker")
                .output()
                .await
                .expect("the image build script runs");
            assert!(
                out.status.success(),
                "cannot build the worker image (is a Docker engine running? deploy/setup.sh starts one): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .await
}

/// A Docker container, as `docker ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    /// `running`, `exited`, …
    pub state: String,
}

/// The flags of an agent whose workers are at `location` (for `docker`, in the tests' image).
pub async fn worker_location_flags(location: &'static str) -> Vec<&'static str> {
    let mut flags = vec!["--worker-location", location];
    if location == "docker" {
        flags.extend(["--docker-image", worker_image().await]);
    }
    flags
}

/// The Docker containers of namespace `ns`, running or not.
pub fn containers(ns: &str) -> Vec<Container> {
    let Ok(out) = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Names}} {{.State}}",
        ])
        .arg("--filter")
        .arg(format!("label=rota.namespace={ns}"))
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(str::to_owned);
            Some(Container {
                id: f.next()?,
                name: f.next()?,
                state: f.next()?,
            })
        })
        .collect()
}

/// `N` distinct free local addresses for daemons' `--http-addr`: each port stays bound until
/// all are taken, so two cannot be the same.
pub fn free_addrs<const N: usize>() -> [String; N] {
    let listeners: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"));
    listeners
        .each_ref()
        .map(|l| l.local_addr().expect("its address").to_string())
}

/// The value of a metric line of `/metrics` (`name{labels}`), 0 when absent.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// `GET http://ADDR/PATH`: the status code and the body (`None` while nothing answers).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// Polls `GET http://ADDR/PATH` (as a Kubernetes probe does) until it answers `status`.
pub async fn probe_until(addr: &str, path: &str, status: u16) -> String {
    match probe_within(addr, path, status, Duration::from_secs(60)).await {
        Some(body) => body,
        None => panic!("{path} answering {status} did not happen within 60s"),
    }
}

/// Polls `GET http://ADDR/PATH` until it answers `status`: the body, or `None` after `limit`.
pub async fn probe_within(addr: &str, path: &str, status: u16, limit: Duration) -> Option<String> {
    let probe = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if let Some((s, body)) = http_get(addr, path).await
                && s == status
            {
                return body;
            }
        }
    };
    tokio::time::timeout(limit, probe).await.ok()
}

/// Consumes the namespace's dead-letter queue on `ch`, without acks: a test reads what is
/// dead-lettered and forgets it.
pub async fn dead_letters(ch: &lapin::Channel, names: &Names) -> lapin::Consumer {
    let opts = lapin::options::BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    ch.basic_consume(
        names.dead().as_str().into(),
        "test-dead-letters".into(),
        opts,
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("consumes the dead-letter queue")
}

/// The reason Rota gave a dead letter (its `x-rota-reason` header), if it has one.
pub fn dead_reason(d: &lapin::message::Delivery) -> Option<String> {
    match d
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-rota-reason")?
    {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// What the management API (the RabbitMQ UI) shows of `queue` in the default vhost.
pub async fn queue_in_management(queue: &str) -> serde_json::Value {
    let path = format!("/api/queues/%2f/{queue}");
    let (status, body) = faults::management("GET", &path)
        .await
        .expect("the management API answers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

/// How many messages wait (ready) in `queue` now, asked over a connection of its own.
pub async fn messages_in(queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

/// How many results wait (ready) in the results queue `queue` now: a message carries one
/// result or a group. Peeks at them over a connection of its own, which gives them back.
pub async fn results_in(queue: &str) -> usize {
    use lapin::options::BasicGetOptions;
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let mut results = 0;
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")
    {
        results += match serde_json::from_slice::<serde_json::Value>(&m.delivery.data) {
            Ok(serde_json::Value::Array(group)) => group.len(),
            _ => 1,
        };
    }
    // Unacked, they go back to the queue with the connection.
    let _ = conn.close(200, "bye".into()).await;
    results
}

/// The processes whose parent is `pid` (from /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // /proc/<pid>/stat: "pid (comm) state ppid …"; comm may hold spaces, so split after ')'.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit_once(')')
                        .map(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned))
                })
                .flatten()
                .is_some_and(|ppid| ppid == pid.to_string())
        })
        .collect()
}

/// Whether a process exists (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s != "Z"))
        })
        .unwrap_or(false)
}

/// The next event about job `uuid` (others are skipped), within a minute.
pub async fn event_of(
    events: &mut rota_common::client::Events,
    uuid: JobId,
) -> rota_common::wire::Event {
    within(Duration::from_secs(60), "an event of the job", async {
        loop {
            let e = events.next().await.expect("events keep coming");
            if e.uuid == uuid {
                return e;
            }
        }
    })
    .await
}

/// The `job.finished` events that end each of `ids` (a final state), in whatever order they
/// come, within `limit`.
pub async fn all_ended(
    events: &mut rota_common::client::Events,
    ids: &[JobId],
    limit: Duration,
) -> std::collections::HashMap<JobId, rota_common::wire::Event> {
    let mut out = std::collections::HashMap::new();
    within(limit, "the jobs to end", async {
        while out.len() < ids.len() {
            let e = events.next().await.expect("events keep coming");
            if ids.contains(&e.uuid) && e.state.is_some_and(rota_common::wire::JobState::is_final) {
                out.insert(e.uuid, e);
            }
        }
    })
    .await;
    out
}

/// Runs `f` with a deadline, so a stuck test fails with a message instead of hanging.
pub async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not happen within {limit:?}"),
    }
}

/// A command-line tool the tests run (kubectl, kubernetes-validate, hadolint, python): from the
/// project's venv, which `deploy/setup.sh tools` fills, else from the PATH.
pub fn tool(name: &str) -> PathBuf {
    let in_venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.venv/bin")
        .join(name);
    if in_venv.exists() {
        return in_venv;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{name} is missing: run deploy/setup.sh tools (it installs the test tools into .venv)")
        })
}

impl System {
    /// The `job.finished` events from now on.
    pub async fn finished_events(&self) -> rota_common::client::Events {
        self.client
            .watch(&[rota_common::wire::EventKind::Finished])
            .await
            .expect("watch")
    }

    /// What the scheduler knows of job `uuid`, which it has recorded.
    pub async fn status(&self, uuid: JobId) -> rota_common::wire::JobRecord {
        self.client.status(uuid).await.expect("recorded")
    }

    /// Every recorded job (only those in `state`, if given), newest first: the scheduler
    /// answers `list` a page at a time; this follows the pages.
    pub async fn list_all(
        &self,
        state: Option<rota_common::wire::JobState>,
    ) -> anyhow::Result<Vec<rota_common::wire::JobRecord>> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let request = RpcRequest::List {
                state,
                limit: Some(usize::MAX),
                cursor: cursor.take(),
            };
            let RpcReply::Jobs { jobs, next } = self.client.call(&request).await? else {
                bail!("not a list of jobs");
            };
            all.extend(jobs);
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(all),
            }
        }
    }
}
