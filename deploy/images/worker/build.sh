#!/usr/bin/env bash
# Builds the worker image for `docker` pools, without a registry: the given worker runtime
# binary (`worker-runtime`, or your own runtime built with `rota_worker_runtime::cli::main`)
# and the shared libraries it links, in an otherwise empty root filesystem, imported with
# `docker import`. The tag is derived from the inputs, so an unchanged binary is not imported
# again. Prints the image name:tag on stdout.
#
#   deploy/images/worker/build.sh [RUNTIME_BINARY] [--name NAME]
#
#   cargo build --release --bin worker-runtime
#   deploy/images/worker/build.sh target/release/worker-runtime      # → rota-worker:<hash>
#   pool-agent run --worker-location docker --docker-image rota-worker:<hash> …
#
# The image runs as user 65534 (nobody); its entrypoint is the runtime, which the pool agent
# starts with `serve`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
runtime="" name="rota-worker"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) runtime="$1"; shift ;;
  esac
done
runtime="${runtime:-$here/../../../target/release/worker-runtime}"
[[ -x "$runtime" ]] || { echo "build.sh: no runtime binary at $runtime; build it first (cargo build --release --bin worker-runtime) or name it" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "build.sh: no Docker engine answers; run deploy/setup.sh (it starts one)" >&2; exit 1; }

# The binary's shared libraries, as absolute paths (the vdso has none).
mapfile -t libs < <(ldd "$runtime" | grep -o '/[^ ]*' | sort -u)
tag="$(cat "$runtime" "${libs[@]}" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-12)"
image="$name:$tag"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"; exit 0
fi

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{usr/local/bin,tmp,proc,sys,dev,etc}
chmod 1777 "$root/tmp"
install -m 0755 "$runtime" "$root/usr/local/bin/worker-runtime"
for lib in "${libs[@]}"; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
echo 'nobody:x:65534:65534:nobody:/tmp:/usr/sbin/nologin' > "$root/etc/passwd"
echo 'nogroup:x:65534:' > "$root/etc/group"
tar -C "$root" -c . | docker import \
  --change 'ENTRYPOINT ["/usr/local/bin/worker-runtime"]' \
  --change 'CMD ["serve"]' \
  --change 'USER 65534:65534' \
  --change 'WORKDIR /tmp' \
  --change "LABEL org.opencontainers.image.title=rota-worker rota.runtime=$(basename "$runtime")" \
  - "$image" >/dev/null
docker tag "$image" "$name:latest"
# Older builds of this image are not needed any more (containers still running keep theirs).
docker images --format '{{.Repository}}:{{.Tag}}' "$name" \
  | grep -vxF -e "$image" -e "$name:latest" | xargs -r docker rmi >/dev/null 2>&1 || true
echo "built $image from $runtime" >&2
echo "$image"
