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
    KEY event_log_status_created (status, created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
