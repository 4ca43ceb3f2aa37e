//! Prometheus metrics: the process-wide recorder, every metric's name in one place, and what
//! is read only when `/metrics` is scraped (pools, sessions, the process).
//!
//! Metrics go through the `metrics` facade; [`install`] sets the Prometheus recorder once
//! per process (a test process running several daemons shares it) and `GET /metrics`
//! renders it. Histograms use explicit buckets ([`LATENCY_BUCKETS`]). Gauges that nobody
//! sets for [`GAUGE_IDLE_TIMEOUT`] (a partition this instance no longer owns) disappear.
//!
//! | metric                                                      | kind      | labels                               |
//! |-------------------------------------------------------------|-----------|--------------------------------------|
//! | `kafka_consumergroup_lag`                                   | gauge     | consumergroup, topic, partition      |
//! | `kafka_consumergroup_lag_seconds`                           | gauge     | consumergroup, topic, partition      |
//! | `kafka_consumergroup_current_offset` (committed)            | gauge     | consumergroup, topic, partition      |
//! | `kafka_topic_partition_current_offset` (high watermark)     | gauge     | topic, partition                     |
//! | `consumer_records_total`                                    | counter   | consumergroup, topic, outcome        |
//! | `consumer_batch_duration_seconds`                           | histogram | consumergroup, topic                 |
//! | `coupon_request_decided_seconds` (accepted → decided)       | histogram |                                      |
//! | `coupon_request_pushed_seconds` (accepted → pushed)         | histogram |                                      |
//! | `coupon_decisions_total`                                    | counter   | result (issued, refused)             |
//! | `payment_ranking_applied_seconds` (committed → applied)     | histogram |                                      |
//! | `webhook_delivered_seconds` (event → delivered)             | histogram | event_type                           |
//! | `outbox_pending_rows`, `outbox_oldest_pending_age_seconds`  | gauge     |                                      |
//! | `outbox_republished_total`                                  | counter   |                                      |
//! | `retry_scheduled_total`                                     | counter   |                                      |
//! | `retry_due`                                                 | gauge     |                                      |
//! | `retry_attempts_total`                                      | counter   | result                               |
//! | `dead_letters_total`                                        | counter   | topic                                |
//! | `alerts_raised_total`                                       | counter   | kind                                 |
//! | `webhook_attempts_total`                                    | counter   | attempt (first, later), result       |
//! | `actor_restarts_total`                                      | counter   | actor                                |
//! | `push_sessions_open`                                        | gauge     |                                      |
//! | `pushes_sent_total`, `pushes_dropped_total`                 | counter   |                                      |
//! | `http_requests_total`                                       | counter   | route, method, status                |
//! | `http_request_duration_seconds`                             | histogram | route, method, status                |
//! | `db_pool_connections`                                       | gauge     | pool (actors, http), state           |
//! | `db_pool_max_connections`                                   | gauge     | pool                                 |
//! | `redis_up`, `redis_ping_seconds` (read at each scrape)      | gauge     |                                      |
//! | `process_resident_memory_bytes`, `process_cpu_seconds_total`, `process_threads` | | |

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Bucket bounds, in seconds, of every latency histogram: 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// How long a gauge nobody sets any more is still rendered.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The process's recorder, installed on first use.
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("bucket bounds are not empty")
            .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT))
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder was installed first; /metrics stays empty");
        }
        describe();
        handle
    })
}

/// The text of `GET /metrics`.
pub fn render() -> String {
    let handle = install();
    handle.run_upkeep();
    let mut text = handle.render();
    text.push_str(&process());
    text
}

