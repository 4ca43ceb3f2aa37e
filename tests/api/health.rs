use actix_web::http::StatusCode;
use insta::assert_json_snapshot;
use secrecy::SecretString;
use serde_json::json;

use std::time::Duration;

use testkit::app::{TestApp, spawn_app};
use testkit::wait::eventually;

#[actix_web::test]
async fn the_liveness_check_answers_200() {
    let app = spawn_app().await;
    assert_eq!(
        app.get("/healthz").await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
}

#[actix_web::test]
async fn metrics_are_served_to_anyone_in_the_prometheus_text_format() {
    let app = spawn_app().await;
    // Lag is measured every `metrics.lag_interval_ms`: a scrape before the first
    // measurement has no lag yet.
    eventually(
        "the first lag measurement",
        Duration::from_secs(30),
        || async {
            let (_, text) = app.anonymous().get_text("/metrics").await;
            text.contains("# TYPE kafka_consumergroup_lag gauge")
        },
    )
    .await;
    let (status, text) = app.anonymous().get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains("# TYPE kafka_consumergroup_lag gauge"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "{text}"
    );
    // The admin's helper reads the same text.
    assert_eq!(app.get_text("/metrics").await.0, StatusCode::OK);
}

#[actix_web::test]
async fn readiness_reports_every_dependency_and_the_partition_assignment() {
    let app = spawn_app().await;
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "status": "ready",
            "checks": {"kafka": "ok", "mysql": "ok", "partitions": "ok", "redis": "ok"},
            "outages": []
        })
    );
}

#[actix_web::test]
async fn readiness_is_503_naming_redis_when_redis_is_unreachable() {
    let app = TestApp::builder()
        .settings(|settings| {
            // Nothing listens on port 1.
            settings.redis.url = SecretString::from("redis://127.0.0.1:1");
        })
        .not_waiting_until_ready()
        .start()
        .await;
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "NOT_READY");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("redis"),
        "{body}"
    );
    assert_ne!(body["error"]["details"]["checks"]["redis"], "ok");
    assert_eq!(body["error"]["details"]["checks"]["mysql"], "ok");
}

#[actix_web::test]
async fn the_actor_tree_lists_three_partition_actors_per_consumed_topic() {
    let app = spawn_app().await;
    let (status, tree) = app.get("/admin/actors").await;
    assert_eq!(status, StatusCode::OK);
    assert_json_snapshot!("actor_tree_when_ready", tree, {
        ".outboxRelay.passes" => "[passes]",
        ".reconciler.passes" => "[passes]",
        ".reconciler.consumers.*.lagging" => "[passes]"
    });
}
