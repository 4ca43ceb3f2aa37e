//! A consumer group on its own embedded cluster and database, with scripted domain actors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use commerce_events::actors::ArbiterPool;
use commerce_events::actors::consumer_group::{
    ConsumerGroup, ConsumerGroupSpec, ConsumerGroupState,
};
use commerce_events::actors::domain::{
    DomainActor, DomainActorState, DomainHandler, ObserveDomain, PipelineProbes,
};
use commerce_events::common::connections;
use commerce_events::config::Settings;
use commerce_events::event_log::{EventLog, OutboxEvent};
use commerce_events::events::EventEnvelope;
use commerce_events::events::topics::dead_letter_topic;
use commerce_events::kafka::cluster::EmbeddedCluster;
use commerce_events::kafka::producer::{EventPublisher, RawRecord};
use commerce_events::outbox::Outbox;

use crate::database::{TestDatabase, init_tracing};
use crate::handler::ScriptedHandler;
use crate::records::{ReadRecord, committed_offsets, read_records};
use crate::wait::eventually;

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
        connections::create_database_if_missing(&settings.database)
            .await
            .expect("test database");
        let pool = connections::connect_mysql(&settings.database, 4)
            .await
            .expect("database pool");
        connections::migrate(&pool).await.expect("migrations");
        let cluster = EmbeddedCluster::start(1).expect("embedded cluster");
        cluster.create_topic(TOPIC, PARTITIONS).expect("topic");
        cluster
            .create_topic(&dead_letter_topic(TOPIC), PARTITIONS)
            .expect("dead-letter topic");
        let publisher = EventPublisher::new(
            cluster.bootstrap_servers(),
            &settings.kafka,
            &settings.instance.id,
        )
        .expect("producer");
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
        let factory_handler = handler.clone();
        let (group, domain) = self.join_with(move || factory_handler.clone());
        Member {
            group,
            domain,
            handler,
        }
    }

    /// Starts a member of `test-group` whose domain actor runs the handlers `factory` makes
    /// (a real one, for example).
    pub fn join_with<H: DomainHandler>(
        &self,
        factory: impl Fn() -> H + Send + 'static,
    ) -> (Arc<ConsumerGroup>, Addr<DomainActor<H>>) {
        self.join_customized(factory, |_| {})
    }

    /// As [`Pipeline::join_with`], the group's spec changed by `customize` first.
    pub fn join_customized<H: DomainHandler>(
        &self,
        factory: impl Fn() -> H + Send + 'static,
        customize: impl FnOnce(&mut ConsumerGroupSpec),
    ) -> (Arc<ConsumerGroup>, Addr<DomainActor<H>>) {
        let domain = DomainActor::start(
            &self.arbiters.next(),
            PipelineProbes::new(self.event_log.clone()),
            factory,
        );
        let mut spec = ConsumerGroupSpec::from_settings(
            &self.settings,
            self.bootstrap_servers(),
            GROUP,
            BTreeMap::from([(TOPIC.to_string(), domain.clone().recipient())]),
            self.publisher.clone(),
            self.event_log.clone(),
            Default::default(),
        );
        customize(&mut spec);
        let group = ConsumerGroup::start(spec, self.arbiters.clone()).expect("consumer group");
        (Arc::new(group), domain)
    }

    /// Commits `event` PENDING in the event log, as the outbox leaves it before publishing.
    pub async fn record_pending(&self, event: OutboxEvent) {
        let outbox = Outbox::new(self.event_log.clone(), self.publisher.clone());
        let mut transaction = outbox.begin().await.unwrap();
        transaction.record(vec![event]).await.unwrap();
        let _unpublished = transaction.commit().await.unwrap();
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
        let group = self.settings.kafka.group_id(GROUP);
        committed_offsets(self.bootstrap_servers(), &group, TOPIC, PARTITIONS).await
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
    pub async fn dead_letters(&self, count: usize) -> Vec<ReadRecord> {
        let bootstrap_servers = self.bootstrap_servers().to_string();
        tokio::task::spawn_blocking(move || {
            read_records(
                &bootstrap_servers,
                &dead_letter_topic(TOPIC),
                PARTITIONS,
                count,
            )
        })
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
