//! Many short runs from several concurrent `distlock run` loops, as cron on several hosts
//! would start them: every critical section is exclusive.

use std::thread;

use crate::support::{Redis, Scratch, distlock, output};

const WORKERS: usize = 4;
const RUNS_PER_WORKER: usize = 8;

#[test]
fn concurrent_short_runs_never_overlap() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let log = dir.file("log");
    // A critical section that would interleave with another one: begin, a pause, end.
    let section = format!(
        "echo \"begin $$ $DISTLOCK_FENCING_TOKEN\" >> {log}; sleep 0.02; echo \"end $$\" >> {log}"
    );

    let ran: Vec<usize> = thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (redis, section) = (&redis, &section);
                s.spawn(move || {
                    let mut ran = 0;
                    for _ in 0..RUNS_PER_WORKER {
                        let mut cmd = distlock(redis);
                        cmd.arg("run");
                        // Half the workers skip a busy lock as `flock -n` would, half wait.
                        if w % 2 == 0 {
                            cmd.arg("--no-wait");
                        } else {
                            cmd.args(["--wait", "20s"]);
                        }
                        cmd.args(["cron", "--", "sh", "-c", section]);
                        let done = output(cmd);
                        match done.code() {
                            0 => ran += 1,
                            75 if w % 2 == 0 => {}
                            _ => panic!("worker {w}: {done:?}"),
                        }
                    }
                    ran
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });

    let text = dir.read("log");
    let lines: Vec<&str> = text.lines().collect();
    let total: usize = ran.iter().sum();
    assert!(
        total >= WORKERS / 2 * RUNS_PER_WORKER,
        "the waiting workers all ran: {ran:?}"
    );
    assert_eq!(lines.len(), 2 * total, "{text}");
    let mut last_token = 0u64;
    for pair in lines.chunks(2) {
        let begin: Vec<&str> = pair[0].split(' ').collect();
        assert_eq!(begin.len(), 3, "{text}");
        assert_eq!(begin[0], "begin", "sections overlap:\n{text}");
        assert_eq!(
            pair[1],
            format!("end {}", begin[1]),
            "sections overlap:\n{text}"
        );
        let token: u64 = begin[2].parse().expect("a fencing token");
        assert!(
            token > last_token,
            "fencing tokens grow in lock order:\n{text}"
        );
        last_token = token;
    }
    assert!(!redis.is_locked("cron"));
}
