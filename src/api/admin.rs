//! Operator endpoints: the actor tree, event-log rows, dead letters and their replay, and
//! pipeline probes.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use crate::actors::tree::ObserveBackground;
use crate::api::auth::Admin;
use crate::api::error::{ApiError, ErrorBody, parse_object};
use crate::api::responses::{AdminErrors, BodyErrors, LookupErrors, ServerErrors};
use crate::api::{AppState, OperationsState};
use crate::delivery::scheduler::{Replay, Replayed};
use crate::event_log::progress::{ConsumerProgress, ConsumerSpec, RecordedIn};
use crate::event_log::{EventRecord, EventStatus, OutboxEvent};
use crate::events::topics;
use crate::events::{
    EventEnvelope, EventId, EventPayload, NamedSchemas, PipelineProbe, add_schema,
};
use crate::kafka::dead_letter::DeadLetterRow;
use crate::outbox::reconciler::ReconcileNow;
use crate::ranking::RankedOrder;
use crate::ranking::rebuild::{RebuildError, RebuildReport, rebuild};

/// The actor tree.
///
/// `GET /admin/actors`: the actor tree (consumer groups, their partitions and domain
/// actors, the background actors, outages), each actor's state as it reports it. Its exact
/// shape is internal and may change.
#[utoipa::path(
    get,
    path = "/admin/actors",
    operation_id = "adminActors",
    responses(
        AdminErrors,
        ServerErrors,
        (status = 200, description = "The actor tree.", body = Object),
    ),
    security(("bearerAuth" = []))
)]
pub async fn actors(state: web::Data<AppState>, _admin: Admin) -> HttpResponse {
    HttpResponse::Ok().json(state.operations.actors.observe().await)
}

/// Whether a consumer group fetches.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupFetching {
    group_id: String,
    paused: bool,
}

/// Pauses or resumes fetching for a consumer group.
///
/// `POST /admin/consumer-groups/{group_id}/pause` and `.../resume`: stops or resumes
/// fetching for one consumer group of this instance (its partitions stay assigned; a
/// rebalance keeps the choice). Answers once the change is in effect; records fetched
/// before a pause are still processed.
#[utoipa::path(
    post,
    path = "/admin/consumer-groups/{group_id}/{action}",
    operation_id = "setConsumerGroupPaused",
    params(
        ("group_id" = String, Path, description = "The full consumer group id of this instance."),
        ("action" = String, Path, pattern = "^(pause|resume)$",
            description = "`pause` or `resume`."),
    ),
    responses(
        AdminErrors,
        ServerErrors,
        (status = 200, description = "The change is in effect.", body = GroupFetching),
        (status = 404, description = "`NOT_FOUND`: no such action, or no such consumer group \
            here.", body = ErrorBody),
        (status = 503, description = "`NOT_APPLIED`: the group did not apply the change in \
            time; `UNAVAILABLE` as for any route.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds."))),
    ),
    security(("bearerAuth" = []))
)]
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

/// Runs a reconciliation pass now.
///
/// `POST /admin/reconcile`: runs a reconciliation pass now (after the one in flight, if
/// any) and answers with the reconciler's state once it is done.
#[utoipa::path(
    post,
    path = "/admin/reconcile",
    operation_id = "reconcile",
    responses(
        AdminErrors,
        ServerErrors,
        (status = 200, description = "The reconciler's state after the pass (its shape is \
            internal).", body = Object),
    ),
    security(("bearerAuth" = []))
)]
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

