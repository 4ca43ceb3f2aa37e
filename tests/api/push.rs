//! Results pushed over WebSocket and Server-Sent Events reach their own user only.

use std::collections::BTreeSet;
use std::time::Duration;

use actix_web::web::Bytes;
use awc::ws::Frame;
use futures::StreamExt;
use serde_json::Value;

use testkit::app::{TestApp, spawn_app};
use testkit::wait::eventually;

/// Reads text frames until `count` results arrived (or the deadline passes).
async fn receive_results<S>(socket: &mut S, count: usize) -> Vec<Value>
where
    S: futures::Stream<Item = Result<Frame, awc::error::WsProtocolError>> + Unpin,
{
    let mut results = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while results.len() < count {
        let frame = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {count} results arrived: {results:?}",
                    results.len()
                )
            });
        if let Some(Ok(Frame::Text(text))) = frame {
            results.push(serde_json::from_slice(&text).expect("a JSON message"));
        }
    }
    results
}

fn request_ids(results: &[Value]) -> BTreeSet<String> {
    results
        .iter()
        .map(|result| result["requestId"].as_str().unwrap().to_string())
        .collect()
}

async fn all_notified(app: &TestApp, requests: &[&String]) {
    for request in requests {
        app.wait_until_notified(request).await;
    }
}

#[actix_web::test]
async fn a_websocket_receives_its_users_results_and_never_another_users() {
    let app = spawn_app().await;
    let ws_url = app.address.replace("http://", "ws://");
    let (_, mut alice) = awc::Client::new()
        .ws(format!("{ws_url}/ws?userId=1"))
        .bearer_auth(app.token(1, false))
        .connect()
        .await
        .unwrap();
    // No user id given: the channel is the token's user's.
    let (_, mut bob) = awc::Client::new()
        .ws(format!("{ws_url}/ws"))
        .bearer_auth(app.token(2, false))
        .connect()
        .await
        .unwrap();
    let coupon_id = app.create_coupon(10).await;
    let sold_out = app.create_coupon(1).await;

    let alice_first = app.issue(1, coupon_id).await;
    let bob_request = app.issue(2, coupon_id).await;
    let bob_sold_out = app.issue(2, sold_out).await;
    app.wait_until_notified(&bob_sold_out).await;
    let alice_second = app.issue(1, sold_out).await;

    let alice_results = receive_results(&mut alice, 2).await;
    assert_eq!(
        request_ids(&alice_results),
        BTreeSet::from([alice_first.clone(), alice_second.clone()])
    );
    let bob_results = receive_results(&mut bob, 2).await;
    assert_eq!(
        request_ids(&bob_results),
        BTreeSet::from([bob_request.clone(), bob_sold_out.clone()])
    );
    let first = alice_results
        .iter()
        .find(|result| result["requestId"] == alice_first.as_str())
        .unwrap();
    assert_eq!(first["type"], "COUPON_RESULT");
    assert_eq!(first["couponId"], coupon_id);
    assert_eq!(first["success"], true);
    assert!(first["couponHistoryId"].is_u64());
    let second = alice_results
        .iter()
        .find(|result| result["requestId"] == alice_second.as_str())
        .unwrap();
    assert_eq!(
        (second["success"].as_bool(), second["reason"].as_str()),
        (Some(false), Some("OUT_OF_STOCK"))
    );
    assert!(second["eventId"].is_string(), "{second}");

    // Every result is out; nothing more may reach either socket.
    all_notified(
        &app,
        &[&alice_first, &bob_request, &bob_sold_out, &alice_second],
    )
    .await;
    for socket in [&mut alice, &mut bob] {
        let extra = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                match socket.next().await {
                    Some(Ok(Frame::Text(text))) => return Some(text),
                    Some(Ok(_)) => continue,
                    _ => return None,
                }
            }
        })
        .await;
        assert!(
            matches!(extra, Err(_) | Ok(None)),
            "unexpected message {extra:?}"
        );
    }
}

#[actix_web::test]
async fn a_result_never_published_is_pushed_from_its_requests_row() {
    let app = spawn_app().await;
    let user = 41;
    app.ensure_users(user, user).await;
    let ws_url = app.address.replace("http://", "ws://");
    let (_, mut socket) = awc::Client::new()
        .ws(format!("{ws_url}/ws"))
        .bearer_auth(app.token(user, false))
        .connect()
        .await
        .unwrap();
    let coupon_id = app.create_coupon(5).await;
    // Decided and committed, its result lost before it reached Kafka: there is no result row
    // for a relay to find, only the request's row.
    let (request_id, result_id) = app
        .commit_decided_request_unpublished(user, coupon_id)
        .await;
    let pushed = receive_results(&mut socket, 1).await;
    assert_eq!(pushed[0]["eventId"], result_id.to_string().as_str());
    assert_eq!(pushed[0]["requestId"], request_id.to_string().as_str());
    assert_eq!(
        (pushed[0]["success"].as_bool(), pushed[0]["reason"].as_str()),
        (Some(false), Some("OUT_OF_STOCK"))
    );
    let view = app.wait_until_notified(&request_id.to_string()).await;
    assert_eq!(view["reason"], "OUT_OF_STOCK", "{view}");
    let (_, tree) = app.get("/admin/actors").await;
    let redriven = tree["reconciler"]["consumers"]["ResultNotifier"]["redriven"]
        .as_u64()
        .unwrap_or(0);
    assert!(redriven >= 1, "{}", tree["reconciler"]);
    // The admin view shows the notifier's progress in the request's row.
    let (_, event) = app.get(&format!("/admin/events/{request_id}")).await;
    let notifier = event["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|consumer| consumer["consumer"] == "ResultNotifier")
        .cloned()
        .unwrap_or_else(|| panic!("no notifier progress: {event}"));
    assert_eq!(
        (
            notifier["recordedIn"].as_str(),
            notifier["settled"].as_bool()
        ),
        (Some("requestRow"), Some(true)),
        "{notifier}"
    );
}

/// Reads an SSE body until `count` `data:` events arrived.
async fn receive_events<S>(body: &mut S, count: usize) -> Vec<Value>
where
    S: futures::Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin,
{
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while events.len() < count {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} events arrived", events.len()))
            .expect("the stream stays open")
            .expect("a chunk");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let id = event.lines().find_map(|line| line.strip_prefix("id: "));
            if let Some(data) = event.lines().find_map(|line| line.strip_prefix("data: ")) {
                let data: Value = serde_json::from_str(data).expect("a JSON event");
                assert_eq!(id, data["eventId"].as_str(), "the SSE id is the event id");
                events.push(data);
            }
        }
    }
    events
}

