use std::time::Duration;

use testkit::handler::ScriptedHandler;
use testkit::pipeline::Pipeline;
use testkit::records::coupon_request;
use testkit::wait::eventually;

#[actix_web::test]
async fn a_record_flows_through_its_partition_actor_to_the_domain_actor_and_its_offset_is_committed()
 {
    let pipeline = Pipeline::start().await;
    let member = pipeline.join(ScriptedHandler::new());
    member.wait_until_assigned().await;

    let first = coupon_request(113);
    let second = coupon_request(114);
    pipeline.publish_to(1, &first).await;
    pipeline.publish_to(1, &second).await;

    eventually("both events handled", Duration::from_secs(20), || async {
        member.handler.recorder.done_count() == 2
    })
    .await;
    assert_eq!(
        member.handler.recorder.done(),
        vec![(1, first.event_id), (1, second.event_id)],
        "handled once each, in offset order, by the actor of partition 1"
    );
    pipeline.wait_for_commits(&[None, Some(2), None]).await;
    let (group, domain) = member.observe().await;
    let partition = &group.partitions[1];
    assert_eq!(
        (
            partition.partition,
            partition.last_stored_offset,
            partition.processed
        ),
        (1, Some(2), 2)
    );
    assert_eq!(domain.processed, 2);
}

#[actix_web::test]
async fn a_second_member_takes_over_from_the_committed_offset_without_reprocessing() {
    let pipeline = Pipeline::start().await;
    let first_member = pipeline.join(ScriptedHandler::new());
    first_member.wait_until_assigned().await;
    let before: Vec<_> = (0..6).map(|n| coupon_request(100 + n as u64)).collect();
    for (n, event) in before.iter().enumerate() {
        pipeline.publish_to(n as i32 % 3, event).await;
    }
    pipeline
        .wait_for_commits(&[Some(2), Some(2), Some(2)])
        .await;
    first_member.group.shutdown().await;

    let second_member = pipeline.join(ScriptedHandler::new());
    second_member.wait_until_assigned().await;
    let after: Vec<_> = (0..6).map(|n| coupon_request(200 + n as u64)).collect();
    for (n, event) in after.iter().enumerate() {
        pipeline.publish_to(n as i32 % 3, event).await;
    }
    eventually(
        "the new events handled by the second member",
        Duration::from_secs(20),
        || async { second_member.handler.recorder.done_count() >= after.len() },
    )
    .await;

    let mut handled = second_member.handler.recorder.done_ids();
    handled.sort();
    let mut expected: Vec<_> = after.iter().map(|event| event.event_id).collect();
    expected.sort();
    assert_eq!(
        handled, expected,
        "the second member handled exactly the events after the commit"
    );
    pipeline
        .wait_for_commits(&[Some(4), Some(4), Some(4)])
        .await;
}

#[actix_web::test]
async fn a_slow_partition_does_not_hold_back_the_others() {
    let pipeline = Pipeline::start().await;
    let handler = ScriptedHandler::new();
    let gate = handler.gate(0);
    let member = pipeline.join(handler);
    member.wait_until_assigned().await;

    let held = coupon_request(115);
    pipeline.publish_to(0, &held).await;
    let others: Vec<_> = (0..4).map(|n| coupon_request(300 + n as u64)).collect();
    for (n, event) in others.iter().enumerate() {
        pipeline.publish_to(1 + n as i32 % 2, event).await;
    }
    eventually(
        "partitions 1 and 2 handled while 0 is held",
        Duration::from_secs(20),
        || async { member.handler.recorder.done_count() == others.len() },
    )
    .await;
    let (group, _) = member.observe().await;
    assert_eq!(
        group.partitions[0].in_flight, 1,
        "partition 0 still holds its batch"
    );
    assert_eq!(group.partitions[0].last_stored_offset, None);

    gate.add_permits(1);
    eventually(
        "partition 0 handled once released",
        Duration::from_secs(20),
        || async { member.handler.recorder.done_count() == others.len() + 1 },
    )
    .await;
    pipeline
        .wait_for_commits(&[Some(1), Some(2), Some(2)])
        .await;
}
