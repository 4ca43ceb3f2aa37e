//! The outbox relay actor: every `outbox.poll_interval_ms` it republishes event-log rows
//! that stayed PENDING longer than `outbox.republish_after_ms` (their request died between
//! the commit and the broker's acknowledgement). Runs never overlap.
//!
//! Supervised: a pass that panics stops the actor and the `Supervisor` restarts it
//! (counted); the pass's transaction rolls back, so its rows stay PENDING for the next pass.

use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;
use tracing::warn;

use crate::actors::tree::ObserveBackground;
use crate::actors::{PassGate, spawn_supervised_pass};
use crate::config::OutboxSettings;
use crate::outbox::Outbox;

/// Stops the relay (shutdown): no pass starts after this one; a pass in flight finishes,
/// and what it could not publish stays PENDING for the next start.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopRelay;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayState {
    /// Passes completed (successful or not): shows the relay is alive.
    pub passes: u64,
    pub republished: u64,
    pub failed: u64,
    pub undecodable: u64,
    pub errors: u64,
    /// Passes that panicked and restarted the relay.
    pub restarts: u64,
}

pub struct OutboxRelay {
    outbox: Outbox,
    republish_after: Duration,
    poll_interval: Duration,
    batch_size: u32,
    gate: PassGate,
    state: OutboxRelayState,
}

impl OutboxRelay {
    pub fn new(outbox: Outbox, settings: &OutboxSettings) -> Self {
        Self {
            outbox,
            republish_after: Duration::from_millis(settings.republish_after_ms),
            poll_interval: Duration::from_millis(settings.poll_interval_ms),
            batch_size: settings.batch_size,
            gate: PassGate::default(),
            state: OutboxRelayState::default(),
        }
    }

    fn run_pass(&mut self, ctx: &mut Context<Self>) {
        if !self.gate.begin() {
            return;
        }
        let outbox = self.outbox.clone();
        let (older_than, limit) = (self.republish_after, self.batch_size);
        let pass = async move { outbox.relay_once(older_than, limit).await };
        spawn_supervised_pass(ctx, "OutboxRelay", pass, |relay: &mut Self, result| {
            relay.gate.end();
            relay.state.passes += 1;
            match result {
                Ok(publication) => {
                    relay.state.republished += publication.published;
                    relay.state.failed += publication.failed;
                    relay.state.undecodable += publication.undecodable;
                }
                Err(error) => {
                    relay.state.errors += 1;
                    warn!(%error, "outbox relay pass failed");
                }
            }
        });
    }
}

impl Actor for OutboxRelay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.poll_interval, |relay, ctx| relay.run_pass(ctx));
    }
}

impl Supervised for OutboxRelay {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.state.restarts += 1;
        self.gate.end();
        warn!(restarts = self.state.restarts, "outbox relay restarting");
    }
}

impl Handler<ObserveBackground> for OutboxRelay {
    type Result = MessageResult<ObserveBackground>;

    fn handle(&mut self, _: ObserveBackground, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(serde_json::to_value(&self.state).expect("relay state serializes"))
    }
}

impl Handler<StopRelay> for OutboxRelay {
    type Result = ();

    fn handle(&mut self, _: StopRelay, _ctx: &mut Self::Context) {
        self.gate.stop();
    }
}