#[actix_web::test]
async fn server_sent_events_carry_the_users_results_only() {
    let app = spawn_app().await;
    let client = awc::Client::default();
    let mut carol = client
        .get(format!("{}/users/3/events", app.address))
        .bearer_auth(app.token(3, false))
        .send()
        .await
        .unwrap();
    let mut dave = client
        .get(format!("{}/users/4/events", app.address))
        .bearer_auth(app.token(4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(
        carol.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    // The opening comment shows the subscription is registered.
    for response in [&mut carol, &mut dave] {
        let opening = response.next().await.unwrap().unwrap();
        assert_eq!(&opening[..], b": connected\n\n");
    }
    let coupon_id = app.create_coupon(1).await;
    let carol_request = app.issue(3, coupon_id).await;
    let dave_request = app.issue(4, coupon_id).await;

    let carol_events = receive_events(&mut carol, 1).await;
    let dave_events = receive_events(&mut dave, 1).await;
    assert_eq!(request_ids(&carol_events), BTreeSet::from([carol_request]));
    assert_eq!(request_ids(&dave_events), BTreeSet::from([dave_request]));
    let outcomes: BTreeSet<(bool, Option<&str>)> = carol_events
        .iter()
        .chain(&dave_events)
        .map(|event| {
            (
                event["success"].as_bool().unwrap(),
                event["reason"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        BTreeSet::from([(true, None), (false, Some("OUT_OF_STOCK"))])
    );
}

#[actix_web::test]
async fn a_push_channel_needs_a_valid_user() {
    use actix_web::http::StatusCode;
    let app = spawn_app().await;
    let user = app.as_token_of(5);
    let (status, body) = user.get("/users/0/events").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "INVALID_USER_ID");
    let (status, body) = user.get("/ws?userId=-5").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "INVALID_USER_ID");
    assert_eq!(
        user.get("/ws?colour=blue").await.1["error"]["code"],
        "INVALID_QUERY"
    );
    let (status, body) = app.anonymous().get("/users/5/events").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = user.get("/users/6/events").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

#[actix_web::test]
async fn a_user_connected_to_another_instance_gets_the_push_and_is_notified_once() {
    use secrecy::SecretString;

    use testkit::app::domain_actor;

    let first = TestApp::builder()
        .settings(|settings| settings.instance.id = "first".into())
        .start()
        .await;
    let coupon_id = first.create_coupon(1_000).await;
    // Requests decided before the second instance starts; its notifier starts after them.
    let mut all_requests = Vec::new();
    for user in 1_000..1_006 {
        all_requests.push(first.issue(user, coupon_id).await);
    }
    let (brokers, database) = (first.bootstrap_servers(), first.database_url());
    let second = TestApp::builder()
        .settings(move |settings| {
            settings.instance.id = "second".into();
            settings.kafka.brokers = brokers;
            settings.database.url = SecretString::from(database);
        })
        .start()
        .await;

    let ws_url = second.address.replace("http://", "ws://");
    let (_, mut socket) = awc::Client::new()
        .ws(format!("{ws_url}/ws?userId=7"))
        .bearer_auth(second.token(7, false))
        .connect()
        .await
        .unwrap();
    let request_id = first.issue(7, coupon_id).await;
    let results = receive_results(&mut socket, 1).await;
    assert_eq!(request_ids(&results), BTreeSet::from([request_id.clone()]));
    assert_eq!(results[0]["success"], true);

    // Every request became NOTIFIED exactly once, whichever instance got there first.
    all_requests.push(request_id);
    for request in &all_requests {
        first.wait_until_notified(request).await;
    }
    let mut marked = 0;
    for app in [&first, &second] {
        let tree = app.get("/admin/actors").await.1;
        marked += domain_actor(&tree, "ResultNotifier")["details"]["markedNotified"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(marked, all_requests.len() as u64);
}

#[actix_web::test]
async fn the_actor_tree_counts_the_open_push_sessions() {
    let app = spawn_app().await;
    let ws_url = app.address.replace("http://", "ws://");
    let mut sockets = Vec::new();
    for user in [1, 1, 2] {
        let (_, socket) = awc::Client::new()
            .ws(format!("{ws_url}/ws"))
            .bearer_auth(app.token(user, false))
            .connect()
            .await
            .unwrap();
        sockets.push(socket);
    }
    let sessions = || async { app.get("/admin/actors").await.1["pushSessions"].clone() };
    eventually(
        "three sessions of two users",
        Duration::from_secs(10),
        || async {
            let sessions = sessions().await;
            sessions["sessions"] == 3 && sessions["users"] == 2
        },
    )
    .await;
    sockets.truncate(1);
    eventually(
        "the closed sessions are gone",
        Duration::from_secs(10),
        || async {
            let sessions = sessions().await;
            sessions["sessions"] == 1 && sessions["users"] == 1
        },
    )
    .await;
}
