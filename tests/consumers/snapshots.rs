//! The observable state of a consumer group and its domain actor through a scripted run.

use std::time::Duration;

use commerce_events::actors::domain::HandlerError;
use insta::assert_json_snapshot;
use serde_json::json;

use testkit::handler::{ScriptedHandler, Step};
use testkit::pipeline::{Member, Pipeline};
use testkit::records::coupon_request;
use testkit::wait::eventually;

async fn snapshot_of(member: &Member) -> serde_json::Value {
    let (group, domain) = member.observe().await;
    json!({ "group": group, "domainActor": domain })
}

#[actix_web::test]
async fn the_actor_tree_through_a_scripted_run() {
    let pipeline = Pipeline::start().await;
    let handler = ScriptedHandler::new();
    let member = pipeline.join(handler.clone());
    member.wait_until_assigned().await;
    assert_json_snapshot!("1_assigned", snapshot_of(&member).await);

    for user_id in [1, 2] {
        pipeline.publish_to(0, &coupon_request(user_id)).await;
    }
    pipeline.publish_to(1, &coupon_request(101)).await;
    eventually("three events handled", Duration::from_secs(20), || async {
        handler.recorder.done_count() == 3
    })
    .await;
    pipeline.wait_for_commits(&[Some(2), Some(1), None]).await;
    assert_json_snapshot!("2_three_events_processed", snapshot_of(&member).await);

    pipeline.publish_bytes(2, None, Some(b"not an event")).await;
    pipeline
        .wait_for_commits(&[Some(2), Some(1), Some(1)])
        .await;
    assert_json_snapshot!("3_poison_pill_dead_lettered", snapshot_of(&member).await);

    let fatal = coupon_request(102);
    handler.script(
        fatal.event_id,
        [Step::Fail(HandlerError::fatal("broken state"))],
    );
    pipeline.publish_to(1, &fatal).await;
    pipeline
        .wait_for_commits(&[Some(2), Some(2), Some(1)])
        .await;
    assert_json_snapshot!(
        "4_restarted_after_a_fatal_error",
        snapshot_of(&member).await
    );

    member.group.shutdown().await;
    assert_json_snapshot!("5_after_shutdown", snapshot_of(&member).await);
}
