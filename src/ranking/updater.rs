//! The RankingUpdater: the domain actor of `order-completed` in `ranking-updater-group`.
//!
//! A partition's batch of completed orders is counted into the per-day best-seller sets
//! with one Redis round trip ([`RankingStore::apply`]); an order counted before (a
//! redelivery) is a duplicate. Redis failures are retryable (the partition retries in
//! place). The event-log row is left alone: `order-completed` has several consumers, and the
//! row's status belongs to the analytics delivery.

use serde::Serialize;

use crate::actors::domain::{AppliedInOneCall, Batch, DomainHandler, EventOutcome, Stats};
use crate::events::EventPayload;
use crate::ranking::{RankedOrder, RankingStore};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RankingStats {
    /// Orders counted into the ranking.
    pub orders_counted: u64,
    /// Product quantities added.
    pub quantity_added: u64,
    /// Redis round trips.
    pub round_trips: u64,
}

pub struct RankingUpdater {
    ranking: RankingStore,
}

impl RankingUpdater {
    pub fn new(ranking: RankingStore) -> Self {
        Self { ranking }
    }
}

impl DomainHandler for RankingUpdater {
    type Stats = RankingStats;

    fn name(&self) -> &'static str {
        "RankingUpdater"
    }

    async fn handle(&self, batch: &Batch, stats: &Stats<RankingStats>) -> Vec<EventOutcome> {
        let selected = AppliedInOneCall::select(&batch.events, "an order event", |event| {
            match &event.payload {
                EventPayload::OrderCompleted(order) => Some(RankedOrder {
                    event_id: event.event_id,
                    day: event.occurred_at.date_naive(),
                    products: &order.products,
                }),
                _ => None,
            }
        });
        let applied = self.ranking.apply(&selected.items).await;
        if let Ok(counted) = &applied {
            let committed_at: std::collections::HashMap<_, _> = batch
                .events
                .iter()
                .map(|event| (event.event_id, event.occurred_at))
                .collect();
            for (order, _) in selected
                .items
                .iter()
                .zip(counted)
                .filter(|(_, counted)| **counted)
            {
                if let Some(at) = committed_at.get(&order.event_id) {
                    crate::observability::metrics::payment_ranked(*at);
                }
            }
            stats.update(|stats| {
                stats.round_trips += u64::from(!selected.items.is_empty());
                for (order, _) in selected
                    .items
                    .iter()
                    .zip(counted)
                    .filter(|(_, counted)| **counted)
                {
                    stats.orders_counted += 1;
                    stats.quantity_added += order
                        .products
                        .iter()
                        .map(|line| u64::from(line.qty))
                        .sum::<u64>();
                }
            });
        }
        selected.settle(applied, "ranking not updated")
    }
}
