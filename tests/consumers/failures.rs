use std::time::Duration;

use commerce_events::actors::domain::HandlerError;
use commerce_events::event_log::{EventStatus, OutboxEvent};
use commerce_events::kafka::dead_letter::{
    CONSUMER_GROUP_HEADER, ERROR_HEADER, ERROR_KIND_HEADER, ORIGINAL_OFFSET_HEADER,
    ORIGINAL_PARTITION_HEADER, ORIGINAL_TOPIC_HEADER,
};

use testkit::handler::{ScriptedHandler, Step};
use testkit::pipeline::{GROUP, Pipeline, TOPIC};
use testkit::records::coupon_request;
use testkit::wait::eventually;

#[actix_web::test]
async fn a_poison_pill_goes_to_the_dead_letter_topic_and_the_next_record_is_processed() {
    let pipeline =
        Pipeline::start_with(|settings| settings.kafka.consumer.max_record_bytes = 4_096).await;
    let member = pipeline.join(ScriptedHandler::new());
    member.wait_until_assigned().await;

    let valid = String::from_utf8(coupon_request(105).encode()).unwrap();
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("invalid-json", b"{\"eventId\": ".to_vec()),
        ("invalid-envelope", br#"{"hello": "world"}"#.to_vec()),
        (
            "unknown-event-type",
            valid
                .replace("CouponRequested", "CouponTeleported")
                .into_bytes(),
        ),
        (
            "invalid-payload",
            valid.replace("\"couponId\"", "\"colour\"").into_bytes(),
        ),
        ("oversized", vec![b' '; 5_000]),
    ];
    for (_, value) in &poison {
        pipeline
            .publish_bytes(2, Some(b"poison-key"), Some(value))
            .await;
    }
    let after = coupon_request(106);
    pipeline.publish_to(2, &after).await;

    eventually(
        "the event after the poison pills handled",
        Duration::from_secs(20),
        || async { member.handler.recorder.done_ids() == vec![after.event_id] },
    )
    .await;
    pipeline.wait_for_commits(&[None, None, Some(6)]).await;

    let letters = pipeline.dead_letters(poison.len()).await;
    for (offset, ((kind, value), letter)) in poison.iter().zip(&letters).enumerate() {
        assert_eq!(letter.partition, 2, "a dead letter keeps its partition");
        assert_eq!(letter.headers[ORIGINAL_TOPIC_HEADER], TOPIC);
        assert_eq!(letter.headers[ORIGINAL_PARTITION_HEADER], "2");
        assert_eq!(letter.headers[ORIGINAL_OFFSET_HEADER], offset.to_string());
        assert_eq!(letter.headers[CONSUMER_GROUP_HEADER], GROUP);
        assert_eq!(letter.headers[ERROR_KIND_HEADER], *kind);
        assert!(!letter.headers[ERROR_HEADER].is_empty());
        assert_eq!(letter.key.as_deref(), Some(&b"poison-key"[..]));
        if *kind != "oversized" {
            assert_eq!(
                letter.value.as_ref(),
                Some(value),
                "the original bytes are kept"
            );
        }
    }
    let (group, _) = member.observe().await;
    assert_eq!(group.partitions[2].dead_lettered, poison.len() as u64);
}

#[actix_web::test]
async fn a_fatal_error_restarts_the_domain_actor_and_the_event_is_retried() {
    let pipeline = Pipeline::start().await;
    let handler = ScriptedHandler::new();
    let event = coupon_request(107);
    handler.script(
        event.event_id,
        [Step::Fail(HandlerError::fatal("state corrupted"))],
    );
    let member = pipeline.join(handler);
    member.wait_until_assigned().await;

    pipeline.publish_to(0, &event).await;
    eventually(
        "the event handled after the restart",
        Duration::from_secs(20),
        || async { member.handler.recorder.done_ids() == vec![event.event_id] },
    )
    .await;
    let (group, domain) = member.observe().await;
    assert_eq!(
        (domain.restarts, domain.failed, domain.processed),
        (1, 1, 1)
    );
    assert_eq!(
        (
            group.partitions[0].retries,
            group.partitions[0].dead_lettered
        ),
        (1, 0)
    );
    pipeline.wait_for_commits(&[Some(1), None, None]).await;
}

