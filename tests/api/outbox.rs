use std::time::Duration;

use commerce_events::event_log::{EventLog, EventStatus};

use crate::helpers::spawn_app;
use crate::support::eventually;

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

async fn spawn_app_with_slow_relay() -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(|settings| settings.outbox.republish_after_ms = 60_000).await
}
