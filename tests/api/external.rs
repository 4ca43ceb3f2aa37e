//! Deliveries to an external system: a local webhook receiver scripted per test, the
//! ExternalForwarder, the RetryScheduler on a clock the test moves, dead letters and replay.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Timelike, Utc};
use commerce_events::common::clock::{Clock, ManualClock};
use commerce_events::common::ids::{OrderId, PaymentId, UserId};
use commerce_events::config::RecordOrdering;
use commerce_events::event_log::{EventRecord, EventStatus, OutboxEvent};
use commerce_events::events::topics;
use commerce_events::events::{EventEnvelope, EventId, EventPayload, PaymentCompleted};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use testkit::app::TestApp;
use testkit::receiver::{Received, Receiver, Reply, reply};
use testkit::records::read_records;
use testkit::wait::{eventually, eventually_found};

const WAIT: Duration = Duration::from_secs(30);
/// The signing secret of these tests, in the Standard Webhooks form.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The alerts `target` received, in order.
fn alerts(target: &Receiver) -> Vec<Value> {
    target
        .received_at("/alerts")
        .iter()
        .map(Received::json)
        .collect()
}

/// Waits for `count` deliveries of `id`, and no more.
async fn wait_for_deliveries(target: &Receiver, id: EventId, count: usize) -> Vec<Received> {
    eventually(&format!("{count} deliveries of {id}"), WAIT, || async {
        target.deliveries_of(id).len() >= count
    })
    .await;
    let deliveries = target.deliveries_of(id);
    assert_eq!(deliveries.len(), count, "no more deliveries than expected");
    deliveries
}

/// A daemon delivering to `target`, on `clock`.
async fn spawn_forwarding_app(target: &Receiver, clock: &ManualClock) -> TestApp {
    let base_url = target.address.clone();
    TestApp::builder()
        .clock(Arc::new(clock.clone()))
        .settings(move |settings| configure_external(settings, &base_url))
        .start()
        .await
}

fn configure_external(settings: &mut commerce_events::config::Settings, base_url: &str) {
    settings.external.base_url = base_url.to_string();
    settings.external.alert_url = format!("{base_url}/alerts");
    settings.external.signing_secret = SECRET.to_string().into();
    settings.external.poll_interval_ms = 20;
    settings.external.timeout_ms = 2_000;
}

/// A clock at a whole second (webhook timestamps are in seconds).
fn test_clock() -> ManualClock {
    ManualClock::starting_at(Utc::now().with_nanosecond(0).unwrap())
}

/// Records a PaymentCompleted event with the id `event_id` (so the receiver can be scripted
/// first) through the outbox and publishes it.
async fn record_payment(app: &TestApp, event_id: EventId, order_id: u64) -> EventId {
    let mut envelope = EventEnvelope::new(
        format!("order:{order_id}"),
        EventPayload::PaymentCompleted(PaymentCompleted {
            payment_id: PaymentId::from_u64(order_id + 1_000).unwrap(),
            order_id: OrderId::from_u64(order_id).unwrap(),
            user_id: UserId::from_u64(7).unwrap(),
            amount: 42_000,
            timestamp: Utc::now(),
        }),
    );
    envelope.event_id = event_id;
    let event = OutboxEvent::new(envelope);
    app.publish_through_outbox(&event).await;
    event_id
}

async fn wait_for_status(app: &TestApp, id: EventId, status: EventStatus) -> EventRecord {
    eventually(&format!("event {id} {status}"), WAIT, || async {
        app.event(id)
            .await
            .is_some_and(|record| record.status == status)
    })
    .await;
    app.event(id).await.unwrap()
}

/// Waits until `failed` attempts have failed and the next one is scheduled; returns when.
async fn wait_until_scheduled(app: &TestApp, id: EventId, failed: i32) -> DateTime<Utc> {
    eventually_found(
        &format!("event {id} scheduled after {failed} failed attempts"),
        WAIT,
        || async {
            match app.event(id).await {
                Some(record)
                    if record.status == EventStatus::Failed && record.retry_count == failed =>
                {
                    Ok(record.next_attempt_at.expect("a due time"))
                }
                seen => Err(Some(format!("{seen:?}"))),
            }
        },
    )
    .await
}

