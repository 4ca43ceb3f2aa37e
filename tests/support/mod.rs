//! Shared by the test binaries: per-test databases, polling with a deadline, a scripted
//! domain handler, and reading committed offsets.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use commerce_events::actors::domain::{Batch, DomainHandler, EventOutcome, HandlerError, Stats};
use commerce_events::common::ids::{CouponId, UserId};
use commerce_events::config::{LogFormat, LogSettings, Settings};
use commerce_events::events::{
    CouponRequested, EventEnvelope, EventId, EventPayload, PipelineProbe,
};

use commerce_events::observability::logging;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use secrecy::SecretString;
use sqlx::Connection;
use tokio::sync::Semaphore;
use uuid::Uuid;

pub const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";

/// The HS256 secret of the tests' daemons.
pub const TEST_JWT_SECRET: &str = "test-secret-of-the-commerce-events-suite";

/// Logs go to the test output when `TEST_LOG` is set (`TEST_LOG=debug cargo test`).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            logging::init(&LogSettings {
                filter,
                format: LogFormat::Pretty,
            });
        }
    });
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub fn new() -> Self {
        Self {
            name: format!("test_{}", Uuid::new_v4().simple()),
        }
    }

    pub fn url(&self) -> String {
        format!("{MYSQL_SERVER}/{}", self.name)
    }

    /// Settings for a test: its own database and Redis key prefix, an embedded cluster of
    /// one broker, an ephemeral HTTP port and short delays.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::default();
        settings.http.port = 0;
        settings.http.workers = 1;
        settings.http.shutdown_timeout_secs = 2;
        settings.database.url = SecretString::from(self.url());
        settings.database.max_connections = 4;
        settings.database.http_max_connections = 4;
        settings.redis.key_prefix = format!("{}:", self.name);
        settings.kafka.embedded_brokers = 1;
        settings.kafka.consumer.fetch_wait_max_ms = 50;
        settings.kafka.consumer.fetch_min_bytes = 1;
        settings.kafka.consumer.drain_timeout_ms = 3_000;
        settings.kafka.consumer.session_timeout_ms = 6_000;
        settings.kafka.consumer.heartbeat_interval_ms = 1_000;
        settings.kafka.consumer.partition_threads = 2;
        settings.retry.delay_ms = 50;
        settings.outbox.poll_interval_ms = 100;
        settings.outbox.republish_after_ms = 2_000;
        settings.instance.id = "test".into();
        settings.auth.jwt_secret = SecretString::from(TEST_JWT_SECRET);
        // Limits a test's bursts never meet; the rate-limit tests set their own.
        let generous = commerce_events::config::RateLimit {
            per_second: 100_000.0,
            burst: 100_000,
        };
        settings.limits.coupon_issue = generous;
        settings.limits.order_create = generous;
        settings.limits.payment = generous;
        settings.limits.charge = generous;
        settings.limits.anonymous = generous;
        settings.analytics.file = std::env::temp_dir()
            .join(format!("{}-analytics.jsonl", self.name))
            .to_string_lossy()
            .into_owned();
        settings
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropping happens outside any runtime the test may still be driving.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async move {
                    if let Ok(mut connection) = sqlx::MySqlConnection::connect(MYSQL_SERVER).await {
                        drop_database(&mut connection, &name).await;
                    }
                });
            }
        })
        .join();
    }
}

/// Drops the database of a test whose daemon may still run. The daemon's connections are
/// killed first: the test's thread, now blocked here, may drive one of them in the middle of
/// a transaction, whose metadata lock would hold `DROP DATABASE` forever.
async fn drop_database(connection: &mut sqlx::MySqlConnection, name: &str) {
    let _ = sqlx::query("SET SESSION lock_wait_timeout = 5")
        .execute(&mut *connection)
        .await;
    for _ in 0..5 {
        let sessions: Vec<u64> =
            sqlx::query_scalar("SELECT id FROM information_schema.processlist WHERE db = ?")
                .bind(name)
                .fetch_all(&mut *connection)
                .await
                .unwrap_or_default();
        for session in sessions {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL CONNECTION {session}")))
                .execute(&mut *connection)
                .await;
        }
        let statement = format!("DROP DATABASE IF EXISTS `{name}`");
        if sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut *connection)
            .await
            .is_ok()
        {
            return;
        }
    }
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_found(what, timeout, || {
        let holds = condition();
        async move { if holds.await { Ok(()) } else { Err(None) } }
    })
    .await
}

