//! placeholder docs (the lead writes the crate docs)

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod model;
pub mod server;
pub mod store;
