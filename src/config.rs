//! The typed settings tree.
//!
//! Layers, later ones winning: the defaults written here → an optional TOML file
//! (`APP_CONFIG_FILE`, default `commerce-events.toml` in the working directory, skipped when
//! absent) → environment variables `APP_<SECTION>__<KEY>` (for example `APP_HTTP__PORT=9090`,
//! `APP_KAFKA__BROKERS=host1:9092,host2:9092`). Every struct carries `#[serde(default)]`, so
//! a file or the environment only has to name what it changes.

mod paths;
mod unknown;

pub use unknown::{IGNORE_VARIABLE, UnknownSetting};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Name of the environment variable that points at the optional settings file.
pub const CONFIG_FILE_VARIABLE: &str = "APP_CONFIG_FILE";
const DEFAULT_CONFIG_FILE: &str = "commerce-events.toml";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error(transparent)]
    Unknown(#[from] UnknownSetting),
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub kafka: KafkaSettings,
    pub retry: RetrySettings,
    pub outbox: OutboxSettings,
    pub reconcile: ReconcileSettings,
    pub coupons: CouponSettings,
    pub shop: ShopSettings,
    pub ranking: RankingSettings,
    pub analytics: AnalyticsSettings,
    pub external: ExternalSettings,
    pub instance: InstanceSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub push: PushSettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    pub otlp: OtlpSettings,
}

impl Settings {
    /// The dotted path of every setting (`kafka.producer.linger_ms`), in declaration order;
    /// a map or a list is one setting.
    pub fn paths() -> Vec<String> {
        paths::setting_paths::<Settings>()
            .into_iter()
            .map(|setting| setting.path)
            .collect()
    }

    /// Loads defaults, then the optional file, then `APP_` environment variables.
    pub fn load() -> Result<Self, SettingsError> {
        let file = std::env::var_os(CONFIG_FILE_VARIABLE)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
        Self::load_from(&file, None)
    }

