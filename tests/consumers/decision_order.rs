//! The CouponIssuer's store deciding a user's requests in the order they were accepted, and
//! refusing a batch from an owner that lost its partition.

use commerce_events::actors::domain::BatchOrigin;
use commerce_events::common::ids::CouponHistoryId;
use commerce_events::coupons::owners::{Ownership, PartitionOwners};
use commerce_events::coupons::store::{CouponStore, CouponStoreError, RequestOutcome};
use commerce_events::event_log::EventStatus;
use commerce_events::events::EventId;
use commerce_events::kafka::TopicPartition;
use commerce_events::outbox::Outbox;

use testkit::pipeline::Pipeline;
use testkit::records::{new_coupon, recorded_requests};

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
