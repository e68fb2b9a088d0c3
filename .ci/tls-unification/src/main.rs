//! `rediss://` with redis-rs' rustls on and distlock's `tls` feature off: every connect
//! returns a typed error, none panics. Exits non-zero otherwise.

use distlock::{Error, LockManager};

#[tokio::main]
async fn main() {
    // Nothing needs to listen: the URL is refused before any connection is made.
    let url = "rediss://127.0.0.1:1".to_owned();
    let single = {
        let url = url.clone();
        tokio::spawn(async move { LockManager::connect(&url).await.map(drop) }).await
    };
    let redlock = tokio::spawn(async move {
        LockManager::builder()
            .connect_redlock([url.as_str(), "rediss://127.0.0.1:2", "rediss://127.0.0.1:3"])
            .await
            .map(drop)
    })
    .await;
    let mut failed = 0;
    for (what, outcome) in [("connect", single), ("connect_redlock", redlock)] {
        match outcome {
            Ok(Err(Error::InvalidArgument(arg))) if arg.what() == "url" => {
                println!("{what}: typed error: {arg}");
            }
            Ok(other) => {
                failed += 1;
                println!("{what}: expected InvalidArgument(url), got {other:?}");
            }
            Err(panic) => {
                failed += 1;
                println!("{what}: PANICKED: {panic}");
            }
        }
    }
    println!("tls-unification: {} passed, {failed} failed", 2 - failed);
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
