//! Native conditional commands against distlock's Lua scripts, on a server that has them
//! (Valkey 9: `DELIFEQ key value`, `SET key value IFEQ old`), and the acquire + release
//! cycle on that server against Redis 7.0.
//!
//! ```sh
//! scripts/fetch-valkey.sh
//! DISTLOCK_TEST_BACKEND=process DISTLOCK_REDIS_SERVER=target/valkey/valkey-server \
//!     cargo bench --bench native
//! ```
//!
//! The first server is the test support's (`DISTLOCK_REDIS_SERVER`); with the process
//! backend a second one is started in the same process from `DISTLOCK_NATIVE_SECOND_SERVER`
//! (default `redis-server`; empty: none). Every variant has its own reconnecting connection
//! (`ConnectionManager`), and the variants of a group run in alternating rounds in this one
//! process, so drift in machine load hits every side of a ratio alike. Groups:
//!
//! - **release** (the key was set before the clock starts): `EVALSHA` of
//!   [`distlock::protocol::RELEASE`] with the release announcement (distlock's default) and
//!   without; `DELIFEQ` pipelined with `PUBLISH` on the lock's channel (one round trip; the
//!   announcement unconditional) and `DELIFEQ` alone;
//! - **extend**: `EVALSHA` of [`distlock::protocol::EXTEND`] against
//!   `SET key token IFEQ token PX ttl GET` (the reply tells "extended" (our token),
//!   "expired" (nil) and "taken" (another token) in one atomic command);
//! - **cycle**: acquire + release, by hand (`SET NX PX GET` + the Lua release, or + the
//!   native pair) and through distlock (`try_lock` + `release`), on both servers.
//!
//! For 1 task and for 64 tasks on distinct keys; the ratios are per-round medians against
//! the group's first variant. A last pass per variant reads the server's own time per
//! operation from `INFO commandstats` (the commands the variant sends itself, not those its
//! scripts call). Under `cargo test` it runs a few operations of each, as a smoke test, and
//! checks that a server without the native commands refuses them as unknown.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use distlock::LockManager;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Barrier;

const TTL_MS: u64 = 30_000;
const TASKS: usize = 64;

/// What one variant does, once per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    ReleaseLua { announce: bool },
    ReleaseNative { announce: bool },
    ExtendLua,
    ExtendNative,
    CycleLua,
    CycleNative,
    CycleDistlock,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::ReleaseLua { announce: true } => "EVALSHA RELEASE + announcement (distlock today)",
            Op::ReleaseLua { announce: false } => "EVALSHA RELEASE, no announcement",
            Op::ReleaseNative { announce: true } => "DELIFEQ + PUBLISH, pipelined",
            Op::ReleaseNative { announce: false } => "DELIFEQ alone",
            Op::ExtendLua => "EVALSHA EXTEND (distlock today)",
            Op::ExtendNative => "SET key token IFEQ token PX ttl GET",
            Op::CycleLua => "by hand: SET NX PX GET + EVALSHA RELEASE",
            Op::CycleNative => "by hand: SET NX PX GET + (DELIFEQ + PUBLISH)",
            Op::CycleDistlock => "distlock: try_lock + release",
        }
    }

    /// The commands the variant sends itself (not those its scripts call, which
    /// `INFO commandstats` also counts): its server time is theirs.
    fn commands(self) -> &'static [&'static str] {
        match self {
            Op::ReleaseLua { .. } | Op::ExtendLua => &["evalsha"],
            Op::ReleaseNative { announce: true } => &["delifeq", "publish"],
            Op::ReleaseNative { announce: false } => &["delifeq"],
            Op::ExtendNative => &["set"],
            Op::CycleLua => &["set", "evalsha"],
            Op::CycleNative => &["set", "delifeq", "publish"],
            Op::CycleDistlock => &["set", "evalsha", "delifeq", "publish"],
        }
    }

    fn is_release(self) -> bool {
        matches!(self, Op::ReleaseLua { .. } | Op::ReleaseNative { .. })
    }
}

/// One variant: an operation on a server, through its own connection.
struct Variant {
    op: Op,
    server: String,
    conn: ConnectionManager,
    admin: redis::aio::MultiplexedConnection,
    locks: Option<LockManager>,
    release: redis::Script,
    extend: redis::Script,
}

impl Variant {
    fn label(&self) -> String {
        format!("{} — {}", self.server, self.op.label())
    }

    async fn release_lua(&self, conn: &mut ConnectionManager, key: &str, token: &str, a: bool) {
        let mut call = self.release.key(key);
        call.arg(token);
        if a {
            call.arg(format!("{key}:released"));
        }
        let code: i64 = call.invoke_async(conn).await.expect("release");
        assert_eq!(code, 1);
    }

    async fn release_native(conn: &mut ConnectionManager, key: &str, token: &str, a: bool) {
        let mut pipe = redis::pipe();
        pipe.cmd("DELIFEQ").arg(key).arg(token);
        if a {
            pipe.cmd("PUBLISH")
                .arg(format!("{key}:released"))
                .arg("")
                .ignore();
        }
        let (code,): (i64,) = pipe.query_async(conn).await.expect("DELIFEQ");
        assert_eq!(code, 1);
    }

