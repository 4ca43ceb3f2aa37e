-- A coupon request claims its (coupon, user) in its own event-log row rather than in a row
-- of coupon_request: one row write per accepted request instead of two. The intake writes
-- `coupon_claim` = '{couponId}/{userId}' with the request's row (INSERT IGNORE); a repeated
-- request meets the unique key and is answered with the request that holds the claim. Rows
-- of other events, and requests recorded by other paths, leave it NULL (a unique key
-- allows any number of NULLs).
ALTER TABLE event_log
    ADD COLUMN coupon_claim VARCHAR(41) CHARACTER SET ascii NULL AFTER event_key,
    ADD UNIQUE KEY event_log_coupon_claim (coupon_claim);

UPDATE event_log e JOIN coupon_request c ON c.request_id = e.event_id
SET e.coupon_claim = CONCAT(c.coupon_id, '/', c.user_id);

DROP TABLE coupon_request;
