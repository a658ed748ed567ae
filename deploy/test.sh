#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine with only the Rust toolchain: sets up
# what the tests need (deploy/setup.sh), builds the workspace once, then runs every test once
# per broker: Debian 12's RabbitMQ 3 (ROTA_AMQP_URL, or the host's on 5672), then RabbitMQ 4
# with every deprecated feature refused (the rota-rabbitmq4 container on 5673, see
# deploy/rabbitmq/rabbitmq4.sh); then the cluster tests once (three RabbitMQ 4 nodes in
# containers, tests/tests/cluster.rs). Fails if any run fails, after all have run.
#
#   deploy/test.sh [extra cargo test arguments]
#   ROTA_TEST_BROKERS=4 deploy/test.sh --test pipeline    # on RabbitMQ 4 only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
brokers="${ROTA_TEST_BROKERS:-3 4}"
deploy/setup.sh
# The system tests start the built binaries: build them and the tests in one go.
cargo build --workspace --all-targets --locked

failed=()
suite() {
  local broker="$1"; shift
  printf '\n=== the test suite on %s ===\n\n' "$broker" >&2
  if env "$@" cargo test --workspace --locked --no-fail-fast "${args[@]}"; then
    printf '\n=== passed on %s ===\n' "$broker" >&2
  else
    printf '\n=== FAILED on %s ===\n' "$broker" >&2
    failed+=("$broker")
  fi
}
# The RabbitMQ 4 node's URL as its administrator (deploy/setup.sh keeps the password; the
# tests make each part's user with it). On the host's broker the tests find it themselves.
admin_url() {
  local file="${XDG_STATE_HOME:-$HOME/.local/state}/rota/rabbitmq-admin-password"
  if [[ -s "$file" ]]; then
    echo "amqp://rota-admin:$(cat "$file")@127.0.0.1:$1/%2f"
  else
    echo "amqp://guest:guest@127.0.0.1:$1/%2f"
  fi
}
args=("$@")
for broker in $brokers; do
  case "$broker" in
    3) suite "RabbitMQ 3 ($(rabbitmqctl -q version 2>/dev/null || echo '?'), ${ROTA_AMQP_URL:-port 5672})" ;;
    4) suite "RabbitMQ 4 ($(docker exec rota-rabbitmq4 rabbitmqctl -q version), port 5673, deprecated features refused)" \
         ROTA_AMQP_URL="$(admin_url 5673)" ROTA_MANAGEMENT_ADDR=127.0.0.1:15673 \
         ROTA_RABBITMQCTL='docker exec rota-rabbitmq4 rabbitmqctl' ;;
    *) echo "test.sh: unknown broker $broker in ROTA_TEST_BROKERS; say 3, 4 or \"3 4\"" >&2; exit 2 ;;
  esac
done
if [[ " $brokers " == *" 4 "* && $# -eq 0 ]]; then
  printf '\n=== the cluster tests (three RabbitMQ 4 nodes) ===\n\n' >&2
  if cargo test -p rota-tests --locked --test cluster -- --ignored --nocapture --test-threads 1; then
    printf '\n=== passed: the cluster tests ===\n' >&2
  else
    printf '\n=== FAILED: the cluster tests ===\n' >&2
    failed+=("a three-node RabbitMQ 4 cluster")
  fi
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  printf 'test.sh: the suite failed on %s\n' "${failed[@]}" >&2
  exit 1
fi
printf 'test.sh: the suite passed on every broker (%s)\n' "$brokers" >&2
