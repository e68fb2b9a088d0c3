//! A hostile `ConnectionLike`: real connections to one real server, with a plan that decides,
//! per command, how badly the "network" behaves.
//!
//! [`HostileConnection`] wraps two or more [`MultiplexedConnection`]s to the same server. For
//! every command it asks the current plan (a closure over [`CommandInfo`]) for an [`Action`]:
//!
//! - [`Action::via`]: which real connection carries the command. Commands on different
//!   connections are not ordered with respect to each other.
//! - [`Action::delay_send`]: wait this long before the command is queued. Dropping the
//!   caller's future during this wait means the command is never sent (like a pool that had
//!   not yet handed out a connection). Combined with routing, a command sent first can be
//!   executed after a later one.
//! - [`Action::delay_reply`]: the command executes at once, its reply is held back this
//!   long (a slow link back, a paused client thread).
//! - [`Action::lose_reply`]: the command executes, but the caller gets an io `TimedOut`
//!   error after the given delay instead of the reply.
//!
//! Once a command is queued (after `delay_send`) it runs on a spawned task: dropping the
//! caller's future no longer stops it, exactly as with a real multiplexed connection whose
//! request already left.
//!
//! The plan is shared by all clones and can be changed at any time with
//! [`HostileConnection::set_plan`]; the default plan passes everything through connection 0
//! untouched. Each command gets a sequence number ([`CommandInfo::seq`]) from a counter
//! shared by all clones.
//!
//! The underlying connections have a response timeout of their own (10 s) only as a last
//! resort; a manager built on this connection should keep distlock's own command timer
//! (i.e. do not call `connection_enforces_timeout()`).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, Value};

/// What the plan sees of one command (or of the first command of a pipeline).
#[derive(Debug, Clone)]
pub struct CommandInfo {
    /// Upper-case command name, e.g. `"EVALSHA"`, `"SCRIPT"`, `"PING"`.
    pub name: String,
    /// For `EVALSHA`: the script SHA (lower-case hex).
    pub sha: Option<String>,
    /// Every argument after the name, raw.
    pub args: Vec<Vec<u8>>,
    /// Sequence number of this command over all clones, from 0.
    pub seq: u64,
    /// `true` when this is the first command of a pipeline (the action applies to all).
    pub pipeline: bool,
}

impl CommandInfo {
    /// Whether any argument equals `needle` (e.g. a lease key).
    pub fn has_arg(&self, needle: &[u8]) -> bool {
        self.args.iter().any(|a| a == needle)
    }

    /// Whether any argument contains `needle` as a substring.
    pub fn mentions(&self, needle: &[u8]) -> bool {
        self.args
            .iter()
            .any(|a| a.windows(needle.len().max(1)).any(|w| w == needle))
    }

    /// `EVALSHA` of `script` (a `redis::Script`).
    pub fn is_script(&self, script: &redis::Script) -> bool {
        self.sha.as_deref() == Some(script.get_hash())
    }
}

/// How one command is mistreated. `Action::default()` passes it through connection 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Action {
    /// Index of the real connection (modulo the number of connections).
    pub route: usize,
    /// Wait before the command is queued; cancellable.
    pub send_delay: Duration,
    /// Wait between the server's reply and handing it to the caller.
    pub reply_delay: Duration,
    /// `Some(d)`: the command executes, the caller gets `TimedOut` after `d`.
    pub lost_reply_after: Option<Duration>,
}

impl Action {
    /// Pass through connection 0, no delay.
    pub fn pass() -> Self {
        Action::default()
    }

    /// Carry the command on real connection `index`.
    pub fn via(mut self, index: usize) -> Self {
        self.route = index;
        self
    }

    /// Wait `d` before the command is queued.
    pub fn delay_send(mut self, d: Duration) -> Self {
        self.send_delay = d;
        self
    }

    /// Hold the reply back for `d`.
    pub fn delay_reply(mut self, d: Duration) -> Self {
        self.reply_delay = d;
        self
    }

