//! A primary and one replica, as `redis-server` processes on free loopback ports (on either
//! test backend: the replica must reach the primary's address as the client sees it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use super::sentinel::{conn, info, wait_for};
use super::{free_port, fresh_data_dir, redis_server_bin};

/// A primary and a replica of it, in sync once [`start`](Self::start) returns.
pub struct ReplicaPair {
    primary: u16,
    replica: u16,
    children: Mutex<Vec<Child>>,
    dirs: Vec<PathBuf>,
}

impl ReplicaPair {
    pub async fn start() -> ReplicaPair {
        let (primary, replica) = (free_port(), free_port());
        let mut children = Vec::new();
        let mut dirs = Vec::new();
        for port in [primary, replica] {
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
            if port == replica {
                cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
            }
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", redis_server_bin()));
            children.push(child);
            dirs.push(dir);
        }
        let pair = ReplicaPair {
            primary,
            replica,
            children: Mutex::new(children),
            dirs,
        };
        wait_for(&format!("replica of {primary} in sync"), || async {
            let info = info(replica, "replication").await?;
            Some(info.contains("master_link_status:up"))
        })
        .await;
        wait_for("the primary counts its replica", || async {
            let info = info(primary, "replication").await?;
            Some(info.contains("connected_slaves:1"))
        })
        .await;
        pair
    }

    /// `redis://127.0.0.1:<primary port>`.
    pub fn primary_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.primary)
    }

    /// A plain connection to the primary, for assertions.
    pub async fn primary(&self) -> redis::aio::MultiplexedConnection {
        conn(self.primary).await.expect("the primary answers")
    }

    /// A plain connection to the replica, for assertions.
    pub async fn replica(&self) -> redis::aio::MultiplexedConnection {
        conn(self.replica).await.expect("the replica answers")
    }

    /// Freezes the replica (SIGSTOP): its link to the primary stays open, it acknowledges
    /// nothing.
    pub fn pause_replica(&self) {
        signal(&self.children.lock().unwrap()[1], libc::SIGSTOP);
    }

    /// Thaws the replica (SIGCONT).
    pub fn resume_replica(&self) {
        signal(&self.children.lock().unwrap()[1], libc::SIGCONT);
    }
}

impl Drop for ReplicaPair {
    fn drop(&mut self) {
        for child in self.children.get_mut().unwrap().iter_mut() {
            signal(child, libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Sends `signal` to `child` (a process of ours, not yet waited for).
pub fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child, which
    // we have not waited for, so it cannot have been reused.
    unsafe {
        libc::kill(pid, signal);
    }
}
