//! The forwarders: the domain actors of `external-events` (ExternalForwarder) and of
//! `order-completed` in `order-analytics-group` (OrderAnalytics).
//!
//! For each event a forwarder takes the event (PENDING or PUBLISHED → IN_PROGRESS, with a
//! lease and the partition and offset it was read from; taken together with the other first
//! attempts running, see [`super::moves`]) and makes the first attempt
//! ([`Deliveries::attempt`]): delivered, it is COMPLETED; failed, the retry schedule or the
//! dead-letter topic takes it. Either way the event is settled for this
//! partition, whose offset moves on — a failing receiver never holds the partition. An
//! event already taken (a redelivery) is a duplicate.
//!
//! Records are worked on in lanes, per the group's ordering ([`super::ordering`]): under
//! `key` ordering a key whose earlier record waits for a retry parks its later records
//! behind it instead of delivering them.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;

use crate::actors::domain::{Batch, DomainHandler, EventOutcome, HandlerError, Stats};
use crate::config::{DeliveryOrder, RecordOrdering};
use crate::delivery::ordering::{self, WaitingBehind};
use crate::delivery::{Attempt, Deliveries, Held, Settled};
use crate::event_log::{EventStatus, Move, Provenance, StatusChange, Transition};
use crate::events::EventEnvelope;

pub struct Forwarder {
    name: &'static str,
    deliveries: Deliveries,
    order: DeliveryOrder,
}

/// How one record's turn in its lane ended.
enum Turn {
    /// Settled for the partition; `behind` when the record is left unfinished on the
    /// schedule, so the rest of its key must wait behind it.
    Settled {
        outcome: EventOutcome,
        behind: Option<WaitingBehind>,
    },
    /// Not settled (a transient failure): the partition sends it again.
    Failed(HandlerError),
}

impl Forwarder {
    /// A forwarder called `name` in the actor tree, working on a partition's records in
    /// `order`.
    pub fn new(name: &'static str, deliveries: Deliveries, order: DeliveryOrder) -> Self {
        Self {
            name,
            deliveries,
            order,
        }
    }

    /// Takes the event and makes its first attempt.
    async fn first_attempt(&self, event: &EventEnvelope, partition: i32, offset: i64) -> Turn {
        let deliveries = &self.deliveries;
        if !deliveries.deliverer().routes(event.event_type()) {
            return Turn::settled(EventOutcome::Failed(HandlerError::permanent(format!(
                "no webhook route for {}",
                event.event_type()
            ))));
        }
        match deliveries
            .take(event.event_id, Provenance { partition, offset })
            .await
        {
            Ok(Transition::Applied) => {}
            Ok(Transition::Skipped) => return self.already_taken(event, offset).await,
            Err(error) => return Turn::Failed(HandlerError::from_error(&error)),
        }
        let held = Held {
            envelope: event,
            record: None,
        };
        match deliveries.attempt(held, Attempt::First).await {
            Ok(Settled::Scheduled { at } | Settled::Waiting { at }) => Turn::Settled {
                outcome: EventOutcome::Done,
                behind: Some(WaitingBehind::scheduled(event.event_id, offset, at)),
            },
            Ok(Settled::Delivered | Settled::DeadLettered { .. }) => {
                Turn::settled(EventOutcome::Done)
            }
            Err(error) => Turn::Failed(HandlerError::from_error(&error)),
        }
    }

    /// A redelivered event: a duplicate, which its key still waits behind while it is
    /// unfinished (a retry scheduled, or an attempt of an instance that is gone).
    async fn already_taken(&self, event: &EventEnvelope, offset: i64) -> Turn {
        match self.deliveries.event_log().find(event.event_id).await {
            Ok(Some(record)) => Turn::Settled {
                outcome: EventOutcome::Duplicate,
                behind: match (record.status, record.next_attempt_at) {
                    (EventStatus::Failed | EventStatus::InProgress, Some(due)) => {
                        Some(WaitingBehind {
                            event_id: event.event_id,
                            offset: record.source.map_or(offset, |source| source.offset),
                            status: record.status,
                            due,
                        })
                    }
                    _ => None,
                },
            },
            Ok(None) => Turn::settled(EventOutcome::Failed(HandlerError::permanent(
                "the event has no event-log row: it was not published through the outbox",
            ))),
            Err(error) => Turn::Failed(HandlerError::from_error(&error)),
        }
    }

