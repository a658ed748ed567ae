#!/usr/bin/env bash
# Builds the Chromium images locally, without a registry: a Debian bookworm root filesystem
# (debootstrap, minbase) with Debian's `chromium` and fonts, imported with `docker import`.
# Tags are derived from the inputs (this script and, for the worker image, the runtime and
# the base image), so an image is built again only when they change. Prints name:tag.
#
#   deploy/images/chromium/build.sh                    # → rota-chromium:<hash> (and :latest)
#       for `--chromium-mode docker`: a container of its own per worker
#   deploy/images/chromium/build.sh --worker target/release/worker-runtime
#                                                      # → rota-worker-chromium:<hash> (and :latest)
#       for `--worker-location docker` pools whose Work uses Chromium: the runtime as
#       entrypoint, Chromium beside it (`--chromium-mode local` inside the container)
#
# Environment: DEBIAN_MIRROR (default: the first one in /etc/apt, else deb.debian.org).
# Takes about 2 minutes the first time; needs root (debootstrap, chroot) and a Docker engine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
worker=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker) worker="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
docker info >/dev/null 2>&1 || { echo "build.sh: no Docker engine answers; run deploy/setup.sh (it starts one)" >&2; exit 1; }
# socat: `--chromium-mode docker` reaches DevTools, which listens on the container's loopback
# only, through it.
packages="chromium fonts-dejavu-core fonts-liberation2 socat"

# --- the Chromium image -------------------------------------------------------------------
# The recipe is this part of the script (up to the worker image's part) and the packages.
base_tag="$( (sed '/^# --- the worker image/,$d' "${BASH_SOURCE[0]}"; echo "$packages") | sha256sum | cut -c1-12)"
base="rota-chromium:$base_tag"
if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { echo "build.sh: debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
  mirror="${DEBIAN_MIRROR:-$(grep -rhoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 || true)}"
  mirror="${mirror:-http://deb.debian.org/debian}"
  root="$(mktemp -d)"
  cleanup() { umount "$root/proc" 2>/dev/null || true; rm -rf "$root"; }
  trap cleanup EXIT
  echo "build.sh: debootstrap bookworm from $mirror (a couple of minutes)…" >&2
  debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
  cat > "$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian*}/debian-security bookworm-security main
SOURCES
  mount -t proc proc "$root/proc"
  chroot "$root" /bin/sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages && apt-get clean" >&2
  umount "$root/proc"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/cache/*
  chmod 1777 "$root/tmp"
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV HOME=/tmp' \
    --change 'WORKDIR /tmp' \
    --change "LABEL org.opencontainers.image.title=rota-chromium" \
    - "$base" >/dev/null
  echo "build.sh: built $base" >&2
fi
docker tag "$base" rota-chromium:latest
if [[ -z "$worker" ]]; then
  echo "$base"; exit 0
fi

# --- the worker image with Chromium: the base plus the runtime ----------------------------
[[ -x "$worker" ]] || { echo "build.sh: no runtime binary at $worker; build it first (cargo build --release --bin worker-runtime)" >&2; exit 1; }
tag="$( (cat "$worker"; echo "$base") | sha256sum | cut -c1-12)"
image="rota-worker-chromium:$tag"
if ! docker image inspect "$image" >/dev/null 2>&1; then
  container="$(docker create "$base" /bin/true)"
  # This trap replaces the base's: it removes the base's root filesystem too, if this run
  # built one (833 MB left in /tmp otherwise).
  trap 'docker rm -f "$container" >/dev/null 2>&1 || true; [[ -z "${root:-}" ]] || cleanup' EXIT
  docker cp "$worker" "$container:/usr/local/bin/worker-runtime"
  docker commit \
    --change 'ENTRYPOINT ["/usr/local/bin/worker-runtime"]' \
    --change 'CMD ["serve"]' \
    --change 'USER 65534:65534' \
    --change "LABEL org.opencontainers.image.title=rota-worker-chromium" \
    "$container" "$image" >/dev/null
  echo "build.sh: built $image from $worker" >&2
fi
docker tag "$image" rota-worker-chromium:latest
# Earlier builds of the worker image (an older runtime) only take space.
docker images --format '{{.Repository}}:{{.Tag}}' rota-worker-chromium \
  | grep -vxF -e "$image" -e rota-worker-chromium:latest | xargs -r docker rmi >/dev/null 2>&1 || true
echo "$image"
