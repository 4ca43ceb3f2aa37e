//! Operator endpoints: the actor tree, event-log rows, dead letters and their replay, and
//! pipeline probes.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::api::auth::Admin;
use crate::api::error::ApiError;
use crate::delivery::scheduler::{Replay, Replayed};
use crate::event_log::{DeadLetterCursor, EventRecord, EventStatus, OutboxEvent};
use crate::events::topics;
use crate::events::{EventEnvelope, EventId, EventPayload, PipelineProbe};

/// `GET /admin/actors`
pub async fn actors(state: web::Data<AppState>, _admin: Admin) -> HttpResponse {
    HttpResponse::Ok().json(state.operations.actors.observe().await)
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupFetching {
    group_id: String,
    paused: bool,
}

/// `POST /admin/consumer-groups/{group_id}/pause` and `.../resume`: stops or resumes
/// fetching for one consumer group of this instance (its partitions stay assigned; a
/// rebalance keeps the choice). Answers once the change is in effect; records fetched
/// before a pause are still processed.
pub async fn set_group_paused(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (group_id, action) = path.into_inner();
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        other => return Err(ApiError::not_found(format!("action {other:?}"))),
    };
    let group = state
        .operations
        .actors
        .consumer_groups
        .iter()
        .find(|group| group.group_id() == group_id)
        .ok_or_else(|| ApiError::not_found(format!("consumer group {group_id:?}")))?;
    if !group
        .set_paused(paused, std::time::Duration::from_secs(5))
        .await
    {
        return Err(ApiError::Unavailable {
            code: "NOT_APPLIED",
            message: format!("consumer group {group_id:?} did not apply the change in time"),
            details: serde_json::Value::Null,
            retry_after: Some(std::time::Duration::from_secs(1)),
        });
    }
    Ok(HttpResponse::Ok().json(GroupFetching { group_id, paused }))
}

