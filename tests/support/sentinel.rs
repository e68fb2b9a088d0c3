//! A primary, a replica and three Sentinels on free loopback ports, as processes or
//! containers on the host's network per test backend ([`super::server`]): Sentinels
//! announce the addresses the servers see, which must be the ones the client reaches.

use std::time::{Duration, Instant};

use super::server::{Server, data_server_args};

/// The service name the Sentinels monitor.
pub const SERVICE: &str = "distlock-test";

/// One primary (first `primary_port`), one replica, three Sentinels.
pub struct SentinelSet {
    servers: [u16; 2],
    sentinels: [u16; 3],
    /// The two data servers, then the three Sentinels.
    running: Vec<Server>,
}

impl SentinelSet {
    /// Starts the set and returns once the replica is in sync and every Sentinel knows the
    /// primary, the replica and the other two Sentinels.
    pub async fn start() -> SentinelSet {
        let first = Server::start(data_server_args).await;
        let primary = first.port();
        let second = Server::start(|port, dir| {
            let mut args = data_server_args(port, dir);
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary.to_string(),
            ]);
            args
        })
        .await;
        let servers = [primary, second.port()];
        let mut running = vec![first, second];
        wait_for(&format!("replica of {primary} in sync"), || async {
            let info = info(servers[1], "replication").await?;
            Some(info.contains("master_link_status:up"))
        })
        .await;
        let mut sentinels = [0; 3];
        for at in &mut sentinels {
            let sentinel = Server::start(|port, dir| {
                let conf = dir.join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {0}\n\
                         logfile {0}/node.log\n\
                         sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n\
                         sentinel down-after-milliseconds {SERVICE} 1000\n\
                         sentinel failover-timeout {SERVICE} 5000\n",
                        dir.display(),
                    ),
                )
                .unwrap();
                vec![conf.display().to_string(), "--sentinel".into()]
            })
            .await;
            *at = sentinel.port();
            running.push(sentinel);
        }
        for port in sentinels {
            wait_for(
                &format!("Sentinel {port} sees the whole set"),
                || async move {
                    let mut conn = conn(port).await?;
                    let primary: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("MASTER")
                        .arg(SERVICE)
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    let fields = flat(&primary);
                    let field = |name: &str| {
                        fields
                            .iter()
                            .position(|f| f == name)
                            .and_then(|i| fields.get(i + 1))
                            .cloned()
                            .unwrap_or_default()
                    };
                    Some(field("num-slaves") == "1" && field("num-other-sentinels") == "2")
                },
            )
            .await;
        }
        SentinelSet {
            servers,
            sentinels,
            running,
        }
    }

    /// `redis://127.0.0.1:<port>` of each Sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The two data servers' ports: the first started as primary.
    pub fn servers(&self) -> [u16; 2] {
        self.servers
    }

    /// The port the Sentinels name as primary now.
    pub async fn primary_port(&self) -> u16 {
        let mut conn = conn(self.sentinels[0]).await.expect("a Sentinel answers");
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(SERVICE)
            .query_async(&mut conn)
            .await
            .expect("the Sentinel names a primary");
        port
    }

    /// A manual failover (`SENTINEL FAILOVER`: the replica catches up first, nothing
    /// acknowledged is lost); returns once the other server is primary, as the Sentinels
    /// and the server itself say.
    pub async fn failover(&self) -> u16 {
        let before = self.primary_port().await;
        let after = if before == self.servers[0] {
            self.servers[1]
        } else {
            self.servers[0]
        };
        let sentinel = self.sentinels[0];
        wait_for("SENTINEL FAILOVER accepted", || async move {
            let mut conn = conn(sentinel).await?;
            let ok: redis::RedisResult<()> = redis::cmd("SENTINEL")
                .arg("FAILOVER")
                .arg(SERVICE)
                .query_async(&mut conn)
                .await;
            Some(ok.is_ok())
        })
        .await;
        wait_for(&format!("{after} promoted"), || async move {
            let role = info(after, "replication").await?;
            Some(role.contains("role:master"))
        })
        .await;
        wait_for("the Sentinels name the new primary", || async move {
            Some(self.primary_port().await == after)
        })
        .await;
        after
    }

    /// Client connections subscribed to something, over all Sentinels.
    pub async fn sentinel_subscribers(&self) -> usize {
        let mut total = 0;
        for port in self.sentinels {
            let mut conn = conn(port).await.expect("a Sentinel answers");
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut conn)
                .await
                .expect("CLIENT LIST");
            total += list
                .lines()
                .filter(|l| l.split(' ').any(|f| f.starts_with("sub=") && f != "sub=0"))
                .count();
        }
        total
    }

    /// Sends `signal` to the data server on `port` (SIGSTOP pauses it, SIGCONT resumes
    /// it, SIGKILL is `kill -9`).
    pub fn signal_server(&self, port: u16, signal: libc::c_int) {
        let at = self
            .servers
            .iter()
            .position(|p| *p == port)
            .expect("one of the set's servers");
        self.running[at].signal(signal);
    }

    /// Waits until the Sentinels name `port` as primary and it says so itself.
    pub async fn wait_promoted(&self, port: u16) {
        wait_for(&format!("{port} promoted"), || async move {
            let role = info(port, "replication").await?;
            Some(role.contains("role:master") && self.primary_port().await == port)
        })
        .await;
    }

    /// A plain connection to one of the data servers, for assertions.
    pub async fn server_conn(&self, port: u16) -> redis::aio::MultiplexedConnection {
        conn(port).await.expect("the server answers")
    }
}

pub(crate) async fn conn(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

pub(crate) async fn info(port: u16, section: &str) -> Option<String> {
    let mut conn = conn(port).await?;
    redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .ok()
}

/// Every bulk string of a (nested) reply, flattened: `SENTINEL MASTER` answers a flat
/// field/value list (RESP2) or a map (RESP3).
fn flat(values: &[redis::Value]) -> Vec<String> {
    let mut out = Vec::new();
    for v in values {
        match v {
            redis::Value::BulkString(b) => out.push(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => out.push(s.clone()),
            redis::Value::Array(items) => out.extend(flat(items)),
            redis::Value::Map(pairs) => {
                for (k, v) in pairs {
                    out.extend(flat(std::slice::from_ref(k)));
                    out.extend(flat(std::slice::from_ref(v)));
                }
            }
            _ => {}
        }
    }
    out
}

/// Polls `check` every 100 ms until it says `Some(true)`; panics after 30 s.
pub(crate) async fn wait_for<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if check().await == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
