//! `GET /metrics` while coupons, payments and a failing webhook run through the daemon.

use std::collections::BTreeMap;
use std::time::Duration;

use awc::http::StatusCode;

use crate::exclusive;
use testkit::app::TestApp;
use testkit::receiver::{Options, Receiver, reply};
use testkit::wait::eventually;

const WAIT: Duration = Duration::from_secs(30);

/// One scrape: every sample by name and labels.
#[derive(Debug, Default)]
pub struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    text: String,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let value: f64 = value.parse().expect("a sample value");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => {
                    let labels = labels.trim_end_matches('}');
                    let parsed = labels
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair.split_once('=').expect("label=value");
                            (key.to_string(), value.trim_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), parsed)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
        Self {
            samples,
            text: text.to_string(),
        }
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(sample, have, _)| {
                sample == name
                    && labels
                        .iter()
                        .all(|(key, value)| have.get(*key).map(String::as_str) == Some(*value))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    pub fn series(&self, name: &str) -> Vec<&BTreeMap<String, String>> {
        self.samples
            .iter()
            .filter(|(sample, _, _)| sample == name)
            .map(|(_, labels, _)| labels)
            .collect()
    }

    pub fn has_type(&self, name: &str, kind: &str) -> bool {
        self.text.contains(&format!("# TYPE {name} {kind}"))
    }
}

pub async fn scrape(app: &TestApp) -> Scrape {
    let (status, text) = app.get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    Scrape::parse(&text)
}

/// A webhook receiver that refuses each webhook's first attempt with `status`, then takes
/// the next.
pub fn receiver_refusing_first_attempts(status: u16) -> Receiver {
    Receiver::start_with(Options {
        first_attempt: Some(reply(status)),
        ..Options::default()
    })
}

pub fn configure_webhooks(settings: &mut commerce_events::config::Settings, base_url: &str) {
    settings.external.base_url = base_url.to_string();
    settings.external.poll_interval_ms = 20;
    settings.external.timeout_ms = 2_000;
    settings.external.backoff.base_ms = 50;
    settings.external.backoff.max_delay_ms = 100;
    settings.external.backoff.jitter = false;
    settings.metrics.lag_interval_ms = 100;
    settings.metrics.outbox_interval_ms = 100;
}

