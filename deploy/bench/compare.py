"""`deploy/bench.sh compare`: Rota, Celery 5 and the bare broker side by side, against the same
RabbitMQ, interleaved in rounds (each round runs each system once per measure, in an order
that turns from round to round), then markdown tables on stdout: each figure's median and
range over the rounds, the ratios Rota/Celery and Rota/floor (the median and range of the
rounds' own ratios, since a round's runs share the machine's weather) and Rota's goals from
issue 11; then the CPU per job of each part. Progress goes to stderr.

The measures:
  1. end to end: N no-op jobs published at once, first publish to last result recorded (Rota:
     by the scheduler; Celery: fetched through its rpc backend; the floor: consumed);
  2. drain: N jobs queued with no worker running, timed from the worker's start to the last
     result;
  3. one at a time: publish, wait for the result, next (after a warm-up): p50 and p99;
  4. paced: Rota at half the rate it reached in (1) in the same round: p99 from submit to
     result recorded; and right before it, at that rate, the floor (p99 from publish to
     delivery, what the broker alone adds on this machine at that moment) and the chain
     (`broker_floor chain`: a message through the three hops a job takes, between three bare
     lapin processes: what those hops take on this machine at that moment, with nothing of
     Rota in them);
  5. memory and disk: RSS of an idle pool agent at its start and once idle for IDLE_AFTER
     seconds after the runs (and of an idle Celery worker), the scheduler's RSS after the
     runs, its store on disk per recorded job;
  6. CPU per job of each part (user + sys from /proc/PID/stat) around measures 1 and 4, and
     how busy the machine was (/proc/stat) during measure 4.

Rota runs as shipped: a release `scheduler run` and one `pool-agent run` with 16 `local` workers
and a prefetch of 4 jobs per worker, Celery's default (namespace rota-bench-compare), driven by
`scheduler bench --json`. Celery runs from celery_noop.py (acks_late, rpc results, prefork x2)
on the vhost rota-bench-celery, published with its own client (persistent, unconfirmed). The floor is the broker_floor example (lapin,
persistent + confirms, publishing and consuming at once). Everything started here is stopped
on exit, the vhost and Rota's queues and exchanges deleted, the data folder removed.

Run from the repository with the project's venv, after the release build (deploy/bench.sh
compare does both):
  .venv/bin/python deploy/bench/compare.py [--rounds 3] [--jobs 10000] [--lone 300] [--paced 10000]

With --sweep 0.25,0.35,0.5 it runs only measure 1 and then measure 4's chain and Rota at each
of those fractions of Rota's rate, and prints their p99s side by side: where the paced tail
of three hops through the broker, with Rota and without, crosses a goal on this machine.
"""

