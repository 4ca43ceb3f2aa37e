//! Consumer groups, partition actors and domain actors against an embedded Kafka cluster
//! and the real MariaDB.

mod coupon_issuer;
mod decision_order;
mod failures;
mod flow;
mod group_queue;
mod ranking_updater;
mod rebalance;
mod shutdown;
mod snapshots;
mod stock_shards;