#[actix_rt::test]
async fn metrics_move_by_exactly_the_work_done_and_lag_falls_back_to_zero() {
    let _exclusive = exclusive().await;
    let receiver = receiver_refusing_first_attempts(500);
    let address = receiver.address.clone();
    let app = TestApp::builder()
        .settings(move |settings| configure_webhooks(settings, &address))
        .start()
        .await;
    let coupon_group = app
        .settings
        .kafka
        .group_id(commerce_events::startup::COUPON_REQUEST_GROUP);
    let ranking_group = app
        .settings
        .kafka
        .group_id(commerce_events::startup::RANKING_GROUP);
    let group = [("consumergroup", coupon_group.as_str())];
    let before = scrape(&app).await;

    // Coupons: 8 users race for 5 coupons.
    let coupon = app.create_coupon(5).await;
    let mut requests = Vec::new();
    for user in 1..=8 {
        requests.push(app.issue(user, coupon).await);
    }
    for request in &requests {
        app.wait_until_notified(request).await;
    }
    // Payments: two orders paid; each sends one webhook that fails once.
    let buyer = app.create_user(1_000_000).await;
    let product = app.create_product("metered", 1_000, 100).await;
    for _ in 0..2 {
        let order = app.place_order(buyer, &[(product, 1)]).await;
        app.pay(order).await;
    }
    eventually(
        "both webhooks delivered on their second attempt",
        WAIT,
        || async {
            receiver.received_count() >= 4
                && scrape(&app).await.sum(
                    "webhook_delivered_seconds_count",
                    &[("event_type", "PaymentCompleted")],
                ) - before.sum(
                    "webhook_delivered_seconds_count",
                    &[("event_type", "PaymentCompleted")],
                ) >= 2.0
        },
    )
    .await;
    eventually("both payments ranked", WAIT, || async {
        scrape(&app)
            .await
            .sum("payment_ranking_applied_seconds_count", &[])
            - before.sum("payment_ranking_applied_seconds_count", &[])
            >= 2.0
    })
    .await;

    let after = scrape(&app).await;
    let moved =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    let processed = [
        group[0],
        ("topic", "coupon-requests"),
        ("outcome", "processed"),
    ];
    assert_eq!(moved("consumer_records_total", &processed), 8.0);
    assert_eq!(
        moved(
            "kafka_records_produced_total",
            &[("topic", "coupon-requests")]
        ),
        8.0
    );
    assert_eq!(
        moved("coupon_decisions_total", &[("result", "issued")]),
        5.0
    );
    assert_eq!(
        moved("coupon_decisions_total", &[("result", "refused")]),
        3.0
    );
    assert_eq!(moved("coupon_request_decided_seconds_count", &[]), 8.0);
    assert_eq!(moved("payment_ranking_applied_seconds_count", &[]), 2.0);
    assert_eq!(
        moved(
            "consumer_records_total",
            &[
                ("consumergroup", ranking_group.as_str()),
                ("outcome", "processed")
            ]
        ),
        2.0
    );
    let first_failed = [("attempt", "first"), ("result", "failed")];
    assert_eq!(moved("webhook_attempts_total", &first_failed), 2.0);
    assert_eq!(moved("retry_scheduled_total", &[]), 2.0);
    assert_eq!(
        moved("retry_attempts_total", &[("result", "delivered")]),
        2.0
    );
    assert_eq!(
        moved(
            "webhook_delivered_seconds_count",
            &[("event_type", "PaymentCompleted")]
        ),
        2.0
    );
    let issue_route = [
        ("route", "/coupons/issue"),
        ("method", "POST"),
        ("status", "202"),
    ];
    assert_eq!(moved("http_requests_total", &issue_route), 8.0);
    assert_eq!(
        moved("http_request_duration_seconds_count", &issue_route),
        8.0
    );
    assert_eq!(moved("dead_letters_total", &[]), 0.0);
    assert!(after.sum("consumer_batch_duration_seconds_count", &group) > 0.0);
    assert!(after.sum("db_pool_max_connections", &[("pool", "actors")]) > 0.0);
    assert_eq!(after.sum("redis_up", &[]), 1.0);
    assert!(after.sum("process_resident_memory_bytes", &[]) > 0.0);
    assert!(after.sum("process_cpu_seconds_total", &[]) > 0.0);
    for (name, kind) in [
        ("kafka_consumergroup_lag", "gauge"),
        ("kafka_consumergroup_lag_seconds", "gauge"),
        ("kafka_consumergroup_current_offset", "gauge"),
        ("kafka_topic_partition_current_offset", "gauge"),
        ("consumer_records_total", "counter"),
        ("kafka_records_produced_total", "counter"),
        ("consumer_batch_duration_seconds", "histogram"),
        ("coupon_request_decided_seconds", "histogram"),
        ("payment_ranking_applied_seconds", "histogram"),
        ("webhook_delivered_seconds", "histogram"),
        ("outbox_pending_rows", "gauge"),
        ("outbox_oldest_pending_age_seconds", "gauge"),
        ("retry_scheduled_total", "counter"),
        ("webhook_attempts_total", "counter"),
        ("http_requests_total", "counter"),
        ("http_request_duration_seconds", "histogram"),
        ("db_pool_connections", "gauge"),
        ("push_sessions_open", "gauge"),
        ("process_cpu_seconds_total", "counter"),
    ] {
        assert!(after.has_type(name, kind), "{name} is a {kind}");
    }
    // The explicit buckets.
    assert!(
        after
            .text
            .contains("coupon_request_decided_seconds_bucket{le=\"0.005\"}")
    );
    // The lag of every partition of every group, labelled as kafka_exporter labels it.
    let lag_series = after.series("kafka_consumergroup_lag");
    for partition in ["0", "1", "2"] {
        assert!(
            lag_series
                .iter()
                .any(|labels| labels.get("consumergroup") == Some(&coupon_group)
                    && labels.get("topic").map(String::as_str) == Some("coupon-requests")
                    && labels.get("partition").map(String::as_str) == Some(partition)),
            "coupon-requests partition {partition} has a lag series"
        );
    }

    // Lag rises while the issuer's group is paused and falls back to zero once resumed.
    let pause = format!("/admin/consumer-groups/{coupon_group}/pause");
    assert_eq!(app.as_admin().post(&pause, "").await.0, StatusCode::OK);
    let waiting = app.create_coupon(100).await;
    for user in 20..30 {
        app.issue(user, waiting).await;
    }
    eventually("the lag shows the 10 waiting requests", WAIT, || async {
        scrape(&app).await.sum("kafka_consumergroup_lag", &group) == 10.0
    })
    .await;
    eventually("the oldest waiting request has an age", WAIT, || async {
        scrape(&app)
            .await
            .sum("kafka_consumergroup_lag_seconds", &group)
            > 0.0
    })
    .await;
    let resume = format!("/admin/consumer-groups/{coupon_group}/resume");
    assert_eq!(app.as_admin().post(&resume, "").await.0, StatusCode::OK);
    eventually("the lag is back to zero", WAIT, || async {
        let now = scrape(&app).await;
        now.sum("kafka_consumergroup_lag", &group) == 0.0
            && now.sum("kafka_consumergroup_lag_seconds", &group) == 0.0
    })
    .await;
    let done = scrape(&app).await;
    assert_eq!(
        done.sum("consumer_records_total", &processed)
            - after.sum("consumer_records_total", &processed),
        10.0
    );
}
