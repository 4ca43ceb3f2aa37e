//! The best-seller ranking: `GET /products/ranking`.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::responses::ServerErrors;
use crate::common::ids::ProductId;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RankingQuery {
    /// Days counted back from today (UTC), today included: 1 to `ranking.max_days`
    /// (default 3).
    #[param(minimum = 1)]
    pub days: Option<u32>,
    /// How many best sellers: 1 to 100 (default 5).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
}

/// One best seller.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RankingEntry {
    /// 1 for the best seller.
    #[schema(minimum = 1)]
    rank: usize,
    product_id: ProductId,
    /// The product's name (absent when the product row is gone).
    name: Option<String>,
    /// Units sold over the days.
    quantity: u64,
}

const MAX_RANKING_LIMIT: u32 = 100;

/// The best sellers over the last days.
///
/// `GET /products/ranking?days=3&limit=5`: best sellers by quantity over the last `days`
/// days (today included, UTC), from Redis.
#[utoipa::path(
    get,
    path = "/products/ranking",
    operation_id = "ranking",
    params(RankingQuery),
    responses(
        ServerErrors,
        (status = 200, description = "The best sellers, best first.", body = Vec<RankingEntry>),
        (status = 400, description = "`INVALID_DAYS`, `INVALID_LIMIT`, `INVALID_QUERY` \
            (not numbers, or unknown parameters).", body = ErrorBody),
    )
)]
pub async fn ranking(
    state: web::Data<AppState>,
    query: web::Query<RankingQuery>,
) -> Result<HttpResponse, ApiError> {
    let days = query.days.unwrap_or(3);
    if !(1..=state.ranking.max_days).contains(&days) {
        return Err(ApiError::bad_request(
            "INVALID_DAYS",
            format!("days must be between 1 and {}", state.ranking.max_days),
        ));
    }
    let limit = query.limit.unwrap_or(5);
    if !(1..=MAX_RANKING_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "INVALID_LIMIT",
            format!("limit must be between 1 and {MAX_RANKING_LIMIT}"),
        ));
    }
    let entries = best_sellers(&state, days, limit as usize).await?;
    Ok(HttpResponse::Ok().json(entries))
}

/// The `limit` best sellers over the last `days` days (today included), best first, with
/// their products' names.
pub async fn best_sellers(
    state: &AppState,
    days: u32,
    limit: usize,
) -> Result<Vec<RankingEntry>, ApiError> {
    let today = state.clock.now().date_naive();
    let ranked = state.ranking.store.top(today, days, limit).await?;
    let ids: Vec<ProductId> = ranked.iter().map(|place| place.product_id).collect();
    let names = state.shop.store.product_names(&ids).await?;
    Ok(ranked
        .into_iter()
        .enumerate()
        .map(|(index, place)| RankingEntry {
            rank: index + 1,
            product_id: place.product_id,
            name: names.get(&place.product_id).cloned(),
            quantity: place.quantity,
        })
        .collect())
}
