//! Users and their balance, products, orders and their payment.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::api::AppState;
use crate::api::auth::{Admin, Caller};
use crate::api::error::{ApiError, ErrorBody, JsonObject};
use crate::api::guard::{
    IdempotencyKeyHeader, idempotency_key, key_reused, limit_anonymous, limit_user, replay,
};
use crate::api::input::name;
use crate::api::responses::{
    ActsAsUserErrors, AdminErrors, BodyErrors, LookupErrors, RateLimited, ReadsUserErrors,
    ServerErrors,
};
use crate::common::error::Classify;
use crate::common::ids::{CouponHistoryId, OrderId, ProductId, UserId};
use crate::event_log::OutboxEvent;
use crate::events::EventPayload;
use crate::outbox::ANSWER_WAIT;
use crate::shop::orders::OrderRequest;
use crate::shop::payments::PaymentRequest;
use crate::shop::store::{
    Answered, Balance, NewOrderLine, Order, Payment, Product, ProductPage, ShopError, User,
};

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
            ShopError::Forbidden(message) => ApiError::forbidden(message),
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

/// A user to create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateUser {
    /// 1 to 100 characters (trimmed), no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u001F\u007F-\u009F\s][^\u0000-\u001F\u007F-\u009F]*$",
        example = "Kim"
    )]
    pub name: String,
}

/// An answer, or the first answer to the same `Idempotency-Key` again.
fn answered<T>(answered: Answered<T>, fresh: impl FnOnce(T) -> HttpResponse) -> HttpResponse {
    match answered {
        Answered::Fresh(value) => fresh(value),
        Answered::Replay(answer) => replay(&answer),
    }
}

/// Creates a user, with a zero balance (admin).
///
/// `POST /users` (admin)
#[utoipa::path(
    post,
    path = "/users",
    operation_id = "createUser",
    request_body = CreateUser,
    responses(
        AdminErrors,
        BodyErrors,
        ServerErrors,
        (status = 201, description = "Created.", body = User,
            headers(("Location" = String, description = "`/users/{userId}`")),
            links(
                ("getBalance" = (operation_id = "getBalance",
                    parameters(("user_id" = "$response.body#/userId")))),
                ("heldCoupons" = (operation_id = "heldCoupons",
                    parameters(("user_id" = "$response.body#/userId")))),
            )),
        (status = 400, description = "`INVALID_JSON`, `INVALID_NAME`.", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
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

/// A user's balance.
///
/// `GET /users/{userId}/balance`
#[utoipa::path(
    get,
    path = "/users/{user_id}/balance",
    operation_id = "getBalance",
    params(("user_id" = UserId, Path, description = "The user's id.")),
    responses(
        ReadsUserErrors,
        ServerErrors,
        (status = 200, description = "The balance.", body = Balance),
        LookupErrors<UserId>,
    ),
    security(("bearerAuth" = []))
)]
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

/// Money to add to a balance.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Charge {
    /// 1 to 100,000,000.
    #[schema(minimum = 1, maximum = 100_000_000, example = 10000)]
    pub amount: i64,
}

/// Adds money to the caller's own balance.
///
/// `POST /users/{userId}/balance/charge`: the user's own balance only.
#[utoipa::path(
    post,
    path = "/users/{user_id}/balance/charge",
    operation_id = "chargeBalance",
    request_body = Charge,
    params(
        IdempotencyKeyHeader,
        ("user_id" = UserId, Path, description = "The caller's own user id."),
    ),
    responses(
        ActsAsUserErrors,
        BodyErrors,
        RateLimited,
        ServerErrors,
        (status = 200, description = "The new balance.", body = Balance),
        (status = 400, description = "`INVALID_USER_ID`, `INVALID_JSON`, `INVALID_AMOUNT`, \
            `INVALID_IDEMPOTENCY_KEY`, `BALANCE_LIMIT_EXCEEDED` (a balance stays at most \
            1,000,000,000,000).", body = ErrorBody),
        (status = 404, description = "`NOT_FOUND`: no such user.", body = ErrorBody),
        (status = 422, description = "`IDEMPOTENCY_KEY_REUSED`.", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
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

/// A product to create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateProduct {
    /// 1 to 100 characters (trimmed), no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u001F\u007F-\u009F\s][^\u0000-\u001F\u007F-\u009F]*$",
        example = "Keyboard"
    )]
    pub name: String,
    /// 1 to 100,000,000.
    #[schema(minimum = 1, maximum = 100_000_000, example = 25000)]
    pub price: i64,
    /// 0 to 10,000,000.
    #[schema(minimum = 0, maximum = 10_000_000, example = 10)]
    pub stock: i64,
}

