//! Group commit of the deliveries' event-log moves ([`crate::common::grouped`]).
//!
//! Hundreds of deliveries start and finish at once under `key` and `unordered` ordering; one
//! autocommit `UPDATE` each would cost a statement and a log flush per move. Instead each
//! attempt hands its move to one writer and waits:
//!
//! - [`Takes`]: a first attempt takes its event (PENDING or PUBLISHED → IN_PROGRESS, leased,
//!   with the partition and offset it was read from) before delivering it; the events taken
//!   together are locked and moved in one transaction ([`EventLog::take_many`]), and each
//!   attempt learns whether its own event was taken or had been before.
//! - [`Completions`]: a delivered event's row must be COMPLETED before its attempt reports
//!   it delivered (the key's next record goes out after that); the events delivered together
//!   are moved with one statement.
//!
//! Should the shared write fail, each attempt makes its own move, and gets its own error (an
//! outage is classed as usual).

use std::collections::BTreeSet;
use std::time::Duration;

use tracing::debug;

use crate::common::clock::SharedClock;
use crate::common::grouped::{GroupWrite, Grouped};
use crate::event_log::{EventLog, EventLogError, Move, Provenance, StatusChange, Transition};
use crate::events::EventId;

/// The most rows one statement moves.
const MAX_IDS_PER_STATEMENT: usize = 1_000;

/// Takes events for their first attempt, together (see the module documentation).
pub struct Takes {
    writer: Grouped<TakeWrite>,
}

#[derive(Clone)]
struct TakeWrite {
    event_log: EventLog,
    clock: SharedClock,
    lease: Duration,
}

impl TakeWrite {
    fn lease_until(&self) -> chrono::DateTime<chrono::Utc> {
        super::lease_until(&self.clock, self.lease)
    }
}

impl GroupWrite for TakeWrite {
    type Item = (EventId, Provenance);
    /// Whether each event was taken; `None` when the shared transaction failed.
    type Answer = Option<Transition>;

    const MAX_ITEMS: usize = MAX_IDS_PER_STATEMENT;

    async fn write(&self, takes: Vec<(EventId, Provenance)>) -> Vec<Option<Transition>> {
        match self.event_log.take_many(&takes, self.lease_until()).await {
            Ok(taken) => {
                debug!(
                    events = takes.len(),
                    taken = taken.len(),
                    "events taken in one transaction"
                );
                transitions(&takes, taken).into_iter().map(Some).collect()
            }
            Err(_) => vec![None; takes.len()],
        }
    }
}

/// Each take's transition, given the ids `taken`: an event given twice (two records of it
/// attempted at once) was taken by its first take only, as two takes one after the other
/// would have it; the second is a duplicate.
fn transitions(takes: &[(EventId, Provenance)], mut taken: BTreeSet<EventId>) -> Vec<Transition> {
    takes
        .iter()
        .map(|(id, _)| {
            if taken.remove(id) {
                Transition::Applied
            } else {
                Transition::Skipped
            }
        })
        .collect()
}

impl Takes {
    pub fn new(event_log: EventLog, clock: SharedClock, lease: Duration) -> Self {
        Self {
            writer: Grouped::new(TakeWrite {
                event_log,
                clock,
                lease,
            }),
        }
    }

    /// Takes the event read at `source` for its first attempt (in a transaction shared with
    /// the others taken now): [`Transition::Skipped`] when it was taken before or is
    /// settled.
    pub async fn take(&self, id: EventId, source: Provenance) -> Result<Transition, EventLogError> {
        if let Some(Some(transition)) = self.writer.submit((id, source)).await {
            return Ok(transition);
        }
        let write = self.writer.write();
        let take = StatusChange::new(Move::Take)
            .due_at(write.lease_until())
            .read_from(source.partition, source.offset);
        write.event_log.change_status(id, take).await
    }
}

/// Completes delivered events, together (see the module documentation).
pub struct Completions {
    writer: Grouped<CompleteWrite>,
}

#[derive(Clone)]
struct CompleteWrite(EventLog);

impl GroupWrite for CompleteWrite {
    type Item = EventId;
    /// Whether the shared statement ran.
    type Answer = bool;

    const MAX_ITEMS: usize = MAX_IDS_PER_STATEMENT;

    async fn write(&self, ids: Vec<EventId>) -> Vec<bool> {
        let moved = match self.0.pool().acquire().await {
            Ok(mut connection) => EventLog::change_status_of_many_in(
                &mut connection,
                &ids,
                StatusChange::new(Move::Complete),
            )
            .await
            .is_ok(),
            Err(_) => false,
        };
        debug!(
            events = ids.len(),
            moved, "deliveries completed in one statement"
        );
        vec![moved; ids.len()]
    }
}

impl Completions {
    pub fn new(event_log: EventLog) -> Self {
        Self {
            writer: Grouped::new(CompleteWrite(event_log)),
        }
    }

    /// Moves the event's row to COMPLETED (in a statement shared with the others completing
    /// now).
    pub async fn complete(&self, id: EventId) -> Result<(), EventLogError> {
        if self.writer.submit(id).await == Some(true) {
            return Ok(());
        }
        self.writer
            .write()
            .0
            .change_status(id, StatusChange::new(Move::Complete))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_taken_twice_at_once_is_applied_once_then_a_duplicate() {
        let (once, twice, settled) = (
            EventId::generate(),
            EventId::generate(),
            EventId::generate(),
        );
        let at = |offset| Provenance {
            partition: 0,
            offset,
        };
        let takes = [
            (twice, at(1)),
            (once, at(2)),
            (twice, at(3)),
            (settled, at(4)),
        ];
        assert_eq!(
            transitions(&takes, BTreeSet::from([once, twice])),
            vec![
                Transition::Applied,
                Transition::Applied,
                Transition::Skipped,
                Transition::Skipped
            ]
        );
    }
}
