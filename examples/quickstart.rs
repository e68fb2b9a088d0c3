//! Take a lock, show that a second client cannot take it meanwhile, release it.
//!
//! ```sh
//! scripts/redis-up.sh            # a Redis in Docker on 127.0.0.1:6379
//! cargo run --example quickstart  # or REDIS_URL=redis://host:port cargo run --example quickstart
//! ```

use std::time::Duration;

use distlock::{Error, LockManager, LockOptions};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // Two managers stand for two processes that share only the Redis server.
    let alice = LockManager::connect(&url).await?;
    let bob = LockManager::connect(&url).await?;

    // Fencing tokens (off by default) let the protected resource reject a stale holder.
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(10))
        .with_fencing(true);
    let guard = alice.lock_with("quickstart:report", opts).await?;
    let guard_token = guard.fencing_token();
    println!(
        "alice holds quickstart:report (fencing token {:?}, valid for {:?})",
        guard.fencing_token(),
        guard.remaining()
    );

    match bob.try_lock("quickstart:report").await {
        Err(Error::Contended { retry_after, .. }) => {
            println!("bob cannot take it while alice holds it (retry after {retry_after:?})")
        }
        Ok(_) => return Err("mutual exclusion violated: bob got a held lock".into()),
        Err(e) => return Err(e.into()),
    }

    // Bob waits (with backoff, up to 5 s) while alice finishes her work.
    let waiter = tokio::spawn(async move {
        let opts = LockOptions::new()
            .with_wait(Duration::from_secs(5))
            .with_fencing(true);
        bob.lock_with("quickstart:report", opts).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // the "work"
    guard.release().await?;
    println!("alice released it");

    let bobs = waiter.await??;
    if bobs.fencing_token() <= guard_token {
        return Err("fencing tokens must increase from one holder to the next".into());
    }
    println!(
        "bob got it after alice released (fencing token {:?}, higher than alice's)",
        bobs.fencing_token()
    );
    bobs.release().await?;
    println!("ok: one holder at a time, and the next holder got a higher fencing token");
    Ok(())
}
