//! ZooKeeper servers for tests, as processes: the Debian `zookeeper` package's jars run by
//! the system `java`, each server on a free loopback port with its own data directory.
//!
//! ```ignore
//! let server = zk::shared();                 // one standalone server for the binary
//! let own = ZkServer::start();               // a server of the test's own (to stop, kill)
//! let url = server.url("/t-fifo");           // zk://127.0.0.1:<port>/t-fifo
//! own.stop(); own.restart();                 // SIGKILL, then the same port and data
//! server.four_letter("wchp");                // watches by path
//! ```
//!
//! Every server started is killed when the test binary exits (an `atexit` hook), also the
//! shared one, which lives in a static.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The server's tick (ms): session timeouts are negotiated within 2 and 600 ticks.
pub const TICK_MS: u64 = 100;

/// Where the Debian package puts the server's classes (its `zookeeper.jar` lists the other
/// jars it needs in its manifest); overridden by `DISTLOCK_ZK_CLASSPATH`.
const DEFAULT_CLASSPATH: &str = "/usr/share/java/zookeeper.jar:/etc/zookeeper/conf";

static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static HOOKED: OnceLock<()> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

extern "C" fn kill_all() {
    if let Ok(pids) = PIDS.lock() {
        for &pid in pids.iter() {
            // SAFETY: kill(2) on a pid this binary started.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

fn track(pid: u32) {
    HOOKED.get_or_init(|| {
        // SAFETY: registering a plain `extern "C"` function.
        unsafe {
            libc::atexit(kill_all);
        }
    });
    PIDS.lock().unwrap().push(pid);
}

fn untrack(pid: u32) {
    PIDS.lock().unwrap().retain(|&p| p != pid);
}

/// Whether the machine can run a server (java and the jars are installed).
pub fn available() -> bool {
    classpath()
        .split(':')
        .next()
        .is_some_and(|jar| std::path::Path::new(jar).exists())
        && Command::new("java")
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn classpath() -> String {
    std::env::var("DISTLOCK_ZK_CLASSPATH").unwrap_or_else(|_| DEFAULT_CLASSPATH.to_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One server process (standalone, or one member of an ensemble).
pub struct ZkServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    config: PathBuf,
    main_class: &'static str,
}

/// The server shared by the tests of this binary (each test uses its own chroot).
pub fn shared() -> &'static ZkServer {
    static SHARED: OnceLock<ZkServer> = OnceLock::new();
    SHARED.get_or_init(ZkServer::start)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "distlock-zk-{}-{}-{name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).expect("server directory");
    dir
}

fn base_config(dir: &std::path::Path, port: u16) -> String {
    format!(
        "tickTime={TICK_MS}\ninitLimit=20\nsyncLimit=10\ndataDir={}\nclientPort={port}\n\
         clientPortAddress=127.0.0.1\nminSessionTimeout={}\nmaxSessionTimeout={}\n\
         admin.enableServer=false\n4lw.commands.whitelist=*\nmaxClientCnxns=0\n",
        dir.join("data").display(),
        2 * TICK_MS,
        600 * TICK_MS,
    )
}

impl ZkServer {
    /// Starts a standalone server and waits until it answers `ruok`.
    pub fn start() -> ZkServer {
        let port = free_port();
        let dir = scratch("standalone");
        let config = dir.join("zoo.cfg");
        std::fs::write(&config, base_config(&dir, port)).expect("write zoo.cfg");
        let mut server = ZkServer {
            child: None,
            port,
            dir,
            config,
            main_class: "org.apache.zookeeper.server.ZooKeeperServerMain",
        };
        server.spawn();
        server.wait_ready(Duration::from_secs(30));
        server
    }

    /// Starts an ensemble of `n` servers and waits until a quorum serves.
    pub fn ensemble(n: usize) -> Vec<ZkServer> {
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let peers: String = ports
            .iter()
            .enumerate()
            .map(|(i, (_, quorum, election))| {
                format!("server.{}=127.0.0.1:{quorum}:{election}\n", i + 1)
            })
            .collect();
        let mut servers: Vec<ZkServer> = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, _, _))| {
                let dir = scratch(&format!("peer{}", i + 1));
                std::fs::write(dir.join("data").join("myid"), format!("{}\n", i + 1))
                    .expect("myid");
                let config = dir.join("zoo.cfg");
                std::fs::write(&config, format!("{}{peers}", base_config(&dir, client)))
                    .expect("write zoo.cfg");
                ZkServer {
                    child: None,
                    port: client,
                    dir,
                    config,
                    main_class: "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                }
            })
            .collect();
        for server in &mut servers {
            server.spawn();
        }
        for server in &servers {
            server.wait_ready(Duration::from_secs(60));
        }
        servers
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("server.log")).expect("server log");
        let child = Command::new("java")
            .args([
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Dzookeeper.admin.enableServer=false",
                "-Dznode.container.checkIntervalMs=1000",
                "-cp",
                &classpath(),
                self.main_class,
            ])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start java (is default-jre-headless installed?)");
        track(child.id());
        self.child = Some(child);
    }

    /// Waits until the server answers `ruok` and serves requests (`srvr` shows a mode).
    pub fn wait_ready(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            if self.four_letter("srvr").is_some_and(|s| {
                s.contains("Mode: standalone")
                    || s.contains("Mode: leader")
                    || s.contains("Mode: follower")
            }) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "ZooKeeper on port {} not ready within {limit:?}; log: {}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` for a connect string.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `zk://127.0.0.1:<port><chroot>`.
    pub fn url(&self, chroot: &str) -> String {
        format!("zk://127.0.0.1:{}{chroot}", self.port)
    }

    /// A four-letter-word command's answer, `None` if the server did not answer.
    pub fn four_letter(&self, command: &str) -> Option<String> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        conn.write_all(command.as_bytes()).ok()?;
        let mut out = String::new();
        conn.read_to_string(&mut out).ok()?;
        (!out.is_empty()).then_some(out)
    }

    /// Watches by path (`wchp`): each watched path and how many sessions watch it.
    pub fn watches(&self) -> Vec<(String, usize)> {
        let text = self.four_letter("wchp").unwrap_or_default();
        let mut out: Vec<(String, usize)> = Vec::new();
        for line in text.lines() {
            if line.starts_with('/') {
                out.push((line.trim().to_owned(), 0));
            } else if line.trim().starts_with("0x")
                && let Some(last) = out.last_mut()
            {
                last.1 += 1;
            }
        }
        out
    }

    /// Kills the server (SIGKILL): its sessions are not closed, its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            untrack(child.id());
        }
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) the server process.
    pub fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on our child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, signal);
            }
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
