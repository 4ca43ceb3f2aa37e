//! Events to publish and records to read back: a pipeline probe, a coupon request, the
//! offsets a group committed, the records of a topic.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{Duration as Span, Utc};
use commerce_events::common::ids::{CouponId, UserId};
use commerce_events::coupons::store::{CouponRequest, NewCoupon};
use commerce_events::event_log::OutboxEvent;
use commerce_events::events::{CouponRequested, EventEnvelope, EventPayload, PipelineProbe};
use commerce_events::outbox::Outbox;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A coupon of `total_quantity` units, valid from an hour ago to an hour from now.
pub fn new_coupon(total_quantity: u32) -> NewCoupon {
    let now = Utc::now();
    NewCoupon {
        name: "Hot".into(),
        discount_amount: 1000,
        total_quantity,
        valid_from: now - Span::hours(1),
        valid_until: now + Span::hours(1),
    }
}

/// Requests of `users` for `coupon_id`, recorded as the intake leaves them (one commit, in
/// `users`' order), as the CouponIssuer's store takes them.
pub async fn recorded_requests(
    outbox: &Outbox,
    coupon_id: CouponId,
    users: impl IntoIterator<Item = u64>,
) -> Vec<CouponRequest> {
    recorded_request_events(outbox, coupon_id, users)
        .await
        .iter()
        .map(|event| CouponRequest::of_event(event).expect("a coupon request"))
        .collect()
}

/// The same requests as the events the intake publishes.
pub async fn recorded_request_events(
    outbox: &Outbox,
    coupon_id: CouponId,
    users: impl IntoIterator<Item = u64>,
) -> Vec<EventEnvelope> {
    let events: Vec<EventEnvelope> = users
        .into_iter()
        .map(|user| {
            let user_id = UserId::from_u64(user).unwrap();
            EventEnvelope::new(
                user_id.partition_key(),
                EventPayload::CouponRequested(CouponRequested { user_id, coupon_id }),
            )
        })
        .collect();
    let mut transaction = outbox.begin().await.unwrap();
    transaction
        .record(events.iter().cloned().map(OutboxEvent::new).collect())
        .await
        .unwrap();
    let _unpublished = transaction.commit().await.unwrap();
    events
}

/// How many coupon histories (coupons issued) `coupon_id` has.
pub async fn histories_of(pool: &sqlx::MySqlPool, coupon_id: CouponId) -> i64 {
    let (histories,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM coupon_history WHERE coupon_id = ?")
            .bind(coupon_id)
            .fetch_one(pool)
            .await
            .unwrap();
    histories
}

/// A pipeline probe (completed by the domain actor wrapper itself).
pub fn probe_event(note: &str) -> EventEnvelope {
    let mut envelope = EventEnvelope::new(
        "",
        EventPayload::PipelineProbe(PipelineProbe {
            note: Some(note.to_string()),
        }),
    );
    envelope.key = format!("probe:{}", envelope.event_id);
    envelope
}

/// A domain event that reaches the domain handler: `user_id`'s request for coupon 1.
pub fn coupon_request(user_id: u64) -> EventEnvelope {
    coupon_request_for(user_id, 1)
}

/// `user_id`'s request for `coupon_id`, keyed by the user as the intake keys it.
pub fn coupon_request_for(user_id: u64, coupon_id: u64) -> EventEnvelope {
    EventEnvelope::new(
        format!("user:{user_id}"),
        EventPayload::CouponRequested(CouponRequested {
            user_id: UserId::from_u64(user_id).expect("a positive user id"),
            coupon_id: CouponId::from_u64(coupon_id).expect("a positive coupon id"),
        }),
    )
}

/// Offsets the group committed for `topic`'s partitions (`None`: nothing committed).
pub async fn committed_offsets(
    bootstrap_servers: &str,
    group_id: &str,
    topic: &str,
    partitions: i32,
) -> Vec<Option<i64>> {
    let bootstrap_servers = bootstrap_servers.to_string();
    let group_id = group_id.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap_servers)
            .set("group.id", &group_id)
            .set("enable.auto.commit", "false")
            .create()
            .expect("a reader of committed offsets can be created");
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(&topic, partition);
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(5))
            .expect("committed offsets can be read");
        (0..partitions)
            .map(|partition| {
                match committed
                    .find_partition(&topic, partition)
                    .map(|element| element.offset())
                {
                    Some(Offset::Offset(offset)) => Some(offset),
                    _ => None,
                }
            })
            .collect()
    })
    .await
    .expect("the offsets reader does not panic")
}

/// A record read back from a topic.
#[derive(Debug)]
pub struct ReadRecord {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Reads `count` records of `topic` from the beginning (blocking; call from a blocking
/// thread). Panics when fewer arrive within 20 s.
pub fn read_records(
    bootstrap_servers: &str,
    topic: &str,
    partitions: i32,
    count: usize,
) -> Vec<ReadRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", "test-record-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("dead-letter reader");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("valid partition");
    }
    consumer
        .assign(&assignment)
        .expect("assign the topic's partitions");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut records = Vec::new();
    while records.len() < count && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|header| {
                            let value = header
                                .value
                                .map(|value| String::from_utf8_lossy(value).into_owned());
                            (header.key.to_string(), value.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(ReadRecord {
                partition: message.partition(),
                key: message.key().map(<[u8]>::to_vec),
                value: message.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    assert_eq!(
        records.len(),
        count,
        "records of {topic} read before the deadline"
    );
    records
}
