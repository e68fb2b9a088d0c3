//! `distlock status` and `distlock release --force`.

use crate::support::{Redis, Scratch, distlock, output, start, wait_until};

fn cli(redis: &Redis, args: &[&str]) -> crate::support::Finished {
    let mut cmd = distlock(redis);
    cmd.args(args);
    output(cmd)
}

#[test]
fn status_says_free_or_held_with_the_remaining_time() {
    let redis = Redis::start();
    let free = cli(&redis, &["status", "job"]);
    assert_eq!(free.code(), 1, "{free:?}");
    assert!(free.stdout.starts_with("lock job: free"), "{free:?}");

    let dir = Scratch::new();
    let mut holder = distlock(&redis);
    holder
        .args(["run", "job", "--", "sh", "-c"])
        .arg(format!("touch {}; exec sleep 30", dir.file("ready")));
    let (_holder, _) = start(holder);
    wait_until("the holder runs", || dir.exists("ready"));

    let held = cli(&redis, &["status", "--show-token", "job"]);
    assert_eq!(held.code(), 0, "{held:?}");
    assert!(held.stdout.starts_with("lock job: held"), "{held:?}");
    assert!(held.stdout.contains("expires in"), "{held:?}");
    assert!(held.stdout.contains("holder token"), "{held:?}");
}

#[test]
fn release_force_asks_for_confirmation_and_with_yes_breaks_the_lease() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let mut holder = distlock(&redis);
    holder
        .args(["run", "--ttl", "1500ms", "job", "--", "sh", "-c"])
        .arg(format!("touch {}; exec sleep 60", dir.file("ready")));
    let (holder, started) = start(holder);
    wait_until("the holder runs", || dir.exists("ready"));

    let unforced = cli(&redis, &["release", "job"]);
    assert_eq!(unforced.code(), 2, "--force is required: {unforced:?}");
    let unconfirmed = cli(&redis, &["release", "--force", "job"]);
    assert_eq!(
        unconfirmed.code(),
        2,
        "no terminal to ask on: {unconfirmed:?}"
    );
    assert!(unconfirmed.stderr.contains("--yes"), "{unconfirmed:?}");
    assert!(redis.is_locked("job"));

    let released = cli(&redis, &["release", "--force", "--yes", "job"]);
    assert_eq!(released.code(), 0, "{released:?}");
    // The holder finds its lease gone at its next renewal and stops its command.
    let holder = holder.finish(started);
    assert_eq!(holder.code(), 79, "{holder:?}");
    let again = cli(&redis, &["release", "--force", "--yes", "job"]);
    assert_eq!(again.code(), 1, "nothing left to release: {again:?}");
}