fn timestamps(deliveries: &[Received]) -> Vec<i64> {
    deliveries
        .iter()
        .map(|delivery| delivery.timestamp().expect("webhook-timestamp"))
        .collect()
}

fn gaps(deliveries: &[Received]) -> Vec<i64> {
    timestamps(deliveries)
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .collect()
}

async fn scheduler_state(app: &TestApp) -> Value {
    app.get("/admin/actors").await.1["retryScheduler"].clone()
}

/// Waits until every attempt made so far has its outcome recorded (its row moved on): the
/// attempts started equal the attempts settled.
async fn wait_until_attempts_settled(app: &TestApp) {
    eventually("every attempt settled", WAIT, || async {
        let state = scheduler_state(app).await;
        let count = |field: &str| state[field].as_u64().unwrap_or(0);
        count("firstAttempts") + count("attempts")
            == count("delivered")
                + count("scheduled")
                + count("waitingForTarget")
                + count("deadLettered")
    })
    .await;
}

/// Waits until the scheduler's counter `field` is `value` (counters move just after the
/// event-log row does); returns the state.
async fn wait_for_scheduler(app: &TestApp, field: &str, value: u64) -> Value {
    eventually(
        &format!("the retry scheduler's {field} at {value}"),
        WAIT,
        || async { scheduler_state(app).await[field] == value },
    )
    .await;
    scheduler_state(app).await
}

#[actix_web::test]
async fn a_receiver_failing_three_times_gets_four_attempts_one_two_four_seconds_apart() {
    let target = Receiver::start();
    let clock = test_clock();
    let app = spawn_forwarding_app(&target, &clock).await;
    let started = clock.now().timestamp();
    let id = EventId::generate();
    target.script(id, [reply(500), reply(503), reply(502)], reply(200));
    let id = record_payment(&app, id, 1).await;

    for (failed, delay) in [(1, 1), (2, 2), (3, 4)] {
        wait_for_deliveries(&target, id, failed as usize).await;
        let due = wait_until_scheduled(&app, id, failed).await;
        assert_eq!(due, clock.now() + chrono::Duration::seconds(delay));
        clock.advance(Duration::from_secs(delay as u64));
    }
    let deliveries = wait_for_deliveries(&target, id, 4).await;
    let record = wait_for_status(&app, id, EventStatus::Completed).await;

    assert_eq!(gaps(&deliveries), vec![1, 2, 4]);
    assert_eq!(timestamps(&deliveries)[0], started);
    assert!(
        deliveries
            .iter()
            .all(|delivery| delivery.webhook_id() == Some(id.to_string().as_str())),
        "the same webhook-id on every attempt"
    );
    assert!(
        deliveries
            .iter()
            .all(|delivery| delivery.path == "/webhooks/payment-completed")
    );
    assert_eq!(record.retry_count, 3, "three failed attempts counted");
    assert_eq!(record.next_attempt_at, None);
    let state = wait_for_scheduler(&app, "delivered", 1).await;
    assert_eq!(state["scheduled"], 3);
    assert_eq!(state["attempts"], 3);
    assert_eq!(state["delivered"], 1);
    assert_eq!(state["deadLettered"], 0);
}

