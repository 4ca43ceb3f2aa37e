//! Identity, authorization and abuse protection: every route against every kind of caller,
//! push channels that belong to their user, rate limits and idempotency keys, and one test
//! per bad input that used to corrupt or crash.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::http::StatusCode;
use awc::ws::Frame;
use chrono::Utc;
use commerce_events::api::{Access, ROUTES};
use futures::StreamExt;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use testkit::app::{ADMIN_USER, TestApp, client, spawn_app};
use testkit::database::TEST_JWT_SECRET;
use testkit::wait::eventually;

/// The kinds of caller the matrix tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    NoToken,
    Forged,
    Expired,
    AnotherUser,
    Owner,
    Admin,
}

const WHO: [Who; 6] = [
    Who::NoToken,
    Who::Forged,
    Who::Expired,
    Who::AnotherUser,
    Who::Owner,
    Who::Admin,
];

/// What a caller should get from a route: refused (401, 403) or let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Unauthenticated,
    Forbidden,
    Allowed,
}

fn expected(access: Access, who: Who) -> Expect {
    use Expect::*;
    match (access, who) {
        (Access::Public, _) => Allowed,
        (_, Who::NoToken | Who::Forged | Who::Expired) => Unauthenticated,
        (Access::Authenticated, _) => Allowed,
        (Access::ReadsUser, Who::AnotherUser) => Forbidden,
        (Access::ReadsUser, _) => Allowed,
        (Access::ActsAsUser, Who::Owner) => Allowed,
        (Access::ActsAsUser, _) => Forbidden,
        (Access::Admin, Who::Admin) => Allowed,
        (Access::Admin, _) => Forbidden,
    }
}

#[derive(serde::Serialize)]
struct RawClaims {
    sub: String,
    exp: i64,
    roles: Vec<String>,
}

fn signed(secret: &str, sub: u64, exp: i64, admin: bool) -> String {
    let claims = RawClaims {
        sub: sub.to_string(),
        exp,
        roles: if admin { vec!["admin".into()] } else { vec![] },
    };
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// The resources the matrix's paths name, all the owner's.
struct Fixture {
    owner: u64,
    other: u64,
    coupon: u64,
    product: u64,
    order: u64,
    request: String,
}

impl Fixture {
    async fn build(app: &TestApp) -> Self {
        let owner = app.create_user(1_000_000).await;
        let other = app.create_user(0).await;
        let coupon = app.create_coupon(100).await;
        let product = app.create_product("Keyboard", 1_000, 1_000).await;
        let order = app.place_order(owner, &[(product, 1)]).await;
        let request = app.issue(owner, coupon).await;
        Self {
            owner,
            other,
            coupon,
            product,
            order,
            request,
        }
    }

    fn path(&self, template: &str) -> String {
        let path = template
            .replace("{user_id}", &self.owner.to_string())
            .replace("{order_id}", &self.order.to_string())
            .replace("{request_id}", &self.request)
            .replace("{event_id}", &self.request)
            .replace("{coupon_id}", &self.coupon.to_string())
            .replace("{product_id}", &self.product.to_string())
            .replace("{group_id}", "product-event-group")
            .replace("{action}", "resume");
        match path.as_str() {
            "/ws" => format!("/ws?userId={}", self.owner),
            _ => path,
        }
    }

    /// A valid body for the route, naming the owner where a body names a user.
    fn body(&self, method: &str, template: &str) -> String {
        let now = Utc::now();
        let body = match (method, template) {
            ("POST", "/coupons") => json!({"name": "x", "discountAmount": 1, "totalQuantity": 1,
                "validFrom": now, "validUntil": now + chrono::Duration::days(1)}),
            ("POST", "/coupons/issue") => json!({"userId": self.owner, "couponId": self.coupon}),
            ("POST", "/users") => json!({"name": "Lee"}),
            ("POST", "/users/{user_id}/balance/charge") => json!({"amount": 1}),
            ("POST", "/products") => json!({"name": "Mouse", "price": 1, "stock": 1}),
            ("PATCH", "/products/{product_id}") => json!({"price": 2_000}),
            ("POST", "/orders") => json!({"userId": self.owner,
                "items": [{"productId": self.product, "quantity": 1}]}),
            _ => return String::new(),
        };
        body.to_string()
    }
}

/// Sends one request and returns its status, the `WWW-Authenticate` header and the error
/// code, without reading a streaming body to its end.
async fn status_of(
    app: &TestApp,
    method: &str,
    path: &str,
    body: String,
    authorization: Option<&str>,
) -> (StatusCode, Option<String>, Option<String>) {
    let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client()
        .request(method, format!("{}{path}", app.address))
        .insert_header(("content-type", "application/json"));
    if let Some(authorization) = authorization {
        request = request.insert_header(("authorization", authorization));
    }
    let mut response = request.send_body(body).await.expect("request sent");
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|value| value.to_str().unwrap().to_string());
    let code = if status.is_client_error() || status.is_server_error() {
        let body = response.body().await.expect("body read");
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|body| body["error"]["code"].as_str().map(str::to_string))
    } else {
        None
    };
    (status, challenge, code)
}

