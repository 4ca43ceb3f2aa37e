//! The CouponIssuer deciding a user's requests in the order they were accepted, and refusing
//! a batch from an owner that lost its partition (at the store, and as two members of a
//! group whose old owner's batch outlives its drain).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use commerce_events::actors::consumer_group::ConsumerGroupSpec;
use commerce_events::actors::domain::{
    Batch, BatchOrigin, DomainHandler, EventOutcome, ObserveDomain, Stats,
};
use commerce_events::common::connections::RedisConnection;
use commerce_events::common::ids::CouponHistoryId;
use commerce_events::coupons::issuer::{CouponIssuer, IssuerStats};
use commerce_events::coupons::locks::RedisLocks;
use commerce_events::coupons::owners::{Ownership, PartitionOwners};
use commerce_events::coupons::store::{CouponStore, CouponStoreError, RequestOutcome};
use commerce_events::event_log::EventStatus;
use commerce_events::events::EventId;
use commerce_events::kafka::TopicPartition;
use commerce_events::outbox::Outbox;
use tokio::sync::Notify;

use testkit::pipeline::{PARTITIONS, Pipeline};
use testkit::records::{histories_of, new_coupon, recorded_request_events, recorded_requests};
use testkit::wait::eventually;

fn history(outcome: &RequestOutcome) -> CouponHistoryId {
    match outcome {
        RequestOutcome::Decided {
            coupon_history_id: Some(id),
            ..
        } => *id,
        other => panic!("not issued: {other:?}"),
    }
}

#[actix_web::test]
async fn a_users_earlier_undecided_request_is_decided_before_the_later_one_that_arrived_first() {
    let pipeline = Pipeline::start().await;
    let outbox = Outbox::new(pipeline.event_log.clone(), pipeline.publisher.clone());
    let store = CouponStore::new(outbox.clone());
    let (first, second) = (
        store.create(&new_coupon(5)).await.unwrap(),
        store.create(&new_coupon(5)).await.unwrap(),
    );
    // User 7 asks for the first coupon, then (answered) for the second; only the second's
    // record reaches the issuer.
    let earlier = recorded_requests(&outbox, first.coupon_id, [7]).await;
    let later = recorded_requests(&outbox, second.coupon_id, [7]).await;

    let batch = store.issue(&later, 0, None).await.unwrap();
    assert_eq!(batch.decided_ahead, 1, "{:?}", batch.outcomes);
    let earlier_id = EventId::from(earlier[0].request.request_id);
    let earlier_row = pipeline.event_log.find(earlier_id).await.unwrap().unwrap();
    assert_eq!(earlier_row.status, EventStatus::Completed, "decided ahead");
    let (earlier_history,): (CouponHistoryId,) =
        sqlx::query_as("SELECT coupon_history_id FROM coupon_history WHERE request_id = ?")
            .bind(earlier[0].request.request_id)
            .fetch_one(pipeline.event_log.pool())
            .await
            .unwrap();
    assert!(
        earlier_history < history(&batch.outcomes[0]),
        "the earlier request's coupon history comes first"
    );

    // Its own record, arriving late, finds it decided.
    let redelivered = store.issue(&earlier, 0, None).await.unwrap();
    assert_eq!(redelivered.outcomes, vec![RequestOutcome::AlreadyDecided]);
    assert_eq!(redelivered.decided_ahead, 0);
}

#[actix_web::test]
async fn a_batch_of_an_owner_that_lost_its_partition_decides_nothing() {
    let pipeline = Pipeline::start().await;
    let pool = pipeline.event_log.pool().clone();
    let outbox = Outbox::new(pipeline.event_log.clone(), pipeline.publisher.clone());
    let store = CouponStore::new(outbox.clone());
    let coupon = store.create(&new_coupon(5)).await.unwrap();
    let requests = recorded_requests(&outbox, coupon.coupon_id, [1, 2]).await;
    let origin = |assignment| BatchOrigin {
        source: TopicPartition::new("coupon-requests", 2),
        offsets: vec![0, 1].into(),
        assignment,
    };

    // The old owner (one process) takes the partition; a new owner (another process) takes
    // it after a revoke whose drain timed out.
    let (old_owner, new_owner) = (
        PartitionOwners::new(pool.clone(), "old"),
        PartitionOwners::new(pool.clone(), "new"),
    );
    let Ownership::Owner(old_fence) = old_owner.fence_for(&origin(1)).await.unwrap() else {
        panic!("the first owner owns it");
    };
    let Ownership::Owner(new_fence) = new_owner.fence_for(&origin(1)).await.unwrap() else {
        panic!("the new owner owns it");
    };
    assert_eq!((old_fence.epoch, new_fence.epoch), (1, 2));

    // The old owner's batch still runs: it is fenced, and changes nothing.
    let stale = store.issue(&requests, 2, Some(&old_fence)).await;
    assert!(
        matches!(stale, Err(CouponStoreError::Fenced)),
        "{:?}",
        stale.map(|batch| batch.outcomes)
    );
    for request in &requests {
        let row = pipeline
            .event_log
            .find(EventId::from(request.request.request_id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            row.status,
            EventStatus::Published,
            "undecided, as the intake left it"
        );
    }
    let issued = store.issue(&requests, 2, Some(&new_fence)).await.unwrap();
    assert!(
        issued
            .outcomes
            .iter()
            .all(|outcome| matches!(outcome, RequestOutcome::Decided { .. })),
        "{:?}",
        issued.outcomes
    );

    // Within one process: a batch of an older assignment than one already seen is stale.
    assert!(matches!(
        new_owner.fence_for(&origin(3)).await.unwrap(),
        Ownership::Owner(_)
    ));
    assert_eq!(
        new_owner.fence_for(&origin(1)).await.unwrap(),
        Ownership::Stale
    );
}

/// The CouponIssuer, whose first batch once `armed` waits for `release` before it decides:
/// an issuer stuck in a slow transaction, longer than the drain timeout.
struct HeldIssuer {
    issuer: CouponIssuer,
    armed: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
    release: Arc<Notify>,
}

impl DomainHandler for HeldIssuer {
    type Stats = IssuerStats;

    fn name(&self) -> &'static str {
        "CouponIssuer"
    }

    async fn handle(&self, batch: &Batch, stats: &Stats<IssuerStats>) -> Vec<EventOutcome> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.holding.store(true, Ordering::SeqCst);
            self.release.notified().await;
        }
        self.issuer.handle(batch, stats).await
    }
}