#[actix_web::test]
async fn a_receiver_that_always_fails_gets_five_attempts_then_the_event_is_dead_lettered() {
    let target = Receiver::start();
    let clock = test_clock();
    let app = spawn_forwarding_app(&target, &clock).await;
    let id = EventId::generate();
    target.script(id, [], reply(500));
    let id = record_payment(&app, id, 2).await;

    for (failed, delay) in [(1, 1), (2, 2), (3, 4), (4, 8)] {
        wait_for_deliveries(&target, id, failed as usize).await;
        wait_until_scheduled(&app, id, failed).await;
        clock.advance(Duration::from_secs(delay));
    }
    let record = wait_for_status(&app, id, EventStatus::DeadLetter).await;
    let deliveries = wait_for_deliveries(&target, id, 5).await;

    assert_eq!(gaps(&deliveries), vec![1, 2, 4, 8]);
    assert_eq!(record.retry_count, 5);
    assert_eq!(
        record.last_error.as_deref(),
        Some("HTTP 500 (after 5 attempts)")
    );
    assert!(record.dead_lettered_at.is_some());

    let bootstrap = app.bootstrap_servers();
    let letters = tokio::task::spawn_blocking(move || {
        read_records(
            &bootstrap,
            &topics::dead_letter_topic(topics::EXTERNAL_EVENTS),
            3,
            1,
        )
    })
    .await
    .unwrap();
    let letter = &letters[0];
    assert_eq!(
        letter.headers["dlt-original-topic"],
        topics::EXTERNAL_EVENTS
    );
    assert_eq!(
        letter.headers["dlt-original-partition"],
        record.source.unwrap().partition.to_string()
    );
    assert_eq!(letter.partition, record.source.unwrap().partition);
    assert_eq!(
        letter.headers["dlt-original-offset"],
        record.source.unwrap().offset.to_string()
    );
    assert_eq!(letter.headers["dlt-consumer-group"], "external-event-group");
    assert_eq!(
        letter.headers["producer-instance"], app.settings.instance.id,
        "every record names the instance that produced it"
    );
    assert_eq!(letter.headers["dlt-error-kind"], "retries-exhausted");
    assert_eq!(letter.headers["dlt-error"], "HTTP 500 (after 5 attempts)");
    let value: Value = serde_json::from_slice(letter.value.as_deref().unwrap()).unwrap();
    assert_eq!(value["eventId"], id.to_string());
    assert_eq!(letter.key.as_deref(), Some("order:2".as_bytes()));

    // The alert: the counter, and the post to the alert URL.
    eventually("the alert posted", WAIT, || async {
        !alerts(&target).is_empty()
    })
    .await;
    let alerts = alerts(&target);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["alert"], "EVENT_DEAD_LETTERED");
    assert_eq!(alerts[0]["eventId"], id.to_string());
    assert_eq!(alerts[0]["attempts"], 5);
    let state = wait_for_scheduler(&app, "deadLettered", 1).await;
    assert_eq!(state["alerts"], 1);
    assert_eq!(state["alertsFailed"], 0);
}

#[actix_web::test]
async fn a_target_failing_for_every_event_is_waited_out_without_dead_letters() {
    let target = Receiver::start();
    let clock = test_clock();
    let app = spawn_forwarding_app(&target, &clock).await;
    let mut ids = Vec::new();
    for order in 0..4 {
        let id = EventId::generate();
        target.script(id, [], reply(503));
        ids.push(record_payment(&app, id, 40 + order).await);
    }
    for id in &ids {
        wait_for_deliveries(&target, *id, 1).await;
    }
    eventually("the target counted down", WAIT, || async {
        scheduler_state(&app).await["targetsDown"]
            .as_array()
            .is_some_and(|down| down.len() == 1)
    })
    .await;
    let (_, ready) = app.get("/readyz").await;
    assert_eq!(
        ready["outages"][0]["dependency"], "deliveryTarget",
        "{ready}"
    );

    // Far more tries than the five attempts an event has: none is spent while it is down.
    // The clock moves only once every attempt made is settled: a settle written after the
    // move would schedule its next try from the moved clock, past the next move.
    for round in 2..=8 {
        wait_until_attempts_settled(&app).await;
        clock.advance(Duration::from_secs(31));
        for id in &ids {
            eventually(&format!("try {round} of {id}"), WAIT, || async {
                target.deliveries_of(*id).len() >= round
            })
            .await;
        }
    }
    wait_until_attempts_settled(&app).await;
    for id in &ids {
        let record = app.event(*id).await.unwrap();
        assert_ne!(record.status, EventStatus::DeadLetter, "{record:?}");
        assert!(
            record.retry_count <= 2,
            "attempts spent while down: {record:?}"
        );
    }

    for id in &ids {
        target.script(*id, [], reply(200));
    }
    clock.advance(Duration::from_secs(31));
    for id in &ids {
        wait_for_status(&app, *id, EventStatus::Completed).await;
    }
    let state = scheduler_state(&app).await;
    assert_eq!(state["deadLettered"], 0);
    assert_eq!(state["targetsDown"], serde_json::json!([]));
    assert!(
        state["waitingForTarget"].as_u64().unwrap() >= 4 * 6,
        "{state}"
    );
    assert_eq!(app.get("/readyz").await.1["outages"], serde_json::json!([]));
}

