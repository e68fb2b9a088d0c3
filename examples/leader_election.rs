//! Leader election with a lease: one leader holds and extends the lease; when it dies
//! without releasing, another candidate takes over once the dead leader's lease is over.
//!
//! Each candidate runs on a thread and runtime of its own, as a process would; a leader
//! "dies" by hanging: its thread blocks, so nothing of it runs any more, not even its
//! client's keep-alive. On Redis its lease runs out with its TTL; on ZooKeeper
//! (`LOCK_URL=zk://...` with the `zookeeper` feature) its session expires and the server
//! deletes its lock node. Either way the next leader is elected no earlier than the dead
//! leader's `valid_until()`.
//!
//! ```sh
//! scripts/redis-up.sh && cargo run --example leader_election
//! ```

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{Backoff, LockManager, LockOptions};

const TTL: Duration = Duration::from_millis(1500);
const CANDIDATES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Elected(usize, Instant),
    /// A leader hung, at this instant, believing its lease valid until the second one.
    Crashed(usize, Instant, Instant),
}

type Log = Arc<Mutex<Vec<Event>>>;

fn record(log: &Log, event: Event) {
    if let Ok(mut log) = log.lock() {
        log.push(event);
    }
}

/// One candidate on its own thread and runtime: waits to be elected, leads for a while,
/// then hangs (blocks its thread) until `revive` is dropped at the end of the example.
fn candidate(id: usize, lock_url: String, key: String, log: Log, revive: mpsc::Receiver<()>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return eprintln!("candidate {id}: no runtime: {e}"),
    };
    let guard = rt.block_on(async {
        // On ZooKeeper the default TTL is the session timeout asked for (the server
        // negotiates it, 4 s at least with its default tick).
        let locks = LockManager::builder()
            .with_default_options(LockOptions::new().with_ttl(TTL))
            .connect(&lock_url)
            .await?;
        let opts = LockOptions::new()
            .with_ttl(TTL)
            .with_fencing(true)
            .with_wait(Duration::from_secs(60))
            .with_backoff(Backoff::new().with_cap(Duration::from_millis(100)));
        let guard = locks.lock_with(&key, opts).await?;
        record(&log, Event::Elected(id, Instant::now()));
        println!(
            "candidate {id} is the leader (fencing token {:?})",
            guard.fencing_token()
        );
        // Lead for a while, extending the lease every TTL/3 ...
        for _ in 0..4 {
            tokio::time::sleep(TTL / 3).await;
            guard.extend(TTL).await?;
        }
        Ok::<_, distlock::Error>(guard)
    });
    let guard = match guard {
        Ok(guard) => guard,
        Err(e) => return eprintln!("candidate {id}: {e}"),
    };
    // ... then hang without releasing: the lease must end by itself.
    record(
        &log,
        Event::Crashed(id, Instant::now(), guard.valid_until()),
    );
    println!("candidate {id} hangs while leading (no release)");
    let _ = revive.recv();
    // The example is over: let the runtime clean up (the lease is long gone).
    rt.block_on(async move { drop(guard) });
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // The lock may live elsewhere (`LOCK_URL`, e.g. `zk://127.0.0.1:2181/examples` with the
    // `zookeeper` feature).
    let lock_url = std::env::var("LOCK_URL").unwrap_or_else(|_| url.clone());
    let on_zookeeper = lock_url.starts_with("zk://");
    let key = format!("example:leader:{}", uuid::Uuid::new_v4().simple());
    let log: Log = Arc::new(Mutex::new(Vec::new()));

    let mut revive = Vec::new();
    let mut threads = Vec::new();
    for id in 0..CANDIDATES {
        let (tx, rx) = mpsc::channel();
        revive.push(tx);
        let (lock_url, key, log) = (lock_url.clone(), key.clone(), Arc::clone(&log));
        threads.push(std::thread::spawn(move || {
            candidate(id, lock_url, key, log, rx)
        }));
    }

    // Wait until every candidate has led and hung: that makes two takeovers. A ZooKeeper
    // session outlives its last ping by the negotiated timeout (seconds), so allow more.
    let limit = if on_zookeeper { 120 } else { 30 };
    let deadline = Instant::now() + Duration::from_secs(limit);
    let events = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let events = log.lock().map_err(|_| "log poisoned")?.clone();
        let crashed = events
            .iter()
            .filter(|e| matches!(e, Event::Crashed(..)))
            .count();
        if crashed == CANDIDATES {
            break events;
        }
        if Instant::now() > deadline {
            return Err(format!("the candidates did not all get to lead within {limit} s").into());
        }
    };
    drop(revive);
    for thread in threads {
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| "a candidate panicked")?;
    }

    let mut takeovers = Vec::new();
    for pair in events.windows(2) {
        match pair {
            [
                Event::Crashed(a, crashed, valid_until),
                Event::Elected(b, elected),
            ] => {
                let gap = elected.duration_since(*crashed);
                println!("leader {a} hung; candidate {b} took over after {gap:?}");
                // Never while the dead leader could still believe it leads.
                if elected < valid_until {
                    return Err(format!(
                        "candidate {b} was elected {:?} before leader {a}'s lease ended",
                        valid_until.duration_since(*elected)
                    )
                    .into());
                }
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
    if !on_zookeeper {
        // On Redis the dead leader's last extend left TTL on its lease: a waiter gets it
        // at most one backoff step (100 ms cap) after it runs out.
        let high = TTL + Duration::from_millis(150);
        if let Some(gap) = takeovers.iter().find(|gap| **gap > high) {
            return Err(format!("a takeover after {gap:?}, later than {high:?}").into());
        }
    }
    println!(
        "ok: never two leaders at once; each takeover came after the dead leader's lease ended"
    );
    Ok(())
}
