//! Real processes for the end-to-end tests: `redis-server` on a free loopback port, the
//! `distlock` binary, scratch directories, and waiting with generous deadlines.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use distlock::redis;

/// How long any one process in these tests may take before the test calls it hung. Far
/// above what the tests need, so a loaded machine slows them down without failing them.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A `redis-server` process without persistence, killed on drop.
pub struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// Starts a server and waits until it answers.
    pub fn start() -> Redis {
        let port = free_port();
        let child =
            Command::new(std::env::var("DISTLOCK_REDIS_SERVER").unwrap_or("redis-server".into()))
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server (is it installed?)");
        let redis = Redis { child, port };
        wait_until("redis-server answers", || {
            redis
                .try_admin()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).ok())
                .is_some()
        });
        redis
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain connection, as an operator's `redis-cli` would have.
    pub fn admin(&self) -> redis::Connection {
        self.try_admin().expect("connect to redis-server")
    }

    fn try_admin(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url())
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()
    }

    /// Whether the lease key of lock `name` (default prefix) exists.
    pub fn is_locked(&self, name: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(lease_key(name))
            .query::<bool>(&mut self.admin())
            .expect("EXISTS")
    }

    /// SIGSTOP: the server keeps its connections open and answers nothing.
    pub fn pause(&self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        signal(self.child.id(), libc::SIGCONT);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Redis key of lock `name` under the default prefix (the README's layout).
pub fn lease_key(name: &str) -> String {
    format!("{}{{{name}}}", distlock::DEFAULT_PREFIX)
}

/// A free TCP port on the loopback interface (racy by nature; good enough for tests).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits");
    // SAFETY: kill(2) with plain integers.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// `distlock` with its URL pointed at `redis`, and none of the caller's lock environment.
pub fn distlock(redis: &Redis) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distlock"));
    cmd.env("DISTLOCK_URL", redis.url())
        .env("DISTLOCK_BIN", env!("CARGO_BIN_EXE_distlock"))
        .env_remove("DISTLOCK_PREFIX")
        .env_remove("DISTLOCK_FENCING_TOKEN")
        .stdin(Stdio::null());
    cmd
}

/// A process started by a test, its output collected as it runs.
pub struct Running {
    child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

/// What a finished process left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From start to exit.
    pub took: Duration,
}

impl Finished {
    /// The exit code; panics (with the stderr) if a signal ended the process.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:?}"))
    }
}

/// Starts `cmd` with stdout and stderr captured.
pub fn start(mut cmd: Command) -> (Running, Instant) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn distlock");
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    (Running { child, out, err }, Instant::now())
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

impl Running {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the exit, at most [`PATIENCE`]; kills and panics past it.
    pub fn finish(mut self, started: Instant) -> Finished {
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if started.elapsed() > PATIENCE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("process still running after {PATIENCE:?}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        let took = started.elapsed();
        let text =
            |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        Finished {
            status,
            stdout: text(self.out.take()),
            stderr: text(self.err.take()),
            took,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that panicked must not leave processes behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to its end.
pub fn output(cmd: Command) -> Finished {
    let (running, started) = start(cmd);
    running.finish(started)
}

/// Polls `done` every 10 ms until it holds; panics after [`PATIENCE`].
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < PATIENCE, "timed out waiting: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh scratch directory, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "distlock-cli-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a scratch dir");
        Scratch(dir)
    }

    /// A path inside, as a string for shell commands.
    pub fn file(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The file's text, empty while it does not exist.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    pub fn exists(&self, name: &str) -> bool {
        Path::new(&self.path(name)).exists()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
