//! Uncontended acquire + release cycles against the floor a user compares with: the design
//! card's protocol sent by hand (`SET key token NX PX ttl` and a Lua compare-and-delete).
//!
//! ```sh
//! cargo bench --bench cycle                               # Redis from the test support
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench cycle # a local redis-server, no Docker
//! ```
//!
//! Four ways to run a cycle, each on its own reconnecting connection (`ConnectionManager`,
//! what `LockManager::connect` uses) to the same server, measured in alternating rounds in
//! this one process (so drift in machine load hits every side of a ratio alike):
//!
//! - **card floor**: `SET NX PX` + `EVALSHA` of the card's compare-and-delete, by hand;
//! - **distlock's protocol by hand**: `SET NX PX GET` + `EVALSHA` of distlock's release
//!   script (compare-and-delete, then the release announcement), from
//!   [`distlock::protocol`];
//! - **distlock**: `try_lock` + `release`;
//! - **distlock fenced**: the same with `LockOptions::with_fencing(true)`;
//! - **distlock fair**: the same with `LockOptions::with_fair(true)` (the acquire and the
//!   release are scripts that also read the lock's waiter queue).
//!
//! For 1 task and for 64 tasks on distinct keys. A last pass per variant reads the server's
//! own time per cycle from `INFO commandstats`. Under `cargo test` it runs a few cycles of
//! each, as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use distlock::{LockManager, LockOptions};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

const TTL_MS: u64 = 30_000;
const TASKS: usize = 64;

/// The card's release: compare-and-delete, nothing else.
const CARD_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

type Cycle = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One way to run an acquire + release cycle on a lock name.
#[derive(Clone)]
enum Variant {
    Card {
        conn: ConnectionManager,
        release: Arc<redis::Script>,
    },
    ByHand {
        conn: ConnectionManager,
        release: Arc<redis::Script>,
    },
    Distlock(LockManager),
    Fenced(LockManager),
    Fair(LockManager),
}

impl Variant {
    fn label(&self) -> &'static str {
        match self {
            Variant::Card { .. } => "card floor: SET NX PX + Lua compare-and-delete, by hand",
            Variant::ByHand { .. } => {
                "distlock's protocol by hand: SET NX PX GET + its release script"
            }
            Variant::Distlock(_) => "distlock: try_lock + release",
            Variant::Fenced(_) => "distlock fenced: with_fencing(true)",
            Variant::Fair(_) => "distlock fair: with_fair(true)",
        }
    }

    fn cycle(&self, name: Arc<String>) -> Cycle {
        let token = uuid::Uuid::new_v4().simple().to_string();
        match self.clone() {
            Variant::Card { mut conn, release } => Box::pin(async move {
                let key = format!("distlock:{{{name}}}");
                let ok: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(TTL_MS)
                    .query_async(&mut conn)
                    .await
                    .expect("SET");
                assert!(ok.is_some(), "uncontended");
                let deleted: i64 = release
                    .key(&key)
                    .arg(&token)
                    .invoke_async(&mut conn)
                    .await
                    .expect("release");
                assert_eq!(deleted, 1);
            }),
            Variant::ByHand { mut conn, release } => Box::pin(async move {
                let key = format!("distlock:{{{name}}}");
                let previous: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(TTL_MS)
                    .arg("GET")
                    .query_async(&mut conn)
                    .await
                    .expect("SET");
                assert!(previous.is_none(), "uncontended");
                let released: i64 = release
                    .key(&key)
                    .arg(&token)
                    .arg(format!("{key}:released"))
                    .invoke_async(&mut conn)
                    .await
                    .expect("release");
                assert_eq!(released, 1);
            }),
            Variant::Distlock(locks) => Box::pin(async move {
                let guard = locks.try_lock(name.as_str()).await.expect("acquire");
                guard.release().await.expect("release");
            }),
            Variant::Fenced(locks) => Box::pin(async move {
                let fenced = LockOptions::new().with_fencing(true);
                let guard = locks
                    .try_lock_with(name.as_str(), fenced)
                    .await
                    .expect("acquire");
                assert!(guard.fencing_token().is_some());
                guard.release().await.expect("release");
            }),
            Variant::Fair(locks) => Box::pin(async move {
                let fair = LockOptions::new().with_fair(true);
                let guard = locks
                    .try_lock_with(name.as_str(), fair)
                    .await
                    .expect("acquire");
                guard.release().await.expect("release");
            }),
        }
    }
}

