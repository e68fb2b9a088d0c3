//! Read-modify-write of a record under the lock: many writers, no lost update.
//!
//! The "database" is a Redis hash read and written in two separate steps, the way an
//! application updates a row it loaded. Without the lock, concurrent writers overwrite
//! each other's updates; with it, every update lands.
//!
//! ```sh
//! scripts/redis-up.sh && cargo run --example db_update
//! ```

use std::time::Duration;

use distlock::{Backoff, LockManager, LockOptions};
use redis::AsyncCommands;

const WRITERS: usize = 16;
const UPDATES: usize = 25;

async fn run(
    url: &str,
    lock_url: &str,
    record: &str,
    locked: bool,
) -> Result<i64, Box<dyn std::error::Error>> {
    let client = redis::Client::open(url)?;
    let mut admin = client.get_multiplexed_async_connection().await?;
    let _: () = admin.hset(record, "balance", 0).await?;

    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let locks = LockManager::connect(lock_url).await?;
        let mut db = client.get_multiplexed_async_connection().await?;
        let record = record.to_owned();
        writers.push(tokio::spawn(async move {
            let opts = LockOptions::new()
                .with_ttl(Duration::from_secs(5))
                .with_wait(Duration::from_secs(30))
                .with_backoff(
                    Backoff::new()
                        .with_base(Duration::from_millis(1))
                        .with_cap(Duration::from_millis(20)),
                );
            for _ in 0..UPDATES {
                let guard = if locked {
                    Some(locks.lock_with(&record, opts).await?)
                } else {
                    None
                };
                let balance: i64 = db.hget(&record, "balance").await?;
                tokio::time::sleep(Duration::from_micros(200)).await; // the application's work
                let _: () = db.hset(&record, "balance", balance + 10).await?;
                if let Some(guard) = guard {
                    guard.release().await?;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for w in writers {
        w.await?.map_err(|e| e.to_string())?;
    }
    let balance: i64 = admin.hget(record, "balance").await?;
    let _: () = admin.del(record).await?;
    Ok(balance)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // The locks may live elsewhere (`LOCK_URL`, e.g. `zk://127.0.0.1:2181/examples` with the
    // `zookeeper` feature); the data always lives in Redis.
    let lock_url = std::env::var("LOCK_URL").unwrap_or_else(|_| url.clone());
    let record = format!("example:account:{}", uuid::Uuid::new_v4().simple());
    let expected = (WRITERS * UPDATES * 10) as i64;

    let unlocked = run(&url, &lock_url, &record, false).await?;
    println!(
        "without the lock: balance {unlocked}, expected {expected} ({} updates lost)",
        (expected - unlocked) / 10
    );
    let locked = run(&url, &lock_url, &record, true).await?;
    println!("with the lock:    balance {locked}, expected {expected}");
    if locked != expected {
        return Err("an update was lost under the lock".into());
    }
    println!(
        "ok: {WRITERS} writers x {UPDATES} read-modify-write updates, none lost under the lock"
    );
    Ok(())
}