/// What a metric is, for its `# TYPE` line.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric's `# HELP` line, by area.
const DESCRIPTIONS: &[(Kind, &str, &str)] = {
    use Kind::*;
    &[
        // Kafka: each partition's lag and offsets, records produced, and what consumers settle.
        (
            Gauge,
            "kafka_consumergroup_lag",
            "Records not yet processed: the partition's high watermark minus the next offset to process",
        ),
        (
            Gauge,
            "kafka_consumergroup_lag_seconds",
            "Age of the oldest record of the partition not yet processed",
        ),
        (
            Gauge,
            "kafka_consumergroup_current_offset",
            "The group's committed offset",
        ),
        (
            Gauge,
            "kafka_topic_partition_current_offset",
            "The partition's high watermark",
        ),
        (
            Counter,
            "kafka_records_produced_total",
            "Records the broker acknowledged, by topic",
        ),
        (
            Counter,
            "kafka_produce_failures_total",
            "Records whose delivery failed after the client's retries, by topic",
        ),
        (
            Counter,
            "consumer_records_total",
            "Records settled, by outcome",
        ),
        (
            Histogram,
            "consumer_batch_duration_seconds",
            "Time to settle one batch of a partition",
        ),
        // How long events take to take effect, end to end, and the coupon decisions.
        (
            Histogram,
            "coupon_request_decided_seconds",
            "From a coupon request accepted to its decision",
        ),
        (
            Histogram,
            "coupon_request_pushed_seconds",
            "From a coupon request accepted to its result pushed to a session",
        ),
        (Counter, "coupon_decisions_total", "Coupon requests decided"),
        (
            Histogram,
            "payment_ranking_applied_seconds",
            "From a payment committed to the ranking counting it",
        ),
        (
            Histogram,
            "webhook_delivered_seconds",
            "From the event to its webhook delivered (the first attempt follows the event within the consumer lag)",
        ),
        // The outbox, retries, dead letters, outage alerts and actor restarts.
        (
            Gauge,
            "outbox_pending_rows",
            "Event rows written but not yet published",
        ),
        (
            Gauge,
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished event row",
        ),
        (
            Counter,
            "outbox_republished_total",
            "Events the outbox relay published",
        ),
        (
            Counter,
            "retry_scheduled_total",
            "Deliveries scheduled for a later attempt",
        ),
        (
            Gauge,
            "retry_due",
            "Scheduled deliveries whose time has come",
        ),
        (
            Counter,
            "retry_attempts_total",
            "Scheduled attempts, by result",
        ),
        (
            Counter,
            "webhook_attempts_total",
            "Webhook attempts, by attempt and result",
        ),
        (
            Counter,
            "dead_letters_total",
            "Records sent to a dead-letter topic, by source topic",
        ),
        (Counter, "alerts_raised_total", "Outage alerts raised"),
        (
            Counter,
            "actor_restarts_total",
            "Supervised actors restarted",
        ),
        // Push sessions and HTTP requests.
        (
            Gauge,
            "push_sessions_open",
            "Open push sessions (WebSocket and SSE)",
        ),
        (
            Counter,
            "pushes_sent_total",
            "Results queued to a push session",
        ),
        (
            Counter,
            "pushes_dropped_total",
            "Results dropped for a session that was too slow",
        ),
        (Counter, "http_requests_total", "HTTP requests answered"),
        (
            Histogram,
            "http_request_duration_seconds",
            "HTTP request handling time",
        ),
        // MySQL pools, Redis, and the trace exporter.
        (
            Gauge,
            "db_pool_connections",
            "MySQL pool connections, by state",
        ),
        (Gauge, "db_pool_max_connections", "MySQL pool size limit"),
        (
            Gauge,
            "redis_up",
            "Whether Redis answered the scrape's ping (its multiplexed connection is up)",
        ),
        (
            Gauge,
            "redis_ping_seconds",
            "How long the scrape's Redis ping took",
        ),
        (
            Counter,
            "otlp_spans_exported_total",
            "Spans a trace collector took",
        ),
        (
            Counter,
            "otlp_spans_dropped_total",
            "Spans not exported, by reason (queue_full, export_failed)",
        ),
    ]
};

