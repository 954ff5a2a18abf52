//! Group commit: requests that arrive while a database command is in flight go out together in
//! the next one. An idle store sends each request at once (no waiting for a batch to fill); a
//! busy one sends one command per batch, so the database round trips per job fall as load rises.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// Requests waiting beyond this many go in the batch after.
const MAX_BATCH: usize = 256;

type Pending<Req, Resp> = (Req, oneshot::Sender<Result<Resp, StoreError>>);

pub(super) struct Batcher<Req, Resp> {
    requests: mpsc::UnboundedSender<Pending<Req, Resp>>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Self { requests: self.requests.clone() }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Starts the task that runs batches with `run`, which answers each request in order. The
    /// task ends when the last handle is dropped.
    pub(super) fn spawn<F, Fut>(run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<Resp, StoreError>>> + Send,
    {
        let (requests, mut pending) = mpsc::unbounded_channel::<Pending<Req, Resp>>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while pending.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (requests, answers): (Vec<_>, Vec<_>) = std::mem::take(&mut batch).into_iter().unzip();
                for (answer, result) in answers.into_iter().zip(run(requests).await) {
                    // The requester may have given up (its job was cancelled); nothing to do then.
                    let _ = answer.send(result);
                }
            }
        });
        Self { requests }
    }

    /// Sends `request` with the next batch and waits for its answer.
    pub(super) async fn submit(&self, request: Req) -> Result<Resp, StoreError> {
        let (answer, answered) = oneshot::channel();
        let gone = || StoreError::Unavailable("the batching task has stopped".into());
        self.requests.send((request, answer)).map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}
