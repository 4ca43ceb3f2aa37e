use actix_web::http::StatusCode;
use awc::http::Method;
use serde_json::json;

use testkit::app::{client, spawn_app};

#[actix_web::test]
async fn bad_requests_get_a_4xx_with_the_common_json_error_body() {
    let app = spawn_app().await;
    let cases: Vec<(StatusCode, &str, (StatusCode, serde_json::Value))> = vec![
        (
            StatusCode::BAD_REQUEST,
            "INVALID_JSON",
            app.post("/admin/probes", "{not json").await,
        ),
        (
            StatusCode::BAD_REQUEST,
            "INVALID_JSON",
            app.post("/admin/probes", r#"{"topic": 42}"#).await,
        ),
        (
            StatusCode::BAD_REQUEST,
            "INVALID_JSON",
            app.post("/admin/probes", r#"{"unexpected": true}"#).await,
        ),
        (
            StatusCode::BAD_REQUEST,
            "INVALID_JSON",
            app.post("/admin/probes", "[null, null]").await,
        ),
        (
            StatusCode::BAD_REQUEST,
            "TOPIC_NOT_CONSUMED",
            app.post("/admin/probes", r#"{"topic": "no-such-topic"}"#)
                .await,
        ),
        (
            StatusCode::BAD_REQUEST,
            "NOTE_TOO_LONG",
            app.post(
                "/admin/probes",
                &json!({"note": "x".repeat(1_001)}).to_string(),
            )
            .await,
        ),
        (
            StatusCode::BAD_REQUEST,
            "INVALID_EVENT_ID",
            app.get("/admin/events/not-a-uuid").await,
        ),
        (
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            app.get("/admin/events/01a20c4d-9946-77b8-9ac2-9e7b856b2318")
                .await,
        ),
        (
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            app.get("/no/such/route").await,
        ),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            app.request(Method::DELETE, "/admin/probes").await,
        ),
    ];
    for (expected_status, expected_code, (status, body)) in cases {
        assert_eq!(status, expected_status, "{body}");
        assert_eq!(body["error"]["code"], expected_code, "{body}");
        let message = body["error"]["message"].as_str().expect("a message");
        assert!(!message.is_empty());
    }
    // A 405 names the route's methods (RFC 9110).
    let response = client()
        .delete(format!("{}/products/1", app.address))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers().get("allow").unwrap(), "GET, PATCH");
}