/// Describes every metric (the `# HELP` lines).
fn describe() {
    for &(kind, name, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// What a partition actor settled in one batch.
pub struct BatchOutcomes {
    pub processed: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub retries: u64,
}

pub fn batch_settled(group: &str, topic: &str, outcomes: &BatchOutcomes, took: Duration) {
    for (outcome, count) in [
        ("processed", outcomes.processed),
        ("duplicate", outcomes.duplicates),
        ("dead_lettered", outcomes.dead_lettered),
        ("retried", outcomes.retries),
    ] {
        if count > 0 {
            counter!(
                "consumer_records_total",
                "consumergroup" => group.to_string(),
                "topic" => topic.to_string(),
                "outcome" => outcome,
            )
            .increment(count);
        }
    }
    histogram!(
        "consumer_batch_duration_seconds",
        "consumergroup" => group.to_string(),
        "topic" => topic.to_string(),
    )
    .record(took.as_secs_f64());
}

/// One partition's position, as the lag monitor computed it.
pub fn partition_lag(
    group: &str,
    topic: &str,
    partition: i32,
    lag: i64,
    lag_seconds: f64,
    committed: Option<i64>,
    high_watermark: i64,
) {
    let labels = [
        ("consumergroup", group.to_string()),
        ("topic", topic.to_string()),
        ("partition", partition.to_string()),
    ];
    gauge!("kafka_consumergroup_lag", &labels).set(lag as f64);
    gauge!("kafka_consumergroup_lag_seconds", &labels).set(lag_seconds);
    if let Some(committed) = committed {
        gauge!("kafka_consumergroup_current_offset", &labels).set(committed as f64);
    }
    gauge!(
        "kafka_topic_partition_current_offset",
        "topic" => topic.to_string(),
        "partition" => partition.to_string(),
    )
    .set(high_watermark as f64);
}

/// Seconds from `since` to now, never negative (clocks of two instances may differ).
fn seconds_since(since: chrono::DateTime<chrono::Utc>) -> f64 {
    let elapsed = chrono::Utc::now() - since;
    (elapsed.num_microseconds().unwrap_or(0).max(0) as f64) / 1e6
}

pub fn coupon_decided(accepted_at: chrono::DateTime<chrono::Utc>, issued: bool) {
    histogram!("coupon_request_decided_seconds").record(seconds_since(accepted_at));
    counter!("coupon_decisions_total", "result" => if issued { "issued" } else { "refused" })
        .increment(1);
}

pub fn coupon_pushed(accepted_at: chrono::DateTime<chrono::Utc>) {
    histogram!("coupon_request_pushed_seconds").record(seconds_since(accepted_at));
}

pub fn payment_ranked(committed_at: chrono::DateTime<chrono::Utc>) {
    histogram!("payment_ranking_applied_seconds").record(seconds_since(committed_at));
}

pub fn webhook_delivered(event_type: &'static str, occurred_at: chrono::DateTime<chrono::Utc>) {
    histogram!("webhook_delivered_seconds", "event_type" => event_type)
        .record(seconds_since(occurred_at));
}

pub fn outbox_backlog(pending: u64, oldest_age: Option<Duration>) {
    gauge!("outbox_pending_rows").set(pending as f64);
    gauge!("outbox_oldest_pending_age_seconds")
        .set(oldest_age.map_or(0.0, |age| age.as_secs_f64()));
}

/// A record the broker acknowledged.
pub fn record_produced(topic: &str) {
    counter!("kafka_records_produced_total", "topic" => topic.to_string()).increment(1);
}

pub fn record_produce_failed(topic: &str) {
    counter!("kafka_produce_failures_total", "topic" => topic.to_string()).increment(1);
}

pub fn outbox_republished(count: u64) {
    counter!("outbox_republished_total").increment(count);
}

pub fn retry_scheduled() {
    counter!("retry_scheduled_total").increment(1);
}

pub fn retry_due(due: u64) {
    gauge!("retry_due").set(due as f64);
}

/// A webhook attempt: a first one (the forwarder's) or a later one (the retry
/// scheduler's, counted in `retry_attempts_total`).
pub fn delivery_attempt(later: bool, result: &'static str) {
    let attempt = if later { "later" } else { "first" };
    counter!("webhook_attempts_total", "attempt" => attempt, "result" => result).increment(1);
    if later {
        counter!("retry_attempts_total", "result" => result).increment(1);
    }
}

pub fn dead_lettered(source_topic: &str) {
    counter!("dead_letters_total", "topic" => source_topic.to_string()).increment(1);
}

pub fn alert_raised(kind: &'static str) {
    counter!("alerts_raised_total", "kind" => kind).increment(1);
}

pub fn actor_restarted(actor: &'static str) {
    counter!("actor_restarts_total", "actor" => actor).increment(1);
}

pub fn push_sent(sessions: usize) {
    counter!("pushes_sent_total").increment(sessions as u64);
}

pub fn push_dropped() {
    counter!("pushes_dropped_total").increment(1);
}

pub fn push_sessions_open(open: usize) {
    gauge!("push_sessions_open").set(open as f64);
}

pub fn otlp_spans_exported(spans: u64) {
    counter!("otlp_spans_exported_total").increment(spans);
}

pub fn otlp_spans_dropped(reason: &'static str, spans: u64) {
    counter!("otlp_spans_dropped_total", "reason" => reason).increment(spans);
}

pub fn http_request(route: &str, method: &str, status: u16, took: Duration) {
    let labels = [
        ("route", route.to_string()),
        ("method", method.to_string()),
        ("status", status.to_string()),
    ];
    counter!("http_requests_total", &labels).increment(1);
    histogram!("http_request_duration_seconds", &labels).record(took.as_secs_f64());
}

pub fn db_pool(name: &'static str, pool: &sqlx::MySqlPool) {
    let size = pool.size();
    let idle = pool.num_idle() as u32;
    gauge!("db_pool_connections", "pool" => name, "state" => "idle").set(f64::from(idle));
    gauge!("db_pool_connections", "pool" => name, "state" => "in_use")
        .set(f64::from(size.saturating_sub(idle)));
    gauge!("db_pool_max_connections", "pool" => name)
        .set(f64::from(pool.options().get_max_connections()));
}

/// Redis answered a scrape's ping (`up`), and how fast.
pub fn redis_ping(up: bool, took: Duration) {
    gauge!("redis_up").set(if up { 1.0 } else { 0.0 });
    gauge!("redis_ping_seconds").set(took.as_secs_f64());
}

/// The process's RSS, CPU time and threads from `/proc/self`, in the Prometheus text format
/// (Linux; empty elsewhere). Rendered by hand: the facade's counters are integers, CPU
/// seconds are not.
fn process() -> String {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return String::new();
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some((_, after_name)) = stat.rsplit_once(')') else {
        return String::new();
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is field 3 (state): utime is field 14, stime 15, num_threads 20, rss 24.
    let field = |number: usize| -> Option<u64> { fields.get(number - 3)?.parse().ok() };
    const TICKS_PER_SECOND: f64 = 100.0; // USER_HZ on Linux
    const PAGE_BYTES: u64 = 4096;
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    if let (Some(user), Some(system)) = (field(14), field(15)) {
        let seconds = (user + system) as f64 / TICKS_PER_SECOND;
        metric(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time",
            seconds,
        );
    }
    if let Some(threads) = field(20) {
        metric(
            "process_threads",
            "gauge",
            "Threads of the process",
            threads as f64,
        );
    }
    if let Some(pages) = field(24) {
        let bytes = (pages * PAGE_BYTES) as f64;
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident set size",
            bytes,
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_described_once() {
        let mut names: Vec<&str> = DESCRIPTIONS.iter().map(|(_, name, _)| *name).collect();
        let described = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), described, "a metric described twice");
    }
}
