#!/usr/bin/env bash
# The cost of `distlock run -- true` over `true`: median wall time of N runs of each,
# against a redis-server on a free loopback port started here (or DISTLOCK_URL if set).
#
#   cargo build --release -p distlock-cli && cli/scripts/overhead.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-20}
bin=${DISTLOCK_BIN:-target/release/distlock}

if [ -z "${DISTLOCK_URL:-}" ]; then
  port=$(( 20000 + RANDOM % 20000 ))
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no >/dev/null &
  server=$!
  trap 'kill $server' EXIT
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
  export DISTLOCK_URL="redis://127.0.0.1:$port"
fi

# Median in microseconds of n runs of "$@".
median_us() {
  local times=()
  for _ in $(seq "$n"); do
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000 )))
  done
  printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2] + a[NR/2+1]) / 2)}'
}

"$bin" run overhead -- true # warm the page cache
plain=$(median_us /bin/true) # the program, not the shell builtin
locked=$(median_us "$bin" run overhead -- /bin/true)
echo "true:                      median ${plain} µs over $n runs"
echo "distlock run -- true:      median ${locked} µs over $n runs"
echo "overhead:                  $(( locked - plain )) µs"