    /// [`Settings::load`] with an explicit file and, when given, these variables instead of
    /// the process environment.
    pub fn load_from(
        file: &Path,
        environment: Option<HashMap<String, String>>,
    ) -> Result<Self, SettingsError> {
        Self::refuse_unknown(file, environment.as_ref())?;
        let layered = config::Config::builder()
            .add_source(config::File::from(file).required(false))
            .add_source(
                config::Environment::with_prefix("APP")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(environment),
            )
            .build()?;
        let settings: Settings = layered.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Refuses a key of `file` or an `APP_…` variable (of `environment`, else the process's)
    /// that names no setting (see `config/unknown.rs`).
    fn refuse_unknown(
        file: &Path,
        environment: Option<&HashMap<String, String>>,
    ) -> Result<(), SettingsError> {
        let known = unknown::KnownSettings::new(paths::setting_paths::<Settings>());
        match environment {
            Some(environment) => known.check_environment(environment)?,
            None => known.check_environment(&std::env::vars().collect())?,
        }
        let written = config::Source::collect(
            &config::Config::builder()
                .add_source(config::File::from(file).required(false))
                .build()?,
        )?;
        known.check_file(&file.display().to_string(), &written)?;
        Ok(())
    }

    /// Checks relations between settings that serde cannot express.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let consumer = &self.kafka.consumer;
        if consumer.drain_timeout_ms >= consumer.session_timeout_ms {
            return Err(SettingsError::Invalid {
                key: "kafka.consumer.drain_timeout_ms",
                reason: format!(
                    "must be shorter than kafka.consumer.session_timeout_ms ({} ms)",
                    consumer.session_timeout_ms
                ),
            });
        }
        if consumer.max_batch_records == 0 {
            return Err(SettingsError::Invalid {
                key: "kafka.consumer.max_batch_records",
                reason: "must be at least 1".into(),
            });
        }
        for (key, max_in_flight) in [
            ("external.max_in_flight", self.external.max_in_flight),
            ("analytics.max_in_flight", self.analytics.max_in_flight),
        ] {
            if max_in_flight == 0 {
                return Err(SettingsError::Invalid {
                    key,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if self.coupons.stock_shards == 0 {
            return Err(SettingsError::Invalid {
                key: "coupons.stock_shards",
                reason: "must be at least 1".into(),
            });
        }
        if self.kafka.partitions < 1 {
            return Err(SettingsError::Invalid {
                key: "kafka.partitions",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// The HTTP and WebSocket listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    pub host: String,
    /// `0` binds an ephemeral port (tests).
    pub port: u16,
    /// actix-web worker threads.
    pub workers: usize,
    /// How long in-flight requests may take to finish on shutdown.
    pub shutdown_timeout_secs: u64,
    /// The largest request body accepted (413 beyond).
    pub body_limit_bytes: usize,
    /// How long a request's headers may take to arrive (408 beyond).
    pub header_timeout_ms: u64,
    /// How long a request's body may take to arrive once its headers did (408 beyond).
    pub body_timeout_ms: u64,
    /// Origins (`scheme://host[:port]`) whose pages may open push channels; a browser's
    /// WebSocket from any other origin is refused (403). Requests without an `Origin`
    /// header (non-browser clients) are not concerned.
    pub allowed_origins: Vec<String>,
    /// When the daemon runs behind a gateway: the header carrying the client's address
    /// (for example `x-forwarded-for`, whose first entry is taken). Empty: the peer address.
    pub trusted_proxy_header: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            workers: 2,
            shutdown_timeout_secs: 5,
            body_limit_bytes: 64 * 1024,
            header_timeout_ms: 6_000,
            body_timeout_ms: 10_000,
            allowed_origins: vec![
                "http://localhost:8080".into(),
                "http://127.0.0.1:8080".into(),
            ],
            trusted_proxy_header: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// `mysql://user:password@host:port/database`; the database is created when missing.
    pub url: SecretString,
    /// Connections of the actors' pool.
    pub max_connections: u32,
    /// Connections of the HTTP workers' pool.
    pub http_max_connections: u32,
    /// How long an actor waits for a connection of its pool.
    pub acquire_timeout_ms: u64,
    /// How long a request waits for a connection: past it, the answer is 503 with
    /// `Retry-After` (a MySQL outage is answered within this, never by a hanging request).
    pub http_acquire_timeout_ms: u64,
    /// How long a pooled connection may stay idle before the pool closes it. Keep it below
    /// the server's `wait_timeout` (MariaDB's and MySQL's default: 28,800 s): a connection
    /// is not pinged when it is taken from the pool, so one the server closed would fail
    /// its first statement (classed as the outage it looks like, and retried).
    pub idle_timeout_secs: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("mysql://root@127.0.0.1:3306/commerce_events"),
            max_connections: 8,
            http_max_connections: 8,
            acquire_timeout_ms: 5_000,
            http_acquire_timeout_ms: 1_000,
            idle_timeout_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RedisSettings {
    pub url: SecretString,
    /// Prepended to every key this process writes, so several deployments (or tests) can
    /// share one Redis.
    pub key_prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("redis://127.0.0.1:6379"),
            key_prefix: String::new(),
        }
    }
}

/// Where Kafka comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KafkaBrokers {
    /// Start an in-process librdkafka mock cluster (real Kafka protocol on loopback ports).
    Embedded,
    /// A real cluster: `host:port,host:port`.
    External(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct KafkaSettings {
    /// `embedded` (default) or a bootstrap list `host:port,...`.
    pub brokers: String,
    /// Broker count of the embedded cluster.
    pub embedded_brokers: i32,
    /// `fetch.wait.max.ms` against the embedded cluster. Its mock broker holds a fetch that
    /// finds no records for the whole wait and does not answer early when records arrive,
    /// so the design document's 500 ms would add up to half a second to every hop.
    pub embedded_fetch_wait_max_ms: u64,
    pub client_id: String,
    /// Partitions of every topic this process creates.
    pub partitions: i32,
    /// Replication factor used when creating missing topics on a real cluster.
    pub replication_factor: i32,
    /// Prefix of every consumer group id (lets two deployments share a cluster).
    pub group_prefix: String,
    pub producer: ProducerSettings,
    pub consumer: ConsumerSettings,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "embedded".into(),
            embedded_brokers: 3,
            embedded_fetch_wait_max_ms: 10,
            client_id: "commerce-events".into(),
            partitions: 3,
            replication_factor: 1,
            group_prefix: String::new(),
            producer: ProducerSettings::default(),
            consumer: ConsumerSettings::default(),
        }
    }
}

impl KafkaSettings {
    pub fn brokers(&self) -> KafkaBrokers {
        let trimmed = self.brokers.trim();
        if trimmed.is_empty() || trimmed.eq_ignore_ascii_case("embedded") {
            KafkaBrokers::Embedded
        } else {
            KafkaBrokers::External(trimmed.to_string())
        }
    }

    /// The fetch wait to use with the configured cluster.
    pub fn fetch_wait_max_ms(&self) -> u64 {
        match self.brokers() {
            KafkaBrokers::Embedded => self.embedded_fetch_wait_max_ms,
            KafkaBrokers::External(_) => self.consumer.fetch_wait_max_ms,
        }
    }

    pub fn group_id(&self, group: &str) -> String {
        format!("{}{}", self.group_prefix, group)
    }
}

/// Producer settings; defaults are the design document's.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProducerSettings {
    pub acks: String,
    pub enable_idempotence: bool,
    pub compression_type: String,
    pub linger_ms: u64,
    pub batch_size: u64,
    /// Local send buffer (Spring's `buffer-memory`), in bytes.
    pub buffer_memory: u64,
    pub max_in_flight: u32,
    pub retries: u32,
    pub delivery_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// Any further librdkafka producer property, passed through unchanged
    /// (for example `security.protocol`).
    pub extra: BTreeMap<String, String>,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        Self {
            acks: "all".into(),
            enable_idempotence: true,
            compression_type: "snappy".into(),
            linger_ms: 10,
            batch_size: 16_384,
            buffer_memory: 33_554_432,
            max_in_flight: 5,
            retries: 3,
            delivery_timeout_ms: 120_000,
            request_timeout_ms: 30_000,
            extra: BTreeMap::new(),
        }
    }
}

/// Consumer settings; defaults are the design document's.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ConsumerSettings {
    pub auto_offset_reset: String,
    pub session_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub fetch_min_bytes: u32,
    pub fetch_wait_max_ms: u64,
    /// Records a partition actor takes from its queue in one batch (Spring's
    /// `max-poll-records`; librdkafka has no equivalent, the batch is formed here).
    pub max_batch_records: usize,
    /// A record larger than this is a poison pill.
    pub max_record_bytes: usize,
    /// How long a revoked or stopping partition may take to finish its in-flight batch;
    /// must be shorter than the session timeout.
    pub drain_timeout_ms: u64,
    /// A partition stores its offset after every batch and commits it at most this often
    /// (and always when it is revoked or stopped).
    pub commit_interval_ms: u64,
    /// Arbiter threads the partition actors are spread over.
    pub partition_threads: usize,
    /// Static group membership (KIP-345): each group member is known by `instance.id`
    /// (`group.instance.id`), so a daemon restarted within the session timeout takes its
    /// partitions back without a rebalance of anyone else's, and a broker that does not
    /// expire a killed member's session still hands them to its successor. The price: a
    /// member that stops for good keeps its partitions until the session timeout ends.
    pub static_membership: bool,
    /// How partitions move when members come and go (classic protocol): `eager` (range,
    /// librdkafka's default: every member gives up everything, then takes a new share) or
    /// `cooperative` (cooperative-sticky, KIP-429: only the partitions that change owner are
    /// revoked, the others keep being consumed through the rebalance). Eager is the default
    /// because the embedded cluster's classic coordinator takes several times longer over a
    /// cooperative rebalance's two rounds; against Kafka, prefer `cooperative`.
    pub assignment: PartitionAssignment,
    /// The group protocol: `classic` (JoinGroup/SyncGroup, the client assigns) or
    /// `consumer` (KIP-848: the broker assigns, incrementally; the session timeout and
    /// heartbeat interval are the broker's `group.consumer.*` settings, and a static member
    /// that comes back within the session timeout keeps its partitions). Needs Kafka 4.0
    /// or the embedded cluster.
    pub group_protocol: GroupProtocol,
    /// Any further librdkafka consumer property, passed through unchanged.
    pub extra: BTreeMap<String, String>,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            auto_offset_reset: "earliest".into(),
            session_timeout_ms: 10_000,
            heartbeat_interval_ms: 3_000,
            fetch_min_bytes: 1_024,
            fetch_wait_max_ms: 500,
            max_batch_records: 500,
            max_record_bytes: 1_048_576,
            drain_timeout_ms: 5_000,
            commit_interval_ms: 100,
            partition_threads: 2,
            static_membership: true,
            assignment: PartitionAssignment::Eager,
            group_protocol: GroupProtocol::Classic,
            extra: BTreeMap::new(),
        }
    }
}

impl ConsumerSettings {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }
}

/// The classic group protocol's assignment strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionAssignment {
    /// `cooperative-sticky` (KIP-429).
    Cooperative,
    /// `range`: stop-the-world rebalances.
    Eager,
}

