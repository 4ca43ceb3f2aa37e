//! The pieces commerce-events' integration tests and benchmarks share, in one place:
//!
//! - [`wait`]: `eventually`, the one way to wait for something (poll with a deadline).
//! - [`database`]: a test's own database, Redis key prefix and embedded cluster (its
//!   settings); the tests' log (`TEST_LOG`).
//! - [`app`]: the whole daemon in the test's process on an ephemeral port ([`app::TestApp`]),
//!   and requests to it as a user, an admin or anonymously.
//! - [`pipeline`], [`handler`], [`records`]: a consumer group on its own cluster with a
//!   scripted domain handler; events to publish and records to read back.
//! - [`receiver`]: a scripted HTTP receiver (webhooks, alerts, OTLP spans).
//! - [`process`]: the built daemon binary, `commerce-events broker` and tansu, run as
//!   processes; [`proxy`]: a TCP proxy a test cuts.
//! - [`faults`]: counted load, the fault checker and the drills' slots.

pub mod app;
pub mod database;
pub mod faults;
pub mod handler;
pub mod pipeline;
pub mod process;
pub mod proxy;
pub mod receiver;
pub mod records;
pub mod wait;
