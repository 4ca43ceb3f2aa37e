//! Coupons: creation, reading, the issue intake and the state of a request.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::api::auth::{Admin, Caller};
use crate::api::error::{ApiError, ErrorBody, JsonObject};
use crate::api::guard::{idempotency_key, key_reused, limit_user, replay};
use crate::api::input::{name, storable_instant};
use crate::api::responses::{
    ActsAsUserErrors, AdminErrors, Authenticated, BodyErrors, InvalidPathId, LookupErrors,
    RateLimited, ReadsUserErrors, ServerErrors,
};
use crate::common::error::{Classify, ErrorClass};
use crate::common::ids::{CouponHistoryId, CouponId, RequestId, UserId};
use crate::coupons::RefusalReason;
use crate::coupons::intake::Intake;
use crate::coupons::results::RecordedDecision;
use crate::coupons::store::{Coupon, HeldCoupon, NewCoupon};
use crate::event_log::{EventRecord, EventStatus};
use crate::events::EventPayload;
use crate::guards::idempotency::{self, Claim};

/// A coupon to create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateCoupon {
    /// 1 to 100 characters (trimmed), no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u001F\u007F-\u009F\s][^\u0000-\u001F\u007F-\u009F]*$",
        example = "Black Friday"
    )]
    pub name: String,
    /// 1 to `coupons.max_discount_amount`.
    #[schema(minimum = 1, example = 5000)]
    pub discount_amount: i64,
    /// How many can be issued: 1 to `coupons.max_total_quantity`.
    #[schema(minimum = 1, example = 100)]
    pub total_quantity: i64,
    /// From when requests get one (years 1000 to 9999).
    pub valid_from: DateTime<Utc>,
    /// Until when (exclusive); after `validFrom`.
    pub valid_until: DateTime<Utc>,
}

/// Creates a coupon (admin).
///
/// `POST /coupons` (admin)
#[utoipa::path(
    post,
    path = "/coupons",
    operation_id = "createCoupon",
    request_body = CreateCoupon,
    responses(
        AdminErrors,
        BodyErrors,
        ServerErrors,
        (status = 201, description = "Created.", body = Coupon,
            headers(("Location" = String, description = "`/coupons/{couponId}`")),
            links(("getCoupon" = (operation_id = "getCoupon",
                parameters(("coupon_id" = "$response.body#/couponId")))))),
        (status = 400, description = "`INVALID_JSON` (not a JSON object of these fields), \
            `INVALID_NAME`, `INVALID_DISCOUNT_AMOUNT`, `INVALID_TOTAL_QUANTITY`, \
            `INVALID_VALIDITY`.", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn create(
    state: web::Data<AppState>,
    _admin: Admin,
    body: JsonObject<CreateCoupon>,
) -> Result<HttpResponse, ApiError> {
    let limits = CouponLimits {
        max_total_quantity: state.coupons.max_total_quantity,
        max_discount_amount: state.coupons.max_discount_amount,
    };
    let coupon = validate_new_coupon(body.0, limits)?;
    let created = state.coupons.store.create(&coupon).await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/coupons/{}", created.coupon_id)))
        .json(created))
}

/// The configured bounds of a coupon.
#[derive(Clone, Copy, Debug)]
struct CouponLimits {
    max_total_quantity: u32,
    max_discount_amount: u64,
}

fn validate_new_coupon(request: CreateCoupon, limits: CouponLimits) -> Result<NewCoupon, ApiError> {
    let CouponLimits {
        max_total_quantity,
        max_discount_amount,
    } = limits;
    let name = name(&request.name)?;
    let discount_amount = u64::try_from(request.discount_amount)
        .ok()
        .filter(|amount| (1..=max_discount_amount).contains(amount))
        .ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_DISCOUNT_AMOUNT",
                format!("discountAmount must be between 1 and {max_discount_amount}"),
            )
        })?;
    let total_quantity = u32::try_from(request.total_quantity)
        .ok()
        .filter(|quantity| (1..=max_total_quantity).contains(quantity))
        .ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_TOTAL_QUANTITY",
                format!("totalQuantity must be between 1 and {max_total_quantity}"),
            )
        })?;
    storable_instant("validFrom", request.valid_from, "INVALID_VALIDITY")?;
    storable_instant("validUntil", request.valid_until, "INVALID_VALIDITY")?;
    if request.valid_from >= request.valid_until {
        return Err(ApiError::bad_request(
            "INVALID_VALIDITY",
            "validFrom must be before validUntil",
        ));
    }
    Ok(NewCoupon {
        name,
        discount_amount,
        total_quantity,
        valid_from: request.valid_from,
        valid_until: request.valid_until,
    })
}

