//! A Redis Cluster of three primaries and three replicas on free loopback ports, as
//! processes or containers on the host's network per test backend ([`super::server`]):
//! the nodes announce the addresses they see, which must be the ones the client reaches.
//! Created with `redis-cli --cluster create`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::server::{Server, data_server_args};

/// Three primaries and their replicas.
pub struct Cluster {
    ports: Vec<u16>,
    nodes: Vec<Server>,
}

impl Cluster {
    /// Starts six nodes, creates the cluster, and returns once every node says
    /// `cluster_state:ok` and every replica is in sync.
    pub async fn start() -> Cluster {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            nodes.push(Server::start(node_args).await);
        }
        let cluster = Cluster {
            ports: nodes.iter().map(Server::port).collect(),
            nodes,
        };
        let ports = cluster.ports.clone();
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("redis-cli (Debian: redis-tools, installed with redis-server)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        for &port in &ports {
            wait_for(&format!("node {port}: cluster_state:ok"), || async move {
                let info: String = query(port, redis::cmd("CLUSTER").arg("INFO")).await?;
                Some(info.contains("cluster_state:ok"))
            })
            .await;
            wait_for(
                &format!("node {port} in sync if a replica"),
                || async move {
                    let info = info(port, "replication").await?;
                    Some(info.contains("role:master") || info.contains("master_link_status:up"))
                },
            )
            .await;
        }
        cluster
    }

    /// The port of every node, primaries and replicas.
    pub fn ports(&self) -> Vec<u16> {
        self.ports.clone()
    }

    /// `redis://127.0.0.1:<port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The ports of the nodes that are primaries now.
    pub async fn primaries(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for &port in &self.ports {
            if info(port, "replication")
                .await
                .is_some_and(|i| i.contains("role:master"))
            {
                out.push(port);
            }
        }
        out
    }

    /// The port of the primary that owns `key`'s slot (the slot ranges on the `myself`
    /// line of each primary's `CLUSTER NODES`).
    pub async fn owner(&self, key: &[u8]) -> u16 {
        for port in self.primaries().await {
            let mut conn = conn(port).await.expect("a node answers");
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("CLUSTER KEYSLOT");
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await
                .expect("CLUSTER NODES");
            let mine = nodes.lines().find(|l| l.contains("myself")).unwrap_or("");
            let owns = mine.split(' ').skip(8).any(|range| {
                let mut bounds = range.split('-').map(|b| b.parse::<u16>());
                match (bounds.next(), bounds.next()) {
                    (Some(Ok(lo)), Some(Ok(hi))) => (lo..=hi).contains(&slot),
                    (Some(Ok(one)), None) => one == slot,
                    _ => false,
                }
            });
            if owns {
                return port;
            }
        }
        panic!(
            "no primary owns the slot of {}",
            String::from_utf8_lossy(key)
        );
    }

    /// How many times each primary ran `command` (lower case), from `INFO commandstats`.
    pub async fn calls(&self, command: &str) -> u64 {
        let mut total = 0;
        for port in self.primaries().await {
            let mut conn = conn(port).await.expect("a node answers");
            total += super::command_calls(&mut conn, command).await;
        }
        total
    }

    /// The port of a replica of the primary on `primary` (its `INFO replication`).
    pub async fn replica_of(&self, primary: u16) -> u16 {
        let info = info(primary, "replication")
            .await
            .expect("the primary answers");
        info.lines()
            .filter(|l| l.starts_with("slave"))
            .flat_map(|l| l.split(','))
            .find_map(|field| field.strip_prefix("port=")?.parse().ok())
            .unwrap_or_else(|| panic!("no replica of {primary}: {info}"))
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the node on `port`: its links stay open, it
    /// answers nothing, as a stuck or overloaded node does.
    pub fn pause(&self, port: u16, paused: bool) {
        let at = self.ports.iter().position(|&p| p == port).expect("a node");
        self.nodes[at].signal(if paused { libc::SIGSTOP } else { libc::SIGCONT });
    }

    /// Kills the node on `port` with SIGKILL (no goodbye to the cluster).
    pub fn kill(&self, port: u16) {
        let at = self.ports.iter().position(|&p| p == port).expect("a node");
        self.nodes[at].kill();
    }

    /// Waits until the node on `port` is a primary and says `cluster_state:ok`.
    pub async fn until_primary(&self, port: u16) {
        wait_for(&format!("node {port} promoted"), || async move {
            let role = info(port, "replication").await?;
            let state: String = query(port, redis::cmd("CLUSTER").arg("INFO")).await?;
            Some(role.contains("role:master") && state.contains("cluster_state:ok"))
        })
        .await;
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn slot(&self, key: &[u8]) -> u16 {
        let mut conn = conn(self.ports[0]).await.expect("a node answers");
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("CLUSTER KEYSLOT")
    }

    /// Moves hash slot `slot` from the primary on `from` to the primary on `to`, as
    /// `redis-cli --cluster reshard` does (`IMPORTING` on the target, `MIGRATING` on the
    /// source, the keys moved by `MIGRATE`, then the new owner announced to every primary),
    /// but one key per `MIGRATE` with `pause` before each step: clients meet every
    /// intermediate state (`ASK` redirections, `TRYAGAIN` for a script whose keys are split
    /// between the two nodes, `MOVED` once the slot has moved). Returns the keys moved.
    pub async fn move_slot(&self, slot: u16, from: u16, to: u16, pause: Duration) -> usize {
        let mut source = conn(from).await.expect("the source answers");
        let mut target = conn(to).await.expect("the target answers");
        let source_id = node_id(&mut source).await;
        let target_id = node_id(&mut target).await;
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        let _: () = setslot("IMPORTING", &source_id)
            .query_async(&mut target)
            .await
            .expect("SETSLOT IMPORTING");
        let _: () = setslot("MIGRATING", &target_id)
            .query_async(&mut source)
            .await
            .expect("SETSLOT MIGRATING");
        let mut moved = 0;
        loop {
            let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1)
                .query_async(&mut source)
                .await
                .expect("GETKEYSINSLOT");
            let Some(key) = keys.into_iter().next() else {
                break;
            };
            tokio::time::sleep(pause).await;
            // `NOKEY` (the key expired or was deleted meanwhile) is an `Okay`-like status.
            let _: redis::Value = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg(&key)
                .arg(0)
                .arg(5000)
                .query_async(&mut source)
                .await
                .expect("MIGRATE");
            moved += 1;
        }
        tokio::time::sleep(pause).await;
        let _: () = setslot("NODE", &target_id)
            .query_async(&mut target)
            .await
            .expect("SETSLOT NODE on the target");
        let _: () = setslot("NODE", &target_id)
            .query_async(&mut source)
            .await
            .expect("SETSLOT NODE on the source");
        for port in self.primaries().await {
            if port != from && port != to {
                let mut other = conn(port).await.expect("a primary answers");
                let _: () = setslot("NODE", &target_id)
                    .query_async(&mut other)
                    .await
                    .expect("SETSLOT NODE on another primary");
            }
        }
        moved
    }

    /// Subscribers of `channel` on the node on `port`: sharded (`PUBSUB SHARDNUMSUB`) and
    /// classic (`PUBSUB NUMSUB`). `None` if the node does not answer.
    pub async fn subscribers(&self, port: u16, channel: &str) -> Option<(u64, u64)> {
        let mut conn = conn(port).await?;
        let count = |kind: &'static str| {
            let mut cmd = redis::cmd("PUBSUB");
            cmd.arg(kind).arg(channel);
            cmd
        };
        let sharded: Vec<(String, u64)> = count("SHARDNUMSUB").query_async(&mut conn).await.ok()?;
        let classic: Vec<(String, u64)> = count("NUMSUB").query_async(&mut conn).await.ok()?;
        Some((sharded.first()?.1, classic.first()?.1))
    }

    /// Client connections on the node on `port` that are not replication links (`CLIENT
    /// LIST` without the flags `M`, its primary, or `S`, a replica), the one that asks
    /// included; `None` if the node does not answer.
    pub async fn clients(&self, port: u16) -> Option<u64> {
        let list: String = query(port, redis::cmd("CLIENT").arg("LIST")).await?;
        let clients = list.lines().filter(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("flags="))
                .is_some_and(|flags| !flags.contains(['M', 'S']))
        });
        Some(clients.count() as u64)
    }

    /// Error replies starting with `prefix` (`TRYAGAIN`, `ASK`, `MOVED`) the primaries
    /// gave, from `INFO errorstats`, summed.
    pub async fn errors(&self, prefix: &str) -> u64 {
        let mut total = 0;
        for port in self.primaries().await {
            let stats = info(port, "errorstats").await.unwrap_or_default();
            total += stats
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("errorstat_{prefix}:count=")))
                .filter_map(|n| n.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
        total
    }

    /// A plain connection to one node, for assertions.
    pub async fn node_conn(&self, port: u16) -> redis::aio::MultiplexedConnection {
        conn(port).await.expect("the node answers")
    }

    /// Keys on every primary, summed (`DBSIZE`).
    pub async fn keys(&self) -> u64 {
        let mut total = 0;
        for port in self.primaries().await {
            let mut conn = conn(port).await.expect("a node answers");
            let n: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
            total += n;
        }
        total
    }
}

async fn conn(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

/// A cluster node's arguments: a data server's, cluster-enabled, with a 2 s node timeout.
fn node_args(port: u16, dir: &std::path::Path) -> Vec<String> {
    let mut args = data_server_args(port, dir);
    args.extend(
        [
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            "2000",
            "--cluster-config-file",
            &format!("nodes-{port}.conf"),
        ]
        .map(str::to_owned),
    );
    args
}

async fn node_id(conn: &mut redis::aio::MultiplexedConnection) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(conn)
        .await
        .expect("CLUSTER MYID")
}

async fn info(port: u16, section: &str) -> Option<String> {
    query(port, redis::cmd("INFO").arg(section)).await
}

/// One command on a fresh connection to the node on `port`; `None` if the node does not
/// answer or the reply is an error.
async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let mut conn = conn(port).await?;
    cmd.query_async(&mut conn).await.ok()
}

/// Polls `check` every 100 ms until it says `Some(true)`; panics after 60 s.
async fn wait_for<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if check().await == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
