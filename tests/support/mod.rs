//! Test support: real Redis servers for integration tests, in Docker or as processes.
//!
//! `RedisNode::start()` picks the backend once per test binary:
//! - `DISTLOCK_TEST_BACKEND=docker`: containers through `testcontainers`, image from
//!   `DISTLOCK_REDIS_IMAGE` (default `redis:7`);
//! - `DISTLOCK_TEST_BACKEND=process`: `redis-server` processes on free loopback ports;
//! - unset: Docker when an engine answers, processes otherwise.
//!
//! Either way a node keeps its address across stop/start, so clients can reconnect.
#![allow(dead_code, unreachable_pub)]

use std::io::Write;
use std::net::TcpListener;
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

fn image_name() -> String {
    std::env::var("DISTLOCK_REDIS_IMAGE").unwrap_or_else(|_| "redis:7".to_owned())
}

fn redis_server_bin() -> String {
    std::env::var("DISTLOCK_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// A free TCP port on the loopback interface (racy by nature; good enough for tests).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A unique key for one test, so tests can share nothing by accident.
pub fn unique_key(name: &str) -> String {
    format!("{name}:{}", uuid::Uuid::new_v4().simple())
}

/// One Redis server.
pub struct RedisNode {
    port: u16,
    extra_args: Vec<String>,
    inner: Inner,
}

enum Inner {
    Docker(Option<Box<ContainerAsync<GenericImage>>>),
    Process(Mutex<Option<Child>>),
}

impl RedisNode {
    /// Starts a server with the default configuration (no persistence).
    pub async fn start() -> RedisNode {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `["--requirepass", "x"]`).
    pub async fn start_with(extra_args: &[&str]) -> RedisNode {
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let port = free_port();
        let inner = match backend() {
            Backend::Docker => {
                Inner::Docker(Some(Box::new(start_container(port, &extra_args).await)))
            }
            Backend::Process => Inner::Process(Mutex::new(Some(spawn_process(port, &extra_args)))),
        };
        let node = RedisNode {
            port,
            extra_args,
            inner,
        };
        node.wait_ready().await;
        node
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A fresh connection for assertions made behind distlock's back.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("client");
        client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// Stops the server (clean shutdown, no data kept).
    pub async fn stop(&self) {
        match &self.inner {
            Inner::Docker(c) => container(c).stop().await.expect("docker stop"),
            Inner::Process(child) => {
                let taken = child.lock().unwrap().take();
                if let Some(mut child) = taken {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    /// Starts the server again on the same address (empty: nothing is persisted).
    pub async fn start_again(&self) {
        match &self.inner {
            Inner::Docker(c) => container(c).start().await.expect("docker start"),
            Inner::Process(child) => {
                let fresh = spawn_process(self.port, &self.extra_args);
                *child.lock().unwrap() = Some(fresh);
            }
        }
        self.wait_ready().await;
    }

    /// Freezes the server (SIGSTOP / `docker pause`): connections stay open, nothing answers.
    pub async fn pause(&self) {
        match &self.inner {
            Inner::Docker(c) => container(c).pause().await.expect("docker pause"),
            Inner::Process(child) => signal(child, "STOP"),
        }
    }

    /// Thaws a paused server.
    pub async fn resume(&self) {
        match &self.inner {
            Inner::Docker(c) => container(c).unpause().await.expect("docker unpause"),
            Inner::Process(child) => signal(child, "CONT"),
        }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = self.url();
        loop {
            let ok = async {
                let client = redis::Client::open(url.as_str()).ok()?;
                let mut conn = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.get_multiplexed_async_connection(),
                )
                .await
                .ok()?
                .ok()?;
                // Any answer, an authentication error included, means the server is up.
                match redis::cmd("PING").query_async::<String>(&mut conn).await {
                    Ok(_) => Some(true),
                    Err(e) => Some(e.code().is_some()),
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
            Inner::Process(child) => {
                if let Some(mut child) = child.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = Command::new("kill")
                        .args(["-CONT", &child.id().to_string()])
                        .status();
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            // `ContainerAsync` removes the container in its Drop, which needs a tokio
            // runtime; outside one (sync tests), lend it a short-lived one on another thread.
            Inner::Docker(slot) => {
                if let Some(c) = slot.take()
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

fn container(slot: &Option<Box<ContainerAsync<GenericImage>>>) -> &ContainerAsync<GenericImage> {
    slot.as_ref().expect("container is present until drop")
}

fn signal(child: &Mutex<Option<Child>>, sig: &str) {
    let guard = child.lock().unwrap();
    let child = guard.as_ref().expect("node is running");
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} failed");
}

async fn start_container(port: u16, extra_args: &[String]) -> ContainerAsync<GenericImage> {
    let image = image_name();
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    // `redis-server <args>` runs on the official image and on the local one alike.
    let mut cmd: Vec<String> = [
        "redis-server",
        "--bind",
        "0.0.0.0",
        "--port",
        "6379",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cmd.extend(extra_args.iter().cloned());
    GenericImage::new(name, tag)
        .with_exposed_port(6379.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
        .with_mapped_port(port, 6379.tcp())
        .with_cmd(cmd)
        .start()
        .await
        .unwrap_or_else(|e| panic!("start redis container from image {image}: {e}"))
}

fn spawn_process(port: u16, extra_args: &[String]) -> Child {
    let dir = std::env::temp_dir().join(format!("distlock-redis-{port}"));
    let _ = std::fs::create_dir_all(&dir);
    Command::new(redis_server_bin())
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().expect("utf-8 temp dir"),
        ])
        .args(extra_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", redis_server_bin()))
}