#[actix_web::test]
async fn a_rejection_is_dead_lettered_at_once_and_too_many_requests_waits_as_asked() {
    let target = Receiver::start();
    let clock = test_clock();
    let app = spawn_forwarding_app(&target, &clock).await;
    let rejected = EventId::generate();
    target.script(rejected, [], reply(400));
    let throttled = EventId::generate();
    target.script(
        throttled,
        [Reply {
            status: 429,
            retry_after: Some("3"),
        }],
        reply(200),
    );
    let rejected = record_payment(&app, rejected, 3).await;
    let throttled = record_payment(&app, throttled, 4).await;

    let record = wait_for_status(&app, rejected, EventStatus::DeadLetter).await;
    assert_eq!(record.retry_count, 1);
    assert_eq!(
        record.last_error.as_deref(),
        Some("HTTP 400 (after 1 attempts)")
    );
    assert_eq!(target.deliveries_of(rejected).len(), 1);

    wait_for_deliveries(&target, throttled, 1).await;
    let due = wait_until_scheduled(&app, throttled, 1).await;
    assert_eq!(
        due,
        clock.now() + chrono::Duration::seconds(3),
        "Retry-After: 3 outweighs the 1 s back-off"
    );
    clock.advance(Duration::from_secs(3));
    let deliveries = wait_for_deliveries(&target, throttled, 2).await;
    wait_for_status(&app, throttled, EventStatus::Completed).await;
    assert_eq!(gaps(&deliveries), vec![3]);
    assert_eq!(
        target.deliveries_of(rejected).len(),
        1,
        "a rejection is never retried"
    );
}

#[actix_web::test]
async fn with_partition_ordering_later_events_are_delivered_while_one_waits_for_its_retry() {
    let target = Receiver::start();
    let clock = test_clock();
    let base_url = target.address.clone();
    let app = TestApp::builder()
        .clock(Arc::new(clock.clone()))
        .settings(move |settings| {
            configure_external(settings, &base_url);
            settings.external.ordering = RecordOrdering::Partition;
        })
        .start()
        .await;
    let failing = EventId::generate();
    target.script(failing, [reply(503)], reply(200));
    // The same order key: the same partition, behind the failing event.
    let failing = record_payment(&app, failing, 5).await;
    let mut later = Vec::new();
    for _ in 0..5 {
        later.push(record_payment(&app, EventId::generate(), 5).await);
    }

    for id in &later {
        wait_for_status(&app, *id, EventStatus::Completed).await;
    }
    // The clock has not moved: the failed event's second attempt cannot have happened.
    let record = app.event(failing).await.unwrap();
    assert_eq!(record.status, EventStatus::Failed);
    assert_eq!(record.retry_count, 1);
    assert_eq!(target.deliveries_of(failing).len(), 1);
    let source = record.source.unwrap();
    for id in &later {
        let later_source = app.event(*id).await.unwrap().source.unwrap();
        assert_eq!(later_source.partition, source.partition);
        assert!(later_source.offset > source.offset);
    }

    clock.advance(Duration::from_secs(1));
    wait_for_deliveries(&target, failing, 2).await;
    wait_for_status(&app, failing, EventStatus::Completed).await;
}

/// Waits until `id` is parked behind an earlier event of its key; returns its row.
async fn wait_until_parked(app: &TestApp, id: EventId, behind: EventId) -> EventRecord {
    eventually(&format!("event {id} parked"), WAIT, || async {
        app.event(id).await.is_some_and(|record| {
            record.status == EventStatus::Failed
                && record
                    .last_error
                    .as_deref()
                    .is_some_and(|error| error.contains(&format!("waiting behind event {behind}")))
        })
    })
    .await;
    app.event(id).await.unwrap()
}

