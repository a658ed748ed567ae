#!/usr/bin/env bash
# The demo, end to end, on a fresh Debian 12 machine with only the Rust toolchain: sets up
# RabbitMQ (deploy/setup.sh), builds, and runs `scheduler demo`, which pushes a mix of Work
# through a scheduler and a pool agent and prints what happened to each job. Files land in
# ./temp. Arguments go to the demo (see `scheduler demo --help`).
#
#   deploy/demo.sh [--worker-location local|thread|process|docker] [--pool-min-size 1] [--pool-max-size 2] [--jobs 12]
#
# With docker workers it first builds the worker image from the built worker-runtime
# (deploy/images/worker/build.sh; reused while the binary is unchanged).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
deploy/setup.sh
# The demo runs every part in one process, as one user: the administrator deploy/setup.sh made
# (a real deployment gives each part a user of its role: see the README's trust model).
admin_password_file="${XDG_STATE_HOME:-$HOME/.local/state}/rota/rabbitmq-admin-password"
if [[ -z "${ROTA_AMQP_URL:-}" && -s "$admin_password_file" ]]; then
  export ROTA_AMQP_URL="amqp://rota-admin:$(cat "$admin_password_file")@127.0.0.1:5672/%2f"
fi
cargo build --locked --bins   # the demo starts worker-runtime for process and docker workers
image=()
if [[ " $* " == *" docker "* || " $* " == *"=docker "* ]]; then
  image=(--docker-image "$(deploy/images/worker/build.sh target/debug/worker-runtime)")
fi
exec target/debug/scheduler demo --clean "${image[@]}" "$@"
