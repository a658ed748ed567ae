#!/usr/bin/env bash
# The benchmarks, on release builds against the local RabbitMQ (data in a temporary folder;
# everything started here is stopped on exit).
#
# The job pipeline: a scheduler and one pool agent (namespace rota-bench), N no-op jobs
# pushed through them with `scheduler bench`:
#   deploy/bench.sh [--jobs 10000] [--via direct|rpc] [--concurrency 256] [--rate N]
#   LOCATION=thread|process|docker POOL_MAX=16 PREFETCH=64 AGENT_FLAGS="--worker-max-jobs 1" deploy/bench.sh …
# (the agent's prefetch is 4 jobs per worker unless PREFETCH says otherwise)
#
# Chromium: a report page rendered to PDF by a bare chromiumoxide program (the floor), by
# Rota's chromium.pdf Work in-process, and end to end through RabbitMQ (namespace
# rota-bench-chromium, one worker); each the first PDF with a cold browser, then the per-PDF
# time with a warm one:
#   deploy/bench.sh chromium [PDFS]                       # default 20
#   LOCATION=local|thread|process AGENT_FLAGS="--chromium-mode docker" deploy/bench.sh chromium
#
# The comparison: Rota, Celery 5 (acks_late, rpc results, prefork x2) and the bare broker (a
# lapin loop, persistent + confirms) side by side, interleaved in rounds, printed as a markdown
# table of figures, ratios and Rota's goals (progress on stderr, the table on stdout; see
# deploy/bench/compare.py for the measures):
#   deploy/bench.sh compare [--rounds 3] [--jobs 10000] [--lone 300] [--paced 10000]
#   deploy/bench.sh compare --sweep 0.25,0.35,0.5   # only the paced p99, at several rates
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what=jobs
[[ "${1:-}" == chromium || "${1:-}" == compare ]] && { what="$1"; shift; }
deploy/setup.sh
cargo build --release --locked --bins --examples
state="${XDG_STATE_HOME:-$HOME/.local/state}/rota"
[[ -s "$state/rabbitmq-admin-password" ]] || { echo "bench.sh: no $state/rabbitmq-admin-password: run deploy/setup.sh" >&2; exit 1; }
if [[ "$what" == compare ]]; then
  # The comparison makes its vhosts through the management API, and runs Rota's parts and
  # Celery alike, as one user: the administrator deploy/setup.sh made (--trust-any-user).
  admin="rota-admin:$(cat "$state/rabbitmq-admin-password")"
  export ROTA_AMQP_URL="amqp://$admin@127.0.0.1:5672/%2f" ROTA_TRUST_ANY_USER=1 \
    ROTA_BENCH_CELERY_URL="amqp://$admin@127.0.0.1:5672/rota-bench-celery"
  exec .venv/bin/python deploy/bench/compare.py "$@"
fi
namespace=rota-bench
[[ "$what" == chromium ]] && namespace=rota-bench-chromium
export ROTA_NAMESPACE="${ROTA_NAMESPACE:-$namespace}"
data="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
bin=target/release

# Each part as the user of its role (rota-bench-scheduler, …), made or brought up to date with
# the administrator deploy/setup.sh keeps; their passwords are kept beside its password.
password() {
  local file="$state/rabbitmq-$1-password"
  [[ -s "$file" ]] || (umask 077; head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | cut -c1-24 > "$file")
  cat "$file"
}
for role in producer scheduler agent; do
  export "ROTA_${role^^}_USERS=rota-bench-$role" "ROTA_${role^^}_PASSWORD=$(password "bench-$role")"
done
export ROTA_VIEWER_USER=rota-bench-viewer ROTA_VIEWER_PASSWORD="$(password bench-viewer)"
ROTA_AMQP_URL=amqp://127.0.0.1:5672/%2f ROTA_ADMIN_PASSWORD="$(password admin)" \
  "$bin/scheduler" setup-users >/dev/null
url_of() { echo "amqp://rota-bench-$1:$(password "bench-$1")@127.0.0.1:5672/%2f"; }

ROTA_AMQP_URL="$(url_of scheduler)" "$bin/scheduler" run --data-dir "$data" --heartbeat-interval 1s \
  >"$data/scheduler.log" 2>&1 &
pids+=($!)
agent=(env ROTA_AMQP_URL="$(url_of agent)" "$bin/pool-agent" run --data-dir "$data" --heartbeat-interval 1s)
ROTA_AMQP_URL="$(url_of producer)"
export ROTA_AMQP_URL

if [[ "$what" == chromium ]]; then
  pdfs="${1:-20}"
  "$bin/examples/chromium_bench" "$pdfs"
  mkdir -p "$data/out"
  # shellcheck disable=SC2086 # AGENT_FLAGS is a list of flags
  "${agent[@]}" --id bench-chromium --worker-location "${LOCATION:-process}" --pool-min-size 1 \
    --pool-max-size 1 --alias "out=$data/out" --chromium-profile-root "$data" --chromium-allow-host 127.0.0.1 ${AGENT_FLAGS:-} \
    >"$data/agent.log" 2>&1 &
  pids+=($!)
  "$bin/examples/chromium_bench" "$pdfs" --through "$data/out" | tail -n 1
else
  location="${LOCATION:-local}"
  docker_flags=()
  if [[ "$location" == docker ]]; then
    docker_flags=(--docker-image "$(deploy/images/worker/build.sh "$bin/worker-runtime")")
  fi
  # shellcheck disable=SC2086 # AGENT_FLAGS is a list of flags
  "${agent[@]}" --id bench --worker-location "$location" "${docker_flags[@]}" \
    --pool-max-size "${POOL_MAX:-16}" --prefetch "${PREFETCH:-$((4 * ${POOL_MAX:-16}))}" ${AGENT_FLAGS:-} >"$data/agent.log" 2>&1 &
  pids+=($!)
  echo "scheduler and pool agent started (logs in $data); benchmarking..." >&2
  "$bin/scheduler" bench "$@"
fi
