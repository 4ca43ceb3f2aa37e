//! Operator endpoints: the actor tree, event-log rows, dead letters and their replay, and
//! pipeline probes.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use crate::actors::tree::ObserveBackground;
use crate::api::AppState;
use crate::api::auth::Admin;
use crate::api::error::ApiError;
use crate::delivery::scheduler::{Replay, Replayed};
use crate::event_log::{EventRecord, EventStatus, OutboxEvent};
use crate::events::topics;
use crate::events::{EventEnvelope, EventId, EventPayload, PipelineProbe};
use crate::kafka::dead_letter::DeadLetterRow;
use crate::outbox::reconciler::ReconcileNow;
use crate::progress::{ConsumerProgress, RecordedIn};
use crate::ranking::RankedOrder;
use crate::ranking::rebuild::{RebuildError, rebuild};

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

/// `POST /admin/reconcile`: runs a reconciliation pass now (after the one in flight, if
/// any) and answers with the reconciler's state once it is done.
pub async fn reconcile(
    state: web::Data<AppState>,
    _admin: Admin,
) -> Result<HttpResponse, ApiError> {
    let reconciler = &state.operations.reconciler;
    reconciler
        .send(ReconcileNow)
        .await
        .map_err(anyhow::Error::from)?;
    let view = reconciler
        .send(ObserveBackground)
        .await
        .map_err(anyhow::Error::from)?;
    Ok(HttpResponse::Ok().json(view))
}

/// `POST /admin/ranking/rebuild`: recomputes the ranking's day sets from the completed
/// orders in MySQL (see [`crate::ranking::rebuild`]); answers with what was counted. 409
/// while another rebuild runs.
pub async fn rebuild_ranking(
    state: web::Data<AppState>,
    _admin: Admin,
) -> Result<HttpResponse, ApiError> {
    let today = state.clock.now().date_naive();
    match rebuild(&state.ranking.store, &state.operations.event_log, today).await {
        Ok(report) => Ok(HttpResponse::Ok().json(report)),
        Err(RebuildError::AlreadyRunning) => Err(ApiError::conflict(
            "REBUILD_RUNNING",
            "another rebuild of the ranking is running",
        )),
        Err(error) => Err(ApiError::from_store(error)),
    }
}

/// An event-log row with where each of its consumers stands, and its dead letters.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EventView {
    #[serde(flatten)]
    record: EventRecord,
    consumers: Vec<ConsumerProgress>,
    dead_letters: Vec<DeadLetterRow>,
}

/// `GET /admin/events/{event_id}`: the row, each consumer's progress (from where that
/// consumer records it), and every dead letter of the event.
pub async fn event(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (event_id, record) = find_event(&state, &path).await?;
    let operations = &state.operations;
    let dead_letters = operations
        .dead_letters
        .of_event(event_id)
        .await
        .map_err(ApiError::from_store)?;
    let mut consumers = Vec::new();
    for consumer in operations.consumers.of(&record) {
        consumers.push(match consumer.recorded_in {
            RecordedIn::EventLog => ConsumerProgress::from_row(consumer, &record),
            RecordedIn::RankingMarks => {
                let counted = state
                    .ranking
                    .store
                    .counted(&[event_id])
                    .await
                    .map_err(ApiError::from_store)?;
                let open_letter = dead_letters
                    .iter()
                    .rev()
                    .find(|letter| {
                        letter.consumer_group == consumer.group_id && letter.replayed_at.is_none()
                    })
                    .map(|letter| letter.error.clone());
                ConsumerProgress::of_ranking(
                    consumer,
                    &record,
                    counted.first().copied().unwrap_or(false),
                    open_letter,
                )
            }
        });
    }
    Ok(HttpResponse::Ok().json(EventView {
        record,
        consumers,
        dead_letters,
    }))
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

/// One dead letter, with its event's row when it was an event.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DeadLetterItem {
    #[serde(flatten)]
    event: Option<EventRecord>,
    dead_letter: DeadLetterRow,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EventPage {
    events: Vec<DeadLetterItem>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 500;

/// A cursor this endpoint gave out: the last `deadLetterId` of a page.
fn parse_cursor(text: &str) -> Option<u64> {
    text.parse::<u64>().ok().filter(|id| *id <= i64::MAX as u64)
}

/// `GET /admin/events?status=DEAD_LETTER&limit=&cursor=`: every dead letter not replayed
/// yet, whichever consumer group sent it, oldest first: the letter (`deadLetter`: group,
/// source partition and offset, error) and, when it was an event, the event's row (its
/// attempts in `retryCount`, `lastError`).
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
    let after = match &query.cursor {
        None => 0,
        Some(text) => parse_cursor(text).ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_CURSOR",
                format!("{text:?} is not a cursor this endpoint gave out"),
            )
        })?,
    };
    let operations = &state.operations;
    let letters = operations
        .dead_letters
        .open(after, limit)
        .await
        .map_err(ApiError::from_store)?;
    let next_cursor = (letters.len() == limit as usize)
        .then(|| letters.last().map(|last| last.dead_letter_id.to_string()))
        .flatten();
    let mut events = Vec::with_capacity(letters.len());
    for letter in letters {
        let event = match letter.event_id {
            Some(event_id) => operations.event_log.find(event_id).await?,
            None => None,
        };
        events.push(DeadLetterItem {
            event,
            dead_letter: letter,
        });
    }
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
    /// The consumers the event was handed back to.
    consumers: Vec<&'static str>,
}

