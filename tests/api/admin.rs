use std::time::Duration;

use actix_web::http::StatusCode;
use commerce_events::event_log::EventStatus;
use commerce_events::events::EventId;
use commerce_events::events::topics;
use serde_json::json;

use commerce_events::startup::PRODUCT_EVENT_GROUP;

use testkit::app::{domain_actor, group, spawn_app};
use testkit::wait::eventually;

#[actix_web::test]
async fn a_probe_travels_the_pipeline_and_is_completed() {
    let app = spawn_app().await;
    let (status, accepted) = app.post("/admin/probes", r#"{"note": "hello"}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(accepted["topic"], topics::PRODUCT_EVENTS);
    assert_eq!(accepted["status"], "PUBLISHED");
    let event_id: EventId = accepted["eventId"].as_str().unwrap().parse().unwrap();

    eventually("the probe completed", Duration::from_secs(20), || async {
        app.get(&format!("/admin/events/{event_id}")).await.1["status"] == "COMPLETED"
    })
    .await;
    let (_, record) = app.get(&format!("/admin/events/{event_id}")).await;
    assert_eq!(record["eventType"], "PipelineProbe");
    assert_eq!(record["payload"], json!({"note": "hello"}));
    assert!(record["publishedAt"].is_string());

    // The event log says COMPLETED as soon as the handler is done; the partition actor
    // counts the record when its batch settles, a moment later.
    let processed = || async {
        let (_, tree) = app.get("/admin/actors").await;
        group(&tree, PRODUCT_EVENT_GROUP)["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|partition| partition["processed"].as_u64().unwrap())
            .sum::<u64>()
    };
    eventually(
        "the probe's batch settled",
        Duration::from_secs(20),
        || async { processed().await > 0 },
    )
    .await;
    assert_eq!(processed().await, 1);
}

#[actix_web::test]
async fn a_redelivered_probe_changes_nothing() {
    let app = spawn_app().await;
    let (_, accepted) = app.post("/admin/probes", "").await;
    let event_id: EventId = accepted["eventId"].as_str().unwrap().parse().unwrap();
    eventually("the probe completed", Duration::from_secs(20), || async {
        app.event(event_id)
            .await
            .is_some_and(|row| row.status == EventStatus::Completed)
    })
    .await;
    let completed = app.event(event_id).await.unwrap();

    // Deliver the very same event again, as a producer retry or the relay might.
    let envelope = completed.envelope();
    app.publisher
        .publish(topics::PRODUCT_EVENTS, &envelope)
        .await
        .unwrap();

    eventually(
        "the redelivery counted as a duplicate",
        Duration::from_secs(20),
        || async {
            domain_actor(&app.get("/admin/actors").await.1, "ProductEventProcessor")["duplicates"]
                == 1
        },
    )
    .await;
    let after = app.event(event_id).await.unwrap();
    assert_eq!(after.status, EventStatus::Completed);
    assert_eq!(
        after.updated_at, completed.updated_at,
        "the row was not touched"
    );
    assert_eq!(
        domain_actor(&app.get("/admin/actors").await.1, "ProductEventProcessor")["processed"],
        1
    );
}

#[actix_web::test]
async fn a_paused_consumer_group_holds_records_until_it_is_resumed() {
    let app = spawn_app().await;
    let (status, paused) = app
        .post(
            &format!("/admin/consumer-groups/{PRODUCT_EVENT_GROUP}/pause"),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        paused,
        json!({"groupId": PRODUCT_EVENT_GROUP, "paused": true})
    );
    assert_eq!(
        group(&app.get("/admin/actors").await.1, PRODUCT_EVENT_GROUP)["paused"],
        true
    );

    let (_, accepted) = app.post("/admin/probes", "").await;
    let path = format!("/admin/events/{}", accepted["eventId"].as_str().unwrap());
    // The relay passes serve as a clock: several go by while the probe waits.
    let relay_passes = || async {
        app.get("/admin/actors").await.1["outboxRelay"]["passes"]
            .as_u64()
            .unwrap()
    };
    let passes_before = relay_passes().await;
    eventually("five relay passes", Duration::from_secs(10), || async {
        relay_passes().await >= passes_before + 5
    })
    .await;
    assert_eq!(
        app.get(&path).await.1["status"],
        "PUBLISHED",
        "not consumed while paused"
    );

    let (status, _) = app
        .post(
            &format!("/admin/consumer-groups/{PRODUCT_EVENT_GROUP}/resume"),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually(
        "the probe completed after the resume",
        Duration::from_secs(20),
        || async { app.get(&path).await.1["status"] == "COMPLETED" },
    )
    .await;
    assert_eq!(
        app.post("/admin/consumer-groups/no-such-group/pause", "")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}
