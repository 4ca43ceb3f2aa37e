//! The outbox relay actor: every `outbox.poll_interval_ms` it republishes event-log rows
//! that stayed PENDING longer than `outbox.republish_after_ms` (their request died between
//! the commit and the broker's acknowledgement). Runs never overlap.

use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;
use tracing::warn;

use crate::config::OutboxSettings;
use crate::outbox::Outbox;

/// Asks for the observable state.
#[derive(Message)]
#[rtype(result = "OutboxRelayState")]
pub struct ObserveRelay;

/// Stops the relay (shutdown). A pass in flight is abandoned: its transaction rolls back
/// and its rows stay PENDING for the next start.
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
}

pub struct OutboxRelay {
    outbox: Outbox,
    republish_after: Duration,
    poll_interval: Duration,
    batch_size: u32,
    busy: bool,
    state: OutboxRelayState,
}

impl OutboxRelay {
    pub fn new(outbox: Outbox, settings: &OutboxSettings) -> Self {
        Self {
            outbox,
            republish_after: Duration::from_millis(settings.republish_after_ms),
            poll_interval: Duration::from_millis(settings.poll_interval_ms),
            batch_size: settings.batch_size,
            busy: false,
            state: OutboxRelayState::default(),
        }
    }

    fn run_pass(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let outbox = self.outbox.clone();
        let (older_than, limit) = (self.republish_after, self.batch_size);
        ctx.spawn(
            actix::fut::wrap_future(async move { outbox.relay_once(older_than, limit).await }).map(
                |result, relay: &mut Self, _ctx| {
                    relay.busy = false;
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
                },
            ),
        );
    }
}

impl Actor for OutboxRelay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.poll_interval, |relay, ctx| relay.run_pass(ctx));
    }
}

impl Handler<ObserveRelay> for OutboxRelay {
    type Result = MessageResult<ObserveRelay>;

    fn handle(&mut self, _: ObserveRelay, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.state.clone())
    }
}

impl Handler<StopRelay> for OutboxRelay {
    type Result = ();

    fn handle(&mut self, _: StopRelay, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