/// `GET /admin/events/{event_id}`
pub async fn event(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (_, record) = find_event(&state, &path).await?;
    Ok(HttpResponse::Ok().json(record))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeRequest {
    /// A consumed topic; `product-events` when absent.
    pub topic: Option<String>,
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeAccepted {
    pub event_id: EventId,
    pub topic: &'static str,
    pub status: EventStatus,
}

const MAX_NOTE_CHARS: usize = 1_000;

/// `POST /admin/probes`: writes a probe event through the outbox; the topic's domain
/// actor marks it COMPLETED. Follow it with `GET /admin/events/{eventId}`.
pub async fn send_probe(
    state: web::Data<AppState>,
    _admin: Admin,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let request: ProbeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ProbeRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|error| ApiError::bad_request("INVALID_JSON", error.to_string()))?
    };
    let topic = request
        .topic
        .unwrap_or_else(|| topics::PRODUCT_EVENTS.to_string());
    let consumed = state.operations.actors.consumed_topics();
    let Some(topic) =
        topics::named(&topic).filter(|topic| consumed.iter().any(|name| name == topic))
    else {
        return Err(ApiError::bad_request(
            "TOPIC_NOT_CONSUMED",
            format!(
                "{topic:?} is not consumed by this process (consumed: {})",
                consumed.join(", ")
            ),
        ));
    };
    if request
        .note
        .as_ref()
        .is_some_and(|note| note.chars().count() > MAX_NOTE_CHARS)
    {
        return Err(ApiError::bad_request(
            "NOTE_TOO_LONG",
            format!("note is longer than {MAX_NOTE_CHARS} characters"),
        ));
    }
    let mut envelope = EventEnvelope::new(
        "",
        EventPayload::PipelineProbe(PipelineProbe { note: request.note }),
    );
    envelope.key = format!("probe:{}", envelope.event_id);
    let event_id = envelope.event_id;
    let mut transaction = state.operations.outbox.begin().await?;
    transaction
        .record(vec![OutboxEvent::probe(topic, envelope)])
        .await?;
    let committed = transaction.commit().await?;
    let publication = committed.publish().await;

    let status = if publication.published == 1 {
        EventStatus::Published
    } else {
        EventStatus::Pending
    };
    Ok(HttpResponse::Accepted().json(ProbeAccepted {
        event_id,
        topic,
        status,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventQuery {
    pub status: String,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EventPage {
    events: Vec<EventRecord>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 500;

/// `GET /admin/events?status=DEAD_LETTER&limit=&cursor=`: dead letters, oldest first, each
/// with its attempts (`retryCount`) and `lastError`.
pub async fn events(
    state: web::Data<AppState>,
    _admin: Admin,
    query: web::Query<EventQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    if query.status != "DEAD_LETTER" {
        return Err(ApiError::bad_request(
            "STATUS_NOT_LISTABLE",
            format!(
                "status {:?} cannot be listed; only DEAD_LETTER can",
                query.status
            ),
        ));
    }
    let limit = query.limit.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&limit) {
        return Err(ApiError::bad_request(
            "INVALID_LIMIT",
            format!("limit must be between 1 and {MAX_PAGE_SIZE}"),
        ));
    }
    let cursor = match &query.cursor {
        None => None,
        Some(text) => Some(DeadLetterCursor::decode(text).ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_CURSOR",
                format!("{text:?} is not a cursor this endpoint gave out"),
            )
        })?),
    };
    let events = state
        .operations
        .event_log
        .dead_letters(cursor.as_ref(), limit)
        .await?;
    let next_cursor = if events.len() == limit as usize {
        events.last().and_then(|last| {
            Some(
                DeadLetterCursor {
                    dead_lettered_at: last.dead_lettered_at?,
                    event_id: last.event_id,
                }
                .encode(),
            )
        })
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(EventPage {
        events,
        next_cursor,
    }))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ReplayAccepted {
    event_id: EventId,
    status: EventStatus,
    /// When the retry scheduler makes the attempt (events delivered to external systems).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /admin/events/{event_id}/replay`: puts a dead letter back on its way. An event
/// delivered to an external system goes back to the retry scheduler (due now, attempts
/// counted afresh); any other event returns to PENDING and the outbox relay publishes it
/// again. 409 for an event that completed or is not dead-lettered.
pub async fn replay(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let event_id = parse_event_id(&path)?;
    let replayed = state
        .operations
        .scheduler
        .send(Replay { event_id })
        .await
        .map_err(anyhow::Error::from)??;
    let (status, next_attempt_at) = match replayed {
        Replayed::Scheduled { at } => (EventStatus::Failed, Some(at)),
        Replayed::Republishing => (EventStatus::Pending, None),
        Replayed::NotFound => return Err(ApiError::not_found(format!("event {event_id}"))),
        Replayed::NotDeadLettered { status } => return Err(not_replayable(event_id, status)),
    };
    Ok(HttpResponse::Accepted().json(ReplayAccepted {
        event_id,
        status,
        next_attempt_at,
    }))
}

/// Why an event in `status` (not DEAD_LETTER) is not replayed.
fn not_replayable(event_id: EventId, status: EventStatus) -> ApiError {
    match status {
        EventStatus::Completed | EventStatus::Notified => ApiError::conflict(
            "ALREADY_COMPLETED",
            format!("event {event_id} completed; replaying it would deliver it twice"),
        ),
        other => ApiError::conflict(
            "NOT_DEAD_LETTERED",
            format!("event {event_id} is {other}; only dead letters can be replayed"),
        ),
    }
}

/// The event-log row of the event id in `path`: 400 for a malformed id, 404 for no row.
async fn find_event(state: &AppState, path: &str) -> Result<(EventId, EventRecord), ApiError> {
    let event_id = parse_event_id(path)?;
    let record = state
        .operations
        .event_log
        .find(event_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {event_id}")))?;
    Ok((event_id, record))
}

fn parse_event_id(text: &str) -> Result<EventId, ApiError> {
    Ok(text.parse()?)
}
