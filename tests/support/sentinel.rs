//! A primary, a replica and three Sentinels, as processes on free loopback ports (on
//! either test backend: Sentinels announce the addresses the servers see, which only
//! processes on the host share with the client).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{free_port, fresh_data_dir, redis_server_bin};

/// The service name the Sentinels monitor.
pub const SERVICE: &str = "distlock-test";

/// One primary (first `primary_port`), one replica, three Sentinels.
pub struct SentinelSet {
    servers: [u16; 2],
    sentinels: [u16; 3],
    children: Mutex<Vec<Child>>,
    dirs: Vec<PathBuf>,
}

impl SentinelSet {
    /// Starts the set and returns once the replica is in sync and every Sentinel knows the
    /// primary, the replica and the other two Sentinels.
    pub async fn start() -> SentinelSet {
        let servers = [free_port(), free_port()];
        let sentinels = [free_port(), free_port(), free_port()];
        let mut set = SentinelSet {
            servers,
            sentinels,
            children: Mutex::new(Vec::new()),
            dirs: Vec::new(),
        };
        for (i, port) in servers.into_iter().enumerate() {
            let dir = fresh_data_dir(port);
            let mut cmd = Command::new(redis_server_bin());
            cmd.args(["--bind", "127.0.0.1", "--protected-mode", "no"])
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--dir", dir.to_str().unwrap()]);
            if i == 1 {
                cmd.args(["--replicaof", "127.0.0.1", &servers[0].to_string()]);
            }
            set.spawn(cmd);
            set.dirs.push(dir);
        }
        wait_for(&format!("replica of {} in sync", servers[0]), || async {
            let info = info(servers[1], "replication").await?;
            Some(info.contains("master_link_status:up"))
        })
        .await;
        for port in sentinels {
            let dir = fresh_data_dir(port);
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                     sentinel monitor {SERVICE} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {SERVICE} 1000\n\
                     sentinel failover-timeout {SERVICE} 5000\n",
                    dir.display(),
                    servers[0]
                ),
            )
            .unwrap();
            let mut cmd = Command::new(redis_server_bin());
            cmd.arg(&conf).arg("--sentinel");
            set.spawn(cmd);
            set.dirs.push(dir);
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
        set
    }

    fn spawn(&self, mut cmd: Command) {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", redis_server_bin()));
        self.children.lock().unwrap().push(child);
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
        let children = self.children.lock().unwrap();
        super::replicated::signal(&children[at], signal);
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

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for child in self.children.get_mut().unwrap().iter_mut() {
            // A paused server must be able to die.
            super::replicated::signal(child, libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
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
