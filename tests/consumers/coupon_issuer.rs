//! The CouponIssuer actor through a scripted sequence: its decisions, the result events it
//! emits and its observable state after each step.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{Duration as Span, Utc};
use commerce_events::actors::domain::{
    BatchOrigin, DomainActor, ObserveDomain, PipelineProbes, ProcessBatch,
};
use commerce_events::common::connections::RedisConnection;
use commerce_events::common::ids::UserId;
use commerce_events::coupons::issuer::CouponIssuer;
use commerce_events::coupons::locks::RedisLocks;
use commerce_events::coupons::owners::PartitionOwners;
use commerce_events::coupons::results::result_event;
use commerce_events::coupons::store::{CouponStore, NewCoupon};
use commerce_events::event_log::{EventLog, OutboxEvent};
use commerce_events::events::topics;
use commerce_events::events::{CouponRequested, EventEnvelope, EventId, EventPayload};
use commerce_events::kafka::TopicPartition;
use commerce_events::outbox::Outbox;
use insta::assert_json_snapshot;
use serde_json::{Value, json};

use testkit::pipeline::Pipeline;
use testkit::wait::eventually;

struct Script {
    names: BTreeMap<EventId, String>,
    requests: BTreeMap<&'static str, EventEnvelope>,
}

impl Script {
    /// Replaces request ids by their names, so snapshots are stable.
    fn named(&self, value: Value) -> Value {
        let mut text = value.to_string();
        for (id, name) in &self.names {
            text = text.replace(&id.to_string(), name);
        }
        serde_json::from_str(&text).unwrap()
    }
}

/// The results the issuer emitted after the first `already`, in the order it decided them:
/// rebuilt from the requests' rows, which record them (a result has no row of its own).
async fn emitted_results(event_log: &EventLog, script: &Script, already: usize) -> Vec<Value> {
    let ids: Vec<(EventId,)> = sqlx::query_as(
        "SELECT event_id FROM event_log WHERE event_type = 'CouponRequested' \
         AND status IN ('COMPLETED', 'NOTIFIED') \
         ORDER BY JSON_UNQUOTE(JSON_EXTRACT(result, '$.resultEventId'))",
    )
    .fetch_all(event_log.pool())
    .await
    .unwrap();
    let mut results = Vec::new();
    for (id,) in ids.into_iter().skip(already) {
        let record = event_log.find(id).await.unwrap().unwrap();
        let result = result_event(&record).expect("a decided request records its result");
        results.push(script.named(result.payload_json()));
    }
    results.sort_by_key(|result| result["requestId"].as_str().unwrap().to_string());
    results
}

#[actix_web::test]
async fn the_coupon_issuer_through_success_duplicate_sold_out_expired_and_redelivery() {
    let pipeline = Pipeline::start().await;
    pipeline
        .cluster
        .create_topic(topics::COUPON_RESULTS, 3)
        .unwrap();
    let event_log = pipeline.event_log.clone();
    let outbox = Outbox::new(event_log.clone(), pipeline.publisher.clone());
    let store = CouponStore::new(outbox.clone());
    let now = Utc::now();
    let open = store
        .create(&NewCoupon {
            name: "Two left".into(),
            discount_amount: 1000,
            total_quantity: 2,
            valid_from: now - Span::hours(1),
            valid_until: now + Span::hours(1),
        })
        .await
        .unwrap();
    let expired = store
        .create(&NewCoupon {
            name: "Yesterday".into(),
            discount_amount: 1000,
            total_quantity: 10,
            valid_from: now - Span::days(2),
            valid_until: now - Span::days(1),
        })
        .await
        .unwrap();

    let mut script = Script {
        names: BTreeMap::new(),
        requests: BTreeMap::new(),
    };
    let plan = [
        ("r1-user1-open", 1, open.coupon_id),
        ("r2-user1-open-again", 1, open.coupon_id),
        ("r3-user2-open", 2, open.coupon_id),
        ("r4-user3-open", 3, open.coupon_id),
        ("r5-user4-expired", 4, expired.coupon_id),
    ];
    let mut rows = Vec::new();
    for (name, user_id, coupon_id) in plan {
        let envelope = EventEnvelope::new(
            format!("user:{user_id}"),
            EventPayload::CouponRequested(CouponRequested {
                user_id: UserId::from_u64(user_id).unwrap(),
                coupon_id,
            }),
        );
        script.names.insert(envelope.event_id, name.to_string());
        script.requests.insert(name, envelope.clone());
        rows.push(OutboxEvent::new(envelope));
    }
    // As the intake leaves them: PENDING rows.
    let mut transaction = outbox.begin().await.unwrap();
    transaction.record(rows).await.unwrap();
    let _unpublished = transaction.commit().await.unwrap();

    let redis = RedisConnection::new(&pipeline.settings.redis).unwrap();
    redis.connect().await;
    let issuer_store = store.clone();
    let owners = PartitionOwners::new(event_log.pool().clone(), "test");
    let issuer = DomainActor::start(
        &pipeline.arbiters.next(),
        PipelineProbes::new(event_log.clone()),
        move || {
            CouponIssuer::new(
                issuer_store.clone(),
                RedisLocks::new(redis.clone(), Duration::from_secs(5)),
                owners.clone(),
            )
        },
    );

    let steps: [(&str, Vec<&str>); 3] = [
        (
            "1_success_then_duplicate",
            vec!["r1-user1-open", "r2-user1-open-again"],
        ),
        (
            "2_success_sold_out_expired",
            vec!["r3-user2-open", "r4-user3-open", "r5-user4-expired"],
        ),
        ("3_redelivered", vec!["r1-user1-open", "r4-user3-open"]),
    ];
    let mut emitted_so_far = 0;
    for (step, names) in steps {
        let events: Arc<[EventEnvelope]> = names
            .iter()
            .map(|name| script.requests[name].clone())
            .collect();
        let offsets: Arc<[i64]> = (0..names.len() as i64).collect();
        let outcomes = issuer
            .send(ProcessBatch {
                origin: BatchOrigin {
                    source: TopicPartition::new(topics::COUPON_REQUESTS, 0),
                    offsets,
                    assignment: 1,
                },
                events,
            })
            .await
            .unwrap();
        let emitted = emitted_results(&event_log, &script, emitted_so_far).await;
        emitted_so_far += emitted.len();
        // Results are published beside the next batch; wait for this step's.
        let published_so_far = emitted_so_far as u64;
        eventually(
            "the step's results published",
            Duration::from_secs(20),
            || async {
                let state = issuer.send(ObserveDomain).await.unwrap();
                state.details["resultsPublished"] == published_so_far
            },
        )
        .await;
        let state = issuer.send(ObserveDomain).await.unwrap();
        let decisions: BTreeMap<&str, Value> = names
            .iter()
            .zip(&outcomes)
            .map(|(name, outcome)| (*name, serde_json::to_value(outcome).unwrap()))
            .collect();
        let mut requests = BTreeMap::new();
        for name in &names {
            let row = event_log
                .find(script.requests[name].event_id)
                .await
                .unwrap()
                .unwrap();
            requests.insert(*name, json!({"status": row.status, "result": row.result}));
        }
        let coupon = store.find(open.coupon_id).await.unwrap().unwrap();
        assert_json_snapshot!(
            step,
            json!({
                "outcomes": decisions,
                "requestRows": requests,
                "emittedResults": emitted,
                "coupon": {"issuedQuantity": coupon.issued_quantity, "remaining": coupon.remaining},
                "actor": state,
            }),
            { ".requestRows.*.result.resultEventId" => "[result event id]" }
        );
    }
}