impl PartitionAssignment {
    /// The `partition.assignment.strategy` it stands for.
    pub fn strategy(self) -> &'static str {
        match self {
            PartitionAssignment::Cooperative => "cooperative-sticky",
            PartitionAssignment::Eager => "range",
        }
    }
}

/// librdkafka's `group.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    Classic,
    /// KIP-848.
    Consumer,
}

impl GroupProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

/// Retries of a partition's batch.
///
/// - `attempts` × `delay_ms`: the in-place retry of a batch whose domain actor failed with a
///   retryable or fatal error (the design document's fixed back-off: 1 s, 3 attempts), for
///   short blips; then the event is dead-lettered.
/// - `outage_*`: a dependency every record needs (MySQL, Redis, Kafka, a delivery target)
///   does not answer. The partition pauses and retries with a doubling delay from
///   `outage_initial_delay_ms` up to `outage_max_delay_ms`, for as long as the outage lasts;
///   nothing is dead-lettered. An outage longer than `outage_alert_after_secs` raises an
///   alert (an error log line with `alert=true`, and a post to `external.alert_url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RetrySettings {
    pub attempts: usize,
    pub delay_ms: u64,
    pub outage_initial_delay_ms: u64,
    pub outage_max_delay_ms: u64,
    pub outage_alert_after_secs: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            attempts: 3,
            delay_ms: 1_000,
            outage_initial_delay_ms: 1_000,
            outage_max_delay_ms: 10_000,
            outage_alert_after_secs: 60,
        }
    }
}