/// A coupon, with its remaining stock.
///
/// `GET /coupons/{couponId}`
#[utoipa::path(
    get,
    path = "/coupons/{coupon_id}",
    operation_id = "getCoupon",
    params(("coupon_id" = CouponId, Path, description = "The coupon's id.")),
    responses(
        Authenticated,
        ServerErrors,
        (status = 200, description = "The coupon.", body = Coupon),
        LookupErrors<CouponId>,
    ),
    security(("bearerAuth" = []))
)]
pub async fn find(
    state: web::Data<AppState>,
    _caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let coupon_id: CouponId = path.parse()?;
    let coupon = state
        .coupons
        .store
        .find(coupon_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("coupon {coupon_id}")))?;
    Ok(HttpResponse::Ok().json(coupon))
}

/// A request for a coupon.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssueBody {
    /// The caller's own id, when given (the acting user is always the token's).
    #[schema(minimum = 1)]
    pub user_id: Option<i64>,
    #[schema(minimum = 1)]
    pub coupon_id: i64,
}

/// A coupon request, recorded.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    request_id: RequestId,
    /// Where it stands, as in `GET /coupons/requests/{requestId}`.
    #[schema(schema_with = request_status)]
    status: &'static str,
}

/// The statuses of a coupon request.
fn request_status() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["PENDING", "COMPLETED", "NOTIFIED", "DEAD_LETTER"]))
        .description(Some(
            "`PENDING`, `COMPLETED` (decided), `NOTIFIED` (decided and pushed) or \
             `DEAD_LETTER`.",
        ))
        .build()
}

/// The decision on a coupon request, once there is one.
fn request_outcome() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            utoipa::openapi::schema::Type::String,
            utoipa::openapi::schema::Type::Null,
        ]))
        .enum_values(Some([
            serde_json::json!("ISSUED"),
            serde_json::json!("REFUSED"),
            serde_json::Value::Null,
        ]))
        .description(Some("`ISSUED` or `REFUSED`; null until decided."))
        .build()
}

/// The idempotency-key route name of coupon issue requests.
const ISSUE_ROUTE: &str = "coupon-issue";