    async fn set_nx(conn: &mut ConnectionManager, key: &str, token: &str) {
        let previous: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(TTL_MS)
            .arg("GET")
            .query_async(conn)
            .await
            .expect("SET");
        assert!(previous.is_none(), "uncontended");
    }

    /// One task: sets up its keys, waits for the clock to start, runs `n` operations.
    async fn task(self: Arc<Self>, name: String, n: u32, start: Arc<Barrier>) {
        let mut conn = self.conn.clone();
        let key = format!("distlock:{{{name}}}");
        let token = uuid::Uuid::new_v4().simple().to_string();
        let keys: Vec<String> = (0..n).map(|i| format!("{key}:{i}")).collect();
        if self.op.is_release() {
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("SET")
                    .arg(k)
                    .arg(&token)
                    .arg("PX")
                    .arg(TTL_MS)
                    .ignore();
            }
            let () = pipe.query_async(&mut conn).await.expect("setup");
        } else if matches!(self.op, Op::ExtendLua | Op::ExtendNative) {
            Self::set_nx(&mut conn, &key, &token).await;
        }
        start.wait().await;
        for k in &keys {
            match self.op {
                Op::ReleaseLua { announce } => {
                    self.release_lua(&mut conn, k, &token, announce).await
                }
                Op::ReleaseNative { announce } => {
                    Self::release_native(&mut conn, k, &token, announce).await
                }
                Op::ExtendLua => {
                    let code: i64 = self
                        .extend
                        .key(&key)
                        .arg(&token)
                        .arg(TTL_MS)
                        .invoke_async(&mut conn)
                        .await
                        .expect("extend");
                    assert_eq!(code, 1);
                }
                Op::ExtendNative => {
                    let previous: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg(&token)
                        .arg("IFEQ")
                        .arg(&token)
                        .arg("PX")
                        .arg(TTL_MS)
                        .arg("GET")
                        .query_async(&mut conn)
                        .await
                        .expect("SET IFEQ");
                    assert_eq!(previous.as_deref(), Some(token.as_str()));
                }
                Op::CycleLua | Op::CycleNative => {
                    let fresh = uuid::Uuid::new_v4().simple().to_string();
                    Self::set_nx(&mut conn, &key, &fresh).await;
                    if self.op == Op::CycleLua {
                        self.release_lua(&mut conn, &key, &fresh, true).await;
                    } else {
                        Self::release_native(&mut conn, &key, &fresh, true).await;
                    }
                }
                Op::CycleDistlock => {
                    let locks = self.locks.as_ref().expect("a manager");
                    let guard = locks.try_lock(name.as_str()).await.expect("acquire");
                    guard.release().await.expect("release");
                }
            }
        }
    }
}

/// Seconds per operation: `n` operations on each of `tasks` concurrent tasks, distinct keys.
async fn run(variant: &Arc<Variant>, tasks: usize, n: u32, prefix: &str) -> f64 {
    let start = Arc::new(Barrier::new(tasks + 1));
    let mut set = tokio::task::JoinSet::new();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    for t in 0..tasks {
        let name = format!("{prefix}:{run_id}:{t}");
        set.spawn(Arc::clone(variant).task(name, n, Arc::clone(&start)));
    }
    start.wait().await;
    let started = Instant::now();
    while let Some(done) = set.join_next().await {
        done.expect("task");
    }
    started.elapsed().as_secs_f64() / f64::from(n * tasks as u32)
}

