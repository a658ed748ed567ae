//! The scheduler: records every job and result in its fjall store, answers RPC, and tracks the
//! other parts; plus the command line that talks to it, the all-in-one demo and the
//! benchmark.

mod agents;
pub mod archive;
pub mod bench;
pub mod cli;
pub mod cron;
pub mod demo;
mod groups;
mod intake;
mod journal;
mod limits;
pub mod pages;
pub mod retries;
pub mod schedules;
pub mod server;
pub mod store;

pub use server::{SchedulerConfig, run};