/// Asks for a coupon, first come first served (decided asynchronously).
///
/// `POST /coupons/issue`: accepted (202) once recorded; the decision comes asynchronously,
/// whether or not the coupon exists or has stock. A user's repeated request for a coupon is
/// answered with the first one (200, its id and status); with an `Idempotency-Key`, a retry
/// gets the first answer again.
#[utoipa::path(
    post,
    path = "/coupons/issue",
    operation_id = "issueCoupon",
    request_body = IssueBody,
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1,
        max_length = 128,
        pattern = "^[!-~]+$",
        description = "Names this request's retries: 1 to 128 visible ASCII characters.")),
    responses(
        ActsAsUserErrors,
        BodyErrors,
        RateLimited,
        ServerErrors,
        (status = 202, description = "Accepted: follow it with \
            `GET /coupons/requests/{requestId}` or a push channel.", body = Accepted,
            links(("getCouponRequest" = (operation_id = "getCouponRequest",
                parameters(("request_id" = "$response.body#/requestId")))))),
        (status = 200, description = "The user asked for this coupon before: that request.",
            body = Accepted,
            links(("getCouponRequest" = (operation_id = "getCouponRequest",
                parameters(("request_id" = "$response.body#/requestId")))))),
        (status = 400, description = "`INVALID_JSON`, `INVALID_USER_ID`, \
            `INVALID_COUPON_ID`, `INVALID_IDEMPOTENCY_KEY`, `USER_NOT_FOUND` (the token's \
            user has no row).", body = ErrorBody),
        (status = 422, description = "`IDEMPOTENCY_KEY_REUSED`: the key was used with \
            another request.", body = ErrorBody),
        (status = 503, description = "`UNAVAILABLE`: a dependency (MySQL, Redis, Kafka) \
            does not answer, or more requests are waiting to be recorded than \
            `coupons.intake_queue` (answered at once); nothing was recorded. Retry after \
            `Retry-After`.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before asking again."))),
    ),
    security(("bearerAuth" = []))
)]
pub async fn issue(
    state: web::Data<AppState>,
    caller: Caller,
    request: HttpRequest,
    JsonObject(body): JsonObject<IssueBody>,
) -> Result<HttpResponse, ApiError> {
    let user = caller.acts_as(body.user_id.map(UserId::parse).transpose()?)?;
    let coupon = CouponId::parse(body.coupon_id)?;
    let key = idempotency_key(
        &request,
        &caller,
        ISSUE_ROUTE,
        coupon.to_string().as_bytes(),
    )?;
    if let Some(key) = &key {
        let mut connection = state.operations.event_log.pool().acquire().await?;
        match idempotency::claim(&mut connection, key).await? {
            Claim::Replay(answer) => return Ok(replay(&answer)),
            Claim::Mismatch => return Err(key_reused()),
            Claim::First => {}
        }
    }
    limit_user(
        &state,
        ISSUE_ROUTE,
        &caller,
        state.limits.settings.coupon_issue,
    )
    .await?;
    let intake = state
        .coupons
        .intake
        .submit(user, coupon, key.map(|key| (key, issue_answer as _)))
        .await
        .map_err(|error| match error.class() {
            ErrorClass::Unavailable(_) => ApiError::unavailable(&error),
            _ => ApiError::Internal(anyhow::Error::from(error)),
        })?;
    match intake {
        Intake::Accepted(request_id) => Ok(HttpResponse::Accepted().json(Accepted {
            request_id,
            status: "PENDING",
        })),
        Intake::Existing(request_id) => {
            let record = state.operations.event_log.find(request_id.into()).await?;
            let status = record
                .as_ref()
                .and_then(|record| request_view(record, None))
                .map_or("PENDING", |view| view.status);
            Ok(HttpResponse::Ok().json(Accepted { request_id, status }))
        }
        Intake::UnknownUser => Err(ApiError::bad_request(
            "USER_NOT_FOUND",
            format!("user {user} does not exist"),
        )),
    }
}

/// What an issue request answers (and replays under its idempotency key).
fn issue_answer(intake: &Intake) -> idempotency::StoredAnswer {
    match intake {
        Intake::Accepted(request_id) => idempotency::StoredAnswer::json(
            202,
            &Accepted {
                request_id: *request_id,
                status: "PENDING",
            },
        ),
        Intake::Existing(request_id) => idempotency::StoredAnswer::json(
            200,
            &Accepted {
                request_id: *request_id,
                status: "PENDING",
            },
        ),
        Intake::UnknownUser => idempotency::StoredAnswer::json(
            400,
            &serde_json::json!({"error": {"code": "USER_NOT_FOUND", "message": "no such user"}}),
        ),
    }
}

/// The state of a request as clients see it.
#[derive(Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestView {
    pub request_id: RequestId,
    pub user_id: UserId,
    pub coupon_id: CouponId,
    /// Where the request stands: `PENDING`, `COMPLETED` (decided), `NOTIFIED` (decided and
    /// pushed) or `DEAD_LETTER`.
    #[schema(schema_with = request_status)]
    pub status: &'static str,
    /// The decision once there is one: `ISSUED` or `REFUSED`.
    #[schema(schema_with = request_outcome)]
    pub outcome: Option<&'static str>,
    /// Why it was refused (null unless refused).
    pub reason: Option<RefusalReason>,
    /// The coupon the user now holds (null unless issued).
    pub coupon_history_id: Option<CouponHistoryId>,
}

