//! Push channels: a WebSocket (`GET /ws`) and Server-Sent Events
//! (`GET /users/{userId}/events`), each carrying its user's own coupon results.
//!
//! - **Who**: a channel belongs to the caller: the bearer token in `Authorization`, or — for
//!   browsers, which cannot set headers on a WebSocket or an `EventSource` — a single-use
//!   ticket from `POST /push/tickets` passed as `?ticket=`. A user id given (`?userId=`, the
//!   SSE path) must be the caller's (403 otherwise).
//! - **Where from**: a browser's request (one with an `Origin` header) must come from one
//!   of `http.allowed_origins` (403 otherwise).
//! - **Resumable**: a client that reconnects with SSE `Last-Event-ID` (or `?after=` on
//!   either channel) first receives the results it missed (from MySQL, up to
//!   `push.resume_max_age_secs` old), then live ones; a result is sent once per channel.
//!   Every message carries its `eventId` (SSE: the `id:` field).
//! - A WebSocket frame larger than `push.max_frame_bytes` closes the channel with 1009.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{CloseCode, CloseReason, Message, ProtocolError};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::api::AppState;
use crate::api::auth::{Caller, bearer_token};
use crate::api::error::{ApiError, ErrorBody};
use crate::api::responses::{ActsAsUserErrors, Authenticated, ServerErrors};
use crate::common::ids::UserId;
use crate::coupons::notifier::push_message;
use crate::coupons::results::result_event;
use crate::coupons::sessions::{PushMessage, Subscription};
use crate::events::{EventId, EventPayload, EventType};
use crate::guards::tokens::AuthError;

/// How often an idle channel is pinged (WebSocket) or sent a comment (SSE), so proxies and
/// clients see it alive.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// The most requests of a user a reconnecting channel reads its missed results from.
const RESUME_LIMIT: u32 = 1_000;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ChannelQuery {
    /// The caller's own user id, when given (the WebSocket only; the SSE path names it).
    #[param(value_type = Option<UserId>)]
    pub user_id: Option<String>,
    /// A ticket from `POST /push/tickets`, for browsers (instead of the bearer token).
    pub ticket: Option<String>,
    /// The last event id received; results after it are sent first.
    #[param(value_type = Option<EventId>)]
    pub after: Option<String>,
}

/// SSE's `Last-Event-ID` header, which either channel takes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct ResumeHeader {
    /// Resume after this event (as `?after=`).
    #[param(rename = "Last-Event-ID", nullable = false)]
    pub last_event_id: Option<EventId>,
}

/// A single-use ticket that opens one push channel.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ticket {
    /// Pass as `?ticket=` to `GET /ws` or `GET /users/{userId}/events`.
    ticket: String,
    expires_in_seconds: u64,
}

/// A single-use ticket for a push channel (for browsers).
///
/// `POST /push/tickets`: a single-use ticket that opens one of the caller's channels.
#[utoipa::path(
    post,
    path = "/push/tickets",
    operation_id = "pushTicket",
    responses(
        Authenticated,
        ServerErrors,
        (status = 201, description = "The ticket.", body = Ticket),
    ),
    security(("bearerAuth" = []))
)]
pub async fn ticket(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    let ticket = state.coupons.tickets.issue(caller.user()).await?;
    Ok(HttpResponse::Created().json(Ticket {
        ticket,
        expires_in_seconds: state.coupons.push.ticket_ttl_secs,
    }))
}

/// The user a channel request belongs to (see the module documentation).
async fn channel_user(
    state: &AppState,
    request: &HttpRequest,
    ticket: Option<&str>,
    claimed: Option<&str>,
) -> Result<UserId, ApiError> {
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|origin| {
            state
                .coupons
                .allowed_origins
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(origin))
        });
        if !allowed {
            return Err(ApiError::forbidden(
                "this origin may not open push channels (http.allowed_origins)",
            ));
        }
    }
    let user =
        match ticket {
            Some(ticket) => state.coupons.tickets.redeem(ticket).await?.ok_or_else(|| {
                AuthError::Malformed("the ticket is unknown, used or expired".into())
            })?,
            None => state.auth.verify(bearer_token(request)?)?.user,
        };
    let claimed = claimed.map(str::parse::<UserId>).transpose()?;
    Caller(crate::guards::tokens::Identity { user, admin: false }).acts_as(claimed)
}

/// Where a reconnecting channel resumes: `?after=`, or SSE's `Last-Event-ID`.
fn resume_point(request: &HttpRequest, after: Option<&str>) -> Result<Option<EventId>, ApiError> {
    let last_event_id = request
        .headers()
        .get("last-event-id")
        .and_then(|value| value.to_str().ok());
    Ok(after.or(last_event_id).map(str::parse).transpose()?)
}

/// The user's live results, preceded by those decided after `after` (from MySQL): each
/// result once.
struct ResultFeed {
    missed: std::vec::IntoIter<PushMessage>,
    sent: HashSet<EventId>,
    after: Option<EventId>,
    live: Subscription,
}