import argparse
import base64
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from celery.result import ResultSet

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = ROOT / "target" / "release"
# An agent remembers the runs receipted in the last minute at the default heartbeat
# (pool-agent/src/recent.rs).
IDLE_AFTER = 70
NAMESPACE = "rota-bench-compare"
VHOST = "rota-bench-celery"
AMQP_URL = os.environ.get("ROTA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
TICK = os.sysconf("SC_CLK_TCK")
WARM_UP = 20


def say(*what):
    print("compare:", *what, file=sys.stderr, flush=True)


# ---- the broker ---------------------------------------------------------------------------


class Management:
    """RabbitMQ's management API (on port 15672 of the AMQP host, with the AMQP user)."""

    def __init__(self, amqp_url):
        u = urllib.parse.urlsplit(amqp_url)
        self.base = f"http://{u.hostname}:15672/api"
        user, password = urllib.parse.unquote(u.username or "guest"), urllib.parse.unquote(u.password or "guest")
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", self.auth)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            if e.code == 404 and method == "DELETE":
                return None
            raise SystemExit(f"RabbitMQ's management API refused {method} {path}: {e}") from e
        except urllib.error.URLError as e:
            raise SystemExit(
                f"cannot reach RabbitMQ's management API at {self.base} ({e.reason}); "
                "enable it with `rabbitmq-plugins enable rabbitmq_management` (deploy/setup.sh does)"
            ) from e

    def fresh_vhost(self, vhost, user):
        self.call("DELETE", f"/vhosts/{vhost}")
        self.call("PUT", f"/vhosts/{vhost}", {})
        self.call("PUT", f"/permissions/{vhost}/{user}", {"configure": ".*", "write": ".*", "read": ".*"})

    def broker(self, queue):
        """The broker's version, and the kind of Rota's jobs queue `queue` (in vhost /): a
        quorum queue, or a classic one with the version of its index and message store (on
        the first version jobs waited in the queue now and then: see the README)."""
        version = (self.call("GET", "/overview") or {}).get("rabbitmq_version", "?")
        q = self.call("GET", f"/queues/%2f/{urllib.parse.quote(queue, safe='')}") or {}
        if q.get("type") != "classic":
            return f"RabbitMQ {version}, Rota's jobs queue a {q.get('type', '?')} queue"
        status = q.get("backing_queue_status") or {}
        # A priority queue adds up the versions of its backing queues, one per priority.
        per = max(len(status.get("priority_lengths") or {}), 1)
        index = status["version"] // per if isinstance(status.get("version"), int) else "?"
        return f"RabbitMQ {version}, Rota's jobs queue a classic queue on index version {index}"

    def delete_namespace(self, vhost, prefix):
        """Deletes the queues and exchanges of `vhost` whose names start with `prefix`."""
        v = urllib.parse.quote(vhost, safe="")
        for kind in ("queues", "exchanges"):
            for item in self.call("GET", f"/{kind}/{v}?columns=name") or []:
                name = item["name"]
                if name.startswith(prefix):
                    self.call("DELETE", f"/{kind}/{v}/{urllib.parse.quote(name, safe='')}")


def rabbitmq_pid():
    """The pid of the RabbitMQ node that listens on AMQP_URL's port on this host, or None."""
    port = urllib.parse.urlsplit(AMQP_URL).port or 5672
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address (hex ip:port), state 0A = LISTEN, inode
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if (p / "comm").read_text().strip() != "beam.smp":
                continue
            for fd in (p / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(p.name)
        except OSError:
            pass
    return None


# ---- processes ----------------------------------------------------------------------------


def cpu_seconds(pid):
    """User + system CPU of a process and of its live children (the prefork pool), in seconds."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / TICK


def children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def memory_kib(pid, field="VmRSS", source="status"):
    """A memory figure of /proc/PID/{source} (VmRSS, VmHWM; Pss of smaps_rollup), summed over the
    process and its live children, in KiB."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/{source}").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def machine_jiffies():
    """(busy, all) clock ticks of every core since boot, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def measured(parts, jobs, run):
    """Runs `run()`; returns what it returned, the CPU per job in ms of each of `parts` (name →
    a function giving that part's CPU seconds so far) and the machine's busy share, in %."""
    before = {p: f() for p, f in parts.items()}
    busy0, all0 = machine_jiffies()
    out = run()
    busy1, all1 = machine_jiffies()
    cpu = {p: (f() - before[p]) / jobs * 1e3 for p, f in parts.items()}
    return out, cpu, 100 * (busy1 - busy0) / max(all1 - all0, 1)


def with_rabbitmq(parts):
    """`parts`, and RabbitMQ's node when it runs on this host."""
    mq = rabbitmq_pid()
    return {**parts, "RabbitMQ": lambda: cpu_seconds(mq)} if mq else parts


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Processes:
    """The long-running processes started here, stopped (TERM, then KILL) on exit."""

    def __init__(self):
        self.running = {}

    def start(self, name, argv, log, **kw):
        say(f"starting {name}")
        self.running[name] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **kw
        )
        return self.running[name]

    def stop(self, name):
        p = self.running.pop(name, None)
        if p is None:
            return
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop within 30 s of SIGTERM: killing it")
            p.kill()
            p.wait()

    def stop_all(self):
        for name in list(self.running):
            self.stop(name)


def run_json(argv, env=None, what=""):
    """Runs a program that prints one JSON line last; its parsed figures."""
    out = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{what or argv[0]} failed (exit {out.returncode}); see the messages above")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- Rota ---------------------------------------------------------------------------------


class Rota:
    name = "Rota"

    def __init__(self, procs, data):
        self.procs, self.data = procs, data
        self.env = {**os.environ, "ROTA_NAMESPACE": NAMESPACE, "ROTA_AMQP_URL": AMQP_URL}
        self.recorded = 0
        (data / "scheduler").mkdir()
        (data / "agent").mkdir()
        self.log = open(data / "rota.log", "ab")

    def start(self):
        self.scheduler = self.procs.start(
            "the scheduler",
            [BIN / "scheduler", "run", "--data-dir", self.data / "scheduler", "--heartbeat-interval", "1s"],
            self.log, env=self.env,
        )
        self.start_agent()
        self.bench("--jobs", "1", "--warm-up", str(WARM_UP), "--one-at-a-time")

    def start_agent(self):
        self.agent = self.procs.start(
            "the pool agent",
            [BIN / "pool-agent", "run", "--data-dir", self.data / "agent", "--heartbeat-interval", "1s",
             "--id", "bench", "--worker-location", "local", "--pool-max-size", "16",
             # 4 jobs held per worker: Celery's default prefetch multiplier, which it runs with.
             "--prefetch", "64"],
            self.log, env=self.env,
        )

    def bench(self, *flags):
        figures = run_json([BIN / "scheduler", "bench", "--json", *flags], env=self.env, what="scheduler bench")
        self.recorded += figures["jobs"] + (WARM_UP if "--warm-up" in flags else 0)
        if figures["failed"]:
            raise SystemExit(f"{figures['failed']} of Rota's no-op jobs failed; see {self.log.name}")
        return figures

    def parts(self):
        return with_rabbitmq({
            "scheduler": lambda: cpu_seconds(self.scheduler.pid),
            "pool agent": lambda: cpu_seconds(self.agent.pid),
            "client (scheduler bench)": children_cpu,
        })

    def at_once(self, jobs):
        f, cpu, _ = measured(self.parts(), jobs, lambda: self.bench("--jobs", str(jobs)))
        return {"jobs_per_s": f["jobs_per_s"], "cpu_ms": cpu}

    def drain(self, jobs):
        self.procs.stop("the pool agent")
        bench = subprocess.Popen(
            [BIN / "scheduler", "bench", "--json", "--drain", "--jobs", str(jobs)],
            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            for line in bench.stderr:
                if line.startswith("queued "):
                    break
                sys.stderr.write(line)
            else:
                raise SystemExit("scheduler bench --drain ended before queueing its jobs")
            bench.stdin.write("go\n")
            bench.stdin.flush()
            self.start_agent()
            out, err = bench.communicate()
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.wait()
        sys.stderr.write(err)
        if bench.returncode != 0:
            raise SystemExit(f"scheduler bench --drain failed (exit {bench.returncode})")
        f = json.loads(out.strip().splitlines()[-1])
        self.recorded += f["jobs"]
        return {"jobs_per_s": f["jobs_per_s"]}

    def one_at_a_time(self, jobs):
        f = self.bench("--one-at-a-time", "--jobs", str(jobs), "--warm-up", str(WARM_UP))
        return {"p50_ms": f["p50_ms"], "p99_ms": f["p99_ms"]}

    def paced(self, rate, jobs):
        f, cpu, busy = measured(self.parts(), jobs, lambda: self.bench("--rate", f"{rate:.0f}", "--jobs", str(jobs)))
        stages = f.get("slowest_1pct_median_ms")
        if stages:
            say("  the slowest 1% (medians, ms): submit → start {submit_to_start:.1f}, finish → stored "
                "{finish_to_stored:.1f}, stored → seen {stored_to_seen:.1f}".format(**stages))
        return {"rate": rate, "p50_ms": f["p50_ms"], "p99_ms": f["p99_ms"], "cpu_ms": cpu, "busy": busy}

    def idle_agent_mib(self):
        return memory_kib(self.agent.pid) / 1024

    def scheduler_mib(self):
        return memory_kib(self.scheduler.pid) / 1024, memory_kib(self.scheduler.pid, "VmHWM") / 1024

    def disk_bytes(self):
        """The scheduler's data folder on disk: (in all, of which in the jobs' folders, work/)."""
        total = folders = 0
        root = self.data / "scheduler"
        for p in root.rglob("*"):
            if p.is_file():
                size = p.stat().st_blocks * 512
                total += size
                folders += size if "work" in p.relative_to(root).parts else 0
        return total, folders


# ---- Celery -------------------------------------------------------------------------------


class Celery:
    name = "Celery"

    def __init__(self, procs, data):
        self.procs = procs
        u = urllib.parse.urlsplit(AMQP_URL)
        self.url = urllib.parse.urlunsplit(u._replace(path="/" + VHOST))
        os.environ["ROTA_BENCH_CELERY_URL"] = self.url
        sys.path.insert(0, str(HERE))
        import celery_noop  # noqa: E402 (needs the URL above)

        self.noop = celery_noop.noop
        self.log = open(data / "celery.log", "ab")

    def start(self):
        self.start_worker()
        for _ in range(WARM_UP):
            self.noop.delay().get(timeout=120)

    def start_worker(self):
        self.worker = self.procs.start(
            "the Celery worker",
            [Path(sys.executable).parent / "celery", "--workdir", HERE, "-A", "celery_noop", "worker",
             "--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            self.log,
        )

    def fetch(self, results):
        # One ResultSet: Celery then drains the rpc reply queue for all of them (a get() per
        # result waits on the broker for each, and is several times slower).
        ResultSet(results).get(timeout=600)

    def at_once(self, jobs):
        mq = rabbitmq_pid()
        before = (cpu_seconds(self.worker.pid), self_cpu(), mq and cpu_seconds(mq))
        t0 = time.perf_counter()
        self.fetch([self.noop.delay() for _ in range(jobs)])
        seconds = time.perf_counter() - t0
        after = (cpu_seconds(self.worker.pid), self_cpu(), mq and cpu_seconds(mq))
        parts = ["worker (prefork ×2)", "client (this script)", "RabbitMQ"]
        cpu = {p: (a - b) / jobs * 1e3 for p, a, b in zip(parts, after, before) if a is not None}
        return {"jobs_per_s": jobs / seconds, "cpu_ms": cpu}

    def drain(self, jobs):
        self.procs.stop("the Celery worker")
        results = [self.noop.delay() for _ in range(jobs)]
        t0 = time.perf_counter()
        self.start_worker()
        self.fetch(results)
        return {"jobs_per_s": jobs / (time.perf_counter() - t0)}

    def one_at_a_time(self, jobs):
        for _ in range(WARM_UP):
            self.noop.delay().get(timeout=60)
        latencies = []
        for _ in range(jobs):
            t0 = time.perf_counter()
            self.noop.delay().get(timeout=60)
            latencies.append((time.perf_counter() - t0) * 1e3)
        return {"p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99)}

    def idle_worker_mib(self):
        # PSS: its three processes share most of their pages, which RSS would count three times.
        return memory_kib(self.worker.pid, "Pss", "smaps_rollup") / 1024


# ---- the floor ----------------------------------------------------------------------------


class Floor:
    name = "floor"

    def run(self, *argv, per=1):
        """broker_floor with `argv`: its figures, with the CPU per message of `per` messages."""
        parts = with_rabbitmq({"floor program": children_cpu})
        f, cpu, busy = measured(
            parts, max(per, 1), lambda: run_json([BIN / "examples" / "broker_floor", *map(str, argv)], what="broker_floor"))
        return {**f, "cpu_ms": cpu, "busy": busy}

    def at_once(self, jobs):
        f = self.run(jobs, 0, per=jobs)
        return {"jobs_per_s": f["msg_per_s"], "cpu_ms": f["cpu_ms"]}

    def one_at_a_time(self, jobs):
        f = self.run(0, jobs)
        return {"p50_ms": f["p50_ms"], "p99_ms": f["p99_ms"]}

    def paced(self, rate, jobs):
        f = self.run(0, 0, jobs, f"{rate:.0f}", per=jobs)
        return {"rate": rate, "p50_ms": f["paced_p50_ms"], "p99_ms": f["paced_p99_ms"], "cpu_ms": f["cpu_ms"], "busy": f["busy"]}


class Chain:
    """`broker_floor chain`: a job's three hops through the broker between three bare
    lapin processes (the client, a relay for the agent, one for the scheduler), nothing of Rota
    in them: what Rota's structure takes on this machine at that moment."""

    name = "chain"

    def paced(self, rate, jobs):
        parts = with_rabbitmq({"chain's 3 processes": children_cpu})
        f, cpu, busy = measured(
            parts, jobs, lambda: run_json([BIN / "examples" / "broker_floor", "chain", f"{rate:.0f}", str(jobs)], what="broker_floor chain"))
        return {"rate": rate, "p50_ms": f["p50_ms"], "p99_ms": f["p99_ms"], "cpu_ms": cpu, "busy": busy}


def sweep(args, rota, chain):
    """`--sweep`: the paced p99 of Rota and of the chain at several fractions of Rota's rate
    at once, each round's fractions taken of that round's rate; a markdown table."""
    runs = {f: {"Rota": [], "chain": []} for f in args.sweep}
    for r in range(args.rounds):
        say(f"round {r + 1}: Rota, {args.jobs:,} at once")
        burst = rota.at_once(args.jobs)["jobs_per_s"]
        say(f"  {burst:,.0f}/s")
        for f in args.sweep:
            for s in (chain, rota):
                say(f"round {r + 1}: {s.name}, {args.paced:,} paced at {f:g} of it, {burst * f:,.0f}/s")
                runs[f][s.name].append(s.paced(burst * f, args.paced))
                say(f"  p99 {runs[f][s.name][-1]['p99_ms']:.1f} ms")
    get = lambda f, s, k: [x[k] for x in runs[f][s]]  # noqa: E731
    out = [
        f"{args.rounds} rounds, each: Rota's rate with {args.jobs:,} jobs at once, then {args.paced:,} "
        "paced through the chain and through Rota at each fraction of that rate; median (range) "
        "over the rounds; Rota/chain is the median (range) of each round's own ratio.",
        "",
        "| fraction of Rota's rate at once | jobs/s | Rota p99 ms | chain p99 ms | Rota/chain "
        "| machine busy %, Rota / chain | RabbitMQ's CPU ms per job, Rota / chain |",
        "|---|---|---|---|---|---|---|",
    ]
    pct = lambda v: f"{v:.0f}"  # noqa: E731
    two = lambda v: f"{v:.2f}"  # noqa: E731
    mq = lambda f, s: [x["cpu_ms"].get("RabbitMQ") for x in runs[f][s]]  # noqa: E731
    for f in args.sweep:
        rota_p99, chain_p99 = get(f, "Rota", "p99_ms"), get(f, "chain", "p99_ms")
        out.append(f"| {f:g} | {spread(get(f, 'Rota', 'rate'), rate)} | {spread(rota_p99, ms)} | {spread(chain_p99, ms)} "
                   f"| {spread(ratios(rota_p99, chain_p99), times)} "
                   f"| {spread(get(f, 'Rota', 'busy'), pct)} / {spread(get(f, 'chain', 'busy'), pct)} "
                   f"| {spread(mq(f, 'Rota'), two)} / {spread(mq(f, 'chain'), two)} |")
    return "\n".join(out)


def fractions(text):
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected fractions between 0 and 1, comma-separated, e.g. 0.25,0.5")
    return values


# ---- figures ------------------------------------------------------------------------------


def percentile(values, p):
    s = sorted(values)
    return s[max(1, min(len(s), int(-(-len(s) * p // 1)))) - 1]


def spread(values, fmt):
    """'median (min–max)' of the values, each printed with fmt."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m = statistics.median(values)
    if len(values) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(min(values))}–{fmt(max(values))})"


def rate(v):
    return f"{v:,.0f}"


def ms(v):
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def times(v):
    return f"{v:.2f}×"


def ratios(a, b):
    return [x / y for x, y in zip(a, b) if x is not None and y]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=10_000, help="jobs of measures 1 and 2")
    ap.add_argument("--lone", type=int, default=300, help="jobs of measure 3, one at a time")
    # A p99 over a second or two is the longest stall in it: 10,000 jobs (about 4 s at
    # Rota's half rate here) put a hundred jobs in the last percent.
    ap.add_argument("--paced", type=int, default=10_000, help="jobs of measure 4")
    ap.add_argument("--sweep", metavar="FRACTIONS", type=fractions,
                    help="instead of the measures above: in each round Rota's rate at once (measure 1), "
                    "then the chain and Rota paced at each of these fractions of it, e.g. 0.25,0.35,0.5")
    args = ap.parse_args()

    # SIGTERM (and SIGHUP) end the run like Ctrl-C does: through the clean-up below.
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    mgmt = Management(AMQP_URL)
    user = urllib.parse.unquote(urllib.parse.urlsplit(AMQP_URL).username or "guest")
    data = Path(tempfile.mkdtemp(prefix="rota-compare-"))
    procs = Processes()
    try:
        mgmt.fresh_vhost(VHOST, user)
        mgmt.delete_namespace("/", NAMESPACE + ".")
        rota, celery, floor, chain = Rota(procs, data), Celery(procs, data), Floor(), Chain()
        rota.start()
        if args.sweep:
            print(sweep(args, rota, chain))
            return 0
        celery.start()
        idle = {"agent": rota.idle_agent_mib(), "celery": celery.idle_worker_mib()}
        say(f"all started (logs in {data}); {args.rounds} rounds")
        res = {s: {m: [] for m in ("at_once", "drain", "lone", "paced")} for s in ("Rota", "Celery", "floor", "chain")}
        systems = [rota, celery, floor]
        for r in range(args.rounds):
            order = systems[r % 3:] + systems[:r % 3]
            for s in order:
                say(f"round {r + 1}: {s.name}, {args.jobs:,} at once")
                res[s.name]["at_once"].append(s.at_once(args.jobs))
                say(f"  {res[s.name]['at_once'][-1]['jobs_per_s']:,.0f}/s")
            for s in order:
                if hasattr(s, "drain"):
                    say(f"round {r + 1}: {s.name}, drain of {args.jobs:,} queued")
                    res[s.name]["drain"].append(s.drain(args.jobs))
                    say(f"  {res[s.name]['drain'][-1]['jobs_per_s']:,.0f}/s")
            for s in order:
                say(f"round {r + 1}: {s.name}, {args.lone} one at a time")
                res[s.name]["lone"].append(s.one_at_a_time(args.lone))
                say(f"  p50 {res[s.name]['lone'][-1]['p50_ms']:.2f} ms")
            half = res["Rota"]["at_once"][-1]["jobs_per_s"] / 2
            for s in (floor, chain, rota):
                say(f"round {r + 1}: {s.name}, {args.paced:,} paced at {half:,.0f}/s")
                res[s.name]["paced"].append(s.paced(half, args.paced))
                say(f"  p99 {res[s.name]['paced'][-1]['p99_ms']:.1f} ms")
        say(f"waiting {IDLE_AFTER} s for the agent to be idle (it forgets receipted runs after a minute)")
        time.sleep(IDLE_AFTER)
        idle["agent after"] = rota.idle_agent_mib()
        sched_rss, sched_peak = rota.scheduler_mib()
        disk = rota.disk_bytes()
        # Asked last: RabbitMQ fills a queue's status in its statistics, every 5 s.
        broker = mgmt.broker(NAMESPACE + ".jobs.default")
        print(table(args, res, idle, sched_rss, sched_peak, disk, rota.recorded, broker))
    except KeyboardInterrupt as e:
        say(f"interrupted ({e or 'SIGINT'}); stopping everything")
        return 130
    finally:
        procs.stop_all()
        try:
            mgmt.call("DELETE", f"/vhosts/{VHOST}")
            mgmt.delete_namespace("/", NAMESPACE + ".")
        except SystemExit as e:
            say(f"could not clean RabbitMQ up: {e}")
        say(f"removing {data}")
        shutil.rmtree(data, ignore_errors=True)
    return 0


def table(args, res, idle, sched_rss, sched_peak, disk, recorded, broker):
    get = lambda s, m, k: [x[k] for x in res[s][m]]  # noqa: E731
    rota_e2e, celery_e2e, floor_e2e = (get(s, "at_once", "jobs_per_s") for s in ("Rota", "Celery", "floor"))
    rota_drain, celery_drain = (get(s, "drain", "jobs_per_s") for s in ("Rota", "Celery"))
    rota_p50, celery_p50, floor_p50 = (get(s, "lone", "p50_ms") for s in ("Rota", "Celery", "floor"))
    rota_p99, celery_p99, floor_p99 = (get(s, "lone", "p99_ms") for s in ("Rota", "Celery", "floor"))
    paced_p99, floor_paced_p99, chain_p99 = (get(s, "paced", "p99_ms") for s in ("Rota", "floor", "chain"))
    paced_rate = get("Rota", "paced", "rate")
    met = lambda ok: "**yes**" if ok else "no"  # noqa: E731
    med = statistics.median
    per_job = [b / max(recorded, 1) / 1024 for b in (disk[0], disk[0] - disk[1], disk[1])]
    rows = [
        ("end to end, jobs/s", spread(rota_e2e, rate), spread(celery_e2e, rate), spread(floor_e2e, rate),
         spread(ratios(rota_e2e, celery_e2e), times), spread(ratios(rota_e2e, floor_e2e), times),
         "≥ 4× Celery (moonshot: ≥ 0.5× floor)", met(med(ratios(rota_e2e, celery_e2e)) >= 4)),
        ("drain of queued jobs, jobs/s", spread(rota_drain, rate), spread(celery_drain, rate), "—",
         spread(ratios(rota_drain, celery_drain), times), "—", "≥ 2× Celery",
         met(med(ratios(rota_drain, celery_drain)) >= 2)),
        ("one at a time, p50 ms", spread(rota_p50, ms), spread(celery_p50, ms), spread(floor_p50, ms),
         spread(ratios(rota_p50, celery_p50), times), spread(ratios(rota_p50, floor_p50), times),
         "≤ Celery's p50", met(med(ratios(rota_p50, celery_p50)) <= 1)),
        ("one at a time, p99 ms", spread(rota_p99, ms), spread(celery_p99, ms), spread(floor_p99, ms),
         spread(ratios(rota_p99, celery_p99), times), spread(ratios(rota_p99, floor_p99), times),
         f"≤ 3× Celery's p50 (is {spread(ratios(rota_p99, celery_p50), times)})",
         met(med(ratios(rota_p99, celery_p50)) <= 3)),
        ("paced at half of Rota's rate in the round, p99 ms",
         f"{spread(paced_p99, ms)} at {spread(paced_rate, rate)} jobs/s",
         "—", spread(floor_paced_p99, ms), "—", spread(ratios(paced_p99, floor_paced_p99), times),
         "≤ 20 ms", met(med(paced_p99) <= 20)),
        ("the same, through the broker-only chain of three processes, p99 ms", "—", "—",
         f"{spread(chain_p99, ms)} (Rota/chain {spread(ratios(paced_p99, chain_p99), times)})", "—", "—",
         "what three hops take here, without Rota", "—"),
        (f"idle agent RSS, MiB (at start / {IDLE_AFTER} s after the runs)",
         f"{idle['agent']:.1f} / {idle['agent after']:.1f}", f"{idle['celery']:.1f} (idle worker, prefork ×2: PSS of its 3 processes)",
         "—", "—", "—", "≤ 20 MiB", met(max(idle["agent"], idle["agent after"]) <= 20)),
        (f"scheduler RSS after {recorded:,} jobs, MiB (now / peak)", f"{sched_rss:.0f} / {sched_peak:.0f}",
         "—", "—", "—", "—", "≤ 64 MiB after 1,000,000 jobs", "— (not run to 1M)"),
        ("scheduler's data folder on disk per recorded job, KiB",
         "{:.1f} (store {:.1f} + job folders {:.1f}; {:,.0f} MiB)".format(*per_job, disk[0] / 2**20),
         "— (keeps no results)", "—", "—", "—", "≤ 2 KiB in the store; folders only when used",
         met(per_job[0] <= 2)),
    ]
    out = [
        f"{args.rounds} rounds of {args.jobs:,} no-op jobs at once, a drain of {args.jobs:,}, "
        f"{args.lone} one at a time (after {WARM_UP} not counted) and {args.paced:,} paced; "
        "median (range) over the rounds; ratios are the median (range) of each round's own ratio.",
        f"{broker}.",
        "",
        "| measure | Rota | Celery 5 | floor (lapin) | Rota/Celery | Rota/floor | goal | met |",
        "|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "CPU per job in measure 1, user + system, ms (median (range) over the rounds):",
        "",
        "| system | part | CPU ms per job |",
        "|---|---|---|",
    ]
    two = lambda v: f"{v:.2f}"  # noqa: E731
    for s in ("Rota", "Celery", "floor"):
        runs = res[s]["at_once"]
        for part in runs[0]["cpu_ms"]:
            out.append(f"| {s} | {part} | {spread([x['cpu_ms'].get(part) for x in runs], two)} |")
    out += [
        "",
        "Measure 4, paced at the same rate: CPU per job (the floor: per message), user + system, ms, and",
        "how busy the machine's cores were, % (median (range) over the rounds):",
        "",
        "| system | part | CPU ms per job |",
        "|---|---|---|",
    ]
    for s in ("Rota", "floor", "chain"):
        runs = res[s]["paced"]
        for part in runs[0]["cpu_ms"]:
            out.append(f"| {s} | {part} | {spread([x['cpu_ms'].get(part) for x in runs], two)} |")
        out.append(f"| {s} | all, machine busy % | {spread([x['busy'] for x in runs], lambda v: f'{v:.0f}')} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