/// Maps an event-log row of a `CouponRequested` event to what clients see: the publishing
/// and processing steps are all still `PENDING` to them. `coupon_history_id` is the history
/// the request created, if any.
pub fn request_view(
    record: &EventRecord,
    coupon_history_id: Option<CouponHistoryId>,
) -> Option<RequestView> {
    let EventPayload::CouponRequested(request) = &record.payload else {
        return None;
    };
    let status = match record.status {
        EventStatus::Pending | EventStatus::Published | EventStatus::InProgress => "PENDING",
        // FAILED is how refusals were recorded before they became COMPLETED with a reason.
        EventStatus::Completed | EventStatus::Failed => "COMPLETED",
        EventStatus::Notified => "NOTIFIED",
        EventStatus::DeadLetter => "DEAD_LETTER",
    };
    let reason: Option<RefusalReason> = record
        .result
        .as_ref()
        .and_then(|result| result.get("reason"))
        .and_then(|reason| serde_json::from_value(reason.clone()).ok());
    let outcome = match status {
        "COMPLETED" | "NOTIFIED" if reason.is_some() => Some("REFUSED"),
        "COMPLETED" | "NOTIFIED" => Some("ISSUED"),
        _ => None,
    };
    Some(RequestView {
        request_id: RequestId::of_event(record.event_id),
        user_id: request.user_id,
        coupon_id: request.coupon_id,
        status,
        outcome,
        reason,
        coupon_history_id,
    })
}

/// Where a coupon request stands, and its decision.
///
/// `GET /coupons/requests/{requestId}`: the requester's own, or any for an admin.
#[utoipa::path(
    get,
    path = "/coupons/requests/{request_id}",
    operation_id = "getCouponRequest",
    params(("request_id" = RequestId, Path, description = "The `requestId` of the 202.")),
    responses(
        ReadsUserErrors,
        ServerErrors,
        (status = 200, description = "The request.", body = RequestView),
        LookupErrors<RequestId>,
    ),
    security(("bearerAuth" = []))
)]
pub async fn request(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let request_id: RequestId = path.parse()?;
    let record = state.operations.event_log.find(request_id.into()).await?;
    let decided = record.as_ref().is_some_and(|record| {
        matches!(
            record.status,
            EventStatus::Completed | EventStatus::Notified
        )
    });
    // The row records an issued request's history; rows decided before it did are looked up.
    let recorded = record
        .as_ref()
        .and_then(RecordedDecision::recorded_in)
        .filter(|decision| decision.result_event_id.is_some());
    let coupon_history_id = match recorded {
        Some(decision) => decision.coupon_history_id,
        None if decided => state.coupons.store.history_of_request(request_id).await?,
        None => None,
    };
    let view = record
        .as_ref()
        .and_then(|record| request_view(record, coupon_history_id))
        .ok_or_else(|| ApiError::not_found(format!("coupon request {request_id}")))?;
    caller.may_read(view.user_id)?;
    Ok(HttpResponse::Ok().json(view))
}

