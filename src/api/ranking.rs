//! The best-seller ranking: `GET /products/ranking`.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::ids::ProductId;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankingQuery {
    pub days: Option<u32>,
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RankingEntry {
    rank: usize,
    product_id: ProductId,
    name: Option<String>,
    quantity: u64,
}

const MAX_RANKING_LIMIT: u32 = 100;

/// `GET /products/ranking?days=3&limit=5`: best sellers by quantity over the last `days`
/// days (today included, UTC), from Redis.
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
    let today = state.clock.now().date_naive();
    let ranked = state.ranking.store.top(today, days, limit as usize).await?;
    let ids: Vec<ProductId> = ranked.iter().map(|place| place.product_id).collect();
    let names = state.shop.store.product_names(&ids).await?;
    let entries: Vec<RankingEntry> = ranked
        .into_iter()
        .enumerate()
        .map(|(index, place)| RankingEntry {
            rank: index + 1,
            product_id: place.product_id,
            name: names.get(&place.product_id).cloned(),
            quantity: place.quantity,
        })
        .collect();
    Ok(HttpResponse::Ok().json(entries))
}
