//! Operator endpoints: the actor tree, event-log rows and pipeline probes.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::event_log::{EventStatus, OutboxEvent};
use crate::events::{EventEnvelope, EventId, EventPayload, PipelineProbe};
use crate::kafka::topics;
use crate::outbox::Outbox;

/// `GET /admin/actors`
pub async fn actors(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.actors.observe().await)
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
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (group_id, action) = path.into_inner();
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        other => return Err(ApiError::not_found(format!("action {other:?}"))),
    };
    let group = state
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
        });
    }
    Ok(HttpResponse::Ok().json(GroupFetching { group_id, paused }))
}

/// `GET /admin/events/{event_id}`
pub async fn event(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let event_id: EventId = path.parse().map_err(|_| {
        ApiError::bad_request(
            "INVALID_EVENT_ID",
            format!("{:?} is not an event id (a UUID)", path.as_str()),
        )
    })?;
    let record = state
        .event_log
        .find(event_id)
        .await
        .map_err(anyhow::Error::from)?
        .ok_or_else(|| ApiError::not_found(format!("event {event_id}")))?;
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
    pub topic: String,
    pub status: EventStatus,
}

const MAX_NOTE_CHARS: usize = 1_000;

/// `POST /admin/probes`: writes a probe event through the outbox; the topic's domain
/// actor marks it COMPLETED. Follow it with `GET /admin/events/{eventId}`.
pub async fn send_probe(
    state: web::Data<AppState>,
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
    let consumed = state.actors.consumed_topics();
    if !consumed.contains(&topic) {
        return Err(ApiError::bad_request(
            "TOPIC_NOT_CONSUMED",
            format!(
                "{topic:?} is not consumed by this process (consumed: {})",
                consumed.join(", ")
            ),
        ));
    }
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
    let event = OutboxEvent { topic, envelope };

    let mut transaction = state
        .event_log
        .pool()
        .begin()
        .await
        .map_err(anyhow::Error::from)?;
    Outbox::record(&mut transaction, std::slice::from_ref(&event))
        .await
        .map_err(anyhow::Error::from)?;
    transaction.commit().await.map_err(anyhow::Error::from)?;
    let publication = state
        .outbox
        .publish_committed(std::slice::from_ref(&event))
        .await;

    let status = if publication.published == 1 {
        EventStatus::Published
    } else {
        EventStatus::Pending
    };
    Ok(HttpResponse::Accepted().json(ProbeAccepted {
        event_id: event.envelope.event_id,
        topic: event.topic,
        status,
    }))
}
