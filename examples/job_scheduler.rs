//! Several workers share a schedule; every scheduled run executes exactly once.
//!
//! Each worker stands for one process (its own `LockManager`, its own connection). For
//! every run, all workers race for the run's lock with `try_lock`; the winner checks a
//! "done" marker *under the lock* (a late worker may win the lock after the run finished),
//! executes the job, and sets the marker before releasing.
//!
//! ```sh
//! scripts/redis-up.sh && cargo run --example job_scheduler
//! ```

use std::time::Duration;

use distlock::{LockManager, LockOptions};
use rand::RngExt;
use redis::AsyncCommands;

const WORKERS: usize = 6;
const RUNS: u32 = 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // The locks may live elsewhere (`LOCK_URL`, e.g. `zk://127.0.0.1:2181/examples` with the
    // `zookeeper` feature); the data always lives in Redis.
    let lock_url = std::env::var("LOCK_URL").unwrap_or_else(|_| url.clone());
    let client = redis::Client::open(url.as_str())?;
    let mut admin = client.get_multiplexed_async_connection().await?;
    let ns = format!("example:jobs:{}", uuid::Uuid::new_v4().simple());

    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let locks = LockManager::connect(&lock_url).await?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let ns = ns.clone();
        workers.push(tokio::spawn(async move {
            let mut executed = 0u32;
            let start = tokio::time::Instant::now();
            for run in 0..RUNS {
                // Runs are due every 50 ms; each worker's clock and scheduling is a little off.
                let jitter = Duration::from_micros(rand::rng().random_range(0..5_000));
                tokio::time::sleep_until(start + Duration::from_millis(50) * run + jitter).await;
                let opts = LockOptions::new().with_ttl(Duration::from_secs(30));
                let guard = match locks.try_lock_with(format!("{ns}:run:{run}"), opts).await {
                    Ok(guard) => guard,
                    Err(e) if e.is_held_by_other() => continue, // another worker has it
                    Err(e) => return Err(e.to_string()),
                };
                let done: bool = conn
                    .exists(format!("{ns}:done:{run}"))
                    .await
                    .map_err(|e| e.to_string())?;
                if !done {
                    // The job: count executions per run, so the proof is in Redis.
                    let _: i64 = conn
                        .incr(format!("{ns}:executions:{run}"), 1)
                        .await
                        .map_err(|e| e.to_string())?;
                    let _: () = conn
                        .set(format!("{ns}:done:{run}"), worker)
                        .await
                        .map_err(|e| e.to_string())?;
                    executed += 1;
                }
                guard.release().await.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>((worker, executed))
        }));
    }
    for w in workers {
        let (worker, executed) = w.await??;
        println!("worker {worker} executed {executed} runs");
    }

    let mut total = 0;
    for run in 0..RUNS {
        let n: i64 = admin.get(format!("{ns}:executions:{run}")).await?;
        if n != 1 {
            return Err(format!("run {run} executed {n} times").into());
        }
        total += n;
    }
    let keys: Vec<String> = admin.keys(format!("{ns}:*")).await?;
    if !keys.is_empty() {
        let _: () = admin.del(keys).await?;
    }
    println!(
        "ok: {RUNS} scheduled runs, {WORKERS} workers, {total} executions: each run exactly once"
    );
    Ok(())
}
