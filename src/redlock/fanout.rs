//! Asking every node at once, each bounded in time, without spawning: nothing outlives a
//! dropped call.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use crate::error::{Error, Result};

/// Runs `call`, or gives up after `limit` with a timeout error.
pub(crate) async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(answer) => answer,
        Err(_) => Err(no_answer(limit)),
    }
}

/// The error of a node that did not answer within `limit`.
pub(crate) fn no_answer(limit: Duration) -> Error {
    Error::timed_out(format!("no answer within {limit:?}"))
}

/// Polls every future on the current task until all are done; outputs in input order.
///
/// Enough for a handful of nodes, needs no spawning (so nothing outlives a dropped call)
/// and no dependency beyond std.
pub(crate) async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    poll_fn(move |cx| {
        let mut all_done = true;
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            Poll::Ready(outputs.iter_mut().filter_map(Option::take).collect())
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn join_all_keeps_input_order_and_polls_every_future() {
        use tokio::sync::oneshot;
        // Each future waits for the one after it: run one at a time, in order, they would
        // never finish; the timeout turns that into a failure instead of a hang.
        let (to_first, first) = oneshot::channel::<()>();
        let (to_second, second) = oneshot::channel::<()>();
        let futures: Vec<Pin<Box<dyn Future<Output = u8> + Send>>> = vec![
            Box::pin(async move {
                first.await.ok();
                0
            }),
            Box::pin(async move {
                second.await.ok();
                to_first.send(()).ok();
                1
            }),
            Box::pin(async move {
                to_second.send(()).ok();
                2
            }),
        ];
        let out = tokio::time::timeout(Duration::from_secs(5), join_all(futures))
            .await
            .expect("join_all polls every future, not one after another");
        assert_eq!(out, [0, 1, 2]);
    }
}
