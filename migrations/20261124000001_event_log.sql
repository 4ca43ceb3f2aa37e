-- The event log: one row per business event, written PENDING in the business transaction
-- (the outbox) and moved through its states by the publisher, the relay and the consumers.
-- Allowed transitions live in src/event_log.rs.
CREATE TABLE IF NOT EXISTS event_log (
    event_id     CHAR(36)     CHARACTER SET ascii NOT NULL,
    event_type   VARCHAR(64)  NOT NULL,
    topic        VARCHAR(249) NOT NULL,
    event_key    VARCHAR(255) NOT NULL,
    payload      JSON         NOT NULL,
    status       VARCHAR(16)  NOT NULL,
    retry_count  INT          NOT NULL DEFAULT 0,
    last_error   TEXT         NULL,
    occurred_at  DATETIME(6)  NOT NULL,
    created_at   DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at   DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    published_at DATETIME(6)  NULL,
    PRIMARY KEY (event_id),
    -- The relay's search for rows never published. Keyed on published_at, which is set once,
    -- rather than on status, which changes several times in a row's life: an index on
    -- status would be rewritten by every transition.
    KEY event_log_unpublished (published_at, created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
