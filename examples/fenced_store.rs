//! The resource side of fencing: a store that keeps the highest fencing token it has seen
//! per record and rejects writes that carry a lower one.
//!
//! A lease alone cannot stop a holder that stalls past its lease (a long GC pause, a
//! stopped VM) from writing after someone else took over. The fencing check can: here the
//! "database" is a Redis hash written through a conditional update, the same shape as
//! `UPDATE records SET value = $1, fence = $2 WHERE id = $3 AND fence <= $2` in SQL.
//!
//! Redis only: it shows a holder that stalls past its lease, which a process cannot
//! stage on ZooKeeper by itself (there the lease is the session, kept alive by the client
//! while the process lives).
//!
//! ```sh
//! scripts/redis-up.sh && cargo run --example fenced_store
//! ```

use std::time::Duration;

use distlock::{LockManager, LockOptions};
use redis::Script;

/// Writes `value` only if `token` is at least the highest token the record has accepted.
/// Returns 1 when written, 0 when rejected as stale.
const FENCED_WRITE: &str = r#"
local highest = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local token = tonumber(ARGV[1])
if token < highest then
  return 0
end
redis.call('HSET', KEYS[1], 'fence', ARGV[1], 'value', ARGV[2])
return 1
"#;

struct FencedStore {
    conn: redis::aio::MultiplexedConnection,
    write: Script,
}

impl FencedStore {
    async fn write(&self, record: &str, token: u64, value: &str) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let written: i64 = self
            .write
            .key(record)
            .arg(token)
            .arg(value)
            .invoke_async(&mut conn)
            .await?;
        Ok(written == 1)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url.as_str())?;
    let store = FencedStore {
        conn: client.get_multiplexed_async_connection().await?,
        write: Script::new(FENCED_WRITE),
    };
    // Fencing tokens are off by default (they cost a Lua acquire): this manager's locks
    // carry them.
    let locks = LockManager::builder()
        .with_default_options(LockOptions::new().with_fencing(true))
        .connect(&url)
        .await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (lock, record) = (
        format!("example:fenced:{id}"),
        format!("example:record:{id}"),
    );

    // Worker A takes a short lease, then stalls past it.
    let a = locks
        .lock_with(
            &lock,
            LockOptions::new()
                .with_fencing(true)
                .with_ttl(Duration::from_millis(300)),
        )
        .await?;
    let a_token = a
        .fencing_token()
        .ok_or("fenced single-primary leases carry a token")?;
    println!("A holds the lock with fencing token {a_token}, then stalls for 600 ms");
    tokio::time::sleep(Duration::from_millis(600)).await;

    // Worker B finds the lease expired, takes the lock and writes.
    let b = locks.try_lock(&lock).await?;
    let b_token = b
        .fencing_token()
        .ok_or("fenced single-primary leases carry a token")?;
    println!("B took over with fencing token {b_token}");
    if !store.write(&record, b_token, "written by B").await? {
        return Err("B's write was rejected".into());
    }
    println!("B wrote the record");

    // A wakes up, unaware, and writes with its stale token.
    println!("A wakes up; its guard says is_held() = {}", a.is_held());
    if store.write(&record, a_token, "written by A").await? {
        return Err("the stale write from A was accepted".into());
    }
    println!("A's late write with token {a_token} was rejected: the record has seen {b_token}");

    b.release().await?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let value: String = redis::cmd("HGET")
        .arg(&record)
        .arg("value")
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("DEL")
        .arg(&record)
        .query_async(&mut conn)
        .await?;
    if value != "written by B" {
        return Err(format!("record holds {value:?}").into());
    }
    println!("ok: the stalled holder could not overwrite the newer holder's write");
    Ok(())
}
