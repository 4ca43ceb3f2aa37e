use std::collections::BTreeSet;
use std::time::Duration;

use testkit::handler::ScriptedHandler;
use testkit::pipeline::Pipeline;
use testkit::records::coupon_request;
use testkit::wait::eventually;

/// The embedded (librdkafka mock) coordinator refuses offset commits while a rebalance is
/// in progress, where a real broker accepts them from the current generation; so here some
/// records handled just before the rebalance may be handled again by their new owner.
/// Losing one is never acceptable.
#[actix_web::test]
async fn a_second_member_joining_moves_partitions_without_losing_records() {
    let pipeline = Pipeline::start().await;
    let first_member = pipeline.join(ScriptedHandler::new());
    first_member.wait_until_assigned().await;
    assert_eq!(first_member.assigned_partitions().await, vec![0, 1, 2]);

    let mut published = Vec::new();
    for n in 0..30 {
        let event = coupon_request(400 + n as u64);
        pipeline.publish_to(n % 3, &event).await;
        published.push(event.event_id);
    }

    let second_member = pipeline.join(ScriptedHandler::new());
    // Keep publishing while the group rebalances.
    for n in 0..60 {
        let event = coupon_request(500 + n as u64);
        pipeline.publish_to(n % 3, &event).await;
        published.push(event.event_id);
        if n % 10 == 0 {
            actix_rt::task::yield_now().await;
        }
    }
    eventually(
        "both members own partitions",
        Duration::from_secs(30),
        || async {
            let first = first_member.assigned_partitions().await;
            let second = second_member.assigned_partitions().await;
            !first.is_empty() && !second.is_empty() && first.len() + second.len() == 3
        },
    )
    .await;
    for n in 0..30 {
        let event = coupon_request(600 + n as u64);
        pipeline.publish_to(n % 3, &event).await;
        published.push(event.event_id);
    }

    let published: BTreeSet<_> = published.into_iter().collect();
    let handled = || {
        let mut handled: BTreeSet<_> = first_member
            .handler
            .recorder
            .done_ids()
            .into_iter()
            .collect();
        handled.extend(second_member.handler.recorder.done_ids());
        handled
    };
    eventually(
        "every event handled by one of the members",
        Duration::from_secs(30),
        || async { handled().is_superset(&published) },
    )
    .await;
    assert_eq!(handled(), published, "nothing lost, nothing invented");
    assert!(
        second_member.handler.recorder.done_count() > 0,
        "the second member took work"
    );
    let first_partitions = first_member.assigned_partitions().await;
    let second_partitions = second_member.assigned_partitions().await;
    assert!(
        !first_partitions.is_empty() && !second_partitions.is_empty(),
        "the partitions are split: {first_partitions:?} / {second_partitions:?}"
    );
    pipeline
        .wait_for_commits(&[Some(40), Some(40), Some(40)])
        .await;
}
