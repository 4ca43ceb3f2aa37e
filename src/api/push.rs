//! Push channels: a WebSocket (`GET /ws?userId=`) and Server-Sent Events
//! (`GET /users/{userId}/events`). Each carries the user's own coupon results only.

use std::convert::Infallible;
use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{CloseCode, CloseReason, Message};
use serde::Deserialize;

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::api::identity::channel_user;

/// How often an idle channel is pinged (WebSocket) or sent a comment (SSE), so proxies and
/// clients see it alive.
const KEEPALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebSocketQuery {
    pub user_id: i64,
}

/// `GET /ws?userId={id}`
pub async fn websocket(
    state: web::Data<AppState>,
    request: HttpRequest,
    query: web::Query<WebSocketQuery>,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let user = channel_user(&request, query.user_id)?;
    let (response, mut session, mut incoming) = actix_ws::handle(&request, body)?;
    let mut subscription = state.coupons.sessions.subscribe(user);
    actix_rt::spawn(async move {
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        let reason = loop {
            tokio::select! {
                message = subscription.next() => match message {
                    Some(text) => {
                        if session.text(text.to_string()).await.is_err() {
                            return;
                        }
                    }
                    // The instance is shutting down.
                    None => break Some(CloseReason::from(CloseCode::Away)),
                },
                received = incoming.recv() => match received {
                    Some(Ok(Message::Ping(bytes))) => {
                        if session.pong(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(reason))) => break reason,
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                },
                _ = keepalive.tick() => {
                    if session.ping(b"").await.is_err() {
                        return;
                    }
                }
            }
        };
        let _ = session.close(reason).await;
    });
    Ok(response)
}

/// `GET /users/{userId}/events`: `data: {json}` per result, a comment first and every
/// 15 s while idle.
pub async fn server_sent_events(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let user = channel_user(&request, *path)?;
    let subscription = state.coupons.sessions.subscribe(user);
    let opening = futures::stream::once(async {
        Ok::<_, Infallible>(Bytes::from_static(b": connected\n\n"))
    });
    let results = futures::stream::unfold(subscription, |mut subscription| async move {
        match tokio::time::timeout(KEEPALIVE, subscription.next()).await {
            Ok(Some(message)) => Some((
                Ok::<_, Infallible>(Bytes::from(format!("data: {message}\n\n"))),
                subscription,
            )),
            Ok(None) => None,
            Err(_) => Some((Ok(Bytes::from_static(b": keepalive\n\n")), subscription)),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(futures::StreamExt::chain(opening, results)))
}