#[actix_web::test]
async fn a_restart_for_one_partitions_fatal_error_leaves_another_partitions_batch_alone() {
    let pipeline = Pipeline::start().await;
    let handler = ScriptedHandler::new();
    let gate = handler.gate(0);
    let held = coupon_request(120);
    let fatal = coupon_request(121);
    handler.script(
        fatal.event_id,
        [Step::Fail(HandlerError::fatal("state corrupted"))],
    );
    let member = pipeline.join(handler);
    member.wait_until_assigned().await;

    // Partition 0's batch is in the handler, waiting at its gate.
    pipeline.publish_to(0, &held).await;
    eventually(
        "partition 0's batch in flight",
        Duration::from_secs(20),
        || async { member.observe().await.0.partitions[0].in_flight == 1 },
    )
    .await;
    // Partition 1's batch fails fatally: the domain actor restarts and retries it.
    pipeline.publish_to(1, &fatal).await;
    eventually(
        "the fatal event handled after the restart",
        Duration::from_secs(20),
        || async { member.handler.recorder.done_ids() == vec![fatal.event_id] },
    )
    .await;
    assert_eq!(member.observe().await.1.restarts, 1);

    gate.add_permits(1);
    eventually(
        "partition 0's batch finished",
        Duration::from_secs(20),
        || async { member.handler.recorder.done_count() == 2 },
    )
    .await;
    let (group, _) = member.observe().await;
    assert_eq!(
        member.handler.recorder.attempts_of(held.event_id),
        1,
        "the held batch ran once: the restart did not cancel it"
    );
    assert_eq!(group.partitions[0].retries, 0);
    pipeline.wait_for_commits(&[Some(1), Some(1), None]).await;
}

#[actix_web::test]
async fn a_panicking_handler_is_restarted_and_the_event_is_retried() {
    let pipeline = Pipeline::start().await;
    let handler = ScriptedHandler::new();
    let event = coupon_request(108);
    handler.script(event.event_id, [Step::Panic]);
    let member = pipeline.join(handler);
    member.wait_until_assigned().await;

    pipeline.publish_to(0, &event).await;
    eventually(
        "the event handled after the panic",
        Duration::from_secs(20),
        || async { member.handler.recorder.done_ids() == vec![event.event_id] },
    )
    .await;
    let (_, domain) = member.observe().await;
    assert_eq!((domain.restarts, domain.processed), (1, 1));
    assert_eq!(member.handler.recorder.attempts_of(event.event_id), 2);
}

#[actix_web::test]
async fn an_event_failing_past_its_retries_is_dead_lettered_and_the_partition_moves_on() {
    let pipeline = Pipeline::start().await;
    let handler = ScriptedHandler::new();
    let stubborn = coupon_request(109);
    handler.script(
        stubborn.event_id,
        vec![Step::Fail(HandlerError::retryable("database unreachable")); 10],
    );
    let member = pipeline.join(handler);
    member.wait_until_assigned().await;

    // The event has an event-log row, as an outbox-published event would.
    pipeline
        .record_pending(OutboxEvent {
            topic: TOPIC,
            envelope: stubborn.clone(),
        })
        .await;

    let next = coupon_request(110);
    pipeline.publish_to(1, &stubborn).await;
    pipeline.publish_to(1, &next).await;
    // Both offsets committed: the stubborn event was settled (dead-lettered), then the next.
    pipeline.wait_for_commits(&[None, Some(2), None]).await;

    assert_eq!(
        member.handler.recorder.attempts_of(stubborn.event_id),
        4,
        "first attempt and 3 retries"
    );
    assert!(member.handler.recorder.done_ids().contains(&next.event_id));
    assert!(
        !member
            .handler
            .recorder
            .done_ids()
            .contains(&stubborn.event_id)
    );
    let letters = pipeline.dead_letters(1).await;
    assert_eq!(letters[0].headers[ERROR_KIND_HEADER], "retries-exhausted");
    assert!(letters[0].headers[ERROR_HEADER].contains("database unreachable"));
    let row = pipeline
        .event_log
        .find(stubborn.event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, EventStatus::DeadLetter);
    assert!(row.last_error.unwrap().contains("database unreachable"));
}

#[actix_web::test]
async fn a_permanent_failure_is_dead_lettered_at_once() {
    let pipeline = Pipeline::start().await;
    let handler = ScriptedHandler::new();
    let refused = coupon_request(111);
    handler.script(
        refused.event_id,
        [Step::Fail(HandlerError::permanent("no such coupon"))],
    );
    let member = pipeline.join(handler);
    member.wait_until_assigned().await;

    let next = coupon_request(112);
    pipeline.publish_to(0, &refused).await;
    pipeline.publish_to(0, &next).await;
    eventually(
        "the next event handled",
        Duration::from_secs(20),
        || async { member.handler.recorder.done_ids() == vec![next.event_id] },
    )
    .await;
    assert_eq!(member.handler.recorder.attempts_of(refused.event_id), 1);
    let letters = pipeline.dead_letters(1).await;
    assert_eq!(letters[0].headers[ERROR_KIND_HEADER], "permanent");
    assert_eq!(letters[0].value.as_deref(), Some(&refused.encode()[..]));
    let (group, _) = member.observe().await;
    assert_eq!(
        (
            group.partitions[0].dead_lettered,
            group.partitions[0].retries
        ),
        (1, 0)
    );
}
