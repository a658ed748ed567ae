//! Fault injection for the fault suite (`tests/tests/faults.rs`): a TCP [`Relay`] between a part
//! and RabbitMQ that cuts, black-holes and delays its connections; broker-side faults (a
//! connection closed through the management API, a lowered [`MaxMessageSize`]); a [`FullDisk`]
//! under a part's data folder; and the [`Ledger`] and [`Tally`] that count, per job as Jepsen
//! does, what was lost, recorded twice and run more than once.
//!
//! Every fault undoes itself when dropped, even after a failed assertion: the relay closes its
//! connections, the broker's limit is restored, the tmpfs is unmounted.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rota_common::client::Events;
use rota_common::wire::{EventKind, Job, JobId, JobRecord, Role, Status};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{System, amqp_url, within};

/// What the relay's connections obey, changed through the [`Relay`]'s controls and watched by
/// every connection task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Controls {
    /// Counts the cuts: a connection older than the last cut ends.
    cuts: u64,
    /// No byte moves, in either direction, and no close is passed on.
    blackhole: bool,
    /// Added before each chunk is passed on.
    delay: Duration,
    /// The relay was dropped: every connection ends.
    stopped: bool,
}

/// A TCP relay on 127.0.0.1 in front of RabbitMQ. A part started with `--amqp-url
/// <relay.url()>` talks to the broker through it, and the test cuts, black-holes or delays
/// that part's connection without touching the broker or other tests. Stops, closing every
/// connection, when dropped.
pub struct Relay {
    addr: SocketAddr,
    controls: watch::Sender<Controls>,
    accepted: watch::Sender<u64>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay to the tests' broker (the host and port of [`amqp_url`]).
    pub async fn to_broker() -> Relay {
        let upstream = broker_addr(&amqp_url());
        Relay::start(&upstream).await
    }

    /// A relay to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free local port for the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let (controls, _) = watch::channel(Controls::default());
        let (accepted, _) = watch::channel(0u64);
        let upstream = upstream.to_owned();
        let rx = controls.subscribe();
        let count = accepted.clone();
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                count.send_modify(|n| *n += 1);
                tokio::spawn(relay_one(client, upstream.clone(), rx.clone()));
            }
        });
        Relay {
            addr,
            controls,
            accepted,
            accept_loop,
        }
    }

    /// The broker URL through this relay, with a 2 s AMQP heartbeat (unless [`amqp_url`]
    /// names one), so that a black-holed connection is noticed within seconds.
    pub fn url(&self) -> String {
        let url = amqp_url();
        let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", &url));
        let (user, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
        let path = rest.find('/').map_or("/%2f", |i| &rest[i..]);
        let at = if user.is_empty() { "" } else { "@" };
        let url = format!("{scheme}://{user}{at}{}{path}", self.addr);
        if url.contains("heartbeat=") {
            url
        } else if url.contains('?') {
            format!("{url}&heartbeat=2")
        } else {
            format!("{url}?heartbeat=2")
        }
    }

    /// Closes every current connection in both directions (with an RST, as a crashed load
    /// balancer or a reset NAT entry does). New connections are still accepted.
    pub fn cut(&self) {
        self.controls.send_modify(|c| c.cuts += 1);
    }

    /// While on, no byte moves on any connection, old or new, in either direction, and no
    /// close is passed on: only the AMQP heartbeats can tell that the peer is gone.
    pub fn blackhole(&self, on: bool) {
        self.controls.send_modify(|c| c.blackhole = on);
    }

    /// Latency added to every chunk passed on, in both directions.
    pub fn delay(&self, delay: Duration) {
        self.controls.send_modify(|c| c.delay = delay);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        *self.accepted.borrow()
    }

    /// Waits until `n` connections in all have been accepted (e.g. "the part reconnected":
    /// `n` = [`Relay::accepted`] before the fault + 1).
    pub async fn await_accepted(&self, n: u64, limit: Duration) {
        let mut rx = self.accepted.subscribe();
        within(limit, &format!("connection {n} through the relay"), async {
            let _ = rx.wait_for(|a| *a >= n).await;
        })
        .await;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.controls.send_modify(|c| c.stopped = true);
    }
}

