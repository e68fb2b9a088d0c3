//! Test support: real Redis servers for integration tests, in Docker or as processes.
//!
//! `RedisNode::start()` picks the backend once per test binary:
//! - `DISTLOCK_TEST_BACKEND=docker`: containers through `testcontainers`, image from
//!   `DISTLOCK_REDIS_IMAGE` (default `redis:7`, or `distlock-redis:local` when only that
//!   one is here);
//! - `DISTLOCK_TEST_BACKEND=process`: `redis-server` processes on free loopback ports;
//! - unset: Docker when an engine answers, processes otherwise.
//!
//! Either way a node keeps its address across stop, kill and restart, so clients can
//! reconnect, and offers the same faults:
//!
//! | call | process backend | Docker backend |
//! |---|---|---|
//! | [`RedisNode::stop`] | SIGTERM (clean shutdown) | `docker stop` |
//! | [`RedisNode::kill`] | SIGKILL | `docker kill` (stop with no grace) |
//! | [`RedisNode::pause`] / [`resume`](RedisNode::resume) | SIGSTOP / SIGCONT | `docker pause` / `unpause` |
//! | [`RedisNode::start_again_with`]`(Data::Keep)` | same port, same data dir | same container |
//! | [`RedisNode::start_again_with`]`(Data::Wipe)` | same port, new empty data dir | new container, same port |
//!
//! A node keeps data across a restart only if it was started with
//! [`NodeOptions::persistent`] (append-only file, fsync on every write); otherwise a
//! restart always comes back empty.
//!
//! Deployments of several servers ([`replicated`], [`sentinel`], [`cluster`]) start each
//! server through [`server`]: a process, or a container of the same image on the host's
//! network (the addresses servers announce to each other must be the client's), with the
//! same faults (SIGSTOP/SIGCONT/SIGKILL, sent with `docker kill --signal` to a container).
//!
//! Beside it: [`proxy`] (a TCP fault proxy), [`hostile`] (a `ConnectionLike` that delays,
//! reorders and loses replies per command), [`child`] (this test binary re-run as a
//! separate OS process), [`tls`] (certificates made with the `openssl` CLI).
#![allow(dead_code, unreachable_pub)]

pub mod child;
pub mod cluster;
pub mod hostile;
pub mod logs;
pub mod proxy;
pub mod replicated;
pub mod sentinel;
pub mod server;
pub mod tls;

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// Which way Redis servers are started in this test binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Containers from `DISTLOCK_REDIS_IMAGE`.
    Docker,
    /// Spawned `redis-server` processes.
    Process,
}

/// The backend of this test binary, announced once on stderr (not captured by the harness).
pub fn backend() -> Backend {
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    *BACKEND.get_or_init(|| {
        let chosen = match std::env::var("DISTLOCK_TEST_BACKEND").as_deref() {
            Ok("docker") => Backend::Docker,
            Ok("process") => Backend::Process,
            Ok(other) if !other.is_empty() => {
                panic!("DISTLOCK_TEST_BACKEND must be `docker` or `process`, got {other:?}")
            }
            _ if docker_answers() => Backend::Docker,
            _ => Backend::Process,
        };
        let detail = match chosen {
            Backend::Docker => format!("docker, image {}", image_name()),
            Backend::Process => format!("process, {}", redis_server_bin()),
        };
        let _ = writeln!(
            std::io::stderr(),
            "distlock test support: Redis backend = {detail}"
        );
        chosen
    })
}

fn docker_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `DISTLOCK_REDIS_IMAGE`; else `redis:7` when it is here already; else the image
/// `scripts/build-redis-image.sh` (or `scripts/redis-up.sh`) built from the local
/// redis-server, when it is here; else `redis:7`, pulled.
pub(crate) fn image_name() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            if let Ok(image) = std::env::var("DISTLOCK_REDIS_IMAGE") {
                return image;
            }
            let present = |image: &str| {
                std::process::Command::new("docker")
                    .args(["image", "inspect", image])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            ["redis:7", "distlock-redis:local"]
                .into_iter()
                .find(|image| present(image))
                .unwrap_or("redis:7")
                .to_owned()
        })
        .clone()
}

