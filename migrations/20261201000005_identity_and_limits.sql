-- Identity and abuse protection.

-- The first answer to a request sent with an `Idempotency-Key`, per user and route: a retry
-- with the same key and body gets it again; the same key with another body is refused. The
-- row is written in the transaction of the request's effect.
CREATE TABLE IF NOT EXISTS idempotency_key (
    user_id         BIGINT UNSIGNED NOT NULL,
    route           VARCHAR(64)     NOT NULL,
    idempotency_key VARCHAR(128)    NOT NULL,
    request_hash    CHAR(64)        CHARACTER SET ascii NOT NULL,
    response_status SMALLINT UNSIGNED NOT NULL,
    response_body   MEDIUMTEXT      NOT NULL,
    created_at      DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (user_id, route, idempotency_key),
    KEY idempotency_key_by_age (created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One issue request per user and coupon: a repeated request returns the first one
-- instead of recording a new event.
CREATE TABLE IF NOT EXISTS coupon_request (
    coupon_id  BIGINT UNSIGNED NOT NULL,
    user_id    BIGINT UNSIGNED NOT NULL,
    request_id CHAR(36)        CHARACTER SET ascii NOT NULL,
    PRIMARY KEY (coupon_id, user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- A user's events in order (keys are `user:{id}`, event ids are time-ordered): what a push
-- channel that reconnects reads to send the results it missed.
ALTER TABLE event_log ADD KEY event_log_by_key (event_key, event_id);
