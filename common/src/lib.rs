//! Everything the three Rota binaries agree on: the v1 wire types, the names of exchanges and
//! queues, the AMQP layer (a reconnecting connection, confirmed publishing, typed consuming),
//! configuration, telemetry and the shutdown signal.

pub mod amqp;
pub mod backoff;
pub mod client;
pub mod config;
pub mod group_commit;
pub mod heartbeat;
pub mod http;
pub mod metrics;
pub mod names;
pub mod roles;
pub mod schema;
pub mod shutdown;
pub mod telemetry;
pub mod users;
pub mod wire;

pub use names::Names;

/// The version of the Rota software, as reported in heartbeats.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
