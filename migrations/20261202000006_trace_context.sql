-- The W3C trace context an event was produced in (`traceparent`), so the relay and the
-- retry scheduler carry it on as the Kafka header and the webhook header.
ALTER TABLE event_log ADD COLUMN traceparent VARCHAR(55) NULL;
