#!/usr/bin/env bash
# RabbitMQ 4 on this host, beside Debian 12's 3.x: an image of Debian 13's rabbitmq-server
# (4.0.5, Erlang 27), built locally with debootstrap and `docker import` (Debian 13 is never
# added to the host's apt sources), and a node of it in a container on the host's network with
# ports of its own, every deprecated feature refused (rabbitmq4.conf). Idempotent: the image is
# tagged with a hash of its recipe and built only when that changes; the node is reused while
# it runs from that image with these settings, and started again otherwise.
#
#   deploy/rabbitmq/rabbitmq4.sh          # the node for the tests: rota-rabbitmq4, AMQP on
#                                         #   5673, management on 15673 (deploy/setup.sh
#                                         #   then makes rota-admin and removes guest)
#   deploy/rabbitmq/rabbitmq4.sh image    # only the image; prints name:tag
#   deploy/rabbitmq/rabbitmq4.sh stop     # removes the node's container (and its data)
#   deploy/rabbitmq/rabbitmq4.sh cluster NAME PORT
#                                         # a three-node cluster: containers NAME-1..3 (nodes
#                                         #   NAME-i@localhost, AMQP on PORT+i, management on
#                                         #   PORT+10000+i) and NAME-epmd; prints their URLs,
#                                         #   separated by commas (ROTA_AMQP_URL)
#   deploy/rabbitmq/rabbitmq4.sh cluster-down NAME   # removes them
#   deploy/rabbitmq/rabbitmq4.sh node-up NAME-i      # starts a killed node again
#
# Environment: DEBIAN_MIRROR (default: the first one in /etc/apt, else deb.debian.org).
# The first build takes about a minute; needs root (debootstrap) and a Docker engine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
say() { printf 'rabbitmq4: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

container=rota-rabbitmq4
amqp_port=5673
management_port=15673
dist_port=25673
epmd_port=4373

# The image: the recipe is this function and the package list.
image() {
  local packages="rabbitmq-server" tag name root mirror
  tag="$( (declare -f image; echo "$packages") | sha256sum | cut -c1-12)"
  name="rota-rabbitmq4:$tag"
  if ! docker image inspect "$name" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || die "debootstrap is missing: run deploy/setup.sh chromium (or apt-get install debootstrap)"
    mirror="${DEBIAN_MIRROR:-$(grep -rhoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 || true)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    root="$(mktemp -d)"
    # shellcheck disable=SC2064 # the root is known now
    trap "rm -rf '$root'" EXIT
    say "debootstrap trixie with $packages from $mirror (about a minute)…"
    debootstrap --variant=minbase --include="$packages" trixie "$root" "$mirror" >/dev/null ||
      die "debootstrap failed; see $root/debootstrap/debootstrap.log"
    echo '[rabbitmq_management].' > "$root/etc/rabbitmq/enabled_plugins"
    chroot "$root" chown rabbitmq:rabbitmq /etc/rabbitmq/enabled_plugins
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/cache/apt/*
    tar -C "$root" --numeric-owner -c . | docker import \
      --change 'ENV HOME=/var/lib/rabbitmq LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'USER rabbitmq' \
      --change 'WORKDIR /var/lib/rabbitmq' \
      --change 'CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]' \
      --change "LABEL org.opencontainers.image.title=rota-rabbitmq4" \
      - "$name" >/dev/null
    say "built $name ($(docker run --rm "$name" dpkg-query -W -f '${Version}' rabbitmq-server))"
  fi
  docker tag "$name" rota-rabbitmq4:latest
  echo "$name"
}

# The node for the tests, from the image and rabbitmq4.conf; reused while both are unchanged.
start() {
  local name inputs ports
  name="$(image)"
  ports="listeners.tcp.default = $amqp_port
management.tcp.port = $management_port"
  inputs="$( (echo "$name"; cat "$here/rabbitmq4.conf"; echo "$ports") | sha256sum | cut -c1-12)"
  if [[ "$(docker inspect -f '{{index .Config.Labels "rota.inputs"}} {{.State.Running}}' "$container" 2>/dev/null)" == "$inputs true" ]] &&
    answers "$amqp_port"; then
    say "RabbitMQ 4 answers on 127.0.0.1:$amqp_port ($container): reusing it"
    return 0
  fi
  answers "$amqp_port" && ! docker inspect "$container" >/dev/null 2>&1 &&
    die "something other than $container answers on port $amqp_port; stop it, the tests' RabbitMQ 4 node needs that port"
  docker rm -f "$container" >/dev/null 2>&1 || true
  local conf="/var/lib/rota-rabbitmq4"
  mkdir -p "$conf"
  cp "$here/rabbitmq4.conf" "$conf/10-rota.conf"
  echo "$ports" > "$conf/20-ports.conf"
  chmod 0644 "$conf"/*.conf
  say "starting $container from $name (AMQP on $amqp_port, management on $management_port)"
  docker run -d --name "$container" --network host --restart unless-stopped \
    --label "rota.inputs=$inputs" \
    -e RABBITMQ_NODENAME=rabbit4@localhost -e ERL_EPMD_PORT="$epmd_port" \
    -e RABBITMQ_DIST_PORT="$dist_port" \
    -v "$conf/10-rota.conf:/etc/rabbitmq/conf.d/10-rota.conf:ro" \
    -v "$conf/20-ports.conf:/etc/rabbitmq/conf.d/20-ports.conf:ro" \
    "$name" >/dev/null
  for _ in $(seq 1 120); do
    answers "$amqp_port" && docker exec "$container" rabbitmqctl -q await_startup >/dev/null 2>&1 && break
    docker inspect -f '{{.State.Running}}' "$container" 2>/dev/null | grep -q true ||
      die "$container stopped while starting; see docker logs $container"
    sleep 1
  done
  answers "$amqp_port" || die "RabbitMQ 4 did not start within 2 minutes; see docker logs $container"
  say "RabbitMQ 4 is up on 127.0.0.1:$amqp_port (management UI on http://127.0.0.1:$management_port)"
}

# Waits until node container $1 runs RabbitMQ.
await_node() {
  for _ in $(seq 1 120); do
    docker exec "$1" rabbitmqctl -q await_startup >/dev/null 2>&1 && return 0
    docker inspect -f '{{.State.Running}}' "$1" 2>/dev/null | grep -q true ||
      die "$1 stopped while starting; see docker logs $1"
    sleep 1
  done
  die "$1 did not start within 2 minutes; see docker logs $1"
}

# Starts RabbitMQ in node container $1 (its VM runs), again if it fails: a node joining a
# cluster, or rejoining it, may check whether a refused deprecated feature is in use before
# its tables have arrived from its peers, take that for "in use" and stop
# (failed_to_deny_deprecated_features, RabbitMQ 4.0.5); a later start finds them.
start_app() {
  for _ in $(seq 1 20); do
    docker exec "$1" rabbitmqctl -q start_app >/dev/null 2>&1 && return 0
    sleep 1
  done
  die "RabbitMQ did not start in $1; see docker logs $1"
}

# Starts killed node container $1 again on its data, and waits until it runs.
node_up() {
  for _ in 1 2 3; do
    docker start "$1" >/dev/null
    for _ in $(seq 1 120); do
      docker exec "$1" rabbitmqctl -q await_startup >/dev/null 2>&1 && return 0
      docker inspect -f '{{.State.Running}}' "$1" 2>/dev/null | grep -q true || break
      sleep 1
    done
    say "$1 stopped while starting (see docker logs $1); starting it again"
  done
  die "$1 did not start again; see docker logs $1"
}

# A three-node cluster on this host's network: one epmd of its own (in a container, so that
# it outlives any node), three nodes with a shared Erlang cookie, joined to the first.
cluster() {
  local name="$1" port="$2" image dir cookie urls=() i
  [[ "$name" =~ ^[a-z0-9-]+$ && "$port" =~ ^[0-9]+$ ]] || die "usage: rabbitmq4.sh cluster NAME PORT"
  image="$(image)"
  cluster_down "$name"
  dir="/var/lib/rota-rabbitmq4/$name"
  mkdir -p "$dir"
  cookie="$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
  local epmd=$((port + 20000))
  docker run -d --name "$name-epmd" --network host --label rota.cluster="$name" "$image" \
    epmd -port "$epmd" >/dev/null
  for i in 1 2 3; do
    cp "$here/rabbitmq4.conf" "$dir/10-rota.conf"
    printf 'listeners.tcp.default = %s\nmanagement.tcp.port = %s\n' $((port + i)) $((port + 10000 + i)) > "$dir/20-ports-$i.conf"
    chmod 0644 "$dir"/*.conf
    docker run -d --name "$name-$i" --network host --label rota.cluster="$name" \
      -e RABBITMQ_NODENAME="$name-$i@localhost" -e ERL_EPMD_PORT="$epmd" \
      -e RABBITMQ_DIST_PORT=$((port + 20000 + i)) -e RABBITMQ_ERLANG_COOKIE="$cookie" \
      -v "$dir/10-rota.conf:/etc/rabbitmq/conf.d/10-rota.conf:ro" \
      -v "$dir/20-ports-$i.conf:/etc/rabbitmq/conf.d/20-ports.conf:ro" \
      "$image" >/dev/null
    urls+=("amqp://guest:guest@127.0.0.1:$((port + i))/%2f")
  done
  await_node "$name-1"
  for i in 2 3; do
    await_node "$name-$i"
    docker exec "$name-$i" rabbitmqctl -q stop_app >/dev/null
    docker exec "$name-$i" rabbitmqctl -q join_cluster "$name-1@localhost" >/dev/null ||
      die "$name-$i could not join $name-1; see docker logs $name-$i"
    start_app "$name-$i"
  done
  say "cluster $name is up: nodes $name-1..3 on ports $((port + 1))-$((port + 3))"
  (IFS=,; echo "${urls[*]}")
}

cluster_down() {
  docker ps -aq --filter "label=rota.cluster=$1" | xargs -r docker rm -f >/dev/null
  rm -rf "/var/lib/rota-rabbitmq4/$1"
}

case "${1:-start}" in
  start) start ;;
  image) image ;;
  stop) docker rm -f "$container" >/dev/null 2>&1 || true ;;
  cluster) cluster "${2:-}" "${3:-}" ;;
  cluster-down) [[ -n "${2:-}" ]] || die "usage: rabbitmq4.sh cluster-down NAME"; cluster_down "$2" ;;
  node-up) node_up "${2:?usage: rabbitmq4.sh node-up CONTAINER}" ;;
  *) die "unknown command ${1}; say image, stop, cluster, cluster-down, node-up, or nothing to start the node" ;;
esac