/// `host:port` of an AMQP URL (port 5672 when it names none).
fn broker_addr(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("127.0.0.1");
    if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:5672")
    }
}

/// One relayed connection: until either side closes, a cut, or the relay stops.
async fn relay_one(mut client: TcpStream, upstream: String, mut ctl: watch::Receiver<Controls>) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return; // the client sees its connection closed, as with a broker that is down
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let cuts = ctl.borrow_and_update().cuts;
    let cut = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let (up, down) = (ctl.clone(), ctl.clone());
        let flows = async {
            tokio::join!(pump(cr, sw, up), pump(sr, cw, down));
        };
        tokio::select! {
            _ = flows => false,
            _ = ctl.wait_for(|c| c.stopped || c.cuts != cuts) => true,
        }
    };
    if cut {
        // An RST rather than a FIN: neither side gets to say goodbye.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Passes bytes from `from` to `to` under the controls; a close is passed on as a FIN.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut ctl: watch::Receiver<Controls>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = from.read(&mut buf).await;
        let delay = ctl.borrow().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // Held while black-holed, whatever was read: data, a close or an error.
        if ctl.wait_for(|c| !c.blackhole).await.is_err() {
            return;
        }
        match read {
            Ok(n) if n > 0 => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => {
                let _ = to.shutdown().await;
                return;
            }
        }
    }
}

/// One request to the management API of the tests' broker ([`crate::management_url`]) over
/// plain HTTP/1.0 (so the body is never chunked), as the administrator of [`amqp_url`]: the
/// status and the body.
pub async fn management(method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use base64::Engine;
    let url = crate::management_url(&amqp_url());
    let addr = url.trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&addr)
        .await
        .with_context(|| format!("the management API at {addr}"))?;
    let (user, password) = crate::credentials(&amqp_url());
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Basic {token}\r\n\
         X-Reason: rota fault suite\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status from the management API")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A client connection as the broker lists it.
#[derive(Debug, Clone)]
pub struct BrokerConnection {
    /// The broker's name for it (`127.0.0.1:40000 -> 127.0.0.1:5672`), which closes it.
    pub name: String,
    /// The name the client gave (`rota pool-agent a1 (host, pid 123)`).
    pub client_name: String,
}

/// The broker's client connections, from `rabbitmqctl list_connections` (the management API
/// lists no client properties where RabbitMQ 4 refuses `management_metrics_collection`).
pub async fn broker_connections() -> anyhow::Result<Vec<BrokerConnection>> {
    let out = tokio::task::spawn_blocking(|| {
        crate::rabbitmqctl()
            .args(["-q", "list_connections", "name", "client_properties"])
            .args(["--formatter", "json"])
            .output()
    })
    .await?
    .context("runs rabbitmqctl list_connections")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl list_connections: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).context("the connections list")?;
    Ok(list
        .iter()
        .filter_map(|c| {
            // [["connection_name", "longstr", "rota pool-agent …"], …]
            let client_name = c["client_properties"]
                .as_array()?
                .iter()
                .find(|p| p[0] == "connection_name")?[2]
                .as_str()?;
            Some(BrokerConnection {
                name: c["name"].as_str()?.to_owned(),
                client_name: client_name.to_owned(),
            })
        })
        .collect())
}

/// The broker closes the connection of the part whose process is `pid` (its name is
/// `rota <part> … pid <pid>)`), as a failover or an operator does (`DELETE
/// /api/connections/…`). Waits until the broker lists it and closes it; returns how many were
/// closed.
pub async fn close_connection_of(pid: u32) -> usize {
    let suffix = format!("pid {pid})");
    within(
        Duration::from_secs(30),
        &format!("the broker listing the connection of pid {pid}"),
        async {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Ok(list) = broker_connections().await else {
                    continue;
                };
                let mine: Vec<_> = list
                    .into_iter()
                    .filter(|c| {
                        c.client_name.starts_with("rota ") && c.client_name.ends_with(&suffix)
                    })
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let mut closed = 0;
                for c in &mine {
                    let path = format!("/api/connections/{}", percent_encode(&c.name));
                    if let Ok((status, _)) = management("DELETE", &path).await
                        && (200..300).contains(&status)
                    {
                        closed += 1;
                    }
                }
                // RabbitMQ 3's management API knows a connection only once its statistics
                // arrive (every 5 s), after rabbitmqctl lists it: until then, try again.
                if closed > 0 {
                    return closed;
                }
            }
        },
    )
    .await
}