/// The outbox relay that republishes event-log rows left unpublished.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OutboxSettings {
    /// A PENDING row older than this is considered lost by its request and republished.
    pub republish_after_ms: u64,
    pub poll_interval_ms: u64,
    pub batch_size: u32,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            republish_after_ms: 5_000,
            poll_interval_ms: 1_000,
            batch_size: 500,
        }
    }
}

/// The reconciler: finds events a consumer has not settled and drives them again.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ReconcileSettings {
    pub enabled: bool,
    /// An event published this long ago that one of its consumers has not settled, while
    /// that consumer's group has read past it, is driven again.
    pub after_ms: u64,
    /// `after_ms` for particular event types (by their names, for example
    /// `OrderCompleted`), where it must differ.
    pub after_ms_by_event_type: BTreeMap<String, u64>,
    /// `after_ms` (at most) for the events recorded proven, whose rows are never marked
    /// PUBLISHED (coupon requests): the reconciler is what publishes them again
    /// when their publication failed, as the relay does for rows left PENDING after
    /// `outbox.republish_after_ms`.
    pub proven_after_ms: u64,
    /// How often the reconciler looks.
    pub interval_ms: u64,
    /// Event-log rows read per consumer and pass.
    pub batch_size: u32,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            after_ms: 30_000,
            after_ms_by_event_type: BTreeMap::new(),
            proven_after_ms: 5_000,
            interval_ms: 5_000,
            batch_size: 1_000,
        }
    }
}

impl ReconcileSettings {
    /// How long events of `event_type` may stay unsettled before they are driven again;
    /// `proven`: its events are recorded proven.
    pub fn after(&self, event_type: &str, proven: bool) -> Duration {
        let default = if proven {
            self.proven_after_ms.min(self.after_ms)
        } else {
            self.after_ms
        };
        Duration::from_millis(
            self.after_ms_by_event_type
                .get(event_type)
                .copied()
                .unwrap_or(default),
        )
    }
}

/// Where completed orders go for analytics.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AnalyticsSettings {
    /// The analytics platform's HTTP endpoint; when empty, orders go to `file`.
    pub url: String,
    /// An append-only JSON-lines file of completed orders.
    pub file: String,
    /// How `order-analytics-group` orders a partition's records (keyed by order: an
    /// order's events stay in order by default).
    pub ordering: RecordOrdering,
    /// Records of one partition delivered at once (`key`: keys at once).
    pub max_in_flight: usize,
}

impl Default for AnalyticsSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            file: "analytics/completed-orders.jsonl".to_string(),
            ordering: RecordOrdering::Key,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

impl AnalyticsSettings {
    pub fn order(&self) -> DeliveryOrder {
        DeliveryOrder::new(self.ordering, self.max_in_flight)
    }
}

/// How a forwarder's consumer group orders the records of one partition (Confluent's
/// Parallel Consumer's `ProcessingOrder`, Karafka's virtual partitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordOrdering {
    /// One record at a time, in offset order. A failed delivery goes to the retry schedule
    /// without holding the partition, so a later record of its key may be delivered first
    /// (as with Spring Kafka's non-blocking retries).
    Partition,
    /// Records of one key in offset order, different keys at once (up to `max_in_flight`).
    /// A record whose key has an earlier record waiting for a retry waits behind it
    /// (parked on the schedule, without holding the partition): order per key survives
    /// retries.
    Key,
    /// Up to `max_in_flight` records at once, in no order.
    Unordered,
}

impl RecordOrdering {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordOrdering::Partition => "partition",
            RecordOrdering::Key => "key",
            RecordOrdering::Unordered => "unordered",
        }
    }
}

