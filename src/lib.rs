//! mcp-worker runs MCP tool calls on behalf of chat users.
//!
//! Jobs arrive on RabbitMQ ([`queue`]); for each, the worker ([`worker`]) routes the tool to an
//! MCP server ([`registry`]), reads the user's OAuth token from MongoDB ([`store`]) when that
//! server needs one, calls the tool over Streamable HTTP with the token in a header ([`mcp`]), and
//! publishes the reply ([`job`] holds the wire format). A job may instead ask for the user's
//! tool catalog ([`catalog`]), which the HTTP API ([`api`]) also serves. [`app`] wires the parts
//! together; docs/ARCHITECTURE.md has the map.

mod api;
pub mod app;
mod catalog;
pub mod config;
pub mod crypto;
pub mod dates;
mod early_refresh;
mod events;
pub mod job;
pub mod mcp;
pub mod messages;
mod metrics;
pub mod oauth;
mod once;
mod outbound;
mod owner;
mod panics;
pub mod provider;
pub mod queue;
pub mod redact;
pub mod refresher;
pub mod registry;
pub mod secret;
pub mod store;
pub mod telemetry;
mod token_events;
mod worker;
