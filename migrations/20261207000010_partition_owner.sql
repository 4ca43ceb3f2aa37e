-- The owner epoch of each partition the CouponIssuer decides: a new assignment of a partition
-- takes the next epoch, and every batch checks, in its own transaction and under a shared lock
-- of this row, that its epoch is still the partition's. A batch of an owner that lost the
-- partition (a revoke whose drain timed out) then fails instead of deciding, and a new owner's
-- epoch waits for a batch already deciding to commit. See src/coupons/owners.rs.
CREATE TABLE IF NOT EXISTS partition_owner (
    topic        VARCHAR(249)    NOT NULL,
    partition_id INT             NOT NULL,
    epoch        BIGINT UNSIGNED NOT NULL,
    owner        VARCHAR(255)    NOT NULL,
    assigned_at  DATETIME(6)     NOT NULL,
    PRIMARY KEY (topic, partition_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