/// Polls `probe` every 20 ms until it finds what it looks for (`Ok`) and returns that;
/// after `timeout` panics naming `what` and, when the probe described it (`Err(Some(..))`),
/// what it saw last.
pub async fn eventually_found<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Option<String>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = match probe().await {
            Ok(found) => return found,
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            match seen {
                Some(seen) => {
                    panic!("timed out after {timeout:?} waiting for: {what}; last seen: {seen}")
                }
                None => panic!("timed out after {timeout:?} waiting for: {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pipeline probe (completed by the domain actor wrapper itself).
pub fn probe_event(note: &str) -> EventEnvelope {
    let mut envelope = EventEnvelope::new(
        "",
        EventPayload::PipelineProbe(PipelineProbe {
            note: Some(note.to_string()),
        }),
    );
    envelope.key = format!("probe:{}", envelope.event_id);
    envelope
}

/// A domain event that reaches the domain handler.
pub fn coupon_request(user_id: u64) -> EventEnvelope {
    EventEnvelope::new(
        format!("user:{user_id}"),
        EventPayload::CouponRequested(CouponRequested {
            user_id: UserId::from_u64(user_id).expect("a positive user id"),
            coupon_id: CouponId::from_u64(1).expect("a positive coupon id"),
        }),
    )
}

/// Offsets the group committed for `topic`'s partitions (`None`: nothing committed).
pub async fn committed_offsets(
    bootstrap_servers: &str,
    group_id: &str,
    topic: &str,
    partitions: i32,
) -> Vec<Option<i64>> {
    let bootstrap_servers = bootstrap_servers.to_string();
    let group_id = group_id.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap_servers)
            .set("group.id", &group_id)
            .set("enable.auto.commit", "false")
            .create()
            .expect("a reader of committed offsets can be created");
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(&topic, partition);
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(5))
            .expect("committed offsets can be read");
        (0..partitions)
            .map(|partition| {
                match committed
                    .find_partition(&topic, partition)
                    .map(|element| element.offset())
                {
                    Some(Offset::Offset(offset)) => Some(offset),
                    _ => None,
                }
            })
            .collect()
    })
    .await
    .expect("the offsets reader does not panic")
}

/// What a scripted handler does with one event.
#[derive(Clone, Debug)]
pub enum Step {
    Fail(HandlerError),
    Panic,
}

/// What the scripted handler saw, shared with the test.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderState>>,
}

#[derive(Default)]
struct RecorderState {
    /// Events in the order they were handled successfully, with their partition.
    done: Vec<(i32, EventId)>,
    /// Every delivery attempt, successful or not.
    attempts: Vec<EventId>,
}

impl Recorder {
    pub fn done(&self) -> Vec<(i32, EventId)> {
        self.inner.lock().unwrap().done.clone()
    }

    pub fn done_ids(&self) -> Vec<EventId> {
        self.done().into_iter().map(|(_, id)| id).collect()
    }

    pub fn done_count(&self) -> usize {
        self.inner.lock().unwrap().done.len()
    }

    pub fn attempts_of(&self, id: EventId) -> usize {
        self.inner
            .lock()
            .unwrap()
            .attempts
            .iter()
            .filter(|seen| **seen == id)
            .count()
    }

    /// Events per partition, in handling order.
    pub fn done_by_partition(&self) -> BTreeMap<i32, Vec<EventId>> {
        let mut by_partition: BTreeMap<i32, Vec<EventId>> = BTreeMap::new();
        for (partition, id) in self.done() {
            by_partition.entry(partition).or_default().push(id);
        }
        by_partition
    }
}

/// A domain handler driven by a script: per event id, a queue of steps for its first
/// deliveries (then success); optionally held at a gate per partition.
#[derive(Clone, Default)]
pub struct ScriptedHandler {
    pub recorder: Recorder,
    script: Arc<Mutex<BTreeMap<EventId, VecDeque<Step>>>>,
    gates: Arc<Mutex<BTreeMap<i32, Arc<Semaphore>>>>,
}

impl ScriptedHandler {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next deliveries of `id` go through `steps` first.
    pub fn script(&self, id: EventId, steps: impl IntoIterator<Item = Step>) {
        self.script
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .extend(steps);
    }

    /// Batches of `partition` wait until the returned gate gets permits (one per batch).
    pub fn gate(&self, partition: i32) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        self.gates.lock().unwrap().insert(partition, gate.clone());
        gate
    }
}

impl DomainHandler for ScriptedHandler {
    type Stats = ();

    fn name(&self) -> &'static str {
        "ScriptedHandler"
    }

    async fn handle(&self, batch: &Batch, _stats: &Stats<()>) -> Vec<EventOutcome> {
        let partition = batch.origin.source.partition;
        let gate = self.gates.lock().unwrap().get(&partition).cloned();
        if let Some(gate) = gate {
            gate.acquire()
                .await
                .expect("gates are never closed")
                .forget();
        }
        let mut outcomes = Vec::with_capacity(batch.events.len());
        for event in batch.events.iter() {
            let step = self
                .script
                .lock()
                .unwrap()
                .get_mut(&event.event_id)
                .and_then(VecDeque::pop_front);
            self.recorder
                .inner
                .lock()
                .unwrap()
                .attempts
                .push(event.event_id);
            match step {
                None => {
                    let mut recorded = self.recorder.inner.lock().unwrap();
                    recorded.done.push((partition, event.event_id));
                    outcomes.push(EventOutcome::Done);
                }
                Some(Step::Fail(error)) => outcomes.push(EventOutcome::Failed(error)),
                Some(Step::Panic) => panic!("scripted panic for {}", event.event_id),
            }
        }
        outcomes
    }
}

/// A record read back from a topic.
#[derive(Debug)]
pub struct ReadRecord {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Reads `count` records of `topic` from the beginning (blocking; call from a blocking
/// thread). Panics when fewer arrive within 20 s.
pub fn read_records(
    bootstrap_servers: &str,
    topic: &str,
    partitions: i32,
    count: usize,
) -> Vec<ReadRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", "test-record-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("dead-letter reader");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("valid partition");
    }
    consumer
        .assign(&assignment)
        .expect("assign the topic's partitions");
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
            records.push(ReadRecord {
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
        "records of {topic} read before the deadline"
    );
    records
}