#[actix_web::test]
async fn with_key_ordering_a_keys_later_events_wait_behind_its_retries_and_other_keys_go_on() {
    let target = Receiver::start();
    let clock = test_clock();
    let app = spawn_forwarding_app(&target, &clock).await;
    let failing = EventId::generate();
    target.script(failing, [reply(503), reply(503)], reply(200));
    let failing = record_payment(&app, failing, 5).await;
    let mut later = Vec::new();
    for _ in 0..3 {
        later.push(record_payment(&app, EventId::generate(), 5).await);
    }
    wait_until_scheduled(&app, failing, 1).await;
    let failing_source = app.event(failing).await.unwrap().source.unwrap();

    // The key's later events are parked: on the schedule, no attempt spent, not delivered.
    for id in &later {
        let parked = wait_until_parked(&app, *id, failing).await;
        assert_eq!(parked.retry_count, 0, "parking spends no attempt");
        assert!(parked.source.unwrap().offset > failing_source.offset);
        assert!(target.deliveries_of(*id).is_empty());
    }
    // Other keys read from the same partition after them are delivered: the partition is
    // not held.
    let mut same_partition_other_key = None;
    for order in 6..70 {
        let id = record_payment(&app, EventId::generate(), order).await;
        let record = wait_for_status(&app, id, EventStatus::Completed).await;
        if record.source.unwrap().partition == failing_source.partition {
            same_partition_other_key = Some(id);
            break;
        }
    }
    let other = same_partition_other_key.expect("some order key lands on the same partition");
    assert!(
        app.event(other).await.unwrap().source.unwrap().offset
            > app.event(later[2]).await.unwrap().source.unwrap().offset
    );

    // The second attempt fails too; the parked events, due just after it was, are looked
    // at and parked again behind its third attempt.
    clock.advance(Duration::from_secs(1));
    wait_for_deliveries(&target, failing, 2).await;
    let third_due = wait_until_scheduled(&app, failing, 2).await;
    clock.advance(Duration::from_millis(1));
    for id in &later {
        eventually("parked behind the third attempt", WAIT, || async {
            app.event(*id).await.unwrap().next_attempt_at
                == Some(third_due + chrono::Duration::milliseconds(1))
        })
        .await;
        assert!(target.deliveries_of(*id).is_empty());
    }

    // The third attempt goes through; the key's events follow in their order.
    clock.advance(Duration::from_secs(2));
    assert_eq!(clock.now(), third_due + chrono::Duration::milliseconds(1));
    for id in later.iter().chain([&failing]) {
        wait_for_status(&app, *id, EventStatus::Completed).await;
    }
    let sequence: Vec<EventId> = target
        .received()
        .into_iter()
        .filter_map(|received| received.webhook_id()?.parse().ok())
        .filter(|id| *id == failing || later.contains(id))
        .collect();
    assert_eq!(
        sequence,
        [vec![failing, failing, failing], later.clone()].concat(),
        "every attempt of the failing event comes before the key's later events, in order"
    );
    wait_until_attempts_settled(&app).await;
    let state = scheduler_state(&app).await;
    assert_eq!(
        state["parked"], 6,
        "three parked by the forwarder, three again: {state}"
    );
}
#[actix_web::test]
async fn a_retry_scheduled_before_a_restart_runs_once_after_it() {
    let target = Receiver::start();
    let clock = test_clock();
    let mut first = spawn_forwarding_app(&target, &clock).await;
    let id = EventId::generate();
    target.script(id, [reply(500)], reply(200));
    let id = record_payment(&first, id, 6).await;
    wait_for_deliveries(&target, id, 1).await;
    let due = wait_until_scheduled(&first, id, 1).await;
    first.stop().await.expect("clean stop");

    // The same database and cluster, a new process whose clock is past the due time.
    let (brokers, database) = (first.bootstrap_servers(), first.database_url());
    let later = ManualClock::starting_at(due + chrono::Duration::seconds(5));
    let base_url = target.address.clone();
    let second = TestApp::builder()
        .clock(Arc::new(later))
        .settings(move |settings| {
            configure_external(settings, &base_url);
            settings.instance.id = "second".into();
            settings.kafka.brokers = brokers;
            settings.database.url = database.into();
        })
        .start()
        .await;
    wait_for_status(&second, id, EventStatus::Completed).await;
    let deliveries = wait_for_deliveries(&target, id, 2).await;
    assert_eq!(gaps(&deliveries), vec![6]);
    wait_for_scheduler(&second, "delivered", 1).await;
}

