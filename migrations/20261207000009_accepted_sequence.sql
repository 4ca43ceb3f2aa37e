-- The order in which the database accepted each event: a number assigned when the row is
-- inserted, so a row committed before another row was inserted always has the smaller one,
-- whichever daemon wrote it and whatever its clock said. The CouponIssuer decides a user's
-- accepted requests in this order (see src/coupons/store.rs), whatever order their records
-- reach the partition in. Existing rows are numbered in their physical order.
ALTER TABLE event_log
    ADD COLUMN accepted_seq BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    ADD UNIQUE KEY event_log_accepted_seq (accepted_seq);
