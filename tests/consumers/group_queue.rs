//! A record that lands on the group queue instead of its partition's queue is never skipped:
//! the partition is split off then and sought back to it.

use std::time::Duration;

use commerce_events::kafka::consumer::split_late;
use testkit::handler::ScriptedHandler;
use testkit::pipeline::{PARTITIONS, Pipeline};
use testkit::records::coupon_request;
use testkit::wait::eventually;

/// Groups of this prefix split their partitions' queues only once records arrive on the
/// group queue (the test hook), so the first fetch of every partition lands there.
const SPLIT_LATE_PREFIX: &str = "split-late-";

#[actix_web::test]
async fn records_that_land_on_the_group_queue_are_read_in_offset_order_by_their_partition_actor() {
    split_late(SPLIT_LATE_PREFIX);
    let pipeline = Pipeline::start_with(|settings| {
        settings.kafka.group_prefix = SPLIT_LATE_PREFIX.to_string();
    })
    .await;
    let events: Vec<_> = (0..9).map(|user| coupon_request(300 + user)).collect();
    for (position, event) in events.iter().enumerate() {
        pipeline
            .publish_to(position as i32 % PARTITIONS, event)
            .await;
    }

    let member = pipeline.join(ScriptedHandler::new());
    eventually("every record handled", Duration::from_secs(30), || async {
        member.handler.recorder.done_count() >= events.len()
    })
    .await;

    let handled = member.handler.recorder.done_by_partition();
    for partition in 0..PARTITIONS {
        let published: Vec<_> = events
            .iter()
            .enumerate()
            .filter(|(position, _)| *position as i32 % PARTITIONS == partition)
            .map(|(_, event)| event.event_id)
            .collect();
        assert_eq!(
            handled.get(&partition),
            Some(&published),
            "partition {partition}: each record once, in offset order"
        );
    }
    let (group, _) = member.observe().await;
    assert!(
        group.records_on_group_queue > 0,
        "the records did land on the group queue: {group:?}"
    );
    assert_eq!(
        (group.late_splits, group.unsplittable),
        (PARTITIONS as u64, 0),
        "{group:?}"
    );
    pipeline
        .wait_for_commits(&[Some(3), Some(3), Some(3)])
        .await;
}
