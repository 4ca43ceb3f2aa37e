//! The RankingUpdater actor through a scripted sequence: its outcomes, the per-day sorted
//! sets it leaves in Redis, and its observable state after each step.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use commerce_events::actors::domain::{
    BatchOrigin, DomainActor, ObserveDomain, PipelineProbes, ProcessBatch,
};
use commerce_events::common::connections::RedisConnection;
use commerce_events::common::ids::{CouponId, OrderId, ProductId, UserId};
use commerce_events::events::topics;
use commerce_events::events::{
    CouponRequested, EventEnvelope, EventPayload, OrderCompleted, OrderedProduct,
};
use commerce_events::kafka::TopicPartition;
use commerce_events::ranking::RankingStore;
use commerce_events::ranking::updater::RankingUpdater;
use insta::assert_json_snapshot;
use serde_json::{Value, json};

use testkit::pipeline::Pipeline;

fn order(order_id: u64, day: u32, lines: &[(u64, u32)]) -> EventEnvelope {
    let mut event = EventEnvelope::new(
        format!("order:{order_id}"),
        EventPayload::OrderCompleted(OrderCompleted {
            order_id: OrderId::from_u64(order_id).unwrap(),
            user_id: UserId::from_u64(7).unwrap(),
            products: lines
                .iter()
                .map(|(id, qty)| OrderedProduct {
                    id: ProductId::from_u64(*id).unwrap(),
                    qty: *qty,
                })
                .collect(),
            total_amount: 10_000,
        }),
    );
    event.occurred_at = Utc.with_ymd_and_hms(2026, 11, day, 12, 0, 0).unwrap();
    event
}

/// Every ranking set under the test's prefix: day → [(product, quantity)].
async fn ranking_sets(redis: &RedisConnection) -> BTreeMap<String, Vec<(String, u64)>> {
    let mut connection = redis.connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(redis.key("ranking:products:*"))
        .query_async(&mut connection)
        .await
        .unwrap();
    let mut sets = BTreeMap::new();
    for key in keys {
        let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut connection)
            .await
            .unwrap();
        let day = key.rsplit(':').next().unwrap().to_string();
        sets.insert(
            day,
            members
                .into_iter()
                .map(|(member, score)| (member, score as u64))
                .collect(),
        );
    }
    sets
}

#[actix_web::test]
async fn the_ranking_updater_through_new_orders_a_redelivery_and_a_foreign_event() {
    let pipeline = Pipeline::start().await;
    let redis = RedisConnection::new(&pipeline.settings.redis).unwrap();
    redis.connect().await;
    let ranking = RankingStore::new(redis.clone(), 8);
    let updater = DomainActor::start(
        &pipeline.arbiters.next(),
        PipelineProbes::new(pipeline.event_log.clone()),
        move || RankingUpdater::new(ranking.clone()),
    );

    let first = order(1, 23, &[(10, 2), (11, 1)]);
    let second = order(2, 23, &[(11, 4)]);
    let yesterday = order(3, 22, &[(10, 5)]);
    let foreign = EventEnvelope::new(
        "user:1",
        EventPayload::CouponRequested(CouponRequested {
            user_id: UserId::from_u64(1).unwrap(),
            coupon_id: CouponId::from_u64(1).unwrap(),
        }),
    );
    let steps: [(&str, Vec<&EventEnvelope>); 3] = [
        ("1_two_orders_of_one_day", vec![&first, &second]),
        (
            "2_redelivered_beside_a_new_day_and_a_foreign_event",
            vec![&second, &yesterday, &foreign],
        ),
        (
            "3_the_whole_history_again",
            vec![&first, &second, &yesterday],
        ),
    ];
    for (step, events) in steps {
        let events: Arc<[EventEnvelope]> = events.into_iter().cloned().collect();
        let offsets: Arc<[i64]> = (0..events.len() as i64).collect();
        let outcomes = updater
            .send(ProcessBatch {
                origin: BatchOrigin {
                    source: TopicPartition::new(topics::ORDER_COMPLETED, 0),
                    offsets,
                    assignment: 1,
                },
                events: events.clone(),
            })
            .await
            .unwrap();
        let outcomes: Vec<Value> = events
            .iter()
            .zip(&outcomes)
            .map(|(event, outcome)| json!({"key": event.key, "outcome": outcome}))
            .collect();
        let state = updater.send(ObserveDomain).await.unwrap();
        assert_json_snapshot!(
            format!("ranking_updater_{step}"),
            json!({
                "outcomes": outcomes,
                "rankingSets": ranking_sets(&redis).await,
                "state": state,
            })
        );
    }
}