fn percent_encode(s: &str) -> String {
    s.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}

/// RabbitMQ's `max_message_size` lowered while this guard lives, restored when it is dropped.
/// The broker applies it to channels opened after the change, so start the part whose
/// publishes it should limit after this, and drop the guard as soon as that part is connected:
/// its channels keep the limit, and other tests on the shared broker are spared.
pub struct MaxMessageSize {
    previous: Option<u64>,
}

impl MaxMessageSize {
    /// The least the suite may set: the broker is shared with tests that run in parallel.
    pub const FLOOR: u64 = 1024 * 1024;

    pub fn lower_to(bytes: u64) -> MaxMessageSize {
        assert!(
            bytes >= Self::FLOOR,
            "never below 1 MiB: the broker is shared"
        );
        let current = rabbitmqctl_eval("application:get_env(rabbit, max_message_size).")
            .expect("rabbitmqctl reads max_message_size");
        // `{ok,134217728}`, or `undefined` when the default applies.
        let previous = current
            .trim()
            .strip_prefix("{ok,")
            .and_then(|v| v.strip_suffix('}'))
            .and_then(|v| v.parse().ok());
        rabbitmqctl_eval(&format!(
            "application:set_env(rabbit, max_message_size, {bytes})."
        ))
        .expect("rabbitmqctl sets max_message_size");
        MaxMessageSize { previous }
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        let restore = match self.previous {
            Some(v) => format!("application:set_env(rabbit, max_message_size, {v})."),
            None => "application:unset_env(rabbit, max_message_size).".to_owned(),
        };
        if let Err(e) = rabbitmqctl_eval(&restore) {
            eprintln!("could not restore RabbitMQ's max_message_size: {e:#}");
        }
    }
}

fn rabbitmqctl_eval(expr: &str) -> anyhow::Result<String> {
    let out = crate::rabbitmqctl()
        .args(["eval", expr])
        .output()
        .context("runs rabbitmqctl")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl eval {expr:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A small tmpfs mounted over a part's data folder, which the test fills and frees; unmounted
/// when dropped, even after a panic. Needs root (`mount`).
pub struct FullDisk {
    dir: PathBuf,
    ballast: PathBuf,
}

impl FullDisk {
    /// Mounts a tmpfs of `bytes` at `dir` (created if missing).
    pub fn mount(dir: &Path, bytes: u64) -> FullDisk {
        std::fs::create_dir_all(dir).expect("the folder to mount on");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("runs mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (the fault suite runs as root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        FullDisk {
            dir: dir.to_owned(),
            ballast: dir.join("ballast"),
        }
    }

    /// Fills the filesystem to the last byte with a ballast file; returns the bytes written.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.ballast)
            .expect("the ballast file");
        let mut written = 0;
        for chunk in [1024 * 1024, 4096, 1] {
            let block = vec![0u8; chunk];
            while f.write_all(&block).is_ok() {
                written += chunk as u64;
            }
        }
        let _ = f.flush();
        written
    }

    /// Removes the ballast: the space is back.
    pub fn free(&self) {
        let _ = std::fs::remove_file(&self.ballast);
    }

    /// The bytes free now.
    pub fn available(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.dir)
            .output();
        out.ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .nth(1)
                    .and_then(|l| l.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        // Lazy: the part may still hold files open in it.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .output();
    }
}

/// The alias under which `probe.count` jobs write their run lines.
pub const RUNS_ALIAS: &str = "runs";

/// Per job, what a fault did, counted as Jepsen does. One [`Tally`] per fault, summed over its
/// injections.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub fault: String,
    pub injections: usize,
    pub jobs: usize,
    /// Accepted (RabbitMQ confirmed them) and never recorded with a final state.
    pub lost: usize,
    /// Recorded with more than one final outcome: two recorded runs of one attempt, or final
    /// `job.finished` events that disagree.
    pub recorded_twice: usize,
    /// Jobs whose final `job.finished` event came more than once, the same each time. Events
    /// are at least once: a scheduler killed after announcing a batch and before flushing it
    /// records and announces it again on restart. Only such faults allow them
    /// ([`Tally::events_may_repeat`]); anywhere else a repeat would be a second recording.
    pub repeated_events: usize,
    /// Whether the fault may repeat a final event (it kills the scheduler).
    pub events_may_repeat: bool,
    /// The most runs of one job, on all agents together.
    pub max_runs: usize,
    /// The most runs of one job on one agent that was not killed.
    pub max_runs_on_surviving_agent: usize,
    /// What else the fault's test expects and did not see (e.g. "/readyz never answered
    /// 503"): any of them breaks the bar.
    pub problems: Vec<String>,
    /// A few examples of what went wrong per job, for the failure message.
    pub notes: Vec<String>,
}

