//! Leader election with a lease: one leader holds and extends the lease; when it dies
//! without releasing, another candidate takes over within the TTL.
//!
//! Redis only: it shows a leader whose lease runs out after it dies, which a process
//! cannot stage on ZooKeeper by itself (there the lease is the session, kept alive by the
//! client while the process lives).
//!
//! ```sh
//! scripts/redis-up.sh && cargo run --example leader_election
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock::{Backoff, LockManager, LockOptions};
use tokio::sync::{Mutex, watch};

const TTL: Duration = Duration::from_millis(1500);
const CANDIDATES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Elected(usize, Instant),
    Crashed(usize, Instant),
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let key = format!("example:leader:{}", uuid::Uuid::new_v4().simple());
    let log = Arc::new(Mutex::new(Vec::<Event>::new()));
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut tasks = Vec::new();
    for id in 0..CANDIDATES {
        let locks = LockManager::connect(&url).await?;
        let key = key.clone();
        let log = Arc::clone(&log);
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let opts = LockOptions::new()
                .with_ttl(TTL)
                .with_fencing(true)
                .with_wait(Duration::from_secs(10))
                .with_backoff(Backoff::new().with_cap(Duration::from_millis(100)));
            loop {
                if *stop.borrow() {
                    return Ok::<_, distlock::Error>(());
                }
                let guard = tokio::select! {
                    got = locks.lock_with(&key, opts) => match got {
                        Ok(guard) => guard,
                        Err(e) if e.is_held_by_other() => continue,
                        Err(e) => return Err(e),
                    },
                    _ = stop.changed() => return Ok(()),
                };
                log.lock().await.push(Event::Elected(id, Instant::now()));
                println!(
                    "candidate {id} is the leader (fencing token {:?})",
                    guard.fencing_token()
                );
                // Lead for a while, extending the lease every TTL/3 ...
                for _ in 0..4 {
                    tokio::time::sleep(TTL / 3).await;
                    guard.extend(TTL).await?;
                }
                // ... then die without releasing: the lease must run out by itself.
                log.lock().await.push(Event::Crashed(id, Instant::now()));
                println!("candidate {id} crashes while leading (no release)");
                std::mem::forget(guard);
                return Ok(());
            }
        }));
    }

    // Wait until every candidate has led and crashed: that makes two takeovers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let log = log.lock().await;
        if log
            .iter()
            .filter(|e| matches!(e, Event::Crashed(..)))
            .count()
            == CANDIDATES
        {
            break;
        }
        if Instant::now() > deadline {
            return Err("the candidates did not all get to lead within 30 s".into());
        }
    }
    stop_tx.send(true)?;
    for t in tasks {
        t.await??;
    }

    let log = log.lock().await.clone();
    let mut takeovers = Vec::new();
    for pair in log.windows(2) {
        match pair {
            [Event::Crashed(a, crashed), Event::Elected(b, elected)] => {
                let gap = elected.duration_since(*crashed);
                println!("leader {a} crashed; candidate {b} took over after {gap:?}");
                takeovers.push(gap);
            }
            [Event::Elected(..), Event::Elected(..)] => {
                return Err("two leaders elected without a crash in between".into());
            }
            _ => {}
        }
    }
    if takeovers.len() != CANDIDATES - 1 {
        return Err(format!(
            "expected {} takeovers, saw {}",
            CANDIDATES - 1,
            takeovers.len()
        )
        .into());
    }
    // The dead leader's last extend left TTL on its lease: nobody may take over before it
    // runs out, and a waiter gets it at most one backoff step (100 ms cap) later.
    let (low, high) = (
        TTL - Duration::from_millis(50),
        TTL + Duration::from_millis(150),
    );
    if let Some(gap) = takeovers.iter().find(|gap| **gap < low || **gap > high) {
        return Err(format!("a takeover after {gap:?}, outside [{low:?}, {high:?}]").into());
    }
    println!(
        "ok: never two leaders at once; each takeover came when the dead leader's lease ran out (TTL {TTL:?}, within one backoff step)"
    );
    Ok(())
}
