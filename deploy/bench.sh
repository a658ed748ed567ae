#!/usr/bin/env bash
# The benchmarks, on release builds against the local RabbitMQ (data in a temporary folder;
# everything started here is stopped on exit).
#
# The job pipeline: a scheduler and one pool agent (namespace rota-bench), N no-op jobs
# pushed through them with `scheduler bench`:
#   deploy/bench.sh [--jobs 10000] [--via direct|rpc] [--concurrency 256] [--rate N]
#   LOCATION=thread|process|docker POOL_MAX=16 AGENT_FLAGS="--worker-max-jobs 1" deploy/bench.sh …
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
#   deploy/bench.sh compare [--rounds 3] [--jobs 10000] [--lone 300] [--paced 3000]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what=jobs
[[ "${1:-}" == chromium || "${1:-}" == compare ]] && { what="$1"; shift; }
deploy/setup.sh
cargo build --release --locked --bins --examples
[[ "$what" == compare ]] && exec .venv/bin/python deploy/bench/compare.py "$@"
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
"$bin/scheduler" run --data-dir "$data" --heartbeat-interval 1s >"$data/scheduler.log" 2>&1 &
pids+=($!)
agent=("$bin/pool-agent" run --data-dir "$data" --heartbeat-interval 1s)

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
    --pool-max-size "${POOL_MAX:-16}" ${AGENT_FLAGS:-} >"$data/agent.log" 2>&1 &
  pids+=($!)
  echo "scheduler and pool agent started (logs in $data); benchmarking..." >&2
  "$bin/scheduler" bench "$@"
fi