impl Tally {
    pub fn new(fault: &str) -> Tally {
        Tally {
            fault: fault.to_owned(),
            ..Tally::default()
        }
    }

    /// Whether the bar holds: nothing lost, nothing recorded twice, at most one run on an
    /// agent that survived, and at most `max_runs` runs in all.
    pub fn holds(&self, max_runs: usize) -> bool {
        self.problems.is_empty()
            && self.lost == 0
            && self.recorded_twice == 0
            && (self.repeated_events == 0 || self.events_may_repeat)
            && self.max_runs_on_surviving_agent <= 1
            && self.max_runs <= max_runs
    }

    /// Panics, with the tally's row and notes, unless [`Tally::holds`].
    pub fn assert_holds(&self, max_runs: usize) {
        self.assert_bar(
            self.holds(max_runs),
            &format!("0 lost, 0 recorded twice, ≤ 1 run on a surviving agent, ≤ {max_runs} runs"),
        );
    }

    /// Panics, with the tally's row, problems and notes, unless `holds`; `bar` says what was
    /// expected.
    pub fn assert_bar(&self, holds: bool, bar: &str) {
        assert!(
            holds,
            "the bar ({bar}) does not hold:\n{}{}{}",
            Tally::table(std::slice::from_ref(self)),
            self.problems
                .iter()
                .map(|p| format!("  ! {p}\n"))
                .collect::<String>(),
            self.notes
                .iter()
                .take(10)
                .map(|n| format!("  - {n}\n"))
                .collect::<String>()
        );
    }

    /// Records an expectation of the fault's test that did not hold.
    pub fn problem(&mut self, problem: impl Into<String>) {
        self.problems.push(problem.into());
    }

    fn note(&mut self, note: String) {
        if self.notes.len() < 20 {
            self.notes.push(note);
        }
    }

    /// A Markdown table, one row per fault.
    pub fn table(tallies: &[Tally]) -> String {
        let mut t = String::from(
            "| fault | injections | jobs | lost | recorded twice | final event repeated | max runs on a surviving agent | max runs | other failures |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
        );
        for x in tallies {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                x.fault,
                x.injections,
                x.jobs,
                x.lost,
                x.recorded_twice,
                x.repeated_events,
                x.max_runs_on_surviving_agent,
                x.max_runs,
                if x.problems.is_empty() {
                    "none".to_owned()
                } else {
                    x.problems.join("; ")
                }
            );
        }
        t
    }
}

