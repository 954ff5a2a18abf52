//! The worker's envelope protocol: what a job's properties and the worker's own `x-mcp-*`
//! headers say about a delivery ([`Envelope`]), and what a copy sent to a delay queue carries
//! back to the jobs queue ([`Carry`]).
//!
//! These headers are how a job remembers, across the delay queues, how often it already waited
//! and for what, and which claim it holds. `queue` does not know them: it reads and writes typed
//! header values and leaves their meaning here.

use crate::queue::{Delivery, Header};

/// Times a job was deferred waiting for its token.
pub(crate) const DEFERRALS_HEADER: &str = "x-mcp-deferrals";
/// Times a job was retried after its MCP server was unavailable.
pub(crate) const RETRIES_HEADER: &str = "x-mcp-retries";
/// Times a job waited for an unreachable database.
pub(crate) const WAITS_HEADER: &str = "x-mcp-waits";
/// The job claim a delayed job still holds, so that it can take it back.
pub(crate) const CLAIM_HEADER: &str = "x-mcp-claim";
/// The version of the user's token an MCP server refused (HTTP 401).
pub(crate) const REFUSED_VERSION_HEADER: &str = "x-mcp-refused-version";

/// What a delivery says about itself: its AMQP properties and the worker's counters.
#[derive(Debug, Clone, Default)]
pub(crate) struct Envelope {
    pub(crate) reply_to: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) message_id: Option<String>,
    /// Earlier deliveries of this message that ended without an ack.
    pub(crate) failed_deliveries: u32,
    /// Times the job already waited for its user's token.
    pub(crate) deferrals: u32,
    /// Times the job was already retried after its MCP server was unavailable.
    pub(crate) retries: u32,
    /// Times the job already waited for an unreachable database.
    pub(crate) waits: u32,
    /// The claim this delivery took back from a delay queue, if it held one.
    pub(crate) claim: Option<String>,
    /// The version of the user's token that the MCP server refused (HTTP 401) on an earlier
    /// delivery, which then waited for the refresher to renew it.
    pub(crate) refused_version: Option<i64>,
}

impl Envelope {
    /// What the rules need of `delivery`'s properties and counters.
    pub(super) fn of(delivery: &Delivery) -> Self {
        Self {
            reply_to: delivery.reply_to.clone(),
            correlation_id: delivery.correlation_id.clone(),
            message_id: delivery.message_id.clone(),
            failed_deliveries: delivery.failed_deliveries,
            deferrals: delivery.count_header(DEFERRALS_HEADER),
            retries: delivery.count_header(RETRIES_HEADER),
            waits: delivery.count_header(WAITS_HEADER),
            claim: delivery.text_header(CLAIM_HEADER),
            refused_version: delivery.integer_header(REFUSED_VERSION_HEADER),
        }
    }
}

/// What a job sent to a delay queue carries back to the jobs queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Carry {
    pub(crate) deferrals: u32,
    pub(crate) retries: u32,
    pub(crate) waits: u32,
    /// The owner of the job's claim, if this delivery held one.
    pub(crate) claim: Option<String>,
    /// The version of the user's token an MCP server refused, if one did.
    pub(crate) refused_version: Option<i64>,
}

impl Carry {
    /// The envelope's counters as they are, with `claim`.
    pub(super) fn of(envelope: &Envelope, claim: Option<&String>) -> Self {
        Self {
            deferrals: envelope.deferrals,
            retries: envelope.retries,
            waits: envelope.waits,
            claim: claim.cloned(),
            refused_version: envelope.refused_version,
        }
    }

    /// The header changes that write this carry onto the delayed copy (an absent claim or
    /// refused version removes the header, so a stale one does not ride along).
    pub(super) fn headers(&self) -> [(&'static str, Option<Header>); 5] {
        [
            (DEFERRALS_HEADER, Some(Header::Count(self.deferrals))),
            (RETRIES_HEADER, Some(Header::Count(self.retries))),
            (WAITS_HEADER, Some(Header::Count(self.waits))),
            (CLAIM_HEADER, self.claim.clone().map(Header::Text)),
            (REFUSED_VERSION_HEADER, self.refused_version.map(Header::Integer)),
        ]
    }
}
