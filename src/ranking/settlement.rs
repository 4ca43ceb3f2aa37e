//! The ranking updater's settlement: its progress is the orders' applied marks in Redis
//! (`ranking:applied:{eventId}`, written by the script that counts them), and a dead letter
//! is a `dead_letter` row of its group. Driving an order again counts it directly (the mark
//! makes that idempotent). Before a pass, a Redis that lost the ranking with its marks gets
//! the ranking recomputed from MySQL rather than every order of the window counted again.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::Utc;
use futures::future::LocalBoxFuture;

use crate::event_log::progress::{ConsumerProgress, ConsumerSpec, RecordedIn};
use crate::event_log::{EventLog, EventRecord, EventStatus};
use crate::events::{EventId, EventPayload};
use crate::kafka::dead_letter::{DeadLetterLog, DeadLetterRow};
use crate::outbox::settlement::{Settlement, SettlementError};
use crate::ranking::rebuild::{RebuildError, rebuild_if_missing};
use crate::ranking::{RankedOrder, RankingStore};

pub struct RankingSettlement {
    consumer: ConsumerSpec,
    ranking: RankingStore,
    event_log: EventLog,
    dead_letters: DeadLetterLog,
    /// Rebuilds started because `ranking:built` was missing.
    rebuilds: AtomicU64,
}

impl RankingSettlement {
    pub fn new(
        consumer: ConsumerSpec,
        ranking: RankingStore,
        event_log: EventLog,
        dead_letters: DeadLetterLog,
    ) -> Self {
        Self {
            consumer,
            ranking,
            event_log,
            dead_letters,
            rebuilds: AtomicU64::new(0),
        }
    }
}

/// Where the ranking stands with an order: counted, dead-lettered, or still ahead
/// (PUBLISHED once the event is, PENDING before).
fn ranking_status(
    record: &EventRecord,
    counted: bool,
    dead_letter_error: Option<&String>,
) -> EventStatus {
    if counted {
        EventStatus::Completed
    } else if dead_letter_error.is_some() {
        EventStatus::DeadLetter
    } else if record.published_at.is_some() {
        EventStatus::Published
    } else {
        EventStatus::Pending
    }
}

impl Settlement for RankingSettlement {
    fn consumer(&self) -> &ConsumerSpec {
        &self.consumer
    }

    fn prepare(&self) -> LocalBoxFuture<'_, Result<(), SettlementError>> {
        Box::pin(async move {
            let today = Utc::now().date_naive();
            match rebuild_if_missing(&self.ranking, &self.event_log, today).await {
                Ok(Some(_)) => {
                    self.rebuilds.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Ok(None) | Err(RebuildError::AlreadyRunning) => Ok(()),
                Err(error) => Err(SettlementError::new(error)),
            }
        })
    }

    fn settled<'a>(
        &'a self,
        page: &'a [EventRecord],
    ) -> LocalBoxFuture<'a, Result<Vec<bool>, SettlementError>> {
        Box::pin(async move {
            let ids: Vec<EventId> = page.iter().map(|record| record.event_id).collect();
            let counted = self
                .ranking
                .counted(&ids)
                .await
                .map_err(SettlementError::new)?;
            let uncounted: Vec<EventId> = ids
                .iter()
                .zip(&counted)
                .filter(|(_, counted)| !**counted)
                .map(|(id, _)| *id)
                .collect();
            let dead = self
                .dead_letters
                .open_among(&self.consumer.group_id, &uncounted)
                .await
                .map_err(SettlementError::new)?;
            Ok(ids
                .iter()
                .zip(counted)
                .map(|(id, counted)| counted || dead.contains(id))
                .collect())
        })
    }

    fn drive_again<'a>(
        &'a self,
        record: &'a EventRecord,
    ) -> LocalBoxFuture<'a, Result<(), SettlementError>> {
        Box::pin(async move {
            if let EventPayload::OrderCompleted(order) = &record.payload {
                let ranked = RankedOrder {
                    event_id: record.event_id,
                    day: record.occurred_at.date_naive(),
                    products: &order.products,
                };
                self.ranking
                    .apply(&[ranked])
                    .await
                    .map_err(SettlementError::new)?;
            }
            Ok(())
        })
    }

    fn progress<'a>(
        &'a self,
        record: &'a EventRecord,
        dead_letters: &'a [DeadLetterRow],
    ) -> LocalBoxFuture<'a, Result<ConsumerProgress, SettlementError>> {
        Box::pin(async move {
            let counted = self
                .ranking
                .counted(&[record.event_id])
                .await
                .map_err(SettlementError::new)?;
            let open_letter = dead_letters
                .iter()
                .rev()
                .find(|letter| {
                    letter.consumer_group == self.consumer.group_id && letter.replayed_at.is_none()
                })
                .map(|letter| letter.error.clone());
            let status = ranking_status(
                record,
                counted.first().copied().unwrap_or(false),
                open_letter.as_ref(),
            );
            Ok(ConsumerProgress {
                consumer: self.consumer.name,
                group_id: self.consumer.group_id.clone(),
                recorded_in: RecordedIn::RankingMarks,
                status,
                settled: status != EventStatus::Published && status != EventStatus::Pending,
                attempts: 0,
                last_error: open_letter,
                next_attempt_at: None,
            })
        })
    }

    fn figures(&self) -> Vec<(&'static str, u64)> {
        vec![("rankingRebuilds", self.rebuilds.load(Ordering::Relaxed))]
    }
}