/// A consumer group's ordering and how much of a partition it works on at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryOrder {
    pub ordering: RecordOrdering,
    pub max_in_flight: usize,
}

impl DeliveryOrder {
    pub fn new(ordering: RecordOrdering, max_in_flight: usize) -> Self {
        Self {
            ordering,
            max_in_flight: max_in_flight.max(1),
        }
    }
}

/// Records (keys, with `key` ordering) a forwarder works on at once per partition.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// The best-seller ranking in Redis.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RankingSettings {
    /// How long a day's ranking (and the record of counted orders) is kept.
    pub retention_days: u32,
    /// The largest `days` the ranking endpoint accepts (at most `retention_days`).
    pub max_days: u32,
}

impl Default for RankingSettings {
    fn default() -> Self {
        Self {
            retention_days: 8,
            max_days: 7,
        }
    }
}

/// First-come-first-served coupons.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CouponSettings {
    /// Tasks writing batches of accepted requests (group commit).
    pub intake_writers: usize,
    /// Requests one intake commit may carry.
    pub intake_max_batch: usize,
    /// Requests waiting for an intake writer, at most. A request that finds the queue full
    /// is answered `503 UNAVAILABLE` with `Retry-After` at once, recording nothing.
    pub intake_queue: usize,
    /// Expiry of the advisory `coupon:{couponId}:user:{userId}` Redis locks.
    pub lock_ttl_ms: u64,
    /// Largest stock a coupon may be created with.
    pub max_total_quantity: u32,
    /// Largest discount a coupon may carry.
    pub max_discount_amount: u64,
    /// Rows a new coupon's stock is split over (1: the coupon row itself). With more, the
    /// partitions deciding a hot coupon's requests take stock from different rows; a shard
    /// that runs dry borrows from the others, and the total stays exact.
    pub stock_shards: u16,
}

impl Default for CouponSettings {
    fn default() -> Self {
        Self {
            intake_writers: 2,
            intake_max_batch: 500,
            intake_queue: 4_000,
            lock_ttl_ms: 5_000,
            max_total_quantity: 10_000_000,
            max_discount_amount: 10_000_000,
            stock_shards: 1,
        }
    }
}

/// Orders and payments.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ShopSettings {
    /// Tasks writing batches of new orders (group commit).
    pub order_writers: usize,
    /// Orders one commit may carry.
    pub order_max_batch: usize,
    /// Tasks writing batches of payments (group commit).
    pub payment_writers: usize,
    /// Payments one commit may carry.
    pub payment_max_batch: usize,
}

impl Default for ShopSettings {
    fn default() -> Self {
        Self {
            order_writers: 2,
            order_max_batch: 100,
            payment_writers: 2,
            payment_max_batch: 100,
        }
    }
}

/// Delivery of events to an external system (webhooks) and its retry schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ExternalSettings {
    /// Where webhooks go (`http://host:port`); empty leaves `external-events` unconsumed.
    pub base_url: String,
    /// The path per event type, appended to `base_url`.
    pub routes: BTreeMap<String, String>,
    /// How long one delivery attempt may take.
    pub timeout_ms: u64,
    /// Signs deliveries (`webhook-signature`) when set; `whsec_<base64>` or plain text.
    pub signing_secret: SecretString,
    /// An administrator alert is POSTed here when an event is dead-lettered (optional).
    pub alert_url: String,
    /// How long an attempt in progress holds its event before another instance may take it.
    pub lease_ms: u64,
    /// How often the retry scheduler looks for due attempts.
    pub poll_interval_ms: u64,
    /// Attempts the scheduler starts per look.
    pub claim_batch: u32,
    /// Different events whose attempts failed, with no delivery in between, after which a
    /// target counts as down: its events then wait, without spending attempts, until it
    /// answers again (one event failing alone spends its attempts and is dead-lettered).
    pub target_down_after_failures: u32,
    pub backoff: BackoffSettings,
    /// How `external-event-group` orders a partition's records (an order's events stay in
    /// order by default).
    pub ordering: RecordOrdering,
    /// Records of one partition delivered at once (`key`: keys at once).
    pub max_in_flight: usize,
}

impl ExternalSettings {
    pub fn order(&self) -> DeliveryOrder {
        DeliveryOrder::new(self.ordering, self.max_in_flight)
    }
}

