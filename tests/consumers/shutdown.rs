use std::time::Duration;

use testkit::handler::ScriptedHandler;
use testkit::pipeline::Pipeline;
use testkit::records::coupon_request;
use testkit::wait::eventually;

#[actix_web::test]
async fn shutdown_lets_the_batch_in_flight_finish_and_commits_it() {
    let pipeline = Pipeline::start().await;
    let handler = ScriptedHandler::new();
    let gate = handler.gate(1);
    let member = pipeline.join(handler);
    member.wait_until_assigned().await;

    let events: Vec<_> = (0..3).map(|n| coupon_request(700 + n as u64)).collect();
    for event in &events {
        pipeline.publish_to(1, event).await;
    }
    eventually(
        "the batch is in flight",
        Duration::from_secs(20),
        || async { member.observe().await.0.partitions[1].in_flight > 0 },
    )
    .await;
    // The records behind the held batch stay in the partition's queue.
    let in_flight = member.observe().await.0.partitions[1].in_flight;

    let group = member.group.clone();
    let shutdown = actix_rt::spawn(async move { group.shutdown().await });
    eventually(
        "the partition is draining",
        Duration::from_secs(20),
        || async {
            let partitions = member.observe().await.0.partitions;
            partitions.is_empty()
                || partitions[1].phase
                    == commerce_events::actors::partition::PartitionPhase::Draining
        },
    )
    .await;
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the batch in flight"
    );
    gate.add_permits(1);
    shutdown.await.unwrap();

    let expected: Vec<_> = events[..in_flight]
        .iter()
        .map(|event| event.event_id)
        .collect();
    assert_eq!(
        member.handler.recorder.done_ids(),
        expected,
        "the batch in flight, and nothing after it"
    );
    assert_eq!(
        pipeline.committed().await,
        vec![None, Some(in_flight as i64), None]
    );
}

#[actix_web::test]
async fn shutdown_gives_up_on_a_stuck_batch_at_the_drain_deadline_and_does_not_commit_it() {
    let pipeline =
        Pipeline::start_with(|settings| settings.kafka.consumer.drain_timeout_ms = 500).await;
    let handler = ScriptedHandler::new();
    let _never_opened = handler.gate(2);
    let member = pipeline.join(handler);
    member.wait_until_assigned().await;

    let done = coupon_request(103);
    let stuck = coupon_request(104);
    pipeline.publish_to(0, &done).await;
    pipeline.publish_to(2, &stuck).await;
    eventually(
        "the free partition handled",
        Duration::from_secs(20),
        || async { member.handler.recorder.done_count() == 1 },
    )
    .await;
    eventually(
        "the stuck batch is in flight",
        Duration::from_secs(20),
        || async { member.observe().await.0.partitions[2].in_flight == 1 },
    )
    .await;

    tokio::time::timeout(Duration::from_secs(10), member.group.shutdown())
        .await
        .expect("shutdown ends soon after the drain deadline");
    assert_eq!(
        pipeline.committed().await,
        vec![Some(1), None, None],
        "the stuck record stays uncommitted, for the next owner"
    );
}
