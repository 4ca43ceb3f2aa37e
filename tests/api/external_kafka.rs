//! The daemon against a separate Kafka-protocol broker process (tansu), configured only
//! through `kafka.brokers`, as it would run against a real cluster.

use std::time::Duration;

use commerce_events::config::Settings;
use commerce_events::events::EventId;
use commerce_events::events::topics;
use commerce_events::startup::PRODUCT_EVENT_GROUP;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use testkit::process::TansuBroker;

use testkit::app::TestApp;
use testkit::records::committed_offsets;
use testkit::wait::eventually;

#[actix_web::test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs the tansu broker (feature external-tools; scripts/test installs it)"
)]
async fn against_an_external_broker_the_daemon_creates_its_topics_and_runs_the_pipeline() {
    let broker = TansuBroker::start().await;
    let brokers = broker.address.clone();
    let mut app = TestApp::builder()
        .settings(|settings| {
            settings.kafka.brokers = brokers;
            // tansu 0.6 holds every JoinGroup ~3 s and, with a session timeout of 6 s (the
            // other tests' setting), expires a static member right after its SyncGroup: the
            // group rebalances every 6 s and never settles. At the daemon's default (10 s) it
            // settles at once, as it does against a Kafka cluster.
            settings.kafka.consumer.session_timeout_ms =
                Settings::default().kafka.consumer.session_timeout_ms;
        })
        .start()
        .await;
    assert_eq!(app.bootstrap_servers(), broker.address);

    let metadata_address = broker.address.clone();
    let partitions_by_topic = tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &metadata_address)
            .create()
            .unwrap();
        let metadata = client
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap();
        metadata
            .topics()
            .iter()
            .map(|topic| (topic.name().to_string(), topic.partitions().len()))
            .collect::<std::collections::BTreeMap<_, _>>()
    })
    .await
    .unwrap();
    for topic in topics::all_with_dead_letters() {
        assert_eq!(
            partitions_by_topic.get(&topic),
            Some(&3),
            "{topic}: {partitions_by_topic:?}"
        );
    }

    let (_, accepted) = app.post("/admin/probes", r#"{"note": "external"}"#).await;
    let event_id: EventId = accepted["eventId"].as_str().unwrap().parse().unwrap();
    eventually("the probe completed", Duration::from_secs(30), || async {
        app.get(&format!("/admin/events/{event_id}")).await.1["status"] == "COMPLETED"
    })
    .await;

    app.stop().await.expect("clean shutdown");
    let committed = committed_offsets(
        &broker.address,
        PRODUCT_EVENT_GROUP,
        topics::PRODUCT_EVENTS,
        3,
    )
    .await;
    assert_eq!(
        committed
            .iter()
            .map(|offset| offset.unwrap_or(0))
            .sum::<i64>(),
        1,
        "{committed:?}"
    );
}
