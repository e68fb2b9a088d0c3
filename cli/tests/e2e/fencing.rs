//! The command sees the lock in its environment.

use crate::support::{Redis, distlock, output};

const PRINT_ENV: &str = "echo \"$DISTLOCK_NAME ${DISTLOCK_FENCING_TOKEN-unset}\"";

#[test]
fn the_command_sees_the_lock_name_and_a_fencing_token_that_grows_between_runs() {
    let redis = Redis::start();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let mut cmd = distlock(&redis);
        cmd.args(["run", "jobs:nightly", "--", "sh", "-c", PRINT_ENV]);
        let done = output(cmd);
        assert_eq!(done.code(), 0, "{done:?}");
        let (name, token) = done.stdout.trim().split_once(' ').expect("two words");
        assert_eq!(name, "jobs:nightly");
        tokens.push(token.parse::<u64>().expect("a number"));
    }
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

#[test]
fn several_urls_lock_on_a_majority_and_pass_no_fencing_token() {
    let nodes = [Redis::start(), Redis::start(), Redis::start()];
    let urls: Vec<String> = nodes.iter().map(|n| format!("--url {}", n.url())).collect();
    let urls = urls.join(" ");
    let mut cmd = distlock(&nodes[0]);
    cmd.env_remove("DISTLOCK_URL")
        // An outer token must not pass for this lock's.
        .env("DISTLOCK_FENCING_TOKEN", "7");
    cmd.args(urls.split(' '));
    cmd.args(["run", "job", "--", "sh", "-c"]).arg(format!(
        "{PRINT_ENV}; \"$DISTLOCK_BIN\" {urls} status job | head -1"
    ));
    let done = output(cmd);
    assert_eq!(done.code(), 0, "{done:?}");
    assert_eq!(done.stdout, "job unset\nlock job: held\n", "{done:?}");
    assert!(nodes.iter().all(|n| !n.is_locked("job")));
}