impl Default for ExternalSettings {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            routes: BTreeMap::from([(
                "PaymentCompleted".to_string(),
                "/webhooks/payment-completed".to_string(),
            )]),
            timeout_ms: 5_000,
            signing_secret: SecretString::from(""),
            alert_url: String::new(),
            lease_ms: 30_000,
            poll_interval_ms: 100,
            claim_batch: 100,
            target_down_after_failures: 3,
            backoff: BackoffSettings::default(),
            ordering: RecordOrdering::Key,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// Exponential back-off between attempts (the design document's 1 s → 2 s → 4 s → 8 s).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BackoffSettings {
    pub base_ms: u64,
    pub factor: f32,
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub max_delay_ms: u64,
    pub jitter: bool,
}

impl Default for BackoffSettings {
    fn default() -> Self {
        Self {
            base_ms: 1_000,
            factor: 2.0,
            attempts: 5,
            max_delay_ms: 60_000,
            jitter: false,
        }
    }
}

/// This daemon instance among several.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct InstanceSettings {
    /// Names the instance's own consumer groups (the result notifier consumes every result
    /// on every instance). Defaults to the host name.
    pub id: String,
}

impl Default for InstanceSettings {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty());
        Self {
            id: host.unwrap_or_else(|| "local".into()),
        }
    }
}

/// Identity: bearer JWTs (see `auth.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// The HS256 key. Empty: the development secret with the embedded Kafka cluster, a
    /// start-up error otherwise.
    pub jwt_secret: SecretString,
    /// `HS256`, `RS256` or `ES256`.
    pub algorithm: String,
    /// The PEM public key that verifies RS256/ES256 tokens.
    pub public_key_file: String,
    /// When set, tokens must carry this `iss`.
    pub issuer: String,
    /// When set, tokens must carry this `aud`.
    pub audience: String,
    /// Clock skew tolerated on `exp`.
    pub leeway_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            jwt_secret: SecretString::from(""),
            algorithm: "HS256".into(),
            public_key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway_secs: 30,
        }
    }
}

/// One rate limit (GCRA): a sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 5.0,
            burst: 10,
        }
    }
}

/// Abuse limits, kept in Redis so that every instance shares them: per user on the routes
/// that write in a user's name, per client address on requests without a token. The
/// defaults stop a script, never a person.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LimitSettings {
    pub coupon_issue: RateLimit,
    pub order_create: RateLimit,
    pub payment: RateLimit,
    pub charge: RateLimit,
    /// Every request without a token, per client address.
    pub anonymous: RateLimit,
    /// How long an `Idempotency-Key`'s first answer is kept.
    pub idempotency_ttl_secs: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            coupon_issue: RateLimit::default(),
            order_create: RateLimit::default(),
            payment: RateLimit::default(),
            charge: RateLimit {
                per_second: 1.0,
                burst: 5,
            },
            anonymous: RateLimit {
                per_second: 50.0,
                burst: 100,
            },
            idempotency_ttl_secs: 86_400,
        }
    }
}

/// WebSocket and SSE push channels.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PushSettings {
    /// How long a ticket from `POST /push/tickets` may wait for its connection.
    pub ticket_ttl_secs: u64,
    /// How far back a reconnecting client is sent the results it missed.
    pub resume_max_age_secs: u64,
    /// The largest WebSocket frame a client may send (closed with 1009 beyond).
    pub max_frame_bytes: usize,
}

impl Default for PushSettings {
    fn default() -> Self {
        Self {
            ticket_ttl_secs: 30,
            resume_max_age_secs: 3_600,
            max_frame_bytes: 64 * 1024,
        }
    }
}

/// Prometheus metrics (`GET /metrics`) and the dashboard's live view.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MetricsSettings {
    /// How often consumer lag is measured (committed offsets and high watermarks are read
    /// from the brokers).
    pub lag_interval_ms: u64,
    /// How often the outbox backlog (pending rows, the oldest one's age) is counted.
    pub outbox_interval_ms: u64,
    /// How often `/dashboard` receives a new view.
    pub dashboard_interval_ms: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            lag_interval_ms: 1_000,
            outbox_interval_ms: 5_000,
            dashboard_interval_ms: 1_000,
        }
    }
}

/// Trace export over OTLP/HTTP (JSON), see `observability/otlp.rs`. Off while `endpoint` is
/// empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OtlpSettings {
    /// The collector's OTLP/HTTP base address (for example `http://127.0.0.1:4318`); spans
    /// go to `{endpoint}/v1/traces`. Empty: nothing is exported.
    pub endpoint: String,
    /// The `service.name` the spans are reported under.
    pub service_name: String,
    /// Spans held in memory for export; more are dropped and counted.
    pub queue: usize,
    /// Spans per export request.
    pub batch_size: usize,
    /// The longest a span waits before its batch leaves.
    pub interval_ms: u64,
    /// How long one export request may take.
    pub timeout_ms: u64,
}

