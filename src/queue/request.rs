//! Request/reply from the client side, for `mcp-worker call`: publish one job and wait for its
//! reply on RabbitMQ's direct reply-to pseudo-queue, which needs no queue of its own.

use std::time::Duration;

use futures::StreamExt;
use lapin::Confirmation;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;

use super::publisher::{DIRECT_REPLY_TO, persistent_json};
use super::{Broker, QueueError};

impl Broker {
    /// Publishes `body` to `queue` as a persistent JSON message with the given ids, then waits up
    /// to `timeout` for the reply. `None` means no reply came in time.
    pub async fn request(
        &self,
        queue: &str,
        message_id: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let channel = self.connection().create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        // Direct reply-to requires consuming (with auto-ack) before publishing on the same channel.
        let mut replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await?;
        let properties = persistent_json()
            .with_message_id(message_id.into())
            .with_correlation_id(message_id.into())
            .with_reply_to(DIRECT_REPLY_TO.into());
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        match channel.basic_publish("".into(), queue.into(), options, body, properties).await?.await? {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(_)) => {
                return Err(QueueError::Channel(format!("no queue named `{queue}`; is a worker running?")));
            }
            Confirmation::Nack(_) | Confirmation::NotRequested => return Err(QueueError::Nacked),
        }
        let reply = tokio::time::timeout(timeout, replies.next()).await;
        let _ = channel.close(200, "done".into()).await;
        match reply {
            Err(_) => Ok(None),
            Ok(None) => Err(QueueError::Channel("the reply consumer closed".into())),
            Ok(Some(delivery)) => Ok(Some(delivery?.data)),
        }
    }
}