#[actix_web::test]
async fn every_route_answers_each_kind_of_caller_as_its_access_rule_says() {
    let app = spawn_app().await;
    let fixture = Fixture::build(&app).await;
    let now = Utc::now().timestamp();
    let tokens: BTreeMap<Who, Option<String>> = BTreeMap::from([
        (Who::NoToken, None),
        (
            Who::Forged,
            Some(signed("not-the-secret", fixture.owner, now + 600, true)),
        ),
        (
            Who::Expired,
            Some(signed(TEST_JWT_SECRET, fixture.owner, now - 600, true)),
        ),
        (Who::AnotherUser, Some(app.token(fixture.other, false))),
        (Who::Owner, Some(app.token(fixture.owner, false))),
        (Who::Admin, Some(app.token(ADMIN_USER, true))),
    ]);
    let mut wrong = Vec::new();
    for route in ROUTES {
        for who in WHO {
            let authorization = tokens[&who].as_ref().map(|token| format!("Bearer {token}"));
            let (status, challenge, code) = status_of(
                &app,
                route.method,
                &fixture.path(route.path),
                fixture.body(route.method, route.path),
                authorization.as_deref(),
            )
            .await;
            let got = match status {
                StatusCode::UNAUTHORIZED => {
                    assert_eq!(challenge.as_deref(), Some("Bearer"), "{route:?} {who:?}");
                    assert_eq!(code.as_deref(), Some("UNAUTHORIZED"), "{route:?} {who:?}");
                    Expect::Unauthenticated
                }
                StatusCode::FORBIDDEN => {
                    assert_eq!(code.as_deref(), Some("FORBIDDEN"), "{route:?} {who:?}");
                    Expect::Forbidden
                }
                _ => Expect::Allowed,
            };
            if got != expected(route.access, who) {
                wrong.push(format!(
                    "{} {} as {who:?}: {status} {code:?}, expected {:?}",
                    route.method,
                    route.path,
                    expected(route.access, who)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[actix_web::test]
async fn tickets_open_one_channel_once_and_expire() {
    let app = TestApp::builder()
        .settings(|settings| settings.push.ticket_ttl_secs = 1)
        .start()
        .await;
    let user = app.as_user(21).await;
    let ticket = |answer: (StatusCode, Value)| {
        assert_eq!(answer.0, StatusCode::CREATED, "{}", answer.1);
        answer.1["ticket"].as_str().unwrap().to_string()
    };
    let first = ticket(user.post("/push/tickets", "").await);
    let events = |ticket: &str| format!("{}/users/21/events?ticket={ticket}", app.address);
    let opened = client().get(events(&first)).send().await.unwrap();
    assert_eq!(opened.status(), StatusCode::OK);
    drop(opened);
    let reused = client().get(events(&first)).send().await.unwrap();
    assert_eq!(
        reused.status(),
        StatusCode::UNAUTHORIZED,
        "a ticket is single-use"
    );
    // Another user's channel with this user's ticket.
    let second = ticket(user.post("/push/tickets", "").await);
    let other = client()
        .get(format!("{}/users/22/events?ticket={second}", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::FORBIDDEN);
    // Unused, a ticket expires.
    let third = ticket(user.post("/push/tickets", "").await);
    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let key = format!("{}push:ticket:{third}", app.settings.redis.key_prefix);
    eventually("the ticket expired", Duration::from_secs(10), || async {
        let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
        !redis::cmd("EXISTS")
            .arg(&key)
            .query_async::<bool>(&mut connection)
            .await
            .unwrap()
    })
    .await;
    let expired = client().get(events(&third)).send().await.unwrap();
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
}

#[actix_web::test]
async fn a_browser_page_from_an_unknown_origin_cannot_open_a_channel() {
    let app = spawn_app().await;
    let token = app.token(23, false);
    let ws_url = app.address.replace("http://", "ws://");
    let refused = awc::Client::new()
        .ws(format!("{ws_url}/ws"))
        .bearer_auth(&token)
        .origin("https://evil.example")
        .connect()
        .await;
    assert!(refused.is_err(), "the handshake is refused");
    let allowed = awc::Client::new()
        .ws(format!("{ws_url}/ws"))
        .bearer_auth(&token)
        .origin("http://localhost:8080")
        .connect()
        .await;
    assert!(allowed.is_ok());
}

#[actix_web::test]
async fn a_frame_over_the_limit_closes_the_websocket_with_1009() {
    let app = TestApp::builder()
        .settings(|settings| settings.push.max_frame_bytes = 1_024)
        .start()
        .await;
    let ws_url = app.address.replace("http://", "ws://");
    let (_, mut socket) = awc::Client::new()
        .ws(format!("{ws_url}/ws"))
        .bearer_auth(app.token(24, false))
        .max_frame_size(16 * 1024 * 1024)
        .connect()
        .await
        .unwrap();
    futures::SinkExt::send(
        &mut socket,
        awc::ws::Message::Text("x".repeat(10_000).into()),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reason = loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Frame::Close(reason)))) => break reason,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(
        reason.map(|reason| reason.code),
        Some(awc::ws::CloseCode::Size)
    );
}

/// The `data:` events of an SSE body, with their ids, until `count` arrived.
async fn sse_events<S>(body: &mut S, count: usize) -> Vec<Value>
where
    S: futures::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
{
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while events.len() < count {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} events: {events:?}", events.len()))
            .expect("the stream stays open")
            .expect("a chunk");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|line| line.strip_prefix("data: ")) {
                events.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    events
}

#[actix_web::test]
async fn a_channel_that_reconnects_gets_the_results_it_missed_once_and_in_order() {
    let app = spawn_app().await;
    let user = 31;
    let token = app.token(user, false);
    let coupons = [
        app.create_coupon(10).await,
        app.create_coupon(10).await,
        app.create_coupon(10).await,
    ];
    let events_url = format!("{}/users/{user}/events", app.address);
    let mut first = client()
        .get(&events_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let seen_request = app.issue(user, coupons[0]).await;
    let seen = sse_events(&mut first, 1).await;
    assert_eq!(seen[0]["requestId"], seen_request.as_str());
    drop(first);

    // Decided while the phone is in a tunnel.
    let missed = [
        app.issue(user, coupons[1]).await,
        app.issue(user, coupons[2]).await,
    ];
    for request in &missed {
        app.wait_until_notified(request).await;
    }
    let mut again = client()
        .get(&events_url)
        .bearer_auth(&token)
        .insert_header(("last-event-id", seen[0]["eventId"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    let resumed = sse_events(&mut again, 2).await;
    let resumed_requests: Vec<&str> = resumed
        .iter()
        .map(|event| event["requestId"].as_str().unwrap())
        .collect();
    assert_eq!(
        resumed_requests,
        vec![missed[0].as_str(), missed[1].as_str()]
    );
    // Then live ones, and nothing twice.
    let coupon = app.create_coupon(10).await;
    let live = app.issue(user, coupon).await;
    let next = sse_events(&mut again, 1).await;
    assert_eq!(next[0]["requestId"], live.as_str());

    // The WebSocket resumes the same way with ?after=.
    let ws_url = app.address.replace("http://", "ws://");
    let (_, mut socket) = awc::Client::new()
        .ws(format!(
            "{ws_url}/ws?after={}",
            seen[0]["eventId"].as_str().unwrap()
        ))
        .bearer_auth(&token)
        .connect()
        .await
        .unwrap();
    let mut replayed = Vec::new();
    while replayed.len() < 3 {
        if let Some(Ok(Frame::Text(text))) =
            tokio::time::timeout(Duration::from_secs(30), socket.next())
                .await
                .expect("replayed results")
        {
            let message: Value = serde_json::from_slice(&text).unwrap();
            replayed.push(message["requestId"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(replayed, vec![missed[0].clone(), missed[1].clone(), live]);
}

#[actix_web::test]
async fn a_user_authenticated_as_a_never_receives_bs_results_on_either_instance() {
    use secrecy::SecretString;
    let first = TestApp::builder()
        .settings(|settings| settings.instance.id = "first".into())
        .start()
        .await;
    let (brokers, database) = (first.bootstrap_servers(), first.database_url());
    let second = TestApp::builder()
        .settings(move |settings| {
            settings.instance.id = "second".into();
            settings.kafka.brokers = brokers;
            settings.database.url = SecretString::from(database);
        })
        .start()
        .await;
    let (alice, bob) = (41, 42);
    let coupon = first.create_coupon(10).await;
    let ws_url = second.address.replace("http://", "ws://");
    // Alice asks for Bob's channel with her token: refused. Her own channel on the other
    // instance hears only her results.
    let stolen = awc::Client::new()
        .ws(format!("{ws_url}/ws?userId={bob}"))
        .bearer_auth(second.token(alice, false))
        .connect()
        .await;
    assert!(stolen.is_err());
    let (_, mut socket) = awc::Client::new()
        .ws(format!("{ws_url}/ws"))
        .bearer_auth(second.token(alice, false))
        .connect()
        .await
        .unwrap();
    let mut sse = client()
        .get(format!("{}/users/{alice}/events", first.address))
        .bearer_auth(first.token(alice, false))
        .send()
        .await
        .unwrap();
    let bob_request = first.issue(bob, coupon).await;
    let alice_request = first.issue(alice, coupon).await;
    first.wait_until_notified(&bob_request).await;
    let mut heard = Vec::new();
    while heard.is_empty() {
        if let Some(Ok(Frame::Text(text))) =
            tokio::time::timeout(Duration::from_secs(30), socket.next())
                .await
                .expect("alice's result")
        {
            heard.push(serde_json::from_slice::<Value>(&text).unwrap());
        }
    }
    assert_eq!(heard[0]["requestId"], alice_request.as_str());
    let over_sse = sse_events(&mut sse, 1).await;
    assert_eq!(over_sse[0]["requestId"], alice_request.as_str());
}

#[actix_web::test]
async fn a_burst_from_one_user_meets_the_limit_shared_by_two_instances() {
    use secrecy::SecretString;
    let limit = commerce_events::config::RateLimit {
        per_second: 5.0,
        burst: 10,
    };
    let first = TestApp::builder()
        .settings(move |settings| {
            settings.instance.id = "first".into();
            settings.limits.coupon_issue = limit;
        })
        .start()
        .await;
    let (brokers, database) = (first.bootstrap_servers(), first.database_url());
    let prefix = first.settings.redis.key_prefix.clone();
    let second = TestApp::builder()
        .settings(move |settings| {
            settings.instance.id = "second".into();
            settings.kafka.brokers = brokers;
            settings.database.url = SecretString::from(database);
            settings.redis.key_prefix = prefix;
            settings.limits.coupon_issue = limit;
        })
        .start()
        .await;
    let user = 51;
    first.ensure_user(user).await;
    let coupon = first.create_coupon(10).await;
    let token = first.token(user, false);
    let body = json!({"couponId": coupon}).to_string();
    let started = std::time::Instant::now();
    let answers: Vec<(StatusCode, Option<String>)> = futures::stream::iter(0..1_000)
        .map(|n| {
            let app = if n % 2 == 0 { &first } else { &second };
            let (token, body) = (token.clone(), body.clone());
            async move {
                let response = client()
                    .post(format!("{}/coupons/issue", app.address))
                    .bearer_auth(token)
                    .insert_header(("content-type", "application/json"))
                    .send_body(body)
                    .await
                    .expect("request sent");
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|value| value.to_str().unwrap().to_string());
                (response.status(), retry_after)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let limited: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    let let_through = answers.len() - limited.len();
    // The burst, plus what the rate refills while the burst is sent, over both instances.
    let most = 10 + (5.0 * elapsed).ceil() as usize + 1;
    assert!(
        let_through <= most,
        "{let_through} let through in {elapsed:.1} s (at most {most})"
    );
    assert!(let_through >= 10, "the burst passes: {let_through}");
    assert!(
        limited.iter().all(|(_, retry_after)| retry_after
            .as_deref()
            .is_some_and(|value| value.parse::<u64>().is_ok())),
        "every 429 says when to retry"
    );
    // One event recorded, whatever the number of answers.
    let (requests,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM event_log WHERE event_type = 'CouponRequested'")
            .fetch_one(first.event_log.pool())
            .await
            .unwrap();
    assert_eq!(requests, 1);
}

#[actix_web::test]
async fn an_idempotency_key_replays_the_first_answer_and_refuses_another_body() {
    let app = spawn_app().await;
    let user = app.create_user(0).await;
    let buyer = app.as_user(user).await;
    let key = [("idempotency-key", "top-up-1")];
    let charge = format!("/users/{user}/balance/charge");
    let first = buyer.post_with(&charge, r#"{"amount": 500}"#, &key).await;
    let again = buyer.post_with(&charge, r#"{"amount": 500}"#, &key).await;
    assert_eq!(
        first,
        (StatusCode::OK, json!({"userId": user, "balance": 500}))
    );
    assert_eq!(again, first, "the retry is answered, not charged again");
    let other = buyer.post_with(&charge, r#"{"amount": 900}"#, &key).await;
    assert_eq!(other.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", other.1);
    assert_eq!(other.1["error"]["code"], "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(
        app.get(&format!("/users/{user}/balance")).await.1["balance"],
        500
    );

    // The same key at once: one charge.
    let concurrent = [("idempotency-key", "top-up-2")];
    let answers = futures::future::join_all(
        (0..10).map(|_| buyer.post_with(&charge, r#"{"amount": 100}"#, &concurrent)),
    )
    .await;
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "{answers:?}"
    );
    assert_eq!(
        app.get(&format!("/users/{user}/balance")).await.1["balance"],
        600
    );

    // Orders and payments replay too.
    let product = app.create_product("Cable", 100, 10).await;
    let order_body = json!({"items": [{"productId": product, "quantity": 1}]}).to_string();
    let order_key = [("idempotency-key", "order-1")];
    let placed = buyer.post_with("/orders", &order_body, &order_key).await;
    let replayed = buyer.post_with("/orders", &order_body, &order_key).await;
    assert_eq!(placed.0, StatusCode::CREATED, "{}", placed.1);
    assert_eq!(replayed, placed);
    let order = placed.1["orderId"].as_u64().unwrap();
    let pay_key = [("idempotency-key", "pay-1")];
    let paid = buyer
        .post_with(&format!("/orders/{order}/pay"), "", &pay_key)
        .await;
    let paid_again = buyer
        .post_with(&format!("/orders/{order}/pay"), "", &pay_key)
        .await;
    assert_eq!(paid.0, StatusCode::OK, "{}", paid.1);
    assert_eq!(
        paid_again, paid,
        "not ORDER_NOT_PENDING: the first answer again"
    );

    // A coupon request sent again with its key gets its 202 again.
    let coupon = app.create_coupon(5).await;
    let issue_key = [("idempotency-key", "issue-1")];
    let issue_body = json!({"couponId": coupon}).to_string();
    let issued = buyer
        .post_with("/coupons/issue", &issue_body, &issue_key)
        .await;
    let issued_again = buyer
        .post_with("/coupons/issue", &issue_body, &issue_key)
        .await;
    assert_eq!(issued.0, StatusCode::ACCEPTED);
    assert_eq!(issued_again, issued);
    let other_coupon = json!({"couponId": coupon + 1}).to_string();
    let reused = buyer
        .post_with("/coupons/issue", &other_coupon, &issue_key)
        .await;
    assert_eq!(reused.0, StatusCode::UNPROCESSABLE_ENTITY);
}

#[actix_web::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let app = TestApp::builder()
        .settings(|settings| {
            settings.http.body_limit_bytes = 4_096;
            settings.http.body_timeout_ms = 1_000;
        })
        .start()
        .await;
    let coupon = |from: &str, until: &str| {
        format!(
            r#"{{"name": "Welcome", "discountAmount": 1000, "totalQuantity": 10, "validFrom": "{from}", "validUntil": "{until}"}}"#
        )
    };
    for (from, until) in [
        ("2016-12-31T23:59:60Z", "2017-01-01T00:00:00Z"),
        ("0000-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("0999-12-31T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("2026-01-01T00:00:00Z", "+10000-01-01T00:00:00Z"),
    ] {
        let (status, error) = app.post("/coupons", &coupon(from, until)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{from}..{until}: {error}");
        assert!(
            ["INVALID_VALIDITY", "INVALID_JSON"]
                .contains(&error["error"]["code"].as_str().unwrap()),
            "{error}"
        );
    }
    let (coupons,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM coupon")
        .fetch_one(app.event_log.pool())
        .await
        .unwrap();
    assert_eq!(coupons, 0, "nothing was written");
    // Later dates an ordinary coupon carries are stored and read back.
    for until in [
        "2040-01-01T00:00:00Z",
        "2100-06-30T12:00:00Z",
        "9999-12-31T23:59:59.999999Z",
    ] {
        let (status, created) = app
            .post("/coupons", &coupon("2026-01-01T00:00:00Z", until))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{until}: {created}");
        let id = created["couponId"].as_u64().unwrap();
        let (status, read) = app.get(&format!("/coupons/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        let stored =
            chrono::DateTime::parse_from_rfc3339(read["validUntil"].as_str().unwrap()).unwrap();
        assert_eq!(stored, chrono::DateTime::parse_from_rfc3339(until).unwrap());
    }
    let huge_discount = r#"{"name": "Free", "discountAmount": 1000000000000000000, "totalQuantity": 1, "validFrom": "2026-01-01T00:00:00Z", "validUntil": "2027-01-01T00:00:00Z"}"#;
    let (status, error) = app.post("/coupons", huge_discount).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_DISCOUNT_AMOUNT"))
    );
    let (status, error) = app.post("/users", r#"{"name": "nul\u0000byte"}"#).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_NAME"))
    );

    // A key given twice is refused on every route, not taken last-wins.
    let user = app.create_user(0).await;
    let (status, error) = app
        .as_user(user)
        .await
        .post(
            &format!("/users/{user}/balance/charge"),
            r#"{"amount": 1, "amount": 100000000}"#,
        )
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_JSON"))
    );
    assert_eq!(
        app.get(&format!("/users/{user}/balance")).await.1["balance"],
        0
    );

    // An out-of-range cursor is a 400, not a crash.
    let (status, error) = app
        .get("/admin/events?status=DEAD_LETTER&cursor=-62167219200000001_01a20c4d-9946-77b8-9ac2-9e7b856b2318")
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_CURSOR"))
    );

    // Too large: 413 with the common body.
    let large = format!(r#"{{"name": "{}"}}"#, "x".repeat(10_000));
    let (status, error) = app.post("/users", &large).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("PAYLOAD_TOO_LARGE"))
    );
}

#[actix_web::test]
async fn a_body_that_trickles_in_is_timed_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::builder()
        .settings(|settings| settings.http.body_timeout_ms = 500)
        .start()
        .await;
    let address = app.address.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /users HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{",
        app.token(ADMIN_USER, true)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The rest never comes; the answer does.
    let mut answer = vec![0; 4_096];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("answered before the client gave up")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("REQUEST_TIMEOUT"), "{answer}");
}

#[actix_web::test]
async fn tokens_are_refused_in_every_bad_form_with_a_bearer_challenge() {
    let app = spawn_app().await;
    let now = Utc::now().timestamp();
    for authorization in [
        "Basic dXNlcjpwYXNz".to_string(),
        "Bearer".to_string(),
        "Bearer not.a.jwt".to_string(),
        format!("Bearer {}", signed("wrong", 1, now + 60, true)),
        format!("Bearer {}", signed(TEST_JWT_SECRET, 1, now - 3_600, true)),
        format!("Bearer {}", signed(TEST_JWT_SECRET, 0, now + 60, true)),
    ] {
        let (status, error) = app
            .with_authorization(&authorization)
            .get("/admin/actors")
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{authorization}: {error}");
        assert_eq!(error["error"]["code"], "UNAUTHORIZED");
    }
}