/// CPU time this process has used so far (all threads, user and system), in seconds: the
/// client's own cost, apart from the server's.
fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` fills the zeroed struct it is given; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Seconds per cycle: `cycles` cycles on each of `tasks` concurrent tasks, distinct keys.
async fn run(variant: &Variant, tasks: usize, cycles: u32, prefix: &str) -> f64 {
    run_measured(variant, tasks, cycles, prefix).await.0
}

/// Seconds per cycle and client CPU seconds per cycle.
async fn run_measured(variant: &Variant, tasks: usize, cycles: u32, prefix: &str) -> (f64, f64) {
    let cpu = cpu_seconds();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let name = Arc::new(format!("{prefix}:{t}"));
        let variant = variant.clone();
        set.spawn(async move {
            for _ in 0..cycles {
                variant.cycle(Arc::clone(&name)).await;
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.expect("task");
    }
    let n = f64::from(cycles * tasks as u32);
    (
        started.elapsed().as_secs_f64() / n,
        (cpu_seconds() - cpu) / n,
    )
}

/// The server's own time in lease commands since the last reset, in µs.
async fn server_usec(admin: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .expect("INFO");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
        .filter(|l| !l.starts_with("cmdstat_config"))
        .filter_map(|l| {
            l.split("usec=")
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

async fn connection(node: &support::RedisNode) -> ConnectionManager {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(distlock::DEFAULT_COMMAND_TIMEOUT));
    ConnectionManager::new_with_config(node.client(), config)
        .await
        .expect("connection manager")
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let node = rt.block_on(support::RedisNode::start());
    let variants = rt.block_on(async {
        let card = Arc::new(redis::Script::new(CARD_RELEASE));
        let ours = Arc::new(redis::Script::new(distlock::protocol::RELEASE));
        vec![
            Variant::Card {
                conn: connection(&node).await,
                release: card,
            },
            Variant::ByHand {
                conn: connection(&node).await,
                release: ours,
            },
            Variant::Distlock(LockManager::connect(&node.url()).await.expect("connect")),
            Variant::Fenced(LockManager::connect(&node.url()).await.expect("connect")),
            Variant::Fair(LockManager::connect(&node.url()).await.expect("connect")),
        ]
    });
    // Warm up (scripts loaded, sockets open) and, under `cargo test`, the smoke test.
    rt.block_on(async {
        for v in &variants {
            run(v, 4, 20, "bench:warm").await;
        }
    });
    if !bench_mode {
        println!("cycle: smoke run of {} variants passed", variants.len());
        return;
    }
    // For profiling one variant alone: DISTLOCK_CYCLE_ONLY=<index> runs it at 64 tasks for
    // about ten seconds and prints its throughput.
    if let Some(k) = std::env::var("DISTLOCK_CYCLE_ONLY")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|k| *k < variants.len())
    {
        let per_cycle = rt.block_on(async {
            let mut samples = Vec::new();
            let rounds: usize = std::env::var("DISTLOCK_CYCLE_ROUNDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            for _ in 0..rounds {
                samples.push(run(&variants[k], TASKS, 20, "bench:only").await);
            }
            median(samples)
        });
        println!("{}: {:.0} cycles/s", variants[k].label(), 1.0 / per_cycle);
        return;
    }

    // DISTLOCK_CYCLE_ROUNDS shortens the run (31 rounds by default).
    let rounds: usize = std::env::var("DISTLOCK_CYCLE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(31);
    let (cycles_one, cycles_many): (u32, u32) = (400, 40);
    let mut one: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut many: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    rt.block_on(async {
        for round in 0..rounds {
            // Rotate who goes first, so no variant always runs on a warmer server.
            for i in 0..variants.len() {
                let k = (i + round) % variants.len();
                one[k].push(run(&variants[k], 1, cycles_one, "bench:one").await);
                many[k].push(run(&variants[k], TASKS, cycles_many, "bench:many").await);
            }
        }
    });
    // Server time and client CPU per cycle, each variant alone, 64 tasks. The client's
    // CPU includes the redis-rs connection task: what the application process pays.
    let (usec, client_usec): (Vec<f64>, Vec<f64>) = rt.block_on(async {
        let mut admin = node.conn().await;
        let (mut server, mut client) = (Vec::new(), Vec::new());
        for v in &variants {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut admin)
                .await
                .expect("CONFIG RESETSTAT");
            let (_, cpu) = run_measured(v, TASKS, 100, "bench:usec").await;
            server.push(server_usec(&mut admin).await / f64::from(TASKS as u32 * 100));
            client.push(cpu * 1e6);
        }
        (server, client)
    });

    // Ratios per round against the card floor (variant 0), then the median.
    let ratio = |samples: &Vec<Vec<f64>>, k: usize| {
        median(
            samples[0]
                .iter()
                .zip(&samples[k])
                .map(|(floor, v)| floor / v)
                .collect(),
        )
    };
    println!();
    println!(
        "acquire + release cycles, {rounds} alternating rounds (1 task: {cycles_one} cycles; {TASKS} tasks: {cycles_many} cycles each), backend {:?}",
        support::backend()
    );
    println!(
        "| variant | 1 task: cycles/s | ratio | {TASKS} tasks: cycles/s | ratio | server µs/cycle | client CPU µs/cycle |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (k, v) in variants.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1} | {:.1} |",
            v.label(),
            1.0 / median(one[k].clone()),
            ratio(&one, k),
            1.0 / median(many[k].clone()),
            ratio(&many, k),
            usec[k],
            client_usec[k]
        );
    }
    let own = |samples: &Vec<Vec<f64>>| {
        median(
            samples[1]
                .iter()
                .zip(&samples[2])
                .map(|(by_hand, ours)| ours / by_hand)
                .collect(),
        )
    };
    println!(
        "client overhead (distlock time / its protocol by hand): 1 task {:.3}x, {TASKS} tasks {:.3}x",
        own(&one),
        own(&many)
    );
}
