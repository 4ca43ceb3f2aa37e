//! Users and their balance, products, orders and their payment.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::api::AppState;
use crate::api::auth::{Admin, Caller};
use crate::api::error::{ApiError, JsonObject};
use crate::api::guard::{idempotency_key, key_reused, limit_anonymous, limit_user, replay};
use crate::api::input::name;
use crate::error::Classify;
use crate::event_log::OutboxEvent;
use crate::events::EventPayload;
use crate::ids::{CouponHistoryId, OrderId, ProductId, UserId};
use crate::outbox::ANSWER_WAIT;
use crate::shop::store::{Answered, NewOrderLine, ShopError};

/// How long a request waits for the product cache (a read, a fill, or a write after a
/// change): MySQL answers a miss and the product events bring every change to the cache
/// anyway, so a slow or absent Redis never slows a request by more.
const CACHE_WRITE_TIMEOUT: Duration = Duration::from_millis(100);
/// The largest single charge, and the largest balance.
pub const MAX_CHARGE: u64 = 100_000_000;
pub const MAX_BALANCE: u64 = 1_000_000_000_000;
const MAX_PRICE: u64 = 100_000_000;
const MAX_STOCK: u32 = 10_000_000;
const MAX_LINES: usize = 100;
const MAX_QUANTITY: u32 = 1_000;
const MAX_PAGE_SIZE: u32 = 100;

impl From<ShopError> for ApiError {
    fn from(error: ShopError) -> Self {
        match error {
            ShopError::NotFound(what) => ApiError::not_found(what),
            ShopError::Invalid { code, message } => ApiError::bad_request(code, message),
            ShopError::Refused(refusal) => ApiError::conflict(refusal.code(), refusal.to_string()),
            ShopError::KeyReused => key_reused(),
            other if other.class().is_unavailable() => ApiError::unavailable(&other),
            other => ApiError::Internal(other.into()),
        }
    }
}

fn bounded(value: i64, max: u64, code: &'static str, field: &str) -> Result<u64, ApiError> {
    u64::try_from(value)
        .ok()
        .filter(|value| (1..=max).contains(value))
        .ok_or_else(|| ApiError::bad_request(code, format!("{field} must be between 1 and {max}")))
}

fn stock(value: i64) -> Result<u32, ApiError> {
    u32::try_from(value)
        .ok()
        .filter(|stock| *stock <= MAX_STOCK)
        .ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_STOCK",
                format!("stock must be between 0 and {MAX_STOCK}"),
            )
        })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
}

/// An answer, or the first answer to the same `Idempotency-Key` again.
fn answered<T>(answered: Answered<T>, fresh: impl FnOnce(T) -> HttpResponse) -> HttpResponse {
    match answered {
        Answered::Fresh(value) => fresh(value),
        Answered::Replay(answer) => replay(&answer),
    }
}

/// `POST /users` (admin)
pub async fn create_user(
    state: web::Data<AppState>,
    _admin: Admin,
    body: JsonObject<CreateUser>,
) -> Result<HttpResponse, ApiError> {
    let user = state.shop.store.create_user(&name(&body.0.name)?).await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/users/{}", user.user_id)))
        .json(user))
}

