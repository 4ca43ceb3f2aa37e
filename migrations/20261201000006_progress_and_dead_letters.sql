-- Per-consumer progress and reconciliation.

-- Every record published to a dead-letter topic, whoever sent it (a partition of any
-- consumer group, or the retry scheduler): what the admin API lists and replays. Rows are
-- never deleted; a replay sets replayed_at.
CREATE TABLE IF NOT EXISTS dead_letter (
    dead_letter_id        BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    consumer_group        VARCHAR(255)    NOT NULL,
    topic                 VARCHAR(249)    NOT NULL,
    source_partition      INT             NOT NULL,
    -- -1 when the record's offset is not known.
    source_offset         BIGINT          NOT NULL,
    -- Set when the record was an event (or its id could be salvaged).
    event_id              CHAR(36)        CHARACTER SET ascii NULL,
    error_kind            VARCHAR(64)     NOT NULL,
    error                 TEXT            NOT NULL,
    dead_letter_partition INT             NOT NULL,
    dead_letter_offset    BIGINT          NOT NULL,
    created_at            DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    replayed_at           DATETIME(6)     NULL,
    PRIMARY KEY (dead_letter_id),
    KEY dead_letter_of_event (event_id),
    KEY dead_letter_open (replayed_at, dead_letter_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- How far the reconciler has found every event of a consumer settled: the consumer's
-- events up to this id (event ids are time-ordered) are not looked at again.
CREATE TABLE IF NOT EXISTS reconcile_checkpoint (
    consumer   VARCHAR(64) NOT NULL,
    event_id   CHAR(36)    CHARACTER SET ascii NOT NULL,
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (consumer)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- The reconciler walks a consumer's events by type and id.
ALTER TABLE event_log ADD KEY event_log_by_type (event_type, event_id);

-- Dead letters are listed from dead_letter now.
ALTER TABLE event_log DROP KEY event_log_dead_lettered;
