//! The whole daemon, started on an ephemeral port with its own database, Redis key prefix
//! and embedded Kafka cluster.

mod admin;
mod connections;
mod coupons;
mod daemon;
mod errors;
mod external;
mod external_kafka;
mod health;
mod openapi;
mod orders;
mod outbox;
mod push;
mod ranking;
mod security;
mod shutdown;
