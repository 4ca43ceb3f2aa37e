//! An actor-based Kafka event processor for an e-commerce backend.
//!
//! How data flows:
//!
//! ```text
//!  HTTP request ──► api ──► slice store: one MySQL transaction, business rows + event_log
//!                    │       rows PENDING (outbox::OutboxTransaction)
//!                    └──► after the commit: outbox::Committed::publish ──► Kafka topic
//!                                                                          │ (key = user, order…)
//!  outbox::relay ── republishes rows left PENDING ─────────────────────────┘
//!                                                                          ▼
//!  kafka::consumer (one member per consumer group, polling thread, rebalances)
//!      └──► actors::consumer_group ──► actors::partition (one actor per assigned partition)
//!                                          │ decode (events) ── bad record ──► <topic>.DLT
//!                                          ▼
//!                                   actors::domain (supervised) ──► the slice's handler:
//!                                   coupons::issuer, coupons::notifier, shop::product_events,
//!                                   ranking::updater, delivery::forwarder
//!                                          │ effects + event_log move, idempotent by event id
//!                                          ▼
//!                                   offset stored and committed after the answer
//! ```
//!
//! Modules, leaves first (no module imports one that imports it back):
//! - [`ids`]: identifier newtypes; [`config`]: the typed settings tree; [`clock`]: time as a
//!   dependency; [`error`]: how failures are classed; [`telemetry`]: logging; [`trace`]: the W3C trace
//!   context; [`otlp`]: its spans exported over OTLP.
//! - [`events`]: the event envelope, its payloads, the table from event type to topic.
//! - [`stores`]: MySQL pools and migrations, Redis; [`event_log`]: the `event_log` table and
//!   its transition table (the only writer of statuses).
//! - [`kafka`]: cluster (embedded mock or real), producer, consumer groups, dead letters.
//! - [`outbox`]: the one path out (record in the transaction, publish after the commit) and
//!   the relay.
//! - [`actors`]: the runtime: consumer-group managers, partition actors, the domain-actor
//!   wrapper and its contract, the arbiter pool, the actor tree. It knows no business.
//! - The slices, each with its rules, store, handlers and background actors:
//!   [`coupons`] (intake, issuer, result notifier, push sessions, locks), [`shop`] (users,
//!   products, orders, payments, the product cache), [`ranking`] (store, updater),
//!   [`delivery`] (webhooks, forwarders, retry scheduler, back-off, replay).
//! - [`api`]: the HTTP API, one file per route area, and the common error body.
//! - [`startup`]: builds, runs and shuts down the whole daemon ([`startup::Application`]).

pub mod actors;
pub mod api;
pub mod common;
pub mod config;
pub mod coupons;
pub mod delivery;
pub mod event_log;
pub mod events;
pub mod guards;
pub mod kafka;
pub mod observability;
pub mod outbox;
pub mod ranking;
pub mod shop;
pub mod startup;