pub(crate) fn redis_server_bin() -> String {
    std::env::var("DISTLOCK_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// A free TCP port on the loopback interface. Racy by nature against other processes,
/// but never the same port twice in one test binary: the system may hand a just-closed
/// ephemeral port out again, and two servers started at once would then share one.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<std::collections::HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        if given.lock().unwrap_or_else(|p| p.into_inner()).insert(port) {
            return port;
        }
    }
}

/// A unique key for one test, so tests can share nothing by accident.
pub fn unique_key(name: &str) -> String {
    format!("{name}:{}", uuid::Uuid::new_v4().simple())
}

/// Whether a restarted node comes back with the data it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// Same data directory (process) or container (Docker): a persistent node comes back
    /// with every acknowledged write.
    Keep,
    /// A fresh, empty data directory (process) or a new container (Docker).
    Wipe,
}

/// How to start a node. `NodeOptions::default()` is a plain server without persistence.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    args: Vec<String>,
    persistent: bool,
    tls: Option<tls::TlsFiles>,
    server: Option<String>,
}

impl NodeOptions {
    /// Extra `redis-server` arguments (e.g. `["--requirepass", "x"]`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Append-only file with `fsync` on every write: whatever the server acknowledged
    /// survives [`RedisNode::kill`] and a [`Data::Keep`] restart.
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// Run this server binary instead of `DISTLOCK_REDIS_SERVER` (process backend only:
    /// e.g. a bench that compares two servers in one process).
    pub fn server(mut self, binary: &str) -> Self {
        self.server = Some(binary.to_owned());
        self
    }

    /// Serve TLS only (no plain port), with these certificates; [`RedisNode::url`] is
    /// then `rediss://`.
    pub fn tls(mut self, files: tls::TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// `redis-server` arguments common to both backends, for a server whose data
    /// directory is `dir` and whose port is `port`.
    fn server_args(&self, port: u16, dir: &str) -> Vec<String> {
        let mut args: Vec<String> = vec!["--protected-mode".into(), "no".into()];
        match &self.tls {
            None => args.extend(["--port".into(), port.to_string()]),
            Some(files) => args.extend([
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                files.path_in(dir, "server.crt"),
                "--tls-key-file".into(),
                files.path_in(dir, "server.key"),
                "--tls-ca-cert-file".into(),
                files.path_in(dir, "ca.crt"),
                // Clients prove nothing: the test is about the server's certificate.
                "--tls-auth-clients".into(),
                "no".into(),
            ]),
        }
        args.extend(["--save".into(), "".into(), "--dir".into(), dir.to_owned()]);
        if self.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly".into(), "no".into()]);
        }
        args.extend(self.args.iter().cloned());
        args
    }
}

/// One Redis server.
pub struct RedisNode {
    port: u16,
    options: NodeOptions,
    inner: Inner,
}

enum Inner {
    Docker(tokio::sync::Mutex<Option<Box<ContainerAsync<GenericImage>>>>),
    Process(Mutex<ProcessState>),
}

struct ProcessState {
    child: Option<Child>,
    /// The data directory of the server now running (or last run).
    dir: PathBuf,
}

impl RedisNode {
    /// Starts a server with the default configuration (no persistence).
    pub async fn start() -> RedisNode {
        Self::start_opts(NodeOptions::default()).await
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `["--requirepass", "x"]`).
    pub async fn start_with(extra_args: &[&str]) -> RedisNode {
        Self::start_opts(NodeOptions::default().args(extra_args)).await
    }