/// `GET /users/{userId}/balance`
pub async fn balance(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user_id: UserId = path.parse()?;
    caller.may_read(user_id)?;
    let user = state
        .shop
        .store
        .user(user_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {user_id}")))?;
    Ok(HttpResponse::Ok().json(crate::shop::store::Balance {
        user_id,
        balance: user.balance,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Charge {
    pub amount: i64,
}

/// `POST /users/{userId}/balance/charge`: the user's own balance only.
pub async fn charge(
    state: web::Data<AppState>,
    caller: Caller,
    request: HttpRequest,
    path: web::Path<String>,
    body: JsonObject<Charge>,
) -> Result<HttpResponse, ApiError> {
    let user_id = caller.acts_as(Some(path.parse()?))?;
    let amount = bounded(body.0.amount, MAX_CHARGE, "INVALID_AMOUNT", "amount")?;
    let key = idempotency_key(&request, &caller, "charge", amount.to_string().as_bytes())?;
    limit_user(&state, "charge", &caller, state.limits.settings.charge).await?;
    let charged = state
        .shop
        .store
        .charge(user_id, amount, MAX_BALANCE, key.as_ref())
        .await?;
    Ok(answered(charged, |balance| {
        HttpResponse::Ok().json(balance)
    }))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateProduct {
    pub name: String,
    pub price: i64,
    pub stock: i64,
}

/// `POST /products` (admin)
pub async fn create_product(
    state: web::Data<AppState>,
    _admin: Admin,
    body: JsonObject<CreateProduct>,
) -> Result<HttpResponse, ApiError> {
    let request = body.0;
    let name = name(&request.name)?;
    let price = bounded(request.price, MAX_PRICE, "INVALID_PRICE", "price")?;
    let stock = stock(request.stock)?;
    let created = state.shop.store.create_product(&name, price, stock).await?;
    created.events.publish_within(ANSWER_WAIT).await;
    let product = created.value;
    Ok(HttpResponse::Created()
        .insert_header((
            header::LOCATION,
            format!("/products/{}", product.product_id),
        ))
        .json(product))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub page: Option<u32>,
    pub size: Option<u32>,
}

/// `GET /products?page=&size=` (page from 0, size 1–100, default 20)
pub async fn products(
    state: web::Data<AppState>,
    request: HttpRequest,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    limit_anonymous(&state, &request).await?;
    let size = query.size.unwrap_or(20);
    if !(1..=MAX_PAGE_SIZE).contains(&size) {
        return Err(ApiError::bad_request(
            "INVALID_PAGE_SIZE",
            format!("size must be between 1 and {MAX_PAGE_SIZE}"),
        ));
    }
    let page = query.page.unwrap_or(0);
    Ok(HttpResponse::Ok().json(state.shop.store.products(page, size).await?))
}

/// `GET /products/{productId}`: read through the Redis product cache (MySQL on a miss, or
/// when Redis is unavailable).
pub async fn product(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let product_id: ProductId = path.parse()?;
    limit_anonymous(&state, &request).await?;
    match tokio::time::timeout(CACHE_WRITE_TIMEOUT, state.shop.cache.get(product_id)).await {
        Ok(Ok(Some(product))) => return Ok(HttpResponse::Ok().json(product)),
        Ok(Ok(None)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "product cache unavailable; reading MySQL"),
        Err(_) => tracing::warn!("product cache did not answer in time; reading MySQL"),
    }
    let product = state
        .shop
        .store
        .product(product_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("product {product_id}")))?;
    match tokio::time::timeout(CACHE_WRITE_TIMEOUT, state.shop.cache.fill(&product)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "product not cached"),
        Err(_) => tracing::warn!("product not cached: the cache did not answer in time"),
    }
    Ok(HttpResponse::Ok().json(product))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateProduct {
    pub price: Option<i64>,
    pub stock: Option<i64>,
}

/// `PATCH /products/{productId}` `{"price"?, "stock"?}` (admin): a ProductChanged event
/// follows.
pub async fn update_product(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<String>,
    body: JsonObject<UpdateProduct>,
) -> Result<HttpResponse, ApiError> {
    let product_id: ProductId = path.parse()?;
    let request = body.0;
    if request.price.is_none() && request.stock.is_none() {
        return Err(ApiError::bad_request(
            "NOTHING_TO_CHANGE",
            "give price, stock or both",
        ));
    }
    let price = request
        .price
        .map(|price| bounded(price, MAX_PRICE, "INVALID_PRICE", "price"))
        .transpose()?;
    let stock = request.stock.map(stock).transpose()?;
    let updated = state
        .shop
        .store
        .update_product(product_id, price, stock)
        .await?;
    cache_changes(&state, updated.events.events()).await;
    updated.events.publish_within(ANSWER_WAIT).await;
    Ok(HttpResponse::Ok().json(updated.value))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderItem {
    pub product_id: i64,
    pub quantity: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateOrder {
    /// The caller's own id, when given (the acting user is always the token's).
    pub user_id: Option<i64>,
    pub items: Vec<OrderItem>,
    pub coupon_history_id: Option<i64>,
}

/// `POST /orders`: an order in the caller's name.
pub async fn create_order(
    state: web::Data<AppState>,
    caller: Caller,
    http_request: HttpRequest,
    body: JsonObject<CreateOrder>,
) -> Result<HttpResponse, ApiError> {
    let request = body.0;
    let user_id = caller.acts_as(request.user_id.map(UserId::parse).transpose()?)?;
    if request.items.is_empty() || request.items.len() > MAX_LINES {
        return Err(ApiError::bad_request(
            "INVALID_ITEMS",
            format!("items must have 1 to {MAX_LINES} lines"),
        ));
    }
    let mut lines = Vec::with_capacity(request.items.len());
    for item in &request.items {
        let product_id = ProductId::parse(item.product_id)?;
        let quantity = bounded(
            item.quantity,
            u64::from(MAX_QUANTITY),
            "INVALID_QUANTITY",
            "quantity",
        )? as u32;
        if lines
            .iter()
            .any(|line: &NewOrderLine| line.product_id == product_id)
        {
            return Err(ApiError::bad_request(
                "DUPLICATE_PRODUCT",
                format!("product {product_id} appears twice; give one line per product"),
            ));
        }
        lines.push(NewOrderLine {
            product_id,
            quantity,
        });
    }
    let coupon_history_id = request
        .coupon_history_id
        .map(CouponHistoryId::parse)
        .transpose()?;
    let identity_of_request = format!("{lines:?}{coupon_history_id:?}");
    let key = idempotency_key(
        &http_request,
        &caller,
        "order-create",
        identity_of_request.as_bytes(),
    )?;
    limit_user(
        &state,
        "order-create",
        &caller,
        state.limits.settings.order_create,
    )
    .await?;
    let created = state
        .shop
        .store
        .create_order(user_id, &lines, coupon_history_id, key.as_ref())
        .await?;
    Ok(answered(created, |order| {
        HttpResponse::Created()
            .insert_header((header::LOCATION, format!("/orders/{}", order.order_id)))
            .json(order)
    }))
}

/// `GET /orders/{orderId}`: the buyer's own, or any for an admin.
pub async fn order(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let order_id: OrderId = path.parse()?;
    let order = state
        .shop
        .store
        .order(order_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("order {order_id}")))?;
    caller.may_read(order.user_id)?;
    Ok(HttpResponse::Ok().json(order))
}

/// `POST /orders/{orderId}/pay`: one transaction, then `OrderCompleted` and
/// `PaymentCompleted` are published (the outbox relay covers a crash in between).
pub async fn pay(
    state: web::Data<AppState>,
    caller: Caller,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let order_id: OrderId = path.parse()?;
    let order = state
        .shop
        .store
        .order(order_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("order {order_id}")))?;
    // Only the buyer pays, with their balance and coupon; never an admin for them.
    caller.acts_as(Some(order.user_id))?;
    let key = idempotency_key(&request, &caller, "pay", order_id.to_string().as_bytes())?;
    limit_user(&state, "pay", &caller, state.limits.settings.payment).await?;
    match state
        .shop
        .store
        .pay(order_id, state.clock.now(), key.as_ref())
        .await?
    {
        Answered::Fresh(paid) => {
            cache_changes(&state, paid.events.events()).await;
            paid.events.publish_within(ANSWER_WAIT).await;
            Ok(HttpResponse::Ok().json(paid.value))
        }
        Answered::Replay(answer) => Ok(replay(&answer)),
    }
}

/// Writes the committed product changes among `events` to the cache at once (the same
/// version compare-and-set as the consumer's), so a read right after a change sees it; the
/// events bring the change to the cache anyway (best effort here).
async fn cache_changes(state: &AppState, events: &[OutboxEvent]) {
    let changes: Vec<_> = events
        .iter()
        .filter_map(|event| match &event.envelope.payload {
            EventPayload::ProductChanged(change) => Some(change),
            _ => None,
        })
        .collect();
    match tokio::time::timeout(CACHE_WRITE_TIMEOUT, state.shop.cache.apply(&changes)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "product changes not cached"),
        Err(_) => tracing::warn!("product cache slow; its events will bring the changes"),
    }
}