/// Creates a product (admin); a ProductChanged event follows.
///
/// `POST /products` (admin)
#[utoipa::path(
    post,
    path = "/products",
    operation_id = "createProduct",
    request_body = CreateProduct,
    responses(
        AdminErrors,
        BodyErrors,
        ServerErrors,
        (status = 201, description = "Created.", body = Product,
            headers(("Location" = String, description = "`/products/{productId}`")),
            links(
                ("getProduct" = (operation_id = "getProduct",
                    parameters(("product_id" = "$response.body#/productId")))),
                ("updateProduct" = (operation_id = "updateProduct",
                    parameters(("product_id" = "$response.body#/productId")))),
            )),
        (status = 400, description = "`INVALID_JSON`, `INVALID_NAME`, `INVALID_PRICE`, \
            `INVALID_STOCK`.", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The page, from 0 (default 0).
    #[param(format = Int64, minimum = 0, maximum = 4_294_967_295_u64)]
    pub page: Option<u32>,
    /// Products per page: 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub size: Option<u32>,
}

/// Products by id, a page at a time.
///
/// `GET /products?page=&size=` (page from 0, size 1–100, default 20)
#[utoipa::path(
    get,
    path = "/products",
    operation_id = "listProducts",
    params(PageQuery),
    responses(
        RateLimited,
        ServerErrors,
        (status = 200, description = "A page of products.", body = ProductPage),
        (status = 400, description = "`INVALID_PAGE_SIZE`, `INVALID_QUERY` (not numbers, \
            unknown parameters).", body = ErrorBody),
    )
)]
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

/// A product.
///
/// `GET /products/{productId}`: read through the Redis product cache (MySQL on a miss, or
/// when Redis is unavailable).
#[utoipa::path(
    get,
    path = "/products/{product_id}",
    operation_id = "getProduct",
    params(("product_id" = ProductId, Path, description = "The product's id.")),
    responses(
        RateLimited,
        ServerErrors,
        (status = 200, description = "The product.", body = Product),
        LookupErrors<ProductId>,
    )
)]
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

/// What to change of a product: its price, its stock or both.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// `minProperties: 1` is set by `openapi::Fixes` (utoipa 5.5 writes `min_properties` as a maximum).
pub struct UpdateProduct {
    /// 1 to 100,000,000.
    #[schema(minimum = 1, maximum = 100_000_000)]
    pub price: Option<i64>,
    /// 0 to 10,000,000.
    #[schema(minimum = 0, maximum = 10_000_000)]
    pub stock: Option<i64>,
}

/// Changes a product's price or stock (admin).
///
/// `PATCH /products/{productId}` `{"price"?, "stock"?}` (admin): a ProductChanged event
/// follows.
#[utoipa::path(
    patch,
    path = "/products/{product_id}",
    operation_id = "updateProduct",
    params(("product_id" = ProductId, Path, description = "The product's id.")),
    request_body = UpdateProduct,
    responses(
        AdminErrors,
        BodyErrors,
        ServerErrors,
        (status = 200, description = "The product after the change.", body = Product),
        (status = 400, description = "`INVALID_PRODUCT_ID`, `INVALID_JSON`, \
            `NOTHING_TO_CHANGE`, `INVALID_PRICE`, `INVALID_STOCK`.", body = ErrorBody),
        (status = 404, description = "`NOT_FOUND`: no such product.", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
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
    cache_changes(state.clone(), updated.events.events().cloned().collect()).await;
    updated.events.publish_within(ANSWER_WAIT).await;
    Ok(HttpResponse::Ok().json(updated.value))
}

/// One line of an order to place.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderItem {
    #[schema(minimum = 1)]
    pub product_id: i64,
    /// 1 to 1,000.
    #[schema(minimum = 1, maximum = 1000)]
    pub quantity: i64,
}

/// An order to place.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateOrder {
    /// The caller's own id, when given (the acting user is always the token's).
    #[schema(minimum = 1)]
    pub user_id: Option<i64>,
    /// 1 to 100 lines, one per product.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<OrderItem>,
    /// A coupon the caller holds, to take its discount.
    #[schema(minimum = 1)]
    pub coupon_history_id: Option<i64>,
}

