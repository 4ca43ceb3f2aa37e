//! An actor-based Kafka event processor for an e-commerce backend.
//!
//! How data flows:
//!
//! ```text
//!  HTTP request ──► api ──► a slice's store: one MySQL transaction, business rows + event_log
//!                    │       rows (outbox::OutboxTransaction)
//!                    └──► after the commit: outbox::Committed::publish ──► Kafka topic
//!                                                                          │ (key = user, order…)
//!  outbox::relay, outbox::reconciler ── publish again what was lost ───────┘
//!                                                                          ▼
//!  kafka::consumer (one member per consumer group, polling thread, rebalances)
//!      └──► actors::consumer_group ──► actors::partition (one actor per assigned partition)
//!                                          │ decode (events) ── bad record ──► <topic>.DLT
//!                                          ▼
//!                                   actors::domain (supervised) ──► a slice's handler:
//!                                   coupons::issuer, coupons::notifier, shop::product_events,
//!                                   ranking::updater, delivery::forwarder
//!                                          │ effects + event_log move, idempotent by event id
//!                                          ▼
//!                                   offset stored and committed after the answer
//! ```
//!
//! Modules, from the leaves up; no module refers to one that refers back to it, and the
//! runtime refers to no slice (`tests/architecture.rs` checks both):
//! - [`common`]: identifiers, how values travel in columns, time as a dependency, how
//!   failures are classed, the MySQL and Redis connections. [`config`]: the typed settings
//!   tree. [`observability`]: metrics, logging, the W3C trace context and its export over
//!   OTLP, the register of dependency outages, alerts.
//! - [`events`]: the event envelope, its payloads, the table from event type to topic.
//! - The runtime, which knows topics, partitions and event-log states, never coupons or
//!   orders: [`event_log`] (the `event_log` table, its transition table, each consumer's
//!   progress), [`kafka`] (cluster, producer, group consumer, dead letters, offsets),
//!   [`outbox`] (the one path out, the relay, the reconciler and the settlement each
//!   consumer's progress is read through), [`actors`] (consumer-group managers, partition
//!   actors, the domain-actor wrapper and its contract, the actor tree, the lag monitor).
//! - [`guards`]: what stands between a request and its effect: tokens, rate limits,
//!   `Idempotency-Key`.
//! - The slices, each with its rules, store, handlers and background actors: [`coupons`]
//!   (intake, issuer, result notifier, push sessions, locks), [`shop`] (users, products,
//!   orders, payments, the product cache), [`ranking`] (the ranking, its updater and
//!   rebuild), [`delivery`] (webhooks, forwarders, the retry scheduler, replay).
//! - [`api`]: the HTTP API, one file per route area, the common error body, the OpenAPI
//!   document.
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
