use std::collections::BTreeSet;
use std::time::Duration;

use commerce_events::event_log::{EventLog, EventStatus, Move, Provenance, StatusChange};

use testkit::app::{TestApp, spawn_app};
use testkit::wait::eventually;

#[actix_web::test]
async fn an_event_committed_but_never_published_is_relayed_and_processed() {
    let app = spawn_app().await;
    let event_id = app.commit_unpublished_probe("crash window").await;
    assert_eq!(
        app.event(event_id).await.unwrap().status,
        EventStatus::Pending
    );

    eventually(
        "the relay published it and the consumer completed it",
        Duration::from_secs(30),
        || async {
            app.event(event_id)
                .await
                .is_some_and(|row| row.status == EventStatus::Completed)
        },
    )
    .await;
    let (_, tree) = app.get("/admin/actors").await;
    assert_eq!(tree["outboxRelay"]["republished"], 1);
}

#[actix_web::test]
async fn the_relay_leaves_fresh_pending_rows_to_their_request() {
    let app = spawn_app_with_slow_relay().await;
    let event_id = app.commit_unpublished_probe("fresh").await;

    // The row is what the relay looks for, only younger than its 60 s threshold.
    let mut connection = app.event_log.pool().acquire().await.unwrap();
    let unpublished = EventLog::lock_unpublished(&mut connection, Duration::ZERO, 10)
        .await
        .unwrap();
    assert_eq!(unpublished.len(), 1);
    drop(connection);

    let relay_passes = || async {
        app.get("/admin/actors").await.1["outboxRelay"]["passes"]
            .as_u64()
            .unwrap()
    };
    let passes_before = relay_passes().await;
    eventually(
        "three more relay passes",
        Duration::from_secs(10),
        || async { relay_passes().await >= passes_before + 3 },
    )
    .await;
    assert_eq!(
        app.get("/admin/actors").await.1["outboxRelay"]["republished"],
        0
    );
    assert_eq!(
        app.event(event_id).await.unwrap().status,
        EventStatus::Pending
    );
}

#[actix_web::test]
async fn a_relay_pass_locks_no_row_younger_than_its_threshold() {
    let app = spawn_app_with_slow_relay().await;
    let event_id = app.commit_unpublished_probe("young").await;

    // A relay pass in progress: its transaction is open and found nothing old enough.
    let mut relay = app.event_log.pool().begin().await.unwrap();
    let old_enough = EventLog::lock_unpublished(&mut relay, Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert!(old_enough.is_empty());

    // The young row is still free: the request's own PUBLISHED mark does not wait for the
    // pass, and another relay that takes any age finds it.
    let mut other = app.event_log.pool().acquire().await.unwrap();
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 1")
        .execute(&mut *other)
        .await
        .unwrap();
    let mut other_relay = sqlx::Connection::begin(&mut *other).await.unwrap();
    let any_age = EventLog::lock_unpublished(&mut other_relay, Duration::ZERO, 10)
        .await
        .unwrap();
    assert_eq!(any_age.len(), 1, "the pass locked the young row");
    other_relay.rollback().await.unwrap();
    let marked = EventLog::change_status_of_many_in(
        &mut other,
        &[event_id],
        StatusChange::new(Move::Publish),
    )
    .await
    .expect("the PUBLISHED mark does not wait for the relay's lock");
    assert_eq!(marked, 1);
    relay.rollback().await.unwrap();
}

async fn spawn_app_with_slow_relay() -> TestApp {
    TestApp::builder()
        .settings(|settings| settings.outbox.republish_after_ms = 60_000)
        .start()
        .await
}

#[actix_web::test]
async fn events_taken_together_are_each_taken_once_where_they_were_read() {
    let app = spawn_app_with_slow_relay().await;
    let (first, settled, second) = (
        app.commit_unpublished_probe("first").await,
        app.commit_unpublished_probe("settled").await,
        app.commit_unpublished_probe("second").await,
    );
    app.event_log
        .change_status(settled, StatusChange::new(Move::Complete))
        .await
        .unwrap();
    let read_at = |partition, offset| Provenance { partition, offset };
    let lease = chrono::Utc::now() + chrono::Duration::seconds(30);

    let taken = app
        .event_log
        .take_many(
            &[
                (first, read_at(0, 10)),
                (settled, read_at(1, 11)),
                (second, read_at(2, 12)),
            ],
            lease,
        )
        .await
        .unwrap();
    assert_eq!(taken, BTreeSet::from([first, second]));
    for (event_id, source) in [(first, read_at(0, 10)), (second, read_at(2, 12))] {
        let row = app.event(event_id).await.unwrap();
        assert_eq!(row.status, EventStatus::InProgress);
        assert_eq!(row.source, Some(source));
        assert!(
            row.next_attempt_at
                .is_some_and(|due| (due - lease).num_milliseconds().abs() < 1)
        );
    }
    let row = app.event(settled).await.unwrap();
    assert_eq!((row.status, row.source), (EventStatus::Completed, None));

    // An event given twice in one group is taken once, where its first take read it.
    let twice = app.commit_unpublished_probe("twice").await;
    let taken = app
        .event_log
        .take_many(&[(twice, read_at(1, 20)), (twice, read_at(1, 21))], lease)
        .await
        .unwrap();
    assert_eq!(taken, BTreeSet::from([twice]));
    assert_eq!(app.event(twice).await.unwrap().source, Some(read_at(1, 20)));

    // A redelivery finds them taken.
    let again = app
        .event_log
        .take_many(&[(first, read_at(0, 10))], lease)
        .await
        .unwrap();
    assert!(again.is_empty());
}