#[actix_web::test]
async fn two_instances_never_make_the_same_attempt_twice() {
    let target = Receiver::start();
    let clock = test_clock();
    // Twenty events failing at once would count the target down (and spend no attempts);
    // here each failure is its event's own.
    let individually = |settings: &mut commerce_events::config::Settings| {
        settings.external.target_down_after_failures = 1_000;
    };
    let base_url = target.address.clone();
    let first = TestApp::builder()
        .clock(Arc::new(clock.clone()))
        .settings(move |settings| {
            configure_external(settings, &base_url);
            individually(settings);
        })
        .start()
        .await;
    let (brokers, database) = (first.bootstrap_servers(), first.database_url());
    let base_url = target.address.clone();
    let second = TestApp::builder()
        .clock(Arc::new(clock.clone()))
        .settings(move |settings| {
            configure_external(settings, &base_url);
            individually(settings);
            settings.instance.id = "second".into();
            settings.kafka.brokers = brokers;
            settings.database.url = database.into();
        })
        .start()
        .await;
    let mut ids = Vec::new();
    for order in 0..20 {
        let id = EventId::generate();
        target.script(id, [reply(500)], reply(200));
        ids.push(record_payment(&first, id, 100 + order).await);
    }
    for id in &ids {
        wait_until_scheduled(&first, *id, 1).await;
    }
    // Both schedulers see every retry due at once.
    clock.advance(Duration::from_secs(1));
    for id in &ids {
        wait_for_status(&first, *id, EventStatus::Completed).await;
    }
    for id in &ids {
        assert_eq!(target.deliveries_of(*id).len(), 2, "event {id}");
    }
    let attempts = |state: Value| state["attempts"].as_u64().unwrap();
    assert_eq!(
        attempts(scheduler_state(&first).await) + attempts(scheduler_state(&second).await),
        20
    );
}