/// Rebuilds the ranking from the completed orders.
///
/// `POST /admin/ranking/rebuild`: recomputes the ranking's day sets from the completed
/// orders in MySQL (see [`crate::ranking::rebuild`]); answers with what was counted. 409
/// while another rebuild runs.
#[utoipa::path(
    post,
    path = "/admin/ranking/rebuild",
    operation_id = "rebuildRanking",
    responses(
        AdminErrors,
        ServerErrors,
        (status = 200, description = "What the rebuild counted.", body = RebuildReport),
        (status = 409, description = "`REBUILD_RUNNING`: another rebuild is running.",
            body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
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
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    #[serde(flatten)]
    record: EventRecord,
    consumers: Vec<ConsumerProgress>,
    dead_letters: Vec<DeadLetterRow>,
}

/// An event: its row, each consumer's progress and its dead letters.
///
/// `GET /admin/events/{event_id}`: the row, each consumer's progress (from where that
/// consumer records it), and every dead letter of the event.
#[utoipa::path(
    get,
    path = "/admin/events/{event_id}",
    operation_id = "adminEvent",
    params(("event_id" = EventId, Path, description = "The event's id.")),
    responses(
        AdminErrors,
        LookupErrors<EventId>,
        ServerErrors,
        (status = 200, description = "The event.", body = EventView),
    ),
    security(("bearerAuth" = []))
)]
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
    for settlement in operations.consumers.of(&record) {
        let progress = settlement
            .progress(&record, &dead_letters)
            .await
            .map_err(ApiError::from_store)?;
        consumers.push(progress);
    }
    Ok(HttpResponse::Ok().json(EventView {
        record,
        consumers,
        dead_letters,
    }))
}

/// A probe to send (an empty body sends one to `product-events`).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeRequest {
    /// A topic this process consumes; `product-events` when absent.
    #[schema(schema_with = probe_topic)]
    pub topic: Option<String>,
    /// Free text echoed in the event log, at most 1,000 characters.
    pub note: Option<String>,
}

/// The topics a probe may name (those this process consumes, by its configuration).
fn probe_topic() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            utoipa::openapi::schema::Type::String,
            utoipa::openapi::schema::Type::Null,
        ]))
        .enum_values(Some(
            topics::ALL
                .iter()
                .map(|topic| serde_json::json!(topic))
                .chain([serde_json::Value::Null]),
        ))
        .description(Some(
            "A topic this process consumes; `product-events` when absent.",
        ))
        .build()
}

/// A probe written through the outbox.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeAccepted {
    pub event_id: EventId,
    pub topic: &'static str,
    /// `PUBLISHED`, or `PENDING` when the relay will publish it.
    pub status: EventStatus,
}

const MAX_NOTE_CHARS: usize = 1_000;

/// Sends a pipeline probe through a topic.
///
/// `POST /admin/probes`: writes a probe event through the outbox; the topic's domain
/// actor marks it COMPLETED. Follow it with `GET /admin/events/{eventId}`.
#[utoipa::path(
    post,
    path = "/admin/probes",
    operation_id = "sendProbe",
    request_body(content = Option<ProbeRequest>, content_type = "application/json",
        description = "Optional: no body (or `null`) probes `product-events`."),
    responses(
        AdminErrors,
        BodyErrors,
        ServerErrors,
        (status = 202, description = "The probe is on its way.", body = ProbeAccepted,
            links(
                ("adminEvent" = (operation_id = "adminEvent",
                    parameters(("event_id" = "$response.body#/eventId")))),
                ("replayEvent" = (operation_id = "replayEvent",
                    parameters(("event_id" = "$response.body#/eventId")))),
            )),
        (status = 400, description = "`INVALID_JSON`, `TOPIC_NOT_CONSUMED` (not a topic this \
            process consumes), `NOTE_TOO_LONG`.", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn send_probe(
    state: web::Data<AppState>,
    _admin: Admin,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    // No body, or `null` (as the document allows), probes `product-events`; anything else
    // is a JSON object, as every body of this API.
    let request: ProbeRequest = if body.trim_ascii().is_empty() || body.trim_ascii() == b"null" {
        ProbeRequest::default()
    } else {
        parse_object(&body)?
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Which events: only `DEAD_LETTER` can be listed.
    #[param(example = "DEAD_LETTER", pattern = "^DEAD_LETTER$")]
    pub status: String,
    /// Page size: 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `nextCursor` of the previous page.
    #[param(pattern = "^[0-9]{1,19}$")]
    pub cursor: Option<String>,
}

/// One dead letter, with its event's row when it was an event.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterItem {
    #[serde(flatten)]
    event: Option<EventRecord>,
    dead_letter: DeadLetterRow,
}

/// OpenAPI: `deadLetter`, and either the fields of an `EventRecord` or nothing else.
impl utoipa::PartialSchema for DeadLetterItem {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::ToSchema;
        use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ObjectBuilder, Type};
        use utoipa::openapi::{Ref, RefOr};
        let letter = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "deadLetter",
                RefOr::Ref(Ref::from_schema_name(DeadLetterRow::name())),
            )
            .required("deadLetter");
        let event_or_nothing = AnyOfBuilder::new()
            .item(RefOr::Ref(Ref::from_schema_name(EventRecord::name())))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .max_properties(Some(1))
                    .description(Some("Not an event: the letter alone.")),
            );
        AllOfBuilder::new()
            .item(letter)
            .item(event_or_nothing)
            .description(Some(
                "One dead letter (`deadLetter`) with, when it was an event, the fields of its \
                 event-log row (`EventRecord`).",
            ))
            .into()
    }
}

