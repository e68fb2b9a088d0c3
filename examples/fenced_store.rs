//! The resource side of fencing: a store that keeps the highest fencing token it has seen
//! per record and rejects writes that carry a lower one.
//!
//! A lease alone cannot stop a holder that stalls past its lease (a long GC pause, a
//! stopped VM) from writing after someone else took over. The fencing check can: here the
//! "database" is a Redis hash written through a conditional update, the same shape as
//! `UPDATE records SET value = $1, fence = $2 WHERE id = $3 AND fence <= $2` in SQL.
//!
//! Worker A runs on a runtime and thread of its own and stalls by blocking that thread, as
//! a pause does: nothing of A runs, not even its client's keep-alive. On Redis its short
//! lease runs out; on ZooKeeper (`LOCK_URL=zk://...` with the `zookeeper` feature; the
//! record stays in Redis) its session expires and the server deletes its lock node. Either
//! way worker B gets the lock with a higher token, and A's late write is rejected.
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

/// What worker A reports: its token and, after its stall, whether its write went in.
enum FromA {
    Holding(u64),
    Wrote(bool),
}

/// Worker A, on its own thread and runtime: takes the lock, reports its token, stalls (the
/// whole thread blocks) until `resume`, then writes with its stale token.
fn worker_a(
    lock_url: String,
    url: String,
    lock: String,
    record: String,
    report: std::sync::mpsc::Sender<FromA>,
    resume: std::sync::mpsc::Receiver<()>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (guard, token, store) = rt.block_on(async {
        // On ZooKeeper the default TTL is the session timeout asked for (the server
        // negotiates it, 4 s at least with its default tick).
        let locks = LockManager::builder()
            .with_default_options(LockOptions::new().with_ttl(Duration::from_millis(300)))
            .connect(&lock_url)
            .await
            .map_err(|e| e.to_string())?;
        let opts = LockOptions::new()
            .with_fencing(true)
            .with_ttl(Duration::from_millis(300));
        let guard = locks
            .lock_with(&lock, opts)
            .await
            .map_err(|e| e.to_string())?;
        let token = guard.fencing_token().ok_or("fenced leases carry a token")?;
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        let store = FencedStore {
            conn: client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?,
            write: Script::new(FENCED_WRITE),
        };
        Ok::<_, String>((guard, token, store))
    })?;
    report
        .send(FromA::Holding(token))
        .map_err(|e| e.to_string())?;
    // The stall: this thread, and so A's runtime, does nothing until B has taken over.
    let _ = resume.recv();
    rt.block_on(async {
        println!("A wakes up; its guard says is_held() = {}", guard.is_held());
        let wrote = store
            .write(&record, token, "written by A")
            .await
            .map_err(|e| e.to_string())?;
        report
            .send(FromA::Wrote(wrote))
            .map_err(|e| e.to_string())?;
        drop(guard);
        Ok(())
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // The lock may live elsewhere (`LOCK_URL`, e.g. `zk://127.0.0.1:2181/examples` with the
    // `zookeeper` feature); the record always lives in Redis.
    let lock_url = std::env::var("LOCK_URL").unwrap_or_else(|_| url.clone());
    let client = redis::Client::open(url.as_str())?;
    let store = FencedStore {
        conn: client.get_multiplexed_async_connection().await?,
        write: Script::new(FENCED_WRITE),
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (lock, record) = (
        format!("example:fenced:{id}"),
        format!("example:record:{id}"),
    );

    // Worker A takes a short lease, then stalls past it.
    let (report, from_a) = std::sync::mpsc::channel();
    let (resume_a, resume) = std::sync::mpsc::channel();
    let a = {
        let (lock_url, url, lock, record) =
            (lock_url.clone(), url.clone(), lock.clone(), record.clone());
        std::thread::spawn(move || worker_a(lock_url, url, lock, record, report, resume))
    };
    let from_a = std::sync::Arc::new(std::sync::Mutex::new(from_a));
    let next_from_a =
        |from_a: std::sync::Arc<std::sync::Mutex<std::sync::mpsc::Receiver<FromA>>>| {
            tokio::task::spawn_blocking(move || {
                from_a
                    .lock()
                    .map_err(|_| "poisoned".to_owned())?
                    .recv_timeout(Duration::from_secs(60))
                    .map_err(|_| "worker A did not report within 60 s".to_owned())
            })
        };
    let a_token = match next_from_a(from_a.clone()).await?? {
        FromA::Holding(token) => token,
        FromA::Wrote(_) => return Err("A wrote before it held the lock".into()),
    };
    println!("A holds the lock with fencing token {a_token}, then stalls");

    // Worker B waits for the lock: it gets it once A's lease (Redis) or session
    // (ZooKeeper) has run out, and writes.
    let locks = LockManager::connect(&lock_url).await?;
    let b = locks
        .lock_with(
            &lock,
            LockOptions::new()
                .with_fencing(true)
                .with_wait(Duration::from_secs(60)),
        )
        .await?;
    let b_token = b.fencing_token().ok_or("fenced leases carry a token")?;
    println!("B took over with fencing token {b_token}");
    if !store.write(&record, b_token, "written by B").await? {
        return Err("B's write was rejected".into());
    }
    println!("B wrote the record");

    // A wakes up, unaware, and writes with its stale token.
    resume_a.send(())?;
    let a_wrote = match next_from_a(from_a).await?? {
        FromA::Wrote(wrote) => wrote,
        FromA::Holding(_) => return Err("A reported twice".into()),
    };
    tokio::task::spawn_blocking(move || a.join())
        .await?
        .map_err(|_| "worker A panicked")??;
    if a_wrote {
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
