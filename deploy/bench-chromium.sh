#!/usr/bin/env bash
# The Chromium figures: a report page rendered to PDF by a bare chromiumoxide program (the
# floor), by Rota's chromium.pdf Work in-process, and end to end through RabbitMQ (a release
# scheduler and pool agent, namespace rota-bench-chromium, one worker); each time the first
# PDF with a cold browser, then the per-PDF time with a warm one. Stops everything it started.
#
#   deploy/bench-chromium.sh [PDFS]                       # default 20
#   LOCATION=local|thread|process AGENT_FLAGS="--chromium-mode docker" deploy/bench-chromium.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pdfs="${1:-20}"
deploy/setup.sh
cargo build --release --locked --bins -p rota-scheduler -p rota-pool-agent -p rota-worker-runtime
cargo build --release --locked -p rota-worker-runtime --example chromium_bench
export ROTA_NAMESPACE="${ROTA_NAMESPACE:-rota-bench-chromium}"
data="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
bin=target/release
"$bin/examples/chromium_bench" "$pdfs"
mkdir -p "$data/out"
"$bin/scheduler" run --data-dir "$data" --heartbeat-interval 1s >"$data/scheduler.log" 2>&1 &
pids+=($!)
# shellcheck disable=SC2086 # AGENT_FLAGS is a list of flags
"$bin/pool-agent" run --id bench-chromium --data-dir "$data" --worker-location "${LOCATION:-process}" \
  --pool-min-size 1 --pool-max-size 1 --alias "out=$data/out" --chromium-profile-root "$data" \
  --heartbeat-interval 1s ${AGENT_FLAGS:-} >"$data/agent.log" 2>&1 &
pids+=($!)
"$bin/examples/chromium_bench" "$pdfs" --through "$data/out" | tail -n 1
