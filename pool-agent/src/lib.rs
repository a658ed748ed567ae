//! The pool agent: takes jobs from the RabbitMQ queues it serves, runs each on a Worker of its
//! pool, keeps every result in a sled outbox until the scheduler's receipt, and says it is
//! alive on the heartbeats exchange.
//!
//! The path of one job: [`intake`] reads and checks the delivery (dead-lettering what cannot
//! run), [`agent`] runs it on a worker from the [`pool`], stores the result in the
//! [`outbox`], acks, and sends the result (several at once when several wait: [`results`]);
//! the receipt deletes it from the outbox.

mod agent;
pub mod config;
pub mod container;
mod fit;
mod intake;
mod metrics;
pub mod outbox;
mod paused;
pub mod pool;
pub mod process;
mod recent;
mod results;

pub use agent::run;
pub use config::AgentConfig;
