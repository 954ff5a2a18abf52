//! Integration tests against the real services: RabbitMQ, a MongoDB-wire server (SecantusDB) and
//! the official MCP Python SDK's servers. Start them with `scripts/services up`; `scripts/test`
//! does that and then runs this suite.

mod catalog;
mod cli;
mod compose;
mod connect;
mod guarantees;
mod hostile_mcp;
mod hostile_oauth;
mod hostile_process;
mod job_path;
mod jobs;
mod mcp_interop;
mod migrations;
mod operate;
mod python_client;
mod queues;
mod readme;
mod refresher;
mod schemas;
mod secrets;
mod store;
mod support;
