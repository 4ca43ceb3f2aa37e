use std::time::Duration;

use commerce_events::events::EventId;
use commerce_events::events::topics;
use commerce_events::startup::PRODUCT_EVENT_GROUP;

use testkit::app::spawn_app;
use testkit::records::committed_offsets;
use testkit::wait::eventually;

#[actix_web::test]
async fn shutdown_drains_partitions_commits_offsets_and_returns() {
    let mut app = spawn_app().await;
    let mut probes = Vec::new();
    for n in 0..6 {
        let (_, accepted) = app
            .post("/admin/probes", &format!(r#"{{"note": "probe {n}"}}"#))
            .await;
        probes.push(
            accepted["eventId"]
                .as_str()
                .unwrap()
                .parse::<EventId>()
                .unwrap(),
        );
    }
    eventually("every probe completed", Duration::from_secs(20), || async {
        let mut completed = 0;
        for id in &probes {
            if app.get(&format!("/admin/events/{id}")).await.1["status"] == "COMPLETED" {
                completed += 1;
            }
        }
        completed == probes.len()
    })
    .await;

    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the daemon stops within 10 s")
        .expect("the daemon stops cleanly");

    let committed = committed_offsets(
        &app.bootstrap_servers(),
        PRODUCT_EVENT_GROUP,
        topics::PRODUCT_EVENTS,
        3,
    )
    .await;
    let total: i64 = committed.iter().map(|offset| offset.unwrap_or(0)).sum();
    assert_eq!(
        total,
        probes.len() as i64,
        "every processed record is committed: {committed:?}"
    );
    assert!(
        awc::Client::default()
            .get(format!("{}/healthz", app.address))
            .send()
            .await
            .is_err(),
        "the listener is closed"
    );
}
