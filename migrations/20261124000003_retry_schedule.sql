-- Scheduled delivery attempts of events to external systems.
ALTER TABLE event_log
    -- When the next attempt is due (FAILED), or until when the attempt in progress holds
    -- the event (IN_PROGRESS: a lease; expired, another instance may take it over).
    ADD COLUMN next_attempt_at DATETIME(6) NULL AFTER retry_count,
    -- Where the event was read from, for the provenance of its dead letter.
    ADD COLUMN source_partition INT NULL AFTER next_attempt_at,
    ADD COLUMN source_offset BIGINT NULL AFTER source_partition,
    -- Set while the row is DEAD_LETTER: what the admin list of dead letters walks.
    ADD COLUMN dead_lettered_at DATETIME(6) NULL AFTER source_offset,
    ADD KEY event_log_next_attempt (next_attempt_at),
    ADD KEY event_log_dead_lettered (dead_lettered_at, event_id);