/// Places an order at today's prices, in the caller's name.
///
/// `POST /orders`: an order in the caller's name.
#[utoipa::path(
    post,
    path = "/orders",
    operation_id = "createOrder",
    request_body = CreateOrder,
    params(IdempotencyKeyHeader),
    responses(
        ActsAsUserErrors,
        BodyErrors,
        RateLimited,
        ServerErrors,
        (status = 201, description = "Placed (PENDING until paid).", body = Order,
            headers(("Location" = String, description = "`/orders/{orderId}`")),
            links(
                ("getOrder" = (operation_id = "getOrder",
                    parameters(("order_id" = "$response.body#/orderId")))),
                ("payOrder" = (operation_id = "payOrder",
                    parameters(("order_id" = "$response.body#/orderId")))),
            )),
        (status = 400, description = "`INVALID_JSON`, `INVALID_USER_ID`, `INVALID_ITEMS`, \
            `INVALID_PRODUCT_ID`, `INVALID_QUANTITY`, `DUPLICATE_PRODUCT`, \
            `INVALID_COUPON_HISTORY_ID`, `INVALID_IDEMPOTENCY_KEY`, `UNKNOWN_USER`, \
            `UNKNOWN_PRODUCT`, `AMOUNT_TOO_LARGE`.", body = ErrorBody),
        (status = 409, description = "`COUPON_NOT_OWNED`, `COUPON_ALREADY_USED`.",
            body = ErrorBody),
        (status = 422, description = "`IDEMPOTENCY_KEY_REUSED`.", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
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
        .orders
        .submit(OrderRequest {
            user_id,
            lines,
            coupon_history_id,
            now: state.clock.now(),
            key,
        })
        .await?;
    Ok(answered(created, |order| {
        HttpResponse::Created()
            .insert_header((header::LOCATION, format!("/orders/{}", order.order_id)))
            .json(order)
    }))
}

/// An order.
///
/// `GET /orders/{orderId}`: the buyer's own, or any for an admin.
#[utoipa::path(
    get,
    path = "/orders/{order_id}",
    operation_id = "getOrder",
    params(("order_id" = OrderId, Path, description = "The order's id.")),
    responses(
        ReadsUserErrors,
        ServerErrors,
        (status = 200, description = "The order.", body = Order),
        LookupErrors<OrderId>,
    ),
    security(("bearerAuth" = []))
)]
pub async fn order(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let order = existing_order(&state, path.parse()?).await?;
    caller.may_read(order.user_id)?;
    Ok(HttpResponse::Ok().json(order))
}

/// Pays the caller's own order with its balance (and its coupon).
///
/// `POST /orders/{orderId}/pay`: decided with the payments waiting at the same time in one
/// transaction (group commit), then `OrderCompleted` and `PaymentCompleted` are published
/// (the outbox relay covers a crash in between).
#[utoipa::path(
    post,
    path = "/orders/{order_id}/pay",
    operation_id = "payOrder",
    params(
        IdempotencyKeyHeader,
        ("order_id" = OrderId, Path, description = "The order's id."),
    ),
    responses(
        ActsAsUserErrors,
        RateLimited,
        ServerErrors,
        (status = 200, description = "Paid.", body = Payment),
        (status = 400, description = "`INVALID_ORDER_ID`, `INVALID_IDEMPOTENCY_KEY`.",
            body = ErrorBody),
        (status = 404, description = "`NOT_FOUND`: no such order.", body = ErrorBody),
        (status = 409, description = "`ORDER_NOT_PENDING` (paid already), \
            `INSUFFICIENT_BALANCE`, `INSUFFICIENT_STOCK`, `COUPON_NOT_OWNED`, \
            `COUPON_ALREADY_USED`.", body = ErrorBody),
        (status = 422, description = "`IDEMPOTENCY_KEY_REUSED`.", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn pay(
    state: web::Data<AppState>,
    caller: Caller,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let order_id: OrderId = path.parse()?;
    // Only the buyer pays, with their balance and coupon; never an admin for them: checked
    // on the order's locked row, before any effect.
    let payer = caller.acts_as(None)?;
    let key = idempotency_key(&request, &caller, "pay", order_id.to_string().as_bytes())?;
    limit_user(&state, "pay", &caller, state.limits.settings.payment).await?;
    let request = PaymentRequest {
        order_id,
        payer,
        now: state.clock.now(),
        key,
        trace: crate::observability::trace::current(),
    };
    match state.shop.payments.submit(request).await? {
        Answered::Fresh(paid) => {
            // The cache is written after the answer: the product events repair it anyway.
            actix_rt::spawn(cache_changes(state.clone(), paid.events));
            Ok(HttpResponse::Ok().json(paid.payment))
        }
        Answered::Replay(answer) => Ok(replay(&answer)),
    }
}

/// The order `order_id`, or 404.
async fn existing_order(state: &AppState, order_id: OrderId) -> Result<Order, ApiError> {
    state
        .shop
        .store
        .order(order_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("order {order_id}")))
}

/// Writes the committed product changes among `events` to the cache at once (the same
/// version compare-and-set as the consumer's): awaited before a product change's answer, so
/// a read right after it sees it; after a payment's answer, in the background. The events
/// bring the change to the cache anyway (best effort here).
async fn cache_changes(state: web::Data<AppState>, events: Vec<OutboxEvent>) {
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