/// The server's time in `commands` since the last reset, in µs.
async fn server_usec(admin: &mut redis::aio::MultiplexedConnection, commands: &[&str]) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            if !commands.contains(&name) {
                return None;
            }
            rest.split("usec=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Whether the server knows `DELIFEQ` (`COMMAND INFO` answers nil for an unknown command).
async fn has_delifeq(admin: &mut redis::aio::MultiplexedConnection) -> bool {
    let info: Vec<redis::Value> = redis::cmd("COMMAND")
        .arg("INFO")
        .arg("delifeq")
        .query_async(admin)
        .await
        .expect("COMMAND INFO");
    info.first().is_some_and(|v| *v != redis::Value::Nil)
}

/// The server's name and version, from `INFO server` (Valkey reports `valkey_version`).
async fn server_name(admin: &mut redis::aio::MultiplexedConnection) -> String {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(admin)
        .await
        .expect("INFO");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    match field("valkey_version") {
        Some(v) => format!("Valkey {v}"),
        None => format!("Redis {}", field("redis_version").unwrap_or_default()),
    }
}

async fn variants(node: &support::RedisNode, groups: &mut [Vec<Arc<Variant>>; 3]) {
    let mut admin = node.conn().await;
    let server = server_name(&mut admin).await;
    let native = has_delifeq(&mut admin).await;
    if !native {
        let refused: redis::RedisResult<i64> = redis::cmd("DELIFEQ")
            .arg("distlock:{bench}")
            .arg("t")
            .query_async(&mut admin)
            .await;
        let err = refused.expect_err("a server without DELIFEQ in COMMAND INFO refuses it");
        assert!(err.to_string().contains("unknown command"), "{err}");
        println!("native: {server} has no DELIFEQ ({err}): Lua only");
    }
    let mut ops = vec![Op::CycleLua];
    if native {
        ops.extend([Op::CycleNative]);
    }
    ops.push(Op::CycleDistlock);
    if native {
        ops.extend([
            Op::ReleaseLua { announce: true },
            Op::ReleaseNative { announce: true },
            Op::ReleaseLua { announce: false },
            Op::ReleaseNative { announce: false },
            Op::ExtendLua,
            Op::ExtendNative,
        ]);
    }
    for op in ops {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(distlock::DEFAULT_COMMAND_TIMEOUT));
        let conn = ConnectionManager::new_with_config(node.client(), config)
            .await
            .expect("connection manager");
        let locks = match op {
            Op::CycleDistlock => Some(LockManager::connect(&node.url()).await.expect("connect")),
            _ => None,
        };
        let group = match op {
            Op::CycleLua | Op::CycleNative | Op::CycleDistlock => 0,
            Op::ReleaseLua { .. } | Op::ReleaseNative { .. } => 1,
            Op::ExtendLua | Op::ExtendNative => 2,
        };
        groups[group].push(Arc::new(Variant {
            op,
            server: server.clone(),
            conn,
            admin: node.conn().await,
            locks,
            release: redis::Script::new(distlock::protocol::RELEASE),
            extend: redis::Script::new(distlock::protocol::EXTEND),
        }));
    }
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let first = rt.block_on(support::RedisNode::start());
    let second_bin = std::env::var("DISTLOCK_NATIVE_SECOND_SERVER")
        .unwrap_or_else(|_| "redis-server".to_owned());
    let second =
        (support::backend() == support::Backend::Process && !second_bin.is_empty()).then(|| {
            rt.block_on(support::RedisNode::start_opts(
                support::NodeOptions::default().server(&second_bin),
            ))
        });
    let mut groups: [Vec<Arc<Variant>>; 3] = Default::default();
    rt.block_on(async {
        variants(&first, &mut groups).await;
        if let Some(node) = &second {
            variants(node, &mut groups).await;
        }
        // Warm up (scripts loaded, sockets open) and, under `cargo test`, the smoke test.
        for v in groups.iter().flatten() {
            run(v, 4, 10, "bench:warm").await;
        }
    });
    if !bench_mode {
        let n = groups.iter().flatten().count();
        println!("native: smoke run of {n} variants passed");
        return;
    }

    // DISTLOCK_NATIVE_ROUNDS shortens the run (21 rounds by default).
    let rounds: usize = std::env::var("DISTLOCK_NATIVE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(21);
    let (n_one, n_many): (u32, u32) = (400, 40);
    println!(
        "{rounds} alternating rounds (1 task: {n_one} operations; {TASKS} tasks: {n_many} each), \
         backend {:?}",
        support::backend()
    );
    for group in groups.iter().filter(|g| !g.is_empty()) {
        let mut one: Vec<Vec<f64>> = vec![Vec::new(); group.len()];
        let mut many: Vec<Vec<f64>> = vec![Vec::new(); group.len()];
        let usec: Vec<f64> = rt.block_on(async {
            for round in 0..rounds {
                // Rotate who goes first, so no variant always runs on a warmer server.
                for i in 0..group.len() {
                    let k = (i + round) % group.len();
                    one[k].push(run(&group[k], 1, n_one, "bench:one").await);
                    many[k].push(run(&group[k], TASKS, n_many, "bench:many").await);
                }
            }
            let mut usec = Vec::new();
            for v in group {
                let mut admin = v.admin.clone();
                let _: () = redis::cmd("CONFIG")
                    .arg("RESETSTAT")
                    .query_async(&mut admin)
                    .await
                    .expect("CONFIG RESETSTAT");
                run(v, TASKS, 100, "bench:usec").await;
                let total = server_usec(&mut admin, v.op.commands()).await;
                usec.push(total / f64::from(TASKS as u32 * 100));
            }
            usec
        });
        let ratio = |samples: &Vec<Vec<f64>>, k: usize| {
            median(
                samples[0]
                    .iter()
                    .zip(&samples[k])
                    .map(|(base, v)| base / v)
                    .collect(),
            )
        };
        println!();
        println!(
            "| variant | 1 task: ops/s | ratio | {TASKS} tasks: ops/s | ratio | server µs/op |"
        );
        println!("|---|---|---|---|---|---|");
        for (k, v) in group.iter().enumerate() {
            println!(
                "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} |",
                v.label(),
                1.0 / median(one[k].clone()),
                ratio(&one, k),
                1.0 / median(many[k].clone()),
                ratio(&many, k),
                usec[k]
            );
        }
    }
}
