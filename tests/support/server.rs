//! One server of a deployment of several (a cluster node, a primary or replica, a
//! Sentinel), on a free loopback port, on either test backend: a `redis-server` process,
//! or a container of the test image on the host's network. Host networking keeps the
//! addresses the servers announce to each other (replicas to primaries, Sentinels and
//! cluster nodes to clients) the ones the client reaches; the server's directory is
//! mounted at the same path, so its arguments, files and log are the same on both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Backend, backend, free_port, fresh_data_dir, image_name, redis_server_bin};

/// A running server; killed and its directory removed when dropped.
pub struct Server {
    port: u16,
    dir: PathBuf,
    run: Mutex<Run>,
}

enum Run {
    Process(Child),
    /// The container's name.
    Container(String),
    /// Killed and reaped.
    Gone,
}

/// The arguments of a data server on `port` keeping its files in `dir`: loopback only, no
/// persistence, its log in `dir/node.log`.
pub fn data_server_args(port: u16, dir: &Path) -> Vec<String> {
    let dir = dir.to_str().expect("utf-8 temp dir");
    [
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "no",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir,
        "--logfile",
        &format!("{dir}/node.log"),
    ]
    .map(str::to_owned)
    .to_vec()
}

impl Server {
    /// Starts `redis-server <args(port, dir)>` on a free port with a fresh directory, and
    /// returns once it answers. A port from `free_port` can be taken by another process
    /// (an outgoing connection's ephemeral port) before the server binds it; the server
    /// then exits, and is started again on another port.
    pub async fn start(args: impl Fn(u16, &Path) -> Vec<String>) -> Server {
        Self::start_on(backend(), args).await
    }

    /// [`start`](Self::start) on `backend`, whatever the tests' backend is.
    pub async fn start_on(backend: Backend, args: impl Fn(u16, &Path) -> Vec<String>) -> Server {
        for _ in 0..5 {
            let port = free_port();
            let dir = fresh_data_dir(port);
            let run = spawn(backend, port, &dir, &args(port, &dir));
            let server = Server {
                port,
                dir,
                run: Mutex::new(run),
            };
            if server.answers().await {
                return server;
            }
        }
        panic!("no server could start in 5 tries");
    }

    /// The loopback port it serves.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends `signal` to the server: SIGSTOP freezes it (its links stay open, it answers
    /// nothing), SIGCONT thaws it.
    pub fn signal(&self, signal: libc::c_int) {
        match &*self.run.lock().unwrap() {
            Run::Process(child) => {
                let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
                // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own
                // child, not yet waited for, so it cannot have been reused.
                unsafe {
                    libc::kill(pid, signal);
                }
            }
            Run::Container(name) => {
                let signal = signal_name(signal);
                docker(&["kill", "--signal", signal.as_str(), name.as_str()], false);
            }
            Run::Gone => {}
        }
    }

    /// Kills the server with SIGKILL (no goodbye to anyone) and reaps it.
    pub fn kill(&self) {
        let mut run = self.run.lock().unwrap();
        match &mut *run {
            Run::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Run::Container(name) => {
                // Quiet: a container killed by a signal is gone already (`--rm`).
                docker(&["rm", "--force", name.as_str()], true);
            }
            Run::Gone => {}
        }
        *run = Run::Gone;
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// Whether the process or container has ended.
    fn exited(&self) -> bool {
        match &mut *self.run.lock().unwrap() {
            Run::Process(child) => !matches!(child.try_wait(), Ok(None)),
            Run::Container(name) => {
                let running = Command::new("docker")
                    .args(["inspect", "--format", "{{.State.Running}}", name.as_str()])
                    .output();
                !matches!(running, Ok(out) if out.status.success() && out.stdout.starts_with(b"true"))
            }
            Run::Gone => true,
        }
    }

    /// Waits until the server answers (`true`), or has exited (`false`: it could not bind
    /// its port; its log is printed); panics after 60 s.
    async fn answers(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.exited() {
                eprintln!(
                    "server on {} exited; starting another:\n{}",
                    self.port,
                    self.log()
                );
                return false;
            }
            // Ours only if it is still alive once something answers on the port.
            if super::sentinel::info(self.port, "server").await.is_some() && !self.exited() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: server {} answers; its log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A frozen server must be able to die.
        self.signal(libc::SIGCONT);
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(backend: Backend, port: u16, dir: &Path, args: &[String]) -> Run {
    match backend {
        Backend::Process => {
            let child = Command::new(redis_server_bin())
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", redis_server_bin()));
            Run::Process(child)
        }
        Backend::Docker => {
            let name = container_name(port);
            let mount = format!("{0}:{0}", dir.display());
            let image = image_name();
            let mut run = vec![
                "run",
                "--detach",
                "--rm",
                "--network",
                "host",
                "--label",
                "distlock-test=1",
                "--name",
                name.as_str(),
                "--volume",
                mount.as_str(),
                image.as_str(),
                "redis-server",
            ];
            run.extend(args.iter().map(String::as_str));
            docker(&run, false);
            Run::Container(name)
        }
    }
}

/// Unique per port and test process.
fn container_name(port: u16) -> String {
    format!("distlock-test-{}-{port}", std::process::id())
}

fn signal_name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGSTOP => "SIGSTOP".into(),
        libc::SIGCONT => "SIGCONT".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        other => other.to_string(),
    }
}

/// Runs `docker <args>`; a failure is printed unless `quiet`, and is not fatal (the
/// server's absence shows).
fn docker(args: &[&str], quiet: bool) {
    match Command::new("docker").args(args).output() {
        Ok(out) if out.status.success() || quiet => {}
        Ok(out) => eprintln!(
            "docker {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) if !quiet => eprintln!("docker: {e}"),
        Err(_) => {}
    }
}
