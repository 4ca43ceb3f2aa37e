//! An actor-based Kafka event processor for an e-commerce backend.
//!
//! How data flows:
//!
//! ```text
//!  HTTP request ──► api ──► one MySQL transaction: business rows + event_log PENDING (outbox)
//!                    │
//!                    └──► after commit: kafka::producer ──► Kafka topic (key = user, order…)
//!                                                             │
//!  actors::outbox_relay ── republishes rows left PENDING ─────┘
//!                                                             ▼
//!  kafka::consumer (one member per consumer group, polling thread, rebalances)
//!      └──► actors::consumer_group ──► actors::partition (one actor per assigned partition)
//!                                          │ decode (events) ── bad record ──► <topic>.DLT
//!                                          ▼
//!                                   actors::domain (supervised, owns the topic's logic)
//!                                          │ effects + event_log transition, idempotent by event id
//!                                          ▼
//!                                   offset stored and committed after the answer
//! ```
//!
//! Modules:
//! - [`config`]: the typed settings tree (defaults → file → `APP_` environment).
//! - [`startup`]: builds, runs and shuts down the whole daemon ([`startup::Application`]).
//! - [`events`]: the event envelope on the wire and its strict decoding.
//! - [`coupons`]: first-come-first-served coupons: decisions (pure) and their store.
//! - [`event_log`]: the `event_log` table and its status transitions (the only writer).
//! - [`outbox`]: publish-after-commit and the relay's republishing.
//! - [`kafka`]: cluster (embedded mock or real), producer, consumer groups, dead letters.
//! - [`actors`]: consumer-group managers, partition actors, domain actors, outbox relay.
//! - [`api`]: the HTTP API and its common JSON error body.
//! - [`stores`]: MySQL pools and migrations, Redis; [`locks`]: Redis locks (advisory).
//! - [`notifications`]: WebSocket / SSE sessions of this instance, by user.
//! - [`webhooks`]: delivering events to external systems (Standard Webhooks).
//! - [`retry`]: the in-place and scheduled retry policies; [`error`]: how failures are classed;
//!   [`clock`]: time as a dependency.

pub mod actors;
pub mod api;
pub mod clock;
pub mod config;
pub mod coupons;
pub mod delivery;
pub mod error;
pub mod event_log;
pub mod events;
pub mod ids;
pub mod kafka;
pub mod outbox;
pub mod ranking;
pub mod shop;
pub mod startup;
pub mod stores;
pub mod telemetry;