/// What the suite knows of its jobs in one [`System`]: the jobs accepted, their `started` and
/// `finished` events, and the run lines their Work wrote in each agent's runs folder.
pub struct Ledger {
    events: Events,
    accepted: Vec<JobId>,
    accepted_set: HashSet<JobId>,
    /// `job.started` events per job and agent.
    started: HashMap<JobId, Vec<String>>,
    /// `job.finished` events with a final state, per job: each one's attempt and status.
    finals: HashMap<JobId, Vec<(u32, Option<Status>)>>,
    /// Jobs that the scheduler's records show ended (whatever their events said).
    ended: HashSet<JobId>,
    /// Agent id → its runs folder.
    run_dirs: Vec<(String, PathBuf)>,
    killed: HashSet<String>,
}

impl Ledger {
    /// Starts watching job events: create it before the first job is published.
    pub async fn new(sys: &System) -> Ledger {
        let events = sys
            .client
            .watch(&[EventKind::Started, EventKind::Finished])
            .await
            .expect("watches job events");
        Ledger {
            events,
            accepted: Vec::new(),
            accepted_set: HashSet::new(),
            started: HashMap::new(),
            finals: HashMap::new(),
            ended: HashSet::new(),
            run_dirs: Vec::new(),
            killed: HashSet::new(),
        }
    }

    /// The `--alias` value that gives agent `id` its own runs folder (created here).
    pub fn runs_alias(&mut self, sys: &System, id: &str) -> String {
        let dir = sys.dir.path().join(format!("runs-{id}"));
        std::fs::create_dir_all(&dir).expect("the runs folder");
        if !self.run_dirs.iter().any(|(a, _)| a == id) {
            self.run_dirs.push((id.to_owned(), dir.clone()));
        }
        format!("{RUNS_ALIAS}={}", dir.display())
    }

    /// A `probe.count` job that takes `ms`.
    pub fn count_job(ms: u64) -> Job {
        Job::new(
            "probe.count",
            json!({ "file": format!("{RUNS_ALIAS}/runs.log"), "ms": ms }),
        )
    }

    /// Publishes `job` to the jobs exchange (RabbitMQ confirms it) and counts it as accepted.
    pub async fn publish(&mut self, sys: &System, job: Job) -> JobId {
        let id = sys
            .client
            .publish_job(job)
            .await
            .expect("RabbitMQ confirms the job");
        self.accept(id);
        id
    }

