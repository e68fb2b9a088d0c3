//! The lock's siblings against the lock: one uncontended cycle of each primitive on one
//! server, in alternating rounds in this one process, as a ratio to the lock cycle.
//!
//! ```sh
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench primitives
//! ```
//!
//! - **lock**: `try_lock` + `release` (`SET NX PX GET` + the release script);
//! - **semaphore permit** (N = 8): `try_acquire` + `release` (one script each way);
//! - **read**: `try_read` + `release` of a read-write lock;
//! - **write**: `try_write` + `release` of a read-write lock;
//! - **lock_all of 2**: two locks taken in order, released together.
//!
//! Under `cargo test` it runs a few cycles of each, as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use distlock::{LockManager, RwLock, Semaphore};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Lock,
    Permit,
    Read,
    Write,
    Pair,
}

const KINDS: [Kind; 5] = [
    Kind::Lock,
    Kind::Permit,
    Kind::Read,
    Kind::Write,
    Kind::Pair,
];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Lock => "lock: try_lock + release",
            Kind::Permit => "semaphore permit (N = 8): try_acquire + release",
            Kind::Read => "read lock: try_read + release",
            Kind::Write => "write lock: try_write + release",
            Kind::Pair => "lock_all of 2 names + release",
        }
    }
}

struct Subjects {
    locks: LockManager,
    sem: Semaphore,
    rw: RwLock,
}

async fn cycle(kind: Kind, s: &Subjects, i: usize) {
    match kind {
        Kind::Lock => {
            let g = s
                .locks
                .try_lock(format!("bench:lock:{}", i % 64))
                .await
                .unwrap();
            g.release().await.unwrap();
        }
        Kind::Permit => s.sem.try_acquire().await.unwrap().release().await.unwrap(),
        Kind::Read => s.rw.try_read().await.unwrap().release().await.unwrap(),
        Kind::Write => s.rw.try_write().await.unwrap().release().await.unwrap(),
        Kind::Pair => {
            let names = [format!("bench:a:{}", i % 64), format!("bench:b:{}", i % 64)];
            s.locks
                .lock_all(&names)
                .await
                .unwrap()
                .release()
                .await
                .unwrap();
        }
    }
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let node = rt.block_on(support::RedisNode::start());
    let subjects = rt.block_on(async {
        let locks = LockManager::connect(&node.url()).await.unwrap();
        Subjects {
            sem: locks.semaphore("bench:sem", 8).unwrap(),
            rw: locks.rw_lock("bench:rw").unwrap(),
            locks,
        }
    });
    let (rounds, per_round) = if bench_mode {
        (15, Duration::from_millis(600))
    } else {
        (1, Duration::from_millis(20))
    };
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
    rt.block_on(async {
        // Warm up every script cache and connection.
        for (i, kind) in KINDS.iter().enumerate() {
            cycle(*kind, &subjects, i).await;
        }
        for _ in 0..rounds {
            for (k, kind) in KINDS.iter().enumerate() {
                let started = Instant::now();
                let mut n = 0;
                while started.elapsed() < per_round {
                    cycle(*kind, &subjects, n).await;
                    n += 1;
                }
                rates[k].push(n as f64 / started.elapsed().as_secs_f64());
            }
        }
    });
    if !bench_mode {
        println!("primitives: smoke run done");
        return;
    }
    // The median of the per-round ratios to the lock cycle of the same round.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\n| primitive | cycles/s (median) | vs lock cycle (median of per-round ratios) |");
    println!("|---|---|---|");
    for (k, kind) in KINDS.iter().enumerate() {
        let ratios: Vec<f64> = rates[k].iter().zip(&rates[0]).map(|(r, l)| r / l).collect();
        println!(
            "| {} | {:.0} | {:.2} |",
            kind.label(),
            median(rates[k].clone()),
            median(ratios)
        );
    }
}
