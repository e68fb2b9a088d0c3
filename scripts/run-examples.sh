#!/usr/bin/env bash
# Runs every example that prints what it proves, with its locks on Redis and then on
# ZooKeeper (its data always in Redis): starts a redis-server and a standalone ZooKeeper
# (Debian's `zookeeper` package and a JRE) on free loopback ports, runs each example with
# LOCK_URL=redis://... and LOCK_URL=zk://..., and stops both servers.
#
#   scripts/run-examples.sh
set -euo pipefail

cd "$(dirname "$0")/.."
classpath=${DISTLOCK_ZK_CLASSPATH:-/usr/share/java/zookeeper.jar:/etc/zookeeper/conf}
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
work=$(mktemp -d)
zk_port=$(free_port)
redis_port=$(free_port)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/zk"
printf 'tickTime=2000\ninitLimit=20\nsyncLimit=10\ndataDir=%s/zk\nclientPort=%s\nclientPortAddress=127.0.0.1\n4lw.commands.whitelist=srvr\n' \
  "$work" "$zk_port" > "$work/zoo.cfg"
java -Xmx256m -Dzookeeper.admin.enableServer=false -cp "$classpath" \
  org.apache.zookeeper.server.ZooKeeperServerMain "$work/zoo.cfg" > "$work/zk.log" 2>&1 &
pids+=($!)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no > "$work/redis.log" 2>&1 &
pids+=($!)

# Both answer within 30 s: ZooKeeper says it serves, Redis answers PING.
for _ in $(seq 300); do
  zk_ok=$( { exec 3<>"/dev/tcp/127.0.0.1/$zk_port" && echo srvr >&3 && cat <&3; } 2>/dev/null | grep -c '^Mode: standalone' || true)
  redis_ok=$(redis-cli -p "$redis_port" ping 2>/dev/null || true)
  if [ "$zk_ok" = 1 ] && [ "$redis_ok" = PONG ]; then break; fi
  sleep 0.1
done
[ "$zk_ok" = 1 ] || { echo "ZooKeeper did not start; log:"; cat "$work/zk.log"; exit 1; }
[ "$redis_ok" = PONG ] || { echo "redis-server did not start"; exit 1; }

export REDIS_URL="redis://127.0.0.1:$redis_port"
for LOCK_URL in "$REDIS_URL" "zk://127.0.0.1:$zk_port/examples"; do
  export LOCK_URL
  for example in quickstart job_scheduler leader_election db_update fenced_store; do
    # The quickstart takes its locks where REDIS_URL points: Redis only.
    if [ "$example" = quickstart ] && [ "$LOCK_URL" != "$REDIS_URL" ]; then continue; fi
    echo "--- $example (locks on $LOCK_URL, data on $REDIS_URL)"
    started=$SECONDS
    cargo run -q -p distlock-examples --features zookeeper --example "$example"
    echo "--- $example passed in $((SECONDS - started)) s"
  done
done
