//! The whole daemon, started on an ephemeral port with its own database, Redis key prefix
//! and embedded Kafka cluster.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod coupons;
mod daemon;
mod errors;
mod external;
mod external_kafka;
mod health;
mod helpers;
mod openapi;
mod orders;
mod outbox;
mod push;
mod ranking;
mod security;
mod shutdown;
