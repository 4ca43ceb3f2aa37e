-- A hot coupon's stock split over shard rows (coupons.stock_shards), so that batches from
-- different partitions take stock from different rows instead of meeting on one row lock.
-- A coupon with one shard keeps its stock in coupon.issued_quantity, as before; a sharded
-- coupon's issued count is the sum of its shards (coupon.issued_quantity stays 0), and the
-- coupon_stock view reads either one.

ALTER TABLE coupon ADD COLUMN stock_shards SMALLINT UNSIGNED NOT NULL DEFAULT 1 AFTER issued_quantity;

CREATE TABLE IF NOT EXISTS coupon_stock_shard (
    coupon_id       BIGINT UNSIGNED   NOT NULL,
    shard           SMALLINT UNSIGNED NOT NULL,
    total_quantity  INT UNSIGNED      NOT NULL,
    issued_quantity INT UNSIGNED      NOT NULL DEFAULT 0,
    PRIMARY KEY (coupon_id, shard),
    CONSTRAINT coupon_stock_shard_never_over_issued CHECK (issued_quantity <= total_quantity)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE OR REPLACE VIEW coupon_stock AS
SELECT c.coupon_id,
       c.total_quantity,
       c.stock_shards,
       CAST(IF(c.stock_shards = 1, c.issued_quantity,
               (SELECT COALESCE(SUM(s.issued_quantity), 0)
                FROM coupon_stock_shard s WHERE s.coupon_id = c.coupon_id)) AS UNSIGNED)
           AS issued_quantity
FROM coupon c;
