//! A hot coupon's stock split over shard rows (`coupons.stock_shards`): batches from
//! different partitions take from different rows, a shard that runs dry borrows from the
//! others, the total stays exact and `find` answers one `remaining`.

use commerce_events::common::ids::CouponId;
use commerce_events::coupons::store::{CouponStore, RequestOutcome};
use commerce_events::outbox::Outbox;
use sqlx::MySqlPool;

use testkit::pipeline::Pipeline;
use testkit::records::{histories_of, new_coupon, recorded_requests};

fn issued(outcomes: &[RequestOutcome]) -> usize {
    outcomes
        .iter()
        .filter(|outcome| {
            matches!(
                outcome,
                RequestOutcome::Decided {
                    coupon_history_id: Some(_),
                    ..
                }
            )
        })
        .count()
}

/// (total, issued) of each shard row, in shard order, and the coupon row's own count.
async fn shards(pool: &MySqlPool, coupon_id: CouponId) -> (Vec<(u32, u32)>, u32) {
    let shards = sqlx::query_as(
        "SELECT total_quantity, issued_quantity FROM coupon_stock_shard \
         WHERE coupon_id = ? ORDER BY shard",
    )
    .bind(coupon_id)
    .fetch_all(pool)
    .await
    .unwrap();
    let (row,): (u32,) = sqlx::query_as("SELECT issued_quantity FROM coupon WHERE coupon_id = ?")
        .bind(coupon_id)
        .fetch_one(pool)
        .await
        .unwrap();
    (shards, row)
}

#[actix_web::test]
async fn batches_of_three_partitions_issue_exactly_the_stock_of_a_sharded_coupon() {
    let pipeline = Pipeline::start().await;
    let pool = pipeline.event_log.pool().clone();
    let outbox = Outbox::new(pipeline.event_log.clone(), pipeline.publisher.clone());
    let store = CouponStore::new(outbox.clone()).with_stock_shards(3);
    let coupon = store.create(&new_coupon(10)).await.unwrap();
    assert_eq!(
        shards(&pool, coupon.coupon_id).await,
        (vec![(4, 0), (3, 0), (3, 0)], 0),
        "the stock split as evenly as it goes"
    );

    // 3 partitions × 4 batches of 5 requests, all at once: 60 users for a stock of 10.
    let mut batches = Vec::new();
    for batch in 0..12u64 {
        let users = batch * 5 + 1..=batch * 5 + 5;
        batches.push((
            (batch % 3) as u32,
            recorded_requests(&outbox, coupon.coupon_id, users).await,
        ));
    }
    let decided = futures::future::join_all(batches.iter().map(|(partition, requests)| {
        let store = store.clone();
        async move { store.issue(requests, *partition, None).await.unwrap() }
    }))
    .await;
    let issued: usize = decided.iter().map(|batch| issued(&batch.outcomes)).sum();
    assert_eq!(issued, 10, "exactly the stock, never more");

    let (shard_rows, coupon_row) = shards(&pool, coupon.coupon_id).await;
    assert_eq!(
        shard_rows,
        vec![(4, 4), (3, 3), (3, 3)],
        "every shard ran dry"
    );
    assert_eq!(coupon_row, 0, "a sharded coupon's own row is not the stock");
    assert_eq!(histories_of(&pool, coupon.coupon_id).await, 10);
    let found = store.find(coupon.coupon_id).await.unwrap().unwrap();
    assert_eq!((found.issued_quantity, found.remaining), (10, 0));
}

#[actix_web::test]
async fn a_shard_that_runs_dry_borrows_from_the_others() {
    let pipeline = Pipeline::start().await;
    let pool = pipeline.event_log.pool().clone();
    let outbox = Outbox::new(pipeline.event_log.clone(), pipeline.publisher.clone());
    let store = CouponStore::new(outbox.clone()).with_stock_shards(3);
    let coupon = store.create(&new_coupon(6)).await.unwrap();

    // One partition only: its shard (1) has 2; the other 3 come from shards 2 and 0.
    let requests = recorded_requests(&outbox, coupon.coupon_id, 1..=5).await;
    let batch = store.issue(&requests, 1, None).await.unwrap();
    assert_eq!(issued(&batch.outcomes), 5, "five of six issued");
    assert_eq!(
        shards(&pool, coupon.coupon_id).await.0,
        vec![(2, 1), (2, 2), (2, 2)],
        "its own shard first, then the next ones round"
    );
    let found = store.find(coupon.coupon_id).await.unwrap().unwrap();
    assert_eq!((found.issued_quantity, found.remaining), (5, 1));

    // The last unit, then sold out.
    let requests = recorded_requests(&outbox, coupon.coupon_id, 6..=7).await;
    let batch = store.issue(&requests, 1, None).await.unwrap();
    assert_eq!(issued(&batch.outcomes), 1);
    assert_eq!(
        shards(&pool, coupon.coupon_id).await.0,
        vec![(2, 2), (2, 2), (2, 2)]
    );

    // A stock smaller than the shard count gets one shard per unit.
    let small = store.create(&new_coupon(2)).await.unwrap();
    assert_eq!(
        shards(&pool, small.coupon_id).await,
        (vec![(1, 0), (1, 0)], 0)
    );
    // One shard is the coupon row itself, as before.
    let plain = CouponStore::new(outbox.clone())
        .create(&new_coupon(5))
        .await
        .unwrap();
    assert_eq!(shards(&pool, plain.coupon_id).await, (vec![], 0));
}
