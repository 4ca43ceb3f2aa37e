//! The Redis product cache that `GET /products/{id}` reads through.
//!
//! `product:{id}` holds the product's JSON (with its `version`) for `ttl`. The product-events
//! consumer writes each change with a compare-and-set on the version ([`ProductCache::apply`]),
//! so a late or redelivered event never puts an older state back; a read that misses loads
//! the row and stores it only if the key is still absent (`SET NX`), so it cannot overwrite
//! a newer state the consumer wrote meanwhile. The API also applies the changes it just
//! committed (the same compare-and-set), so a read right after a change sees it; the events
//! remain what brings every instance's and every missed change to the cache.

use std::time::Duration;

use redis::Script;

use crate::common::connections::{RedisConnection, RedisConnectionError};
use crate::common::ids::ProductId;
use crate::events::ProductChanged;
use crate::shop::store::Product;

const APPLY_SCRIPT: &str = r#"
local ttl = tonumber(ARGV[1])
local flags = {}
for i, key in ipairs(KEYS) do
  local state = ARGV[2 * i]
  local version = tonumber(ARGV[2 * i + 1])
  local current = redis.call('GET', key)
  if (not current) or tonumber(cjson.decode(current).version) < version then
    redis.call('SET', key, state, 'EX', ttl)
    flags[i] = 1
  else
    flags[i] = 0
  end
end
return flags
"#;

#[derive(Clone)]
pub struct ProductCache {
    redis: RedisConnection,
    script: Script,
    ttl: Duration,
}

impl ProductCache {
    pub fn new(redis: RedisConnection, ttl: Duration) -> Self {
        Self {
            redis,
            script: Script::new(APPLY_SCRIPT),
            ttl,
        }
    }

    pub fn key(&self, product_id: ProductId) -> String {
        self.redis.key(&format!("product:{product_id}"))
    }

    /// Writes each change newer than what the cache holds; `true` for each one written.
    pub async fn apply(
        &self,
        changes: &[&ProductChanged],
    ) -> Result<Vec<bool>, RedisConnectionError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(self.ttl.as_secs().max(1));
        for change in changes {
            let product = Product {
                product_id: change.product_id,
                name: change.name.clone(),
                price: change.price,
                stock: change.stock,
                version: change.version,
            };
            invocation
                .key(self.key(change.product_id))
                .arg(serde_json::to_string(&product).expect("a product serializes"))
                .arg(change.version);
        }
        let mut connection = self.redis.connection()?;
        let flags: Vec<u8> = invocation.invoke_async(&mut connection).await?;
        Ok(flags.into_iter().map(|flag| flag == 1).collect())
    }

    /// The cached product, if any (an unreadable entry counts as a miss).
    pub async fn get(
        &self,
        product_id: ProductId,
    ) -> Result<Option<Product>, RedisConnectionError> {
        let mut connection = self.redis.connection()?;
        let cached: Option<String> = redis::cmd("GET")
            .arg(self.key(product_id))
            .query_async(&mut connection)
            .await?;
        Ok(cached.and_then(|text| serde_json::from_str(&text).ok()))
    }

    /// Stores a product read from MySQL unless the key holds one already.
    pub async fn fill(&self, product: &Product) -> Result<(), RedisConnectionError> {
        let mut connection = self.redis.connection()?;
        redis::cmd("SET")
            .arg(self.key(product.product_id))
            .arg(serde_json::to_string(product).expect("a product serializes"))
            .arg("NX")
            .arg("EX")
            .arg(self.ttl.as_secs().max(1))
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }
}
