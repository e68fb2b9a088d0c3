#!/usr/bin/env bash
# Starts the Redis the examples use (docker-compose.yml: 127.0.0.1:6379) and waits until it
# answers. Works with either Compose tool (`docker compose` or the older `docker-compose`)
# and on machines that cannot pull images:
#
#   image: $DISTLOCK_REDIS_IMAGE if set; else `redis:7` if present or pullable; else one
#   built here from the machine's own redis-server (scripts/build-redis-image.sh).
#
# Usage: scripts/redis-up.sh        start (idempotent)
#        scripts/redis-up.sh down   stop and remove it
set -euo pipefail
cd "$(dirname "$0")/.."

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "redis-up: neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi

if [ "${1:-up}" = "down" ]; then
  DISTLOCK_REDIS_IMAGE=${DISTLOCK_REDIS_IMAGE:-unused} "${compose[@]}" down
  exit 0
fi

if [ -z "${DISTLOCK_REDIS_IMAGE:-}" ]; then
  if docker image inspect redis:7 >/dev/null 2>&1 ||
    timeout 120 docker pull -q redis:7 >/dev/null 2>&1; then
    DISTLOCK_REDIS_IMAGE=redis:7
  elif docker image inspect distlock-redis:local >/dev/null 2>&1; then
    DISTLOCK_REDIS_IMAGE=distlock-redis:local
  else
    echo "redis-up: redis:7 cannot be pulled; building an image from the local redis-server" >&2
    DISTLOCK_REDIS_IMAGE=$(scripts/build-redis-image.sh)
  fi
fi
export DISTLOCK_REDIS_IMAGE
echo "redis-up: starting $DISTLOCK_REDIS_IMAGE with ${compose[*]}" >&2
"${compose[@]}" up -d

# Ready when a PING over the published port gets +PONG (bash's /dev/tcp: no client needed).
for _ in $(seq 1 100); do
  if { exec 3<>/dev/tcp/127.0.0.1/6379; } 2>/dev/null; then
    printf 'PING\r\n' >&3
    if read -r -t 1 reply <&3 && [ "${reply%$'\r'}" = "+PONG" ]; then
      exec 3>&-
      echo "redis-up: Redis answers on 127.0.0.1:6379" >&2
      exit 0
    fi
    exec 3>&-
  fi
  sleep 0.1
done
echo "redis-up: Redis did not answer on 127.0.0.1:6379 within 10 s" >&2
exit 1