/// The coupons a user holds.
///
/// `GET /users/{userId}/coupons`
#[utoipa::path(
    get,
    path = "/users/{user_id}/coupons",
    operation_id = "heldCoupons",
    params(("user_id" = UserId, Path, description = "The user's id.")),
    responses(
        ReadsUserErrors,
        ServerErrors,
        (status = 200, description = "The user's coupons.", body = Vec<HeldCoupon>),
        InvalidPathId<UserId>,
    ),
    security(("bearerAuth" = []))
)]
pub async fn held(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user: UserId = path.parse()?;
    caller.may_read(user)?;
    let coupons = state.coupons.store.held_by(user).await?;
    Ok(HttpResponse::Ok().json(coupons))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{CouponRequested, EventType, PipelineProbe};
    use serde_json::json;

    fn record(status: EventStatus, result: Option<serde_json::Value>) -> EventRecord {
        EventRecord {
            event_id: "01a20c4d-9946-77b8-9ac2-9e7b856b2318".parse().unwrap(),
            event_type: EventType::CouponRequested,
            topic: "coupon-requests".into(),
            key: "user:5".into(),
            payload: EventPayload::CouponRequested(CouponRequested {
                user_id: UserId::parse(5).unwrap(),
                coupon_id: CouponId::parse(9).unwrap(),
            }),
            status,
            retry_count: 0,
            last_error: None,
            result,
            occurred_at: Utc::now(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            published_at: None,
            next_attempt_at: None,
            source: None,
            dead_lettered_at: None,
            traceparent: None,
        }
    }

    #[test]
    fn publishing_steps_look_pending_to_clients() {
        for status in [
            EventStatus::Pending,
            EventStatus::Published,
            EventStatus::InProgress,
        ] {
            assert_eq!(
                request_view(&record(status, None), None).unwrap().status,
                "PENDING"
            );
        }
    }

    #[test]
    fn a_refusal_carries_its_reason_and_a_success_its_history() {
        let refused = request_view(
            &record(
                EventStatus::Completed,
                Some(json!({"reason": "OUT_OF_STOCK"})),
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            (refused.status, refused.outcome, refused.reason),
            (
                "COMPLETED",
                Some("REFUSED"),
                Some(RefusalReason::OutOfStock)
            )
        );
        let history = CouponHistoryId::parse(77).unwrap();
        let issued = request_view(&record(EventStatus::Notified, None), Some(history)).unwrap();
        assert_eq!(
            (issued.status, issued.coupon_history_id, issued.reason),
            ("NOTIFIED", Some(history), None)
        );
    }

    #[test]
    fn other_events_are_not_coupon_requests() {
        let mut probe = record(EventStatus::Completed, None);
        probe.event_type = EventType::PipelineProbe;
        probe.payload = EventPayload::PipelineProbe(PipelineProbe { note: None });
        assert_eq!(request_view(&probe, None), None);
    }

    #[test]
    fn a_coupon_needs_a_name_a_discount_a_stock_and_a_period() {
        let valid = || CreateCoupon {
            name: "Welcome".into(),
            discount_amount: 1000,
            total_quantity: 100,
            valid_from: Utc::now(),
            valid_until: Utc::now() + chrono::Duration::days(1),
        };
        let limits = CouponLimits {
            max_total_quantity: 1_000,
            max_discount_amount: 50_000,
        };
        assert!(validate_new_coupon(valid(), limits).is_ok());
        let cases: Vec<(CreateCoupon, &str)> = vec![
            (
                CreateCoupon {
                    name: "  ".into(),
                    ..valid()
                },
                "INVALID_NAME",
            ),
            (
                CreateCoupon {
                    discount_amount: 0,
                    ..valid()
                },
                "INVALID_DISCOUNT_AMOUNT",
            ),
            (
                CreateCoupon {
                    discount_amount: 1_000_000_000_000_000_000,
                    ..valid()
                },
                "INVALID_DISCOUNT_AMOUNT",
            ),
            (
                CreateCoupon {
                    name: "nul\0".into(),
                    ..valid()
                },
                "INVALID_NAME",
            ),
            (
                CreateCoupon {
                    total_quantity: -1,
                    ..valid()
                },
                "INVALID_TOTAL_QUANTITY",
            ),
            (
                CreateCoupon {
                    total_quantity: 1_001,
                    ..valid()
                },
                "INVALID_TOTAL_QUANTITY",
            ),
            (
                CreateCoupon {
                    valid_until: Utc::now() - chrono::Duration::days(1),
                    ..valid()
                },
                "INVALID_VALIDITY",
            ),
        ];
        for (request, code) in cases {
            match validate_new_coupon(request, limits) {
                Err(ApiError::BadRequest { code: actual, .. }) => assert_eq!(actual, code),
                other => panic!("expected {code}, got {other:?}"),
            }
        }
    }
}