    /// Publishes `n` `probe.count` jobs of `ms` each.
    pub async fn publish_counted(&mut self, sys: &System, n: usize, ms: u64) -> Vec<JobId> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(self.publish(sys, Ledger::count_job(ms)).await);
        }
        ids
    }

    /// Counts a job accepted by other means (e.g. `submit`).
    pub fn accept(&mut self, id: JobId) {
        if self.accepted_set.insert(id) {
            self.accepted.push(id);
        }
    }

    /// Agent `id` was killed: its runs do not count as runs on a surviving agent.
    pub fn killed(&mut self, id: &str) {
        self.killed.insert(id.to_owned());
    }

    fn take(&mut self, e: rota_common::wire::Event) {
        match e.event {
            EventKind::Started => self
                .started
                .entry(e.uuid)
                .or_default()
                .push(e.agent.map(|a| a.to_string()).unwrap_or_default()),
            EventKind::Finished if e.state.is_some_and(|s| s.is_final()) => {
                self.finals
                    .entry(e.uuid)
                    .or_default()
                    .push((e.attempt, e.status));
            }
            _ => {}
        }
    }

    /// Waits until each of `ids` has a `job.started` event (from any agent).
    pub async fn started(&mut self, ids: &[JobId], limit: Duration) {
        let what = format!("{} jobs started", ids.len());
        within(limit, &what, async {
            while !ids.iter().all(|id| self.started.contains_key(id)) {
                let e = self.events.next().await.expect("events keep coming");
                self.take(e);
            }
        })
        .await;
    }

    /// Waits until `n` more `job.started` events come from agent `agent`; returns their jobs.
    pub async fn next_started_on(&mut self, agent: &str, n: usize, limit: Duration) -> Vec<JobId> {
        let mut ids = Vec::new();
        within(limit, &format!("{n} jobs started on {agent}"), async {
            while ids.len() < n {
                let e = self.events.next().await.expect("events keep coming");
                if e.event == EventKind::Started
                    && e.agent.as_ref().is_some_and(|a| a.as_str() == agent)
                {
                    ids.push(e.uuid);
                }
                self.take(e);
            }
        })
        .await;
        ids
    }

    /// Waits until a job recorded as finished was run by `agent` (its `finished` event comes
    /// after the scheduler recorded the result); returns it.
    pub async fn next_finished_from(&mut self, agent: &str, limit: Duration) -> JobId {
        within(limit, &format!("a job of {agent} recorded"), async {
            loop {
                let e = self.events.next().await.expect("events keep coming");
                let from_agent = e.event == EventKind::Finished
                    && e.agent.as_ref().is_some_and(|a| a.as_str() == agent);
                let id = e.uuid;
                self.take(e);
                if from_agent {
                    return id;
                }
            }
        })
        .await
    }

    /// Waits (at most `limit`) until every accepted job is recorded with a final state; whether
    /// they all were. Its `job.finished` event says so at once; the scheduler's records, read at
    /// each of its heartbeats, say so too when that event was never sent (events are notifications:
    /// a scheduler killed between writing a record and announcing it may never announce it). A job never recorded is counted lost by
    /// [`Ledger::tally_into`].
    pub async fn recorded(&mut self, sys: &System, limit: Duration) -> bool {
        let mut beats = sys.heartbeats().await;
        let mut beating = true;
        let all = async {
            loop {
                if self
                    .accepted
                    .iter()
                    .all(|id| self.finals.contains_key(id) || self.ended.contains(id))
                {
                    return;
                }
                tokio::select! {
                    e = self.events.next() => self.take(e.expect("events keep coming")),
                    hb = beats.next(), if beating => match hb {
                        Some(hb) if hb.role == Role::Scheduler => self.read_records(sys).await,
                        Some(_) => {}
                        None => beating = false,
                    },
                }
            }
        };
        tokio::time::timeout(limit, all).await.is_ok()
    }

    /// Notes the jobs that the scheduler's records show ended.
    async fn read_records(&mut self, sys: &System) {
        if let Ok(jobs) = sys.list_all(None).await {
            self.ended.extend(
                jobs.iter()
                    .filter(|j| j.state.is_final() && self.accepted_set.contains(&j.uuid))
                    .map(|j| j.uuid),
            );
        }
    }

    /// Waits (at most `limit`) until each of `agents` reports, in a heartbeat, no job running
    /// and no result waiting for its receipt: any duplicate result has reached the scheduler.
    pub async fn settle(&mut self, sys: &System, agents: &[&str], limit: Duration) -> bool {
        let mut beats = sys.heartbeats().await;
        let mut waiting: HashSet<&str> = agents.iter().copied().collect();
        let all = async {
            while !waiting.is_empty() {
                let hb = beats.next().await.expect("heartbeats keep coming");
                if hb.role == Role::Agent && hb.running.is_empty() && hb.unreceipted == 0 {
                    waiting.remove(hb.id.as_str());
                }
            }
        };
        let settled = tokio::time::timeout(limit, all).await.is_ok();
        // Events already delivered to the watch queue: a late duplicate shows here.
        while let Some(Some(e)) = futures::FutureExt::now_or_never(self.events.next()) {
            self.take(e);
        }
        settled
    }

    /// The run lines written so far: per job, the agent of each run.
    pub fn runs(&self) -> HashMap<JobId, Vec<String>> {
        let mut runs: HashMap<JobId, Vec<String>> = HashMap::new();
        for (agent, dir) in &self.run_dirs {
            let text = std::fs::read_to_string(dir.join("runs.log")).unwrap_or_default();
            for line in text.lines() {
                if let Some(id) = line.split_whitespace().next().and_then(|u| u.parse().ok()) {
                    runs.entry(id).or_default().push(agent.clone());
                }
            }
        }
        runs
    }

    /// The scheduler's records of every job (asked again while it is reconnecting).
    pub async fn records(sys: &System) -> HashMap<JobId, JobRecord> {
        within(
            Duration::from_secs(60),
            "the scheduler's list of jobs",
            async {
                loop {
                    if let Ok(jobs) = sys.list_all(None).await {
                        return jobs.into_iter().map(|j| (j.uuid, j)).collect();
                    }
                }
            },
        )
        .await
    }

    /// Adds this ledger's jobs to `tally` (call once, after [`Ledger::recorded`] and
    /// [`Ledger::settle`]).
    pub async fn tally_into(&mut self, sys: &System, tally: &mut Tally) {
        let records = Ledger::records(sys).await;
        let runs = self.runs();
        tally.jobs += self.accepted.len();
        for id in &self.accepted {
            let record = records.get(id);
            match record {
                Some(r) if r.state.is_final() => {}
                Some(r) => {
                    tally.lost += 1;
                    tally.note(format!("{id}: still {} when the round ended", r.state));
                }
                None => {
                    tally.lost += 1;
                    tally.note(format!("{id}: never recorded"));
                }
            }
            let finals = self.finals.get(id).map(Vec::as_slice).unwrap_or_default();
            let outcomes: HashSet<_> = finals.iter().collect();
            let mut per_attempt: HashMap<u32, usize> = HashMap::new();
            for a in record.iter().flat_map(|r| &r.attempts) {
                if a.status.is_some() {
                    *per_attempt.entry(a.attempt).or_default() += 1;
                }
            }
            let twice_in_record = per_attempt.values().any(|n| *n > 1);
            if outcomes.len() > 1 || twice_in_record {
                tally.recorded_twice += 1;
                tally.note(format!(
                    "{id}: final job.finished events (attempt, status) {finals:?}, recorded runs per attempt {per_attempt:?}"
                ));
            } else if finals.len() > 1 {
                tally.repeated_events += 1;
                tally.note(format!(
                    "{id}: the same final job.finished event {} times",
                    finals.len()
                ));
            }
            let on = runs.get(id).map(Vec::as_slice).unwrap_or_default();
            if on.len() > tally.max_runs {
                tally.max_runs = on.len();
            }
            let mut per_agent: std::collections::BTreeMap<&str, usize> = Default::default();
            for agent in on {
                *per_agent.entry(agent).or_default() += 1;
            }
            if on.len() > 1 {
                let started = self.started.get(id).map(Vec::len).unwrap_or(0);
                tally.note(format!(
                    "{id}: ran {} times (runs per agent {per_agent:?}), {started} job.started events",
                    on.len()
                ));
            }
            let most = per_agent
                .iter()
                .filter(|(agent, _)| !self.killed.contains(**agent))
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(0);
            tally.max_runs_on_surviving_agent = tally.max_runs_on_surviving_agent.max(most);
        }
    }
}

/// How many injections of each fault to make: `ROTA_FAULT_SOAK` when set (the soak mode),
/// else `default`.
pub fn injections(default: usize) -> usize {
    std::env::var("ROTA_FAULT_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_and_relay_urls() {
        assert_eq!(
            broker_addr("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "127.0.0.1:5672"
        );
        assert_eq!(broker_addr("amqp://h/%2f?heartbeat=3"), "h:5672");
        assert_eq!(percent_encode("a b->c:1"), "a%20b-%3Ec%3A1");
    }

    #[test]
    fn a_tally_holds_only_at_the_bar() {
        let mut t = Tally::new("x");
        assert!(t.holds(1));
        t.max_runs = 2;
        assert!(!t.holds(1));
        assert!(t.holds(2));
        t.max_runs_on_surviving_agent = 2;
        assert!(!t.holds(2));
        assert!(Tally::table(&[t.clone()]).contains("| x | 0 | 0 | 0 | 0 | 0 | 2 | 2 | none |"));
        t.max_runs_on_surviving_agent = 1;
        t.repeated_events = 1;
        assert!(!t.holds(2));
        t.events_may_repeat = true;
        assert!(t.holds(2));
        t.problem("no 503");
        assert!(!t.holds(2));
    }
}
