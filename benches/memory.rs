//! Memory per held guard and per waiter, counted by a global allocator.
//!
//! ```sh
//! cargo bench --bench memory                                # Redis from the test support
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench memory  # a local redis-server
//! ```
//!
//! Live heap bytes are read before and after creating N guards (or N waiting tasks), so the
//! figures include everything distlock keeps per lease or per waiter, plus the guard value
//! itself where it is stored in a `Vec`. Under `cargo test` it runs a short smoke version.

#[path = "../tests/support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use distlock::{LockGuard, LockManager, LockOptions};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let n: usize = if bench_mode { 10_000 } else { 100 };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let node = rt.block_on(support::RedisNode::start());
    rt.block_on(async {
        let locks = LockManager::connect(&node.url()).await.expect("connect");
        let holder = LockManager::connect(&node.url()).await.expect("connect");
        // Warm up: scripts loaded, connections and buffers sized.
        locks
            .try_lock("bench:mem:warm")
            .await
            .expect("warm")
            .release()
            .await
            .expect("warm");

        let mut report = Vec::new();
        for (label, opts) in [
            ("held guard", LockOptions::new()),
            (
                "held guard, auto-extended",
                LockOptions::new().with_auto_extend(true),
            ),
        ] {
            let mut guards: Vec<LockGuard> = Vec::with_capacity(n);
            let before = live();
            for i in 0..n {
                guards.push(
                    locks
                        .try_lock_with(format!("bench:mem:{label}:{i}"), opts)
                        .await
                        .expect("acquire"),
                );
            }
            // The Vec was allocated before counting: add the guard values themselves.
            let per = (live() - before) as f64 / n as f64 + std::mem::size_of::<LockGuard>() as f64;
            report.push((label, per));
            for g in guards {
                g.release().await.expect("release");
            }
        }

        // Waiters: tasks blocked in `lock` on a held key, with notifications on.
        let held = holder.lock("bench:mem:contended").await.expect("hold");
        let before = live();
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let locks = locks.clone();
            tasks.push(tokio::spawn(async move {
                let opts = LockOptions::new().with_wait(Duration::from_secs(120));
                if let Ok(g) = locks.lock_with("bench:mem:contended", opts).await {
                    let _ = g.release().await;
                }
            }));
        }
        // Let every waiter make its attempts and settle into waiting.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let per_waiter = (live() - before) as f64 / n as f64;
        report.push((
            "waiter (a task blocked in lock, notifications on)",
            per_waiter,
        ));
        held.release().await.expect("release");
        for t in tasks {
            t.abort();
        }

        println!();
        println!(
            "memory, averaged over {n} (backend {:?})",
            support::backend()
        );
        println!("| what | bytes each |");
        println!("|---|---|");
        for (label, bytes) in report {
            println!("| {label} | {bytes:.0} |");
        }
        println!(
            "| size_of::<LockGuard>() | {} |",
            std::mem::size_of::<LockGuard>()
        );
    });
}