    /// Execute the command but answer the caller with `TimedOut` after `d`.
    pub fn lose_reply(mut self, d: Duration) -> Self {
        self.lost_reply_after = Some(d);
        self
    }
}

type Plan = Arc<dyn Fn(&CommandInfo) -> Action + Send + Sync>;

/// See the module docs.
#[derive(Clone)]
pub struct HostileConnection {
    conns: Arc<Vec<MultiplexedConnection>>,
    plan: Arc<Mutex<Plan>>,
    seq: Arc<AtomicU64>,
}

impl HostileConnection {
    /// `n` (at least 2) real connections to `client`'s server.
    pub async fn connect(client: &redis::Client, n: usize) -> HostileConnection {
        assert!(n >= 2, "a hostile connection needs at least two real ones");
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .expect("hostile connection: connect to the test node");
            conns.push(conn);
        }
        HostileConnection {
            conns: Arc::new(conns),
            plan: Arc::new(Mutex::new(Arc::new(|_: &CommandInfo| Action::pass()))),
            seq: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Replaces the plan for every clone, from the next command on.
    pub fn set_plan(&self, plan: impl Fn(&CommandInfo) -> Action + Send + Sync + 'static) {
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(plan);
    }

    /// Back to passing everything through untouched.
    pub fn clear_plan(&self) {
        self.set_plan(|_| Action::pass());
    }

    /// How many commands (pipelines count once) went through all clones so far.
    pub fn commands_seen(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    fn decide(&self, first: &Cmd, pipeline: bool) -> (Action, MultiplexedConnection) {
        let mut args = first.args_iter().filter_map(|a| match a {
            redis::Arg::Simple(bytes) => Some(bytes.to_vec()),
            _ => None,
        });
        let name = args
            .next()
            .map(|n| String::from_utf8_lossy(&n).to_ascii_uppercase())
            .unwrap_or_default();
        let args: Vec<Vec<u8>> = args.collect();
        let sha = (name == "EVALSHA")
            .then(|| {
                args.first()
                    .map(|s| String::from_utf8_lossy(s).to_lowercase())
            })
            .flatten();
        let info = CommandInfo {
            name,
            sha,
            args,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            pipeline,
        };
        let plan = Arc::clone(&self.plan.lock().unwrap_or_else(|p| p.into_inner()));
        let action = plan(&info);
        let conn = self.conns[action.route % self.conns.len()].clone();
        (action, conn)
    }
}

fn lost_reply() -> RedisError {
    io::Error::new(io::ErrorKind::TimedOut, "hostile connection: reply lost").into()
}

/// Applies `action` around `request`, which runs on a spawned task once queued.
async fn mistreat<T: Send + 'static>(
    action: Action,
    request: impl std::future::Future<Output = redis::RedisResult<T>> + Send + 'static,
) -> redis::RedisResult<T> {
    if !action.send_delay.is_zero() {
        tokio::time::sleep(action.send_delay).await;
    }
    let task = tokio::spawn(request);
    if let Some(after) = action.lost_reply_after {
        tokio::time::sleep(after).await;
        return Err(lost_reply());
    }
    let reply = match task.await {
        Ok(reply) => reply,
        Err(join) => Err(io::Error::other(format!("hostile connection task: {join}")).into()),
    };
    if !action.reply_delay.is_zero() {
        tokio::time::sleep(action.reply_delay).await;
    }
    reply
}

impl ConnectionLike for HostileConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let (action, mut conn) = self.decide(cmd, false);
        let cmd = cmd.clone();
        Box::pin(mistreat(action, async move {
            conn.req_packed_command(&cmd).await
        }))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let first = pipeline.cmd_iter().next().cloned().unwrap_or_default();
        let (action, mut conn) = self.decide(&first, true);
        let pipeline = pipeline.clone();
        Box::pin(mistreat(action, async move {
            conn.req_packed_commands(&pipeline, offset, count).await
        }))
    }

    fn get_db(&self) -> i64 {
        self.conns[0].get_db()
    }
}