impl Default for OtlpSettings {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            service_name: "commerce-events".into(),
            queue: 8_192,
            batch_size: 512,
            interval_ms: 1_000,
            timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// A `tracing` filter; `RUST_LOG` wins when set.
    pub filter: String,
    /// `pretty` or `json`.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The database URL with its secret exposed, for the one place that connects.
pub fn database_url(settings: &DatabaseSettings) -> &str {
    settings.url.expose_secret()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_tree_lists_every_setting_by_its_dotted_path() {
        let paths = Settings::paths();
        for expected in [
            "http.port",
            "kafka.producer.linger_ms",
            "kafka.consumer.extra",
            "reconcile.after_ms_by_event_type",
            "external.backoff.jitter",
            "limits.charge.burst",
            "otlp.timeout_ms",
        ] {
            assert!(
                paths.iter().any(|path| path == expected),
                "{expected} in {paths:?}"
            );
        }
        assert!(
            !paths
                .iter()
                .any(|path| path == "kafka" || path == "limits.charge")
        );
        assert!(paths.len() > 100, "{} settings", paths.len());
    }

    #[test]
    fn the_configuration_reference_documents_every_setting() {
        let reference = include_str!("../docs/configuration.md");
        let missing: Vec<String> = Settings::paths()
            .into_iter()
            .filter(|path| !reference.contains(&format!("`{path}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "settings missing from docs/configuration.md (each as `section.key`): {missing:?}"
        );
    }

    #[test]
    fn defaults_match_the_design_document() {
        let settings = Settings::default();
        assert_eq!(settings.kafka.producer.acks, "all");
        assert_eq!(settings.kafka.producer.linger_ms, 10);
        assert_eq!(settings.kafka.consumer.max_batch_records, 500);
        assert_eq!(settings.kafka.consumer.session_timeout_ms, 10_000);
        assert_eq!(
            settings.kafka.consumer.assignment,
            PartitionAssignment::Eager
        );
        assert_eq!(
            settings.kafka.consumer.group_protocol,
            GroupProtocol::Classic
        );
        assert_eq!(settings.kafka.brokers(), KafkaBrokers::Embedded);
        settings.validate().expect("defaults are valid");
    }

    #[test]
    fn a_bootstrap_list_selects_an_external_cluster() {
        let kafka = KafkaSettings {
            brokers: " kafka-1:9092,kafka-2:9092 ".into(),
            ..KafkaSettings::default()
        };
        assert_eq!(
            kafka.brokers(),
            KafkaBrokers::External("kafka-1:9092,kafka-2:9092".into())
        );
    }

    #[test]
    fn a_file_overrides_the_defaults_and_the_environment_overrides_the_file() {
        let file =
            std::env::temp_dir().join(format!("commerce-events-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            "[http]\nport = 9000\nhost = \"0.0.0.0\"\n[kafka.consumer]\nmax_batch_records = 50\n",
        )
        .unwrap();
        let environment = HashMap::from([
            ("APP_HTTP__PORT".to_string(), "9090".to_string()),
            (
                "APP_KAFKA__BROKERS".to_string(),
                "kafka-1:9092,kafka-2:9092".to_string(),
            ),
            (
                "APP_DATABASE__URL".to_string(),
                "mysql://app:pa55w0rd@db:3306/shop".to_string(),
            ),
            ("APP_RETRY__DELAY_MS".to_string(), "250".to_string()),
        ]);
        let settings = Settings::load_from(&file, Some(environment)).unwrap();
        std::fs::remove_file(&file).unwrap();

        assert_eq!(settings.http.port, 9090, "environment over file");
        assert_eq!(settings.http.host, "0.0.0.0", "file over default");
        assert_eq!(settings.kafka.consumer.max_batch_records, 50);
        assert_eq!(
            settings.kafka.consumer.session_timeout_ms, 10_000,
            "untouched default"
        );
        assert_eq!(
            settings.kafka.brokers(),
            KafkaBrokers::External("kafka-1:9092,kafka-2:9092".into())
        );
        assert_eq!(
            database_url(&settings.database),
            "mysql://app:pa55w0rd@db:3306/shop"
        );
        assert_eq!(settings.retry.delay_ms, 250);
        assert!(
            !format!("{settings:?}").contains("pa55w0rd"),
            "secrets stay out of debug output"
        );
    }

    #[test]
    fn a_missing_file_leaves_the_defaults() {
        let settings = Settings::load_from(
            Path::new("/nonexistent/commerce-events.toml"),
            Some(HashMap::new()),
        )
        .unwrap();
        assert_eq!(settings.http.port, 8080);
    }

    #[test]
    fn a_malformed_value_is_reported() {
        let environment = HashMap::from([("APP_HTTP__PORT".to_string(), "eighty".to_string())]);
        let error =
            Settings::load_from(Path::new("/nonexistent.toml"), Some(environment)).unwrap_err();
        assert!(error.to_string().contains("port"), "{error}");
    }

    fn variables(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    fn refused_variables(pairs: &[(&str, &str)]) -> String {
        Settings::load_from(Path::new("/nonexistent.toml"), Some(variables(pairs)))
            .unwrap_err()
            .to_string()
    }

    /// Loads `text` as the settings file.
    fn load_file(text: &str) -> Result<Settings, SettingsError> {
        let file = std::env::temp_dir().join(format!(
            "commerce-events-{}-{}.toml",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&file, text).unwrap();
        let loaded = Settings::load_from(&file, Some(HashMap::new()));
        std::fs::remove_file(&file).unwrap();
        loaded
    }

    #[test]
    fn a_variable_that_names_no_setting_stops_the_start_naming_the_closest_one() {
        assert_eq!(
            refused_variables(&[("APP_HTTP__PROT", "9999")]),
            "APP_HTTP__PROT: no such setting; did you mean http.port?"
        );
        assert_eq!(
            refused_variables(&[("APP_KAFKA__PRODUCER__LINGERMS", "5")]),
            "APP_KAFKA__PRODUCER__LINGERMS: no such setting; did you mean kafka.producer.linger_ms?"
        );
        assert_eq!(
            refused_variables(&[("APP_NOTHING_LIKE_IT", "1")]),
            "APP_NOTHING_LIKE_IT: no such setting"
        );
        // A section alone is not a setting's value, but it names settings: not refused here.
        assert!(
            Settings::load_from(
                Path::new("/nonexistent.toml"),
                Some(variables(&[("APP_HTTP__PORT", "9999")]))
            )
            .is_ok()
        );
    }

    #[test]
    fn variables_of_other_tools_pass_when_listed_and_the_file_variable_always() {
        assert!(
            refused_variables(&[("APP_OTHER_TOOL", "x")]).starts_with("APP_OTHER_TOOL:"),
            "not listed: refused"
        );
        let listed = variables(&[
            ("APP_OTHER_TOOL", "x"),
            ("APP_CONFIG_IGNORE", "APP_OTHER_TOOL, APP_ANOTHER"),
            ("APP_CONFIG_FILE", "/nonexistent.toml"),
            ("PATH", "/usr/bin"),
        ]);
        assert!(Settings::load_from(Path::new("/nonexistent.toml"), Some(listed)).is_ok());
    }

    #[test]
    fn a_file_key_that_names_no_setting_stops_the_start_naming_the_closest_one() {
        let error = load_file("[http]\nprot = 9999\n").unwrap_err().to_string();
        assert!(
            error.ends_with("http.prot: no such setting; did you mean http.port?"),
            "{error}"
        );
        let error = load_file("[kafka.producr]\nlinger_ms = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.ends_with("kafka.producr: no such setting; did you mean kafka.producer?"),
            "{error}"
        );
    }

    #[test]
    fn the_keys_of_a_map_setting_are_the_operators_own() {
        let settings = load_file(
            "[kafka.producer.extra]\n\"security.protocol\" = \"SASL_SSL\"\n\
             [reconcile.after_ms_by_event_type]\nPaymentCompleted = 1000\n",
        )
        .unwrap();
        assert_eq!(
            settings.kafka.producer.extra["security.protocol"],
            "SASL_SSL"
        );
        assert_eq!(
            settings.reconcile.after_ms_by_event_type["PaymentCompleted"],
            1_000
        );
    }

    #[test]
    fn every_setting_of_the_tree_is_known_by_its_variable() {
        let known = unknown::KnownSettings::new(paths::setting_paths::<Settings>());
        let every: HashMap<String, String> = Settings::paths()
            .into_iter()
            .map(|path| {
                let name = format!("APP_{}", path.to_uppercase().replace('.', "__"));
                (name, "x".to_string())
            })
            .collect();
        assert!(every.len() > 100);
        assert_eq!(known.check_environment(&every), Ok(()));
    }

    #[test]
    fn a_drain_timeout_longer_than_the_session_is_rejected() {
        let mut settings = Settings::default();
        settings.kafka.consumer.drain_timeout_ms = 20_000;
        let error = settings.validate().unwrap_err();
        assert!(error.to_string().contains("drain_timeout_ms"), "{error}");
    }
}