    /// Starts a server as `options` say.
    pub async fn start_opts(options: NodeOptions) -> RedisNode {
        let port = free_port();
        let inner = match backend() {
            Backend::Docker => {
                assert!(
                    options.server.is_none(),
                    "NodeOptions::server needs the process backend"
                );
                let container = start_container(port, &options).await;
                Inner::Docker(tokio::sync::Mutex::new(Some(Box::new(container))))
            }
            Backend::Process => {
                let dir = fresh_data_dir(port);
                let child = spawn_process(port, &options, &dir);
                Inner::Process(Mutex::new(ProcessState {
                    child: Some(child),
                    dir,
                }))
            }
        };
        let node = RedisNode {
            port,
            options,
            inner,
        };
        node.wait_ready().await;
        node
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://` for a TLS node.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A redis-rs client for this node, trusting its test CA when it serves TLS.
    pub fn client(&self) -> redis::Client {
        match &self.options.tls {
            None => redis::Client::open(self.url()).expect("client"),
            Some(files) => files.client(&self.url()),
        }
    }

    /// A fresh connection for assertions made behind distlock's back.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.client().get_multiplexed_async_connection(),
        )
        .await
        .expect("connect to test redis within 10 s")
        .expect("connect to test redis")
    }

    /// Stops the server cleanly (SIGTERM / `docker stop`): it finishes what it is doing,
    /// closes its connections and, if persistent, flushes its append-only file.
    pub async fn stop(&self) {
        match &self.inner {
            Inner::Docker(c) => {
                let c = c.lock().await;
                container(&c).stop().await.expect("docker stop");
            }
            Inner::Process(state) => {
                let taken = lock(state).child.take();
                if let Some(mut child) = taken {
                    send_signal(&child, libc::SIGTERM);
                    // A clean shutdown takes milliseconds; SIGKILL if it hangs.
                    if !wait_exit(&mut child, Duration::from_secs(10)) {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            }
        }
    }

    /// Kills the server outright (SIGKILL / `docker kill`): no shutdown, connections
    /// vanish, only what a persistent node already wrote to disk survives.
    pub async fn kill(&self) {
        match &self.inner {
            Inner::Docker(c) => {
                let c = c.lock().await;
                container(&c)
                    .stop_with_timeout(Some(0))
                    .await
                    .expect("docker kill");
            }
            Inner::Process(state) => {
                let taken = lock(state).child.take();
                if let Some(mut child) = taken {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    /// Starts a stopped or killed server again on the same address, with its data
    /// ([`Data::Keep`]), and waits until it answers.
    pub async fn start_again(&self) {
        self.start_again_with(Data::Keep).await;
    }

    /// Starts a stopped or killed server again on the same address and waits until it
    /// answers. See [`Data`] for what it comes back with.
    pub async fn start_again_with(&self, data: Data) {
        match &self.inner {
            Inner::Docker(slot) => {
                let mut slot = slot.lock().await;
                match data {
                    Data::Keep => container(&slot).start().await.expect("docker start"),
                    Data::Wipe => {
                        if let Some(old) = slot.take() {
                            old.rm().await.expect("docker rm");
                        }
                        let fresh = start_container(self.port, &self.options).await;
                        *slot = Some(Box::new(fresh));
                    }
                }
            }
            Inner::Process(state) => {
                let mut state = lock(state);
                assert!(state.child.is_none(), "start_again on a running node");
                if data == Data::Wipe {
                    let _ = std::fs::remove_dir_all(&state.dir);
                    state.dir = fresh_data_dir(self.port);
                }
                let child = spawn_process(self.port, &self.options, &state.dir);
                state.child = Some(child);
            }
        }
        self.wait_ready().await;
    }

    /// [`kill`](Self::kill), then [`start_again_with`](Self::start_again_with).
    pub async fn restart(&self, data: Data) {
        self.kill().await;
        self.start_again_with(data).await;
    }

    /// Freezes the server (SIGSTOP / `docker pause`): connections stay open, the kernel
    /// still accepts new ones, nothing answers.
    pub async fn pause(&self) {
        match &self.inner {
            Inner::Docker(c) => {
                let c = c.lock().await;
                container(&c).pause().await.expect("docker pause");
            }
            Inner::Process(state) => {
                let state = lock(state);
                send_signal(
                    state.child.as_ref().expect("node is running"),
                    libc::SIGSTOP,
                );
            }
        }
    }

    /// Thaws a paused server; it then answers everything that queued up meanwhile.
    pub async fn resume(&self) {
        match &self.inner {
            Inner::Docker(c) => {
                let c = c.lock().await;
                container(&c).unpause().await.expect("docker unpause");
            }
            Inner::Process(state) => {
                let state = lock(state);
                send_signal(
                    state.child.as_ref().expect("node is running"),
                    libc::SIGCONT,
                );
            }
        }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = self.client();
        loop {
            let ok = async {
                let mut conn = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.get_multiplexed_async_connection(),
                )
                .await
                .ok()?
                .ok()?;
                // Any answer, an authentication error included, means the server is up;
                // except LOADING: a persistent server still replaying its append-only file.
                match redis::cmd("PING").query_async::<String>(&mut conn).await {
                    Ok(_) => Some(true),
                    Err(e) => Some(e.code().is_some_and(|code| code != "LOADING")),
                }
            }
            .await;
            if ok == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis on port {} did not come up",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        match &mut self.inner {
            Inner::Process(state) => {
                let state = state.get_mut().unwrap_or_else(|p| p.into_inner());
                if let Some(mut child) = state.child.take() {
                    // A paused server must be able to die.
                    send_signal(&child, libc::SIGCONT);
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let _ = std::fs::remove_dir_all(&state.dir);
            }
            // `ContainerAsync` removes the container in its Drop, which needs a tokio
            // runtime; outside one (sync tests), lend it a short-lived one on another thread.
            Inner::Docker(slot) => {
                if let Some(c) = slot.get_mut().take()
                    && tokio::runtime::Handle::try_current().is_err()
                {
                    let _ = std::thread::spawn(move || {
                        let rt = tokio::runtime::Runtime::new().expect("runtime");
                        rt.block_on(async move { drop(c) });
                    })
                    .join();
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn container(slot: &Option<Box<ContainerAsync<GenericImage>>>) -> &ContainerAsync<GenericImage> {
    slot.as_ref().expect("container is present until drop")
}

fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
    // which we have not waited for, so it cannot have been reused.
    let rc = unsafe { libc::kill(pid, signal) };
    assert!(
        rc == 0 || signal == libc::SIGCONT,
        "kill({pid}, {signal}) failed"
    );
}

/// Waits up to `limit` for `child` to exit; `true` if it did.
fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn fresh_data_dir(port: u16) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "distlock-redis-{port}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("create the node's data dir");
    dir
}

/// Where a container keeps its data (`WORKDIR` of both the official and the local image).
const CONTAINER_DATA_DIR: &str = "/data";

async fn start_container(port: u16, options: &NodeOptions) -> ContainerAsync<GenericImage> {
    let image = image_name();
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    // `redis-server <args>` runs on the official image and on the local one alike.
    let mut cmd = vec!["redis-server".to_owned(), "--bind".into(), "0.0.0.0".into()];
    cmd.extend(options.server_args(6379, CONTAINER_DATA_DIR));
    let mut request = GenericImage::new(name, tag)
        .with_exposed_port(6379.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
        .with_mapped_port(port, 6379.tcp())
        .with_cmd(cmd);
    if let Some(files) = &options.tls {
        for (file, bytes) in files.contents() {
            request = request.with_copy_to(files.path_in(CONTAINER_DATA_DIR, file), bytes);
        }
    }
    request
        .start()
        .await
        .unwrap_or_else(|e| panic!("start redis container from image {image}: {e}"))
}

fn spawn_process(port: u16, options: &NodeOptions, dir: &std::path::Path) -> Child {
    let dir = dir.to_str().expect("utf-8 temp dir");
    if let Some(files) = &options.tls {
        for (file, bytes) in files.contents() {
            let path = files.path_in(dir, file);
            let parent = std::path::Path::new(&path).parent().expect("parent dir");
            std::fs::create_dir_all(parent).expect("create the TLS dir");
            std::fs::write(&path, bytes).expect("write a TLS file");
        }
    }
    let binary = options.server.clone().unwrap_or_else(redis_server_bin);
    Command::new(&binary)
        .args(["--bind", "127.0.0.1"])
        .args(options.server_args(port, dir))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {binary}: {e}"))
}

/// Five independent nodes, started together: the nodes of a lock over several primaries.
pub async fn five_nodes() -> Vec<RedisNode> {
    let (a, b, c, d, e) = tokio::join!(
        RedisNode::start(),
        RedisNode::start(),
        RedisNode::start(),
        RedisNode::start(),
        RedisNode::start()
    );
    vec![a, b, c, d, e]
}

/// How many times the server ran `command` (lower case, e.g. `"evalsha"`) since it
/// started, from `INFO commandstats`: proof that a request reached it.
pub async fn command_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split("calls=").nth(1))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `EVALSHA` calls the server has run so far (distlock's acquire, extend, release).
pub async fn evalsha_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    command_calls(conn, "evalsha").await
}

/// The distlock channels (default prefix) the server has subscribers for.
pub async fn subscribed_channels(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("distlock:*")
        .query_async(conn)
        .await
        .expect("PUBSUB CHANNELS")
}

/// Waits until `key` is gone; panics after `within`. Returns how long it took.
pub async fn wait_until_gone(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(conn)
            .await
            .expect("EXISTS");
        if !exists {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{key} still exists after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A manager on `url` whose leases carry fencing tokens (off by default).
pub async fn fenced_manager(url: &str) -> distlock::LockManager {
    distlock::LockManager::builder()
        .with_default_options(distlock::LockOptions::new().with_fencing(true))
        .connect(url)
        .await
        .expect("connect a fenced manager")
}

/// Options for many tasks contending for one lock: a long wait, a quick backoff.
pub fn contended(wait: Duration) -> distlock::LockOptions {
    distlock::LockOptions::new()
        .with_ttl(Duration::from_secs(10))
        .with_wait(wait)
        .with_backoff(
            distlock::Backoff::new()
                .with_base(Duration::from_millis(1))
                .with_cap(Duration::from_millis(20)),
        )
}

/// Runs `cycles` non-atomic increments (GET, yield, SET) of the counter `counter` on
/// `conn`'s server, each under the lock `name` of `locks`: only mutual exclusion keeps the
/// counter exact. The returned task ends when they are done and panics on any error.
pub fn racy_increments(
    locks: distlock::LockManager,
    name: String,
    counter: String,
    mut conn: redis::aio::MultiplexedConnection,
    cycles: usize,
    options: distlock::LockOptions,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for _ in 0..cycles {
            let guard = locks.lock_with(&name, options).await.expect("lock");
            let value: Option<u64> = redis::cmd("GET")
                .arg(&counter)
                .query_async(&mut conn)
                .await
                .expect("GET");
            tokio::task::yield_now().await;
            let _: () = redis::cmd("SET")
                .arg(&counter)
                .arg(value.unwrap_or(0) + 1)
                .query_async(&mut conn)
                .await
                .expect("SET");
            guard.release().await.expect("release");
        }
    })
}

/// The Redis key of the lease on lock `name` under the default prefix.
pub fn lease_key(name: &str) -> String {
    format!("{}{{{name}}}", distlock::DEFAULT_PREFIX)
}

/// Sets the lease of lock `name` to `token` for `px_ms`, as another owner speaking the raw
/// protocol would.
pub async fn set_lease(
    conn: &mut redis::aio::MultiplexedConnection,
    name: &str,
    token: &str,
    px_ms: u64,
) {
    let _: () = redis::cmd("SET")
        .arg(lease_key(name))
        .arg(token)
        .arg("PX")
        .arg(px_ms)
        .query_async(conn)
        .await
        .expect("SET the lease");
}

/// Spawns a waiter that takes `name` with `opts`, records `i` in `order` when served,
/// holds 20 ms and releases: order tests compare `order` with the arrival order.
pub fn fifo_waiter(
    locks: &distlock::LockManager,
    name: &str,
    i: usize,
    order: &std::sync::Arc<Mutex<Vec<usize>>>,
    opts: distlock::LockOptions,
) -> tokio::task::JoinHandle<()> {
    let (locks, name, order) = (locks.clone(), name.to_owned(), std::sync::Arc::clone(order));
    tokio::spawn(async move {
        let guard = locks.lock_with(&name, opts).await.expect("served");
        order.lock().unwrap().push(i);
        tokio::time::sleep(Duration::from_millis(20)).await;
        guard.release().await.expect("release");
    })
}

/// Polls `check` every 10 ms until it returns true; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a scenario started from: the node's client connections and the runtime's alive
/// tasks. [`Baseline::assert_settled`] checks that a scenario left nothing behind
/// (issue 9's resource accounting: DESIGN.md invariant 3).
///
/// Take it before creating managers (and after opening any connection the test keeps
/// until the end, such as a checking connection from [`RedisNode::conn`]); drop every
/// guard, waiter and manager, then call `assert_settled`.
///
/// Inspection goes through a blocking, non-multiplexed connection opened for each look:
/// it spawns no task on the runtime and is excluded from the count (by `CLIENT ID`).
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    /// Client connections on the node, the inspecting one excluded.
    pub connections: usize,
    /// `num_alive_tasks()` of the current tokio runtime.
    pub tasks: usize,
}

/// What the node and the runtime hold right now, for [`Baseline`].
#[derive(Debug, Default)]
struct Snapshot {
    /// `CLIENT LIST` lines, the inspecting connection's excluded.
    clients: Vec<String>,
    /// `distlock:*` keys other than fence counters.
    keys: Vec<String>,
    /// `PUBSUB CHANNELS *`.
    channels: Vec<String>,
    tasks: usize,
}

impl Snapshot {
    fn take(node: &RedisNode) -> Result<Snapshot, String> {
        let client = node.client();
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .map_err(|e| format!("connect to inspect: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let me: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query(&mut conn)
            .map_err(|e| format!("CLIENT ID: {e}"))?;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut conn)
            .map_err(|e| format!("CLIENT LIST: {e}"))?;
        let own = format!("id={me} ");
        let clients = list
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with(&own))
            .map(str::to_owned)
            .collect();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{DEFAULT_PREFIX_PATTERN}*"))
            .query(&mut conn)
            .map_err(|e| format!("KEYS: {e}"))?;
        keys.retain(|k| !k.ends_with(":fence"));
        keys.sort();
        let mut channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("*")
            .query(&mut conn)
            .map_err(|e| format!("PUBSUB CHANNELS: {e}"))?;
        channels.sort();
        drop(conn);
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        Ok(Snapshot {
            clients,
            keys,
            channels,
            tasks,
        })
    }
}

/// The pattern of every key distlock writes under the default prefix.
const DEFAULT_PREFIX_PATTERN: &str = distlock::DEFAULT_PREFIX;

impl Baseline {
    /// Records the node's connections and the runtime's alive tasks now.
    ///
    /// Connections and tasks that are already on their way out (the node's readiness
    /// probe, a connection the test just dropped) are let go first: the baseline is the
    /// first value that stays the same over three looks 25 ms apart (within 2 s).
    pub async fn take(node: &RedisNode) -> Baseline {
        let deadline = Instant::now() + Duration::from_secs(2);
        let look = || {
            let snapshot = Snapshot::take(node).expect("inspect the node for a baseline");
            (snapshot.clients.len(), snapshot.tasks)
        };
        let mut last = look();
        let mut same = 0;
        while same < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let now = look();
            same = if now == last { same + 1 } else { 0 };
            last = now;
        }
        Baseline {
            connections: last.0,
            tasks: last.1,
        }
    }

    /// Polls until nothing is left behind, or panics naming what is after `within`:
    /// no `distlock:*` key except fence counters, no subscribed channel, the node's
    /// connection count back to the baseline's, the runtime's alive tasks back to the
    /// baseline's.
    pub async fn assert_settled(&self, node: &RedisNode, within: Duration) {
        if let Some(left) = self.left_behind(node, within).await {
            panic!("not settled within {within:?}; left behind: {left}");
        }
    }

    /// [`assert_settled`](Self::assert_settled) without the panic: `None` once settled,
    /// otherwise what was still left behind after `within`.
    pub async fn left_behind(&self, node: &RedisNode, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = match Snapshot::take(node) {
                Ok(now) => {
                    let mut left = Vec::new();
                    if !now.keys.is_empty() {
                        left.push(format!("lease keys {:?}", now.keys));
                    }
                    if !now.channels.is_empty() {
                        left.push(format!("subscribed channels {:?}", now.channels));
                    }
                    if now.clients.len() != self.connections {
                        left.push(format!(
                            "{} client connections instead of {}: {:#?}",
                            now.clients.len(),
                            self.connections,
                            now.clients
                        ));
                    }
                    if now.tasks != self.tasks {
                        left.push(format!(
                            "{} alive runtime tasks instead of {}",
                            now.tasks, self.tasks
                        ));
                    }
                    left
                }
                Err(e) => vec![e],
            };
            if left.is_empty() {
                return None;
            }
            if Instant::now() >= deadline {
                return Some(left.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The clients blocked in `WAIT` on the server behind `conn` now (`CLIENT LIST`).
pub async fn blocked_in_wait(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .expect("CLIENT LIST");
    list.lines()
        .filter(|l| l.split(' ').any(|f| f == "cmd=wait"))
        .filter(|l| {
            l.split(' ')
                .any(|f| f.starts_with("flags=") && f.contains('b'))
        })
        .count()
}