impl ResultFeed {
    /// Subscribes first, then reads what was missed, so nothing decided in between is lost.
    async fn open(
        state: &AppState,
        user: UserId,
        after: Option<EventId>,
    ) -> Result<Self, ApiError> {
        let live = state.coupons.sessions.subscribe(user);
        let mut missed = Vec::new();
        if after.is_some() {
            let since = state.clock.now()
                - chrono::Duration::seconds(state.coupons.push.resume_max_age_secs as i64);
            // A result has no row of its own: the user's requests' rows hold them (see
            // `coupons::results`). A request older than `after` may have been decided after
            // it, so the requests of the whole window are read, and their results compared.
            let records = state
                .operations
                .event_log
                .of_key_after(
                    &user.partition_key(),
                    EventType::CouponRequested,
                    None,
                    since,
                    RESUME_LIMIT,
                )
                .await?;
            missed = records
                .iter()
                .filter_map(result_event)
                .filter(|result| after.is_none_or(|after| result.event_id > after))
                .filter_map(|result| match &result.payload {
                    EventPayload::CouponResult(payload) => {
                        Some(push_message(result.event_id, payload))
                    }
                    _ => None,
                })
                .collect();
            missed.sort_by_key(|message| message.id);
        }
        Ok(Self {
            sent: missed.iter().map(|message| message.id).collect(),
            missed: missed.into_iter(),
            after,
            live,
        })
    }

    /// The next message, or `None` once the instance is shutting down.
    async fn next(&mut self) -> Option<PushMessage> {
        if let Some(message) = self.missed.next() {
            return Some(message);
        }
        loop {
            let message = self.live.next().await?;
            let seen = self.sent.contains(&message.id)
                || self.after.is_some_and(|after| message.id <= after);
            if !seen {
                return Some(message);
            }
        }
    }
}

/// The caller's coupon results, live, over a WebSocket.
///
/// `GET /ws[?userId=][&ticket=][&after=]`: a WebSocket carrying the caller's coupon
/// results, one JSON text message each (see the module documentation of `push`). The
/// caller is the bearer token's user, or the ticket's.
#[utoipa::path(
    get,
    path = "/ws",
    operation_id = "pushWebSocket",
    params(ChannelQuery, ResumeHeader),
    responses(
        ActsAsUserErrors,
        ServerErrors,
        (status = 101, description = "Switching to the WebSocket protocol: one text message \
            per coupon result (JSON)."),
        (status = 400, description = "`NOT_A_WEBSOCKET` (not an upgrade request), \
            `INVALID_USER_ID`, `INVALID_EVENT_ID`, `INVALID_QUERY`.", body = ErrorBody),
    ),
    security(("bearerAuth" = []), ())
)]
pub async fn websocket(
    state: web::Data<AppState>,
    request: HttpRequest,
    query: web::Query<ChannelQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let user = channel_user(
        &state,
        &request,
        query.ticket.as_deref(),
        query.user_id.as_deref(),
    )
    .await?;
    let after = resume_point(&request, query.after.as_deref())?;
    let mut feed = ResultFeed::open(&state, user, after).await?;
    let (response, mut session, incoming) = actix_ws::handle(&request, body)
        .map_err(|error| ApiError::bad_request("NOT_A_WEBSOCKET", error.to_string()))?;
    let mut incoming = incoming.max_frame_size(state.coupons.push.max_frame_bytes);
    actix_rt::spawn(async move {
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        let reason = loop {
            tokio::select! {
                message = feed.next() => match message {
                    Some(message) => {
                        if session.text(message.json.to_string()).await.is_err() {
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
                    Some(Err(ProtocolError::Overflow)) => {
                        break Some(CloseReason {
                            code: CloseCode::Size,
                            description: Some("frame too large".into()),
                        });
                    }
                    // The client went away without a closing frame (a closed tab, a lost
                    // network): the end of a session, nothing for an operator to act on.
                    Some(Err(ProtocolError::Io(error))) => {
                        debug!(%error, "websocket connection lost");
                        return;
                    }
                    Some(Err(error)) => {
                        warn!(%error, "websocket protocol error");
                        break Some(CloseReason::from(CloseCode::Protocol));
                    }
                    None => return,
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

/// The caller's coupon results, live, as Server-Sent Events.
///
/// `GET /users/{userId}/events[?ticket=][&after=]`: `id: {eventId}` and `data: {json}` per
/// result, a comment first and every 15 s while idle.
#[utoipa::path(
    get,
    path = "/users/{user_id}/events",
    operation_id = "pushEvents",
    params(
        ("user_id" = UserId, Path, description = "The caller's own user id."),
        ChannelQuery,
        ResumeHeader,
    ),
    responses(
        ActsAsUserErrors,
        ServerErrors,
        (status = 200, description = "Server-Sent Events: `id: {eventId}` and \
            `data: {json}` per coupon result.", content_type = "text/event-stream",
            body = String),
        (status = 400, description = "`INVALID_USER_ID`, `INVALID_EVENT_ID`, \
            `INVALID_QUERY`.", body = ErrorBody),
    ),
    security(("bearerAuth" = []), ())
)]
pub async fn server_sent_events(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
    query: web::Query<ChannelQuery>,
) -> Result<HttpResponse, ApiError> {
    let user = channel_user(&state, &request, query.ticket.as_deref(), Some(&path)).await?;
    let after = resume_point(&request, query.after.as_deref())?;
    let feed = ResultFeed::open(&state, user, after).await?;
    let opening = futures::stream::once(async {
        Ok::<_, Infallible>(Bytes::from_static(b": connected\n\n"))
    });
    let results = futures::stream::unfold(feed, |mut feed| async move {
        match tokio::time::timeout(KEEPALIVE, feed.next()).await {
            Ok(Some(message)) => Some((
                Ok::<_, Infallible>(Bytes::from(format!(
                    "id: {}\ndata: {}\n\n",
                    message.id, message.json
                ))),
                feed,
            )),
            Ok(None) => None,
            Err(_) => Some((Ok(Bytes::from_static(b": keepalive\n\n")), feed)),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(opening.chain(results)))
}
