//! Client-side pieces the scenarios share: a user's WebSocket that notes when each of the
//! user's coupon results arrives, and counting a failed request (the first few are printed).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use std::time::Duration;

use awc::ws::Frame;
use commerce_events::common::ids::UserId;
use commerce_events::guards::tokens::Authenticator;
use futures::StreamExt;
use serde_json::Value;

/// When each request's result arrived, by request id.
pub type Arrivals = Rc<RefCell<HashMap<String, Instant>>>;

/// Opens `user`'s push channel (`ws_address` is `ws://host:port`) with `token` and notes in
/// `arrivals` when each of the user's results arrives; the reader runs until the socket
/// closes.
pub async fn read_results(
    client: &awc::Client,
    ws_address: &str,
    user: u64,
    token: String,
    arrivals: &Arrivals,
) -> anyhow::Result<actix_rt::task::JoinHandle<()>> {
    let (_, mut socket) = client
        .ws(format!("{ws_address}/ws?userId={user}"))
        .bearer_auth(token)
        .connect()
        .await
        .map_err(|error| anyhow::anyhow!("websocket: {error}"))?;
    let arrivals = arrivals.clone();
    Ok(actix_rt::spawn(async move {
        while let Some(Ok(frame)) = socket.next().await {
            if let Frame::Text(text) = frame
                && let Ok(message) = serde_json::from_slice::<Value>(&text)
                && let Some(request_id) = message["requestId"].as_str()
            {
                arrivals
                    .borrow_mut()
                    .insert(request_id.to_string(), Instant::now());
            }
        }
    }))
}

/// Counts a failed request in `failures`; the first three are printed with `what`.
pub fn count_failure(failures: &Cell<u64>, what: impl std::fmt::Display) {
    failures.set(failures.get() + 1);
    if failures.get() <= 3 {
        eprintln!("{what}");
    }
}

/// A bearer token for `user` (an admin's with `admin`), valid a day: signed per request, as
/// a client with many users would.
pub fn token(auth: &Authenticator, user: u64, admin: bool) -> String {
    auth.mint(
        UserId::from_u64(user).expect("positive user ids"),
        admin,
        Duration::from_secs(86_400),
    )
    .expect("the bench signs HS256 tokens")
}

/// What an answer that was not the one hoped for says: its status and body.
pub async fn refusal<S>(response: &mut awc::ClientResponse<S>) -> String
where
    S: futures::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
{
    let body = response.body().await.unwrap_or_default();
    format!("{}: {}", response.status(), String::from_utf8_lossy(&body))
}
