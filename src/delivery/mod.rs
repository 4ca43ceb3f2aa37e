//! Delivering events to external systems: webhooks (and the analytics file), the first
//! attempt inside the partition's batch (the forwarder), later attempts on a back-off
//! schedule kept in MySQL (the retry scheduler), dead letters and their replay.

pub mod backoff;
pub mod forwarder;
pub mod scheduler;
pub mod webhook;