#[actix_web::test]
async fn a_stale_owners_batch_that_outlived_its_drain_is_fenced_and_the_new_owner_decides() {
    let pipeline = Pipeline::start_with(|settings| {
        settings.kafka.consumer.drain_timeout_ms = 500;
    })
    .await;
    let pool = pipeline.event_log.pool().clone();
    let outbox = Outbox::new(pipeline.event_log.clone(), pipeline.publisher.clone());
    let store = CouponStore::new(outbox.clone());
    let coupon = store.create(&new_coupon(100)).await.unwrap();
    let redis = RedisConnection::new(&pipeline.settings.redis).unwrap();
    redis.connect().await;
    let (armed, holding, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(Notify::new()),
    );
    let issuer = |instance: &'static str, armed: Arc<AtomicBool>| {
        let (store, redis, holding, release) = (
            store.clone(),
            redis.clone(),
            holding.clone(),
            release.clone(),
        );
        let owners = PartitionOwners::new(pool.clone(), instance);
        let factory = {
            let owners = owners.clone();
            move || HeldIssuer {
                issuer: CouponIssuer::new(
                    store.clone(),
                    RedisLocks::new(redis.clone(), Duration::from_secs(5)),
                    owners.clone(),
                ),
                armed: armed.clone(),
                holding: holding.clone(),
                release: release.clone(),
            }
        };
        // As the daemon wires it: each assignment takes its epoch before its first batch.
        let fenced = move |spec: &mut ConsumerGroupSpec| {
            spec.partitions.on_assigned = Some(Arc::new(owners));
        };
        (factory, fenced)
    };

    // The old owner takes every partition, then holds a batch.
    let (factory, fenced) = issuer("old", armed.clone());
    let (old_group, old_issuer) = pipeline.join_customized(factory, fenced);
    eventually(
        "the old owner holds every partition",
        Duration::from_secs(30),
        || async { old_group.observe().await.partitions.len() == PARTITIONS as usize },
    )
    .await;
    armed.store(true, Ordering::SeqCst);
    let events = recorded_request_events(&outbox, coupon.coupon_id, 1..=6).await;
    for (position, event) in events.iter().enumerate() {
        pipeline
            .publish_to(position as i32 % PARTITIONS, event)
            .await;
    }
    eventually("a batch held", Duration::from_secs(30), || async {
        holding.load(Ordering::SeqCst)
    })
    .await;

    // A new owner joins and the old one leaves, giving up the held batch at the drain
    // deadline: the new owner reads it again and decides every request.
    let (factory, fenced) = issuer("new", Arc::new(AtomicBool::new(false)));
    let (new_group, new_issuer) = pipeline.join_customized(factory, fenced);
    old_group.shutdown().await;
    let decided = || async {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM event_log WHERE event_type = 'CouponRequested' \
             AND status IN ('COMPLETED', 'NOTIFIED')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        count
    };
    eventually(
        "the new owner decided every request",
        Duration::from_secs(30),
        || async { decided().await == events.len() as i64 },
    )
    .await;

    // The old owner's batch goes on: it is fenced, and changes nothing.
    release.notify_one();
    let fenced = || async {
        let state = old_issuer.send(ObserveDomain).await.unwrap();
        state.details["batchesFenced"].as_u64().unwrap_or(0)
    };
    eventually(
        "the old owner's batch fenced",
        Duration::from_secs(30),
        || async { fenced().await >= 1 },
    )
    .await;
    assert_eq!(
        histories_of(&pool, coupon.coupon_id).await,
        6,
        "each request issued once"
    );
    let (old, new) = (
        old_issuer.send(ObserveDomain).await.unwrap(),
        new_issuer.send(ObserveDomain).await.unwrap(),
    );
    assert_eq!(
        (old.failed, new.failed),
        (0, 0),
        "no failure counted: {old:?} {new:?}"
    );
    // The old owner decided the batches of the partitions it did not hold back (two events
    // each, at most two partitions); the held batch's events were the new owner's.
    assert!(old.processed <= 4, "{old:?}");
    assert!(new.processed >= 2, "{new:?}");
    assert_eq!(new.details["batchesFenced"], 0, "{new:?}");
    new_group.shutdown().await;
}