    /// Parks the event behind `behind`: on the schedule, no attempt spent, looked at again
    /// once `behind` may have finished.
    async fn park(
        &self,
        event: &EventEnvelope,
        partition: i32,
        offset: i64,
        behind: &WaitingBehind,
    ) -> Turn {
        let reason = behind.reason(&event.key);
        let park = StatusChange::new(Move::Fail)
            .with_error(&reason)
            .due_at(behind.recheck_at(self.deliveries.clock().now()))
            .read_from(partition, offset);
        match self
            .deliveries
            .event_log()
            .change_status(event.event_id, park)
            .await
        {
            Ok(Transition::Applied) => {
                self.deliveries.count_parked();
                Turn::Settled {
                    outcome: EventOutcome::Done,
                    behind: Some(behind.clone()),
                }
            }
            // Taken before (a redelivery): it orders itself against its key on the
            // schedule, or it is finished.
            Ok(Transition::Skipped) => self.already_taken(event, offset).await,
            Err(error) => Turn::Failed(HandlerError::from_error(&error)),
        }
    }

    /// One lane's records, one after the other. Under `key` ordering a record whose key
    /// has an earlier unfinished record is parked behind it; a record that is not settled
    /// leaves the rest of its lane unsettled too (they are sent again in order).
    async fn run_lane(
        &self,
        batch: &Batch,
        lane: Vec<usize>,
        mut behind: Option<WaitingBehind>,
    ) -> Vec<(usize, EventOutcome)> {
        let partition = batch.origin.source.partition;
        let keeps_key_order = self.order.ordering == RecordOrdering::Key;
        let mut outcomes = Vec::with_capacity(lane.len());
        let mut unsettled: Option<HandlerError> = None;
        for position in lane {
            let event = &batch.events[position];
            let offset = batch.origin.offsets[position];
            if let Some(error) = &unsettled {
                outcomes.push((
                    position,
                    EventOutcome::Failed(HandlerError {
                        message: format!(
                            "not attempted: an earlier event of its key is not settled ({})",
                            error.message
                        ),
                        ..error.clone()
                    }),
                ));
                continue;
            }
            let turn = match behind.as_ref().filter(|behind| behind.holds(offset)) {
                Some(waiting) if keeps_key_order => {
                    let waiting = waiting.clone();
                    self.park(event, partition, offset, &waiting).await
                }
                _ => self.first_attempt(event, partition, offset).await,
            };
            match turn {
                Turn::Settled {
                    outcome,
                    behind: left,
                } => {
                    if let Some(left) = left {
                        behind.get_or_insert(left);
                    }
                    outcomes.push((position, outcome));
                }
                Turn::Failed(error) => {
                    outcomes.push((position, EventOutcome::Failed(error.clone())));
                    unsettled = Some(error);
                }
            }
        }
        outcomes
    }

    /// Under `key` ordering, what each key of the batch waits behind from earlier batches.
    async fn earlier_unfinished(
        &self,
        batch: &Batch,
    ) -> Result<HashMap<String, WaitingBehind>, HandlerError> {
        if self.order.ordering != RecordOrdering::Key {
            return Ok(HashMap::new());
        }
        let keys: HashSet<&str> = batch
            .events
            .iter()
            .map(|event| event.key.as_str())
            .collect();
        let keys: Vec<&str> = keys.into_iter().collect();
        let unfinished = self
            .deliveries
            .event_log()
            .unfinished_of_keys(
                &batch.origin.source.topic,
                batch.origin.source.partition,
                &keys,
            )
            .await
            .map_err(|error| HandlerError::from_error(&error))?;
        let handled: HashSet<_> = batch.events.iter().map(|event| event.event_id).collect();
        Ok(ordering::waiting_behind(unfinished, &handled))
    }
}

impl Turn {
    fn settled(outcome: EventOutcome) -> Self {
        Turn::Settled {
            outcome,
            behind: None,
        }
    }
}

impl DomainHandler for Forwarder {
    /// The counters are the deliveries' own, shown under the retry scheduler.
    type Stats = ();

    fn name(&self) -> &'static str {
        self.name
    }

    async fn handle(&self, batch: &Batch, _stats: &Stats<()>) -> Vec<EventOutcome> {
        let mut behind = match self.earlier_unfinished(batch).await {
            Ok(behind) => behind,
            Err(error) => return vec![EventOutcome::Failed(error); batch.events.len()],
        };
        let lanes = ordering::lanes(
            self.order.ordering,
            batch.events.iter().map(|event| event.key.as_str()),
        );
        let mut outcomes: Vec<Option<EventOutcome>> = vec![None; batch.events.len()];
        let runs = lanes.into_iter().map(|lane| {
            let waiting = behind.remove(batch.events[lane[0]].key.as_str());
            self.run_lane(batch, lane, waiting)
        });
        let mut settled = futures::stream::iter(runs).buffer_unordered(self.order.max_in_flight);
        while let Some(lane) = settled.next().await {
            for (position, outcome) in lane {
                outcomes[position] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every record is in one lane"))
            .collect()
    }
}