#[actix_web::test]
async fn dead_letters_are_listed_and_replayed_and_completed_events_are_not() {
    let target = Receiver::start();
    let clock = test_clock();
    let app = spawn_forwarding_app(&target, &clock).await;
    let mut dead = Vec::new();
    for order in 0..3 {
        let id = EventId::generate();
        target.script(id, [reply(410)], reply(200));
        let id = record_payment(&app, id, 10 + order).await;
        wait_for_status(&app, id, EventStatus::DeadLetter).await;
        dead.push(id);
    }

    // Listed oldest first, two to a page.
    let (status, page) = app.get("/admin/events?status=DEAD_LETTER&limit=2").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let listed = |page: &Value| -> Vec<String> {
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|event| event["eventId"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        listed(&page),
        vec![dead[0].to_string(), dead[1].to_string()]
    );
    assert_eq!(page["events"][0]["retryCount"], 1);
    assert_eq!(
        page["events"][0]["lastError"],
        "HTTP 410 (after 1 attempts)"
    );
    let cursor = page["nextCursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (_, rest) = app
        .get(&format!(
            "/admin/events?status=DEAD_LETTER&limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(listed(&rest), vec![dead[2].to_string()]);
    assert!(rest.get("nextCursor").is_none(), "{rest}");

    // Replay: back to the scheduler, delivered (the receiver now accepts).
    let (status, accepted) = app
        .post(&format!("/admin/events/{}/replay", dead[0]), "")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["status"], "FAILED");
    let record = wait_for_status(&app, dead[0], EventStatus::Completed).await;
    assert_eq!(record.dead_lettered_at, None);
    assert_eq!(target.deliveries_of(dead[0]).len(), 2);
    let (_, remaining) = app.get("/admin/events?status=DEAD_LETTER").await;
    assert_eq!(
        listed(&remaining),
        vec![dead[1].to_string(), dead[2].to_string()]
    );

    // Refusals.
    let (status, refused) = app
        .post(&format!("/admin/events/{}/replay", dead[0]), "")
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(refused["error"]["code"], "ALREADY_COMPLETED");
    let (status, missing) = app
        .post(&format!("/admin/events/{}/replay", EventId::generate()), "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    let (status, invalid) = app.post("/admin/events/not-an-id/replay", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(invalid["error"]["code"], "INVALID_EVENT_ID");
    let (status, unlisted) = app.get("/admin/events?status=FAILED").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(unlisted["error"]["code"], "STATUS_NOT_LISTABLE");
    let (status, bad_cursor) = app
        .get("/admin/events?status=DEAD_LETTER&cursor=nonsense")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_cursor["error"]["code"], "INVALID_CURSOR");

    // An event waiting for its retry is not a dead letter.
    let waiting = EventId::generate();
    target.script(waiting, [reply(500)], reply(200));
    let waiting = record_payment(&app, waiting, 20).await;
    wait_until_scheduled(&app, waiting, 1).await;
    let (status, refused) = app
        .post(&format!("/admin/events/{waiting}/replay"), "")
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(refused["error"]["code"], "NOT_DEAD_LETTERED");
    assert_eq!(scheduler_state(&app).await["replayed"], 1);
}

#[actix_web::test]
async fn deliveries_are_signed_as_standard_webhooks_documents() {
    let target = Receiver::start();
    let clock = test_clock();
    let app = spawn_forwarding_app(&target, &clock).await;
    let id = record_payment(&app, EventId::generate(), 30).await;
    wait_for_status(&app, id, EventStatus::Completed).await;
    let delivery = target.deliveries_of(id).remove(0);

    // HMAC-SHA256 keyed with the base64-decoded secret, over "{id}.{timestamp}.{body}".
    let key = BASE64
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(
        format!(
            "{}.{}.",
            delivery.webhook_id().unwrap(),
            delivery.timestamp().unwrap()
        )
        .as_bytes(),
    );
    mac.update(&delivery.body);
    let expected = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
    assert_eq!(delivery.signature(), Some(expected.as_str()));
    assert_eq!(delivery.timestamp(), Some(clock.now().timestamp()));

    let body: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(body["type"], "PaymentCompleted");
    assert_eq!(body["eventId"], id.to_string());
    assert_eq!(
        body["data"],
        json!({"paymentId": 1030, "orderId": 30, "userId": 7, "amount": 42000,
               "timestamp": body["data"]["timestamp"]})
    );
}

#[actix_web::test]
async fn the_retry_scheduler_through_schedule_fire_fail_dead_letter_and_replay() {
    let target = Receiver::start();
    let clock = test_clock();
    let app = spawn_forwarding_app(&target, &clock).await;
    let started = clock.now();
    let id = EventId::generate();
    // Attempts 1–5 fail (5 attempts in all), the replayed one succeeds.
    target.script(id, [reply(500); 5], reply(200));
    let id = record_payment(&app, id, 40).await;

    let view = |record: EventRecord, state: Value| {
        json!({
            "event": {
                "status": record.status,
                "retryCount": record.retry_count,
                "lastError": record.last_error,
                "nextAttemptAfterStartMs": record
                    .next_attempt_at
                    .map(|at| (at - started).num_milliseconds()),
                "deadLettered": record.dead_lettered_at.is_some(),
            },
            "scheduler": state,
        })
    };

    wait_for_deliveries(&target, id, 1).await;
    wait_until_scheduled(&app, id, 1).await;
    let state = wait_for_scheduler(&app, "scheduled", 1).await;
    insta::assert_json_snapshot!(
        "scheduler_1_scheduled",
        view(app.event(id).await.unwrap(), state)
    );

    clock.advance(Duration::from_secs(1));
    wait_for_deliveries(&target, id, 2).await;
    wait_until_scheduled(&app, id, 2).await;
    let state = wait_for_scheduler(&app, "scheduled", 2).await;
    insta::assert_json_snapshot!(
        "scheduler_2_fired_and_failed",
        view(app.event(id).await.unwrap(), state)
    );

    for (failed, delay) in [(2, 2), (3, 4), (4, 8)] {
        if failed > 2 {
            wait_until_scheduled(&app, id, failed).await;
        }
        clock.advance(Duration::from_secs(delay));
        wait_for_deliveries(&target, id, failed as usize + 1).await;
    }
    let record = wait_for_status(&app, id, EventStatus::DeadLetter).await;
    let state = wait_for_scheduler(&app, "deadLettered", 1).await;
    insta::assert_json_snapshot!("scheduler_3_dead_lettered", view(record, state));

    let (status, _) = app.post(&format!("/admin/events/{id}/replay"), "").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let record = wait_for_status(&app, id, EventStatus::Completed).await;
    let state = wait_for_scheduler(&app, "delivered", 1).await;
    insta::assert_json_snapshot!("scheduler_4_replayed_and_delivered", view(record, state));
}

/// Pays an order of `quantity` units of a new product for a new user; returns the order id.
async fn pay_an_order(app: &TestApp, quantity: u32) -> u64 {
    let product = app.create_product("Lamp", 1_000, 100).await;
    let user = app.create_user(100_000).await;
    let order_id = app.place_order(user, &[(product, quantity)]).await;
    app.pay(order_id).await;
    order_id
}

#[actix_web::test]
async fn analytics_receives_each_completed_order_once_even_after_a_replay() {
    let target = Receiver::start();
    let analytics_url = format!("{}/analytics/orders", target.address);
    let app = TestApp::builder()
        .settings(move |settings| {
            settings.analytics.url = analytics_url;
            settings.external.poll_interval_ms = 20;
        })
        .start()
        .await;
    let mut orders = Vec::new();
    for quantity in 1..=3 {
        orders.push(pay_an_order(&app, quantity).await);
    }
    let analytics = || target.received_at("/analytics/orders");
    eventually("three orders at the analytics platform", WAIT, || async {
        analytics().len() >= 3
    })
    .await;
    let analytics_actor = || async {
        testkit::app::domain_actor(&app.get("/admin/actors").await.1, "OrderAnalytics").clone()
    };
    eventually("the deliveries recorded", WAIT, || async {
        analytics_actor().await["processed"] == 3
    })
    .await;

    let replayed = testkit::app::replay_from_offset_zero(&app, topics::ORDER_COMPLETED).await;
    assert_eq!(replayed, 3);
    eventually("the replay seen as duplicates", WAIT, || async {
        analytics_actor().await["duplicates"] == 3
    })
    .await;
    let received = analytics();
    assert_eq!(received.len(), 3, "once per event id");
    let mut ids: Vec<_> = received
        .iter()
        .map(|delivery| delivery.webhook_id().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    let mut delivered_orders: Vec<u64> = received
        .iter()
        .map(|delivery| {
            let body: Value = serde_json::from_slice(&delivery.body).unwrap();
            assert_eq!(body["type"], "OrderCompleted");
            body["data"]["orderId"].as_u64().unwrap()
        })
        .collect();
    delivered_orders.sort();
    assert_eq!(delivered_orders, orders);
}

#[actix_web::test]
async fn without_an_analytics_url_completed_orders_are_appended_to_a_json_lines_file() {
    let app = testkit::app::spawn_app().await;
    let order_id = pay_an_order(&app, 2).await;
    let file = app.settings.analytics.file.clone();
    eventually("the order in the analytics file", WAIT, || async {
        std::fs::read_to_string(&file).is_ok_and(|text| text.lines().count() == 1)
    })
    .await;
    let line: Value =
        serde_json::from_str(std::fs::read_to_string(&file).unwrap().trim_end()).unwrap();
    assert_eq!(line["type"], "OrderCompleted");
    assert_eq!(line["data"]["orderId"], order_id);
    assert_eq!(line["data"]["products"][0]["qty"], 2);
    let _ = std::fs::remove_file(&file);
}
