//! A consumer group on its own embedded cluster and database, with scripted domain actors.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use commerce_events::actors::ArbiterPool;
use commerce_events::actors::consumer_group::{
    ConsumerGroup, ConsumerGroupSpec, ConsumerGroupState,
};
use commerce_events::actors::domain::{DomainActor, DomainActorState, ObserveDomain};
use commerce_events::config::Settings;
use commerce_events::event_log::EventLog;
use commerce_events::events::EventEnvelope;
use commerce_events::kafka::cluster::EmbeddedCluster;
use commerce_events::kafka::producer::{EventPublisher, RawRecord};
use commerce_events::kafka::topics::dead_letter_topic;
use commerce_events::stores;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::support::{ScriptedHandler, TestDatabase, committed_offsets, eventually, init_tracing};

pub const TOPIC: &str = "test-events";
pub const GROUP: &str = "test-group";
pub const PARTITIONS: i32 = 3;

/// One embedded cluster with `test-events` (3 partitions) and its dead-letter topic, and a
/// database for the event log.
pub struct Pipeline {
    pub cluster: Arc<EmbeddedCluster>,
    pub publisher: EventPublisher,
    pub event_log: EventLog,
    pub settings: Settings,
    pub arbiters: Arc<ArbiterPool>,
    _database: TestDatabase,
}

/// One member of the test group.
pub struct Member {
    pub group: Arc<ConsumerGroup>,
    pub domain: Addr<DomainActor<ScriptedHandler>>,
    pub handler: ScriptedHandler,
}

impl Pipeline {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(customize: impl FnOnce(&mut Settings)) -> Self {
        init_tracing();
        let database = TestDatabase::new();
        let mut settings = database.settings();
        customize(&mut settings);
        if let Ok(debug) = std::env::var("KAFKA_DEBUG") {
            settings.kafka.consumer.extra.insert("debug".into(), debug);
        }
        stores::create_database_if_missing(&settings.database)
            .await
            .expect("test database");
        let pool = stores::connect_mysql(&settings.database, 4)
            .await
            .expect("database pool");
        stores::migrate(&pool).await.expect("migrations");
        let cluster = EmbeddedCluster::start(1).expect("embedded cluster");
        cluster.create_topic(TOPIC, PARTITIONS).expect("topic");
        cluster
            .create_topic(&dead_letter_topic(TOPIC), PARTITIONS)
            .expect("dead-letter topic");
        let publisher =
            EventPublisher::new(cluster.bootstrap_servers(), &settings.kafka).expect("producer");
        Self {
            cluster: Arc::new(cluster),
            publisher,
            event_log: EventLog::new(pool),
            arbiters: Arc::new(ArbiterPool::new(2)),
            settings,
            _database: database,
        }
    }

    pub fn bootstrap_servers(&self) -> &str {
        self.cluster.bootstrap_servers()
    }

    /// Starts a member of `test-group` whose domain actor runs `handler`.
    pub fn join(&self, handler: ScriptedHandler) -> Member {
        let domain = DomainActor::new(handler.clone(), self.event_log.clone())
            .start_supervised(&self.arbiters.next());
        let spec = ConsumerGroupSpec::from_settings(
            &self.settings,
            self.bootstrap_servers(),
            GROUP,
            BTreeMap::from([(TOPIC.to_string(), domain.clone().recipient())]),
            self.publisher.clone(),
            self.event_log.clone(),
        );
        let group = ConsumerGroup::start(spec, self.arbiters.clone()).expect("consumer group");
        Member {
            group: Arc::new(group),
            domain,
            handler,
        }
    }

    /// Publishes `event` to one partition.
    pub async fn publish_to(&self, partition: i32, event: &EventEnvelope) {
        let value = event.encode();
        self.publish_bytes(partition, Some(event.key.as_bytes()), Some(&value))
            .await;
    }

    pub async fn publish_bytes(&self, partition: i32, key: Option<&[u8]>, value: Option<&[u8]>) {
        self.publisher
            .publish_raw(RawRecord {
                topic: TOPIC,
                partition: Some(partition),
                key,
                value,
                headers: Vec::new(),
            })
            .await
            .expect("publish to the embedded cluster");
    }

    pub async fn committed(&self) -> Vec<Option<i64>> {
        committed_offsets(self.bootstrap_servers(), GROUP, TOPIC, PARTITIONS).await
    }

    /// Waits until the group committed exactly `expected` per partition.
    pub async fn wait_for_commits(&self, expected: &[Option<i64>]) {
        eventually(
            "expected offsets committed",
            Duration::from_secs(20),
            || async { self.committed().await == expected },
        )
        .await;
    }

    /// Reads `count` records from the dead-letter topic.
    pub async fn dead_letters(&self, count: usize) -> Vec<DeadLetterRecord> {
        let bootstrap_servers = self.bootstrap_servers().to_string();
        tokio::task::spawn_blocking(move || read_dead_letters(&bootstrap_servers, count))
            .await
            .expect("dead-letter reader")
    }
}

impl Member {
    pub async fn observe(&self) -> (ConsumerGroupState, DomainActorState) {
        let domain = self
            .domain
            .send(ObserveDomain)
            .await
            .expect("domain actor answers");
        (self.group.observe().await, domain)
    }

    pub async fn wait_until_assigned(&self) {
        eventually("partitions assigned", Duration::from_secs(30), || async {
            self.group.health().joined() && !self.group.observe().await.partitions.is_empty()
        })
        .await;
    }

    pub async fn assigned_partitions(&self) -> Vec<i32> {
        self.group
            .observe()
            .await
            .partitions
            .iter()
            .map(|partition| partition.partition)
            .collect()
    }
}

/// A record read back from `test-events.DLT`.
#[derive(Debug)]
pub struct DeadLetterRecord {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

fn read_dead_letters(bootstrap_servers: &str, count: usize) -> Vec<DeadLetterRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", "dead-letter-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("dead-letter reader");
    let topic = dead_letter_topic(TOPIC);
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment
            .add_partition_offset(&topic, partition, Offset::Beginning)
            .expect("valid partition");
    }
    consumer
        .assign(&assignment)
        .expect("assign dead-letter partitions");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut records = Vec::new();
    while records.len() < count && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|header| {
                            let value = header
                                .value
                                .map(|value| String::from_utf8_lossy(value).into_owned());
                            (header.key.to_string(), value.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(DeadLetterRecord {
                partition: message.partition(),
                key: message.key().map(<[u8]>::to_vec),
                value: message.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    assert_eq!(
        records.len(),
        count,
        "dead letters read before the deadline"
    );
    records
}
