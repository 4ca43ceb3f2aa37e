//! The result notifier's settlement: its progress is the request's row, since a coupon
//! result has no row of its own (see [`crate::coupons::results`]).
//!
//! The walk reads the requests' rows. A request pushed (NOTIFIED) or dead-lettered is
//! settled; one decided (COMPLETED) waits for its push since its decision (`updated_at`),
//! and driving it again publishes its result rebuilt from the row, with the result's own
//! event id. A request not decided yet has no result: the walk stops behind it.

use chrono::{DateTime, Utc};
use futures::future::LocalBoxFuture;

use crate::coupons::results::result_event;
use crate::event_log::progress::{ConsumerProgress, ConsumerSpec, RecordedIn};
use crate::event_log::{EventRecord, EventStatus};
use crate::events::EventType;
use crate::kafka::dead_letter::DeadLetterRow;
use crate::kafka::producer::EventPublisher;
use crate::outbox::settlement::{Settlement, SettlementError, publish_again, settled_each};

pub struct ResultSettlement {
    consumer: ConsumerSpec,
    publisher: EventPublisher,
}

impl ResultSettlement {
    pub fn new(consumer: ConsumerSpec, publisher: EventPublisher) -> Self {
        Self {
            consumer,
            publisher,
        }
    }
}

/// Whether the notifier has settled the result of a request in `request_status`: pushed
/// (NOTIFIED), or the request dead-lettered. A request not yet decided has no result to
/// push; one COMPLETED has its result waiting.
pub fn result_settled(request_status: EventStatus) -> bool {
    matches!(
        request_status,
        EventStatus::Notified | EventStatus::DeadLetter
    )
}

/// Whether the request is decided (or will never be): its result exists, or never will.
fn decided(status: EventStatus) -> bool {
    matches!(
        status,
        EventStatus::Completed | EventStatus::Notified | EventStatus::DeadLetter
    )
}

impl Settlement for ResultSettlement {
    fn consumer(&self) -> &ConsumerSpec {
        &self.consumer
    }

    /// The rows walked are the requests, which hold the results.
    fn event_types(&self) -> Vec<EventType> {
        vec![EventType::CouponRequested]
    }

    fn settled<'a>(
        &'a self,
        page: &'a [EventRecord],
    ) -> LocalBoxFuture<'a, Result<Vec<bool>, SettlementError>> {
        settled_each(page, |record| {
            // A request decided before results were recorded in their requests' rows has a
            // result row of its own, which the relay publishes.
            let legacy = record.status == EventStatus::Completed && result_event(record).is_none();
            result_settled(record.status) || legacy
        })
    }

    fn waiting_since(&self, record: &EventRecord) -> Option<DateTime<Utc>> {
        (record.status == EventStatus::Completed).then_some(record.updated_at)
    }

    fn waits_for_earlier_work(&self, page: &[EventRecord]) -> bool {
        page.iter().any(|record| !decided(record.status))
    }

    fn drive_again<'a>(
        &'a self,
        record: &'a EventRecord,
    ) -> LocalBoxFuture<'a, Result<(), SettlementError>> {
        Box::pin(async move {
            let Some(result) = result_event(record) else {
                return Ok(());
            };
            publish_again(&self.publisher, self.consumer.topic, &result).await
        })
    }

    /// NOTIFIED (shown COMPLETED: pushed), its result published and waiting (PUBLISHED, the
    /// request COMPLETED), or no result yet (PENDING, the request undecided).
    fn progress<'a>(
        &'a self,
        record: &'a EventRecord,
        _dead_letters: &'a [DeadLetterRow],
    ) -> LocalBoxFuture<'a, Result<ConsumerProgress, SettlementError>> {
        let status = match record.status {
            EventStatus::Notified => EventStatus::Completed,
            EventStatus::DeadLetter => EventStatus::DeadLetter,
            EventStatus::Completed => EventStatus::Published,
            _ => EventStatus::Pending,
        };
        let progress = ConsumerProgress {
            consumer: self.consumer.name,
            group_id: self.consumer.group_id.clone(),
            recorded_in: RecordedIn::RequestRow,
            status,
            settled: result_settled(record.status),
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
        };
        Box::pin(async move { Ok(progress) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_is_settled_once_pushed_or_its_request_dead() {
        assert!(result_settled(EventStatus::Notified));
        assert!(result_settled(EventStatus::DeadLetter));
        assert!(!result_settled(EventStatus::Completed));
        assert!(!result_settled(EventStatus::Published));
    }

    #[test]
    fn the_walk_waits_behind_a_request_not_decided_yet() {
        assert!(!decided(EventStatus::Published));
        assert!(!decided(EventStatus::InProgress));
        assert!(decided(EventStatus::Completed));
        assert!(decided(EventStatus::DeadLetter));
    }
}
