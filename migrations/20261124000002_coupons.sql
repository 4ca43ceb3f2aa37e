-- First-come-first-served coupons.

-- What a consumer decided about an event beyond its status (for a coupon request: the
-- reason it was refused), written with its final status.
ALTER TABLE event_log ADD COLUMN result JSON NULL AFTER last_error;

CREATE TABLE IF NOT EXISTS coupon (
    coupon_id       BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    name            VARCHAR(100)    NOT NULL,
    discount_amount BIGINT UNSIGNED NOT NULL,
    total_quantity  INT UNSIGNED    NOT NULL,
    issued_quantity INT UNSIGNED    NOT NULL DEFAULT 0,
    valid_from      DATETIME(6)     NOT NULL,
    valid_until     DATETIME(6)     NOT NULL,
    created_at      DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (coupon_id),
    CONSTRAINT coupon_never_over_issued CHECK (issued_quantity <= total_quantity),
    CONSTRAINT coupon_valid_period CHECK (valid_from < valid_until)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One row per coupon a user holds. The unique keys make over-issuing to one user, and
-- issuing twice for one request, impossible whatever the application does. There is
-- deliberately no foreign key to coupon: its check would take a shared lock on the coupon
-- row for every history inserted, and that row is the hot spot of a popular coupon
-- (coupons are never deleted).
CREATE TABLE IF NOT EXISTS coupon_history (
    coupon_history_id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    coupon_id         BIGINT UNSIGNED NOT NULL,
    user_id           BIGINT UNSIGNED NOT NULL,
    request_id        CHAR(36)        CHARACTER SET ascii NOT NULL,
    status            VARCHAR(16)     NOT NULL DEFAULT 'ISSUED',
    issued_at         DATETIME(6)     NOT NULL,
    PRIMARY KEY (coupon_history_id),
    UNIQUE KEY coupon_history_one_per_user (coupon_id, user_id),
    UNIQUE KEY coupon_history_one_per_request (request_id),
    KEY coupon_history_by_user (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