/// `POST /admin/events/{event_id}/replay`: puts a dead letter back on its way, for every
/// consumer that dead-lettered it. For the consumer whose progress is the row, an event
/// delivered to an external system goes back to the retry scheduler (due now, attempts
/// counted afresh), any other returns to PENDING and the outbox relay publishes it again;
/// the ranking counts it at once (its applied mark keeps that idempotent). 409 for an
/// event no consumer dead-lettered.
pub async fn replay(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (event_id, record) = find_event(&state, &path).await?;
    let operations = &state.operations;
    let open: Vec<DeadLetterRow> = operations
        .dead_letters
        .of_event(event_id)
        .await
        .map_err(ApiError::from_store)?
        .into_iter()
        .filter(|letter| letter.replayed_at.is_none())
        .collect();
    let mut consumers = Vec::new();
    for consumer in operations.consumers.of(&record) {
        let dead_lettered_here = open
            .iter()
            .any(|letter| letter.consumer_group == consumer.group_id);
        if consumer.recorded_in == RecordedIn::RankingMarks && dead_lettered_here {
            if let EventPayload::OrderCompleted(order) = &record.payload {
                state
                    .ranking
                    .store
                    .apply(&[RankedOrder {
                        event_id,
                        day: record.occurred_at.date_naive(),
                        products: &order.products,
                    }])
                    .await
                    .map_err(ApiError::from_store)?;
            }
            operations
                .dead_letters
                .mark_replayed(event_id, Some(&consumer.group_id))
                .await
                .map_err(ApiError::from_store)?;
            consumers.push(consumer.name);
        }
    }
    let (status, next_attempt_at) = if record.status == EventStatus::DeadLetter {
        let replayed = operations
            .scheduler
            .send(Replay { event_id })
            .await
            .map_err(anyhow::Error::from)??;
        let moved = match replayed {
            Replayed::Scheduled { at } => (EventStatus::Failed, Some(at)),
            Replayed::Republishing => (EventStatus::Pending, None),
            Replayed::NotFound => return Err(ApiError::not_found(format!("event {event_id}"))),
            Replayed::NotDeadLettered { status } => return Err(not_replayable(event_id, status)),
        };
        for consumer in operations.consumers.of(&record) {
            if consumer.recorded_in == RecordedIn::EventLog {
                operations
                    .dead_letters
                    .mark_replayed(event_id, Some(&consumer.group_id))
                    .await
                    .map_err(ApiError::from_store)?;
                consumers.push(consumer.name);
            }
        }
        moved
    } else if consumers.is_empty() {
        return Err(not_replayable(event_id, record.status));
    } else {
        (record.status, None)
    };
    Ok(HttpResponse::Accepted().json(ReplayAccepted {
        event_id,
        status,
        next_attempt_at,
        consumers,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_a_dead_letter_id_and_nothing_else() {
        assert_eq!(parse_cursor("42"), Some(42));
        for bad in [
            "-62167219200000001_01a20c4d-9946-77b8-9ac2-9e7b856b2318",
            "-1",
            "18446744073709551615",
            "nonsense",
            "",
        ] {
            assert_eq!(parse_cursor(bad), None, "{bad}");
        }
    }
}
