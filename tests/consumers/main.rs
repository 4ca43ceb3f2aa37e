//! Consumer groups, partition actors and domain actors against an embedded Kafka cluster
//! and the real MariaDB.

#[path = "../support/mod.rs"]
mod support;

mod coupon_issuer;
mod failures;
mod flow;
mod helpers;
mod ranking_updater;
mod rebalance;
mod shutdown;
mod snapshots;
mod stock_shards;
