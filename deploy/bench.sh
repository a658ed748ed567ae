#!/usr/bin/env bash
# The benchmark: builds release binaries, starts a scheduler and one pool agent against the
# local RabbitMQ (namespace rota-bench, data in a temporary folder), pushes N no-op jobs
# through them with `scheduler bench`, prints the figures, and stops everything.
#
#   deploy/bench.sh [--jobs 10000] [--via direct|rpc] [--concurrency 256] [--rate N]
#   LOCATION=thread|process|docker POOL_MAX=16 AGENT_FLAGS="--worker-max-jobs 1" deploy/bench.sh …
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
deploy/setup.sh
cargo build --release --locked --bins
export ROTA_NAMESPACE="${ROTA_NAMESPACE:-rota-bench}"
data="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
bin=target/release
location="${LOCATION:-local}"
docker_flags=()
if [[ "$location" == docker ]]; then
  docker_flags=(--docker-image "$(deploy/images/worker/build.sh "$bin/worker-runtime")")
fi
"$bin/scheduler" run --data-dir "$data" --heartbeat-interval 1s >"$data/scheduler.log" 2>&1 &
pids+=($!)
# shellcheck disable=SC2086 # AGENT_FLAGS is a list of flags
"$bin/pool-agent" run --id bench --data-dir "$data" --worker-location "$location" "${docker_flags[@]}" \
  --pool-max-size "${POOL_MAX:-16}" --heartbeat-interval 1s ${AGENT_FLAGS:-} >"$data/agent.log" 2>&1 &
pids+=($!)
echo "scheduler and pool agent started (logs in $data); benchmarking..." >&2
"$bin/scheduler" bench "$@"
