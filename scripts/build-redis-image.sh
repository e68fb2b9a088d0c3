#!/usr/bin/env bash
# Builds a small Redis image from this machine's own `redis-server` binary and the
# shared libraries `ldd` lists for it (`FROM scratch`), for machines where no image
# can be pulled. Prints the image name on its last line of output.
#
# Usage: scripts/build-redis-image.sh [IMAGE [SERVER]]
#   IMAGE   default: distlock-redis:local
#   SERVER  the server binary, default: redis-server on the PATH. A `valkey-server`
#           (scripts/fetch-valkey.sh) gives a Valkey image; inside, it is /usr/bin/redis-server
#           either way, so containers start the same.
# Needs: docker, redis-server (Debian: `apt-get install redis-server`) or the SERVER given.
set -euo pipefail

image=${1:-distlock-redis:local}
server=${2:-$(command -v redis-server || true)}
if [ -z "$server" ] || [ ! -x "$server" ]; then
  echo "build-redis-image: ${2:-redis-server} not found (apt-get install redis-server)" >&2
  exit 1
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# The Debian binary is a symlink (redis-server -> redis-check-rdb) that picks its role
# from argv[0]; copy the real file under the server's name.
mkdir -p "$ctx/rootfs/usr/bin" "$ctx/rootfs/data" "$ctx/rootfs/tmp"
cp -L "$server" "$ctx/rootfs/usr/bin/redis-server"

# Every library the dynamic loader resolves, plus the loader itself, at the same paths.
ldd "$server" | awk '/=>/ { print $3 } /^\s*\/.*ld-linux/ { print $1 }' | sort -u |
  while read -r lib; do
    [ -n "$lib" ] && [ -e "$lib" ] || continue
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
# The loader is also reached through /lib64 on x86_64.
if [ -e /lib64/ld-linux-x86-64.so.2 ]; then
  mkdir -p "$ctx/rootfs/lib64"
  cp -L /lib64/ld-linux-x86-64.so.2 "$ctx/rootfs/lib64/"
fi

cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
WORKDIR /data
EXPOSE 6379
# No entrypoint, like the official image's command form: `redis-server <args>` works on both.
CMD ["redis-server", "--bind", "0.0.0.0", "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
DOCKERFILE

docker build -q -t "$image" "$ctx" >/dev/null
echo "build-redis-image: built $image from $server ($("$server" --version | awk '{print $3}'))" >&2
echo "$image"