impl utoipa::ToSchema for DeadLetterItem {
    fn schemas(schemas: &mut NamedSchemas) {
        add_schema::<EventRecord>(schemas);
        add_schema::<DeadLetterRow>(schemas);
    }
}

/// A page of open dead letters.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
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

/// The dead letters not replayed yet.
///
/// `GET /admin/events?status=DEAD_LETTER&limit=&cursor=`: every dead letter not replayed
/// yet, whichever consumer group sent it, oldest first: the letter (`deadLetter`: group,
/// source partition and offset, error) and, when it was an event, the event's row (its
/// attempts in `retryCount`, `lastError`).
#[utoipa::path(
    get,
    path = "/admin/events",
    operation_id = "adminDeadLetters",
    params(EventQuery),
    responses(
        AdminErrors,
        ServerErrors,
        (status = 200, description = "A page of open dead letters, oldest first.",
            body = EventPage),
        (status = 400, description = "`STATUS_NOT_LISTABLE` (a status other than \
            `DEAD_LETTER`), `INVALID_LIMIT`, `INVALID_CURSOR`, `INVALID_QUERY` (a missing \
            `status`, an unknown parameter, not a number).", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
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

/// A dead letter on its way again.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayAccepted {
    event_id: EventId,
    status: EventStatus,
    /// When the retry scheduler makes the attempt (events delivered to external systems).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The consumers the event was handed back to.
    consumers: Vec<&'static str>,
}

/// Replays a dead-lettered event.
///
/// `POST /admin/events/{event_id}/replay`: puts a dead letter back on its way, for every
/// consumer that dead-lettered it. For the consumer whose progress is the row, an event
/// delivered to an external system goes back to the retry scheduler (due now, attempts
/// counted afresh), any other returns to PENDING and the outbox relay publishes it again;
/// the ranking counts it at once (its applied mark keeps that idempotent). 409 for an
/// event no consumer dead-lettered.
#[utoipa::path(
    post,
    path = "/admin/events/{event_id}/replay",
    operation_id = "replayEvent",
    params(("event_id" = EventId, Path, description = "The dead-lettered event's id.")),
    responses(
        AdminErrors,
        LookupErrors<EventId>,
        ServerErrors,
        (status = 202, description = "Replayed.", body = ReplayAccepted),
        (status = 409, description = "`ALREADY_COMPLETED` (replaying would deliver it twice), \
            `NOT_DEAD_LETTERED` (no consumer dead-lettered it).", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
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
    for settlement in operations.consumers.of(&record) {
        let consumer = settlement.consumer();
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
            mark_replayed_for(operations, event_id, consumer, &mut consumers).await?;
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
        for settlement in operations.consumers.of(&record) {
            let consumer = settlement.consumer();
            if consumer.recorded_in == RecordedIn::EventLog {
                mark_replayed_for(operations, event_id, consumer, &mut consumers).await?;
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

/// Marks `consumer`'s dead letters of the event replayed, and counts it among the
/// consumers the event was handed back to.
async fn mark_replayed_for(
    operations: &OperationsState,
    event_id: EventId,
    consumer: &ConsumerSpec,
    consumers: &mut Vec<&'static str>,
) -> Result<(), ApiError> {
    operations
        .dead_letters
        .mark_replayed(event_id, Some(&consumer.group_id))
        .await
        .map_err(ApiError::from_store)?;
    consumers.push(consumer.name);
    Ok(())
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

/// The event-log row of the event id in `path`: 400 for a malformed id, 404 for no row (as
/// [`LookupErrors`] documents them).
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
