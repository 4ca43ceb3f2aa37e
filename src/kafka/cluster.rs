//! Which Kafka the process talks to, and making sure its topics exist.
//!
//! With `kafka.brokers = "embedded"` the process starts an in-process librdkafka mock
//! cluster: real Kafka protocol on loopback ports, so `kcat -b <bootstrap>` or a second
//! process on this machine can use it too. Everything else talks to it exactly as to a real
//! cluster; only topic creation differs, because the mock broker does not implement the
//! CreateTopics admin request.

use std::time::Duration;

use std::ffi::{CStr, CString};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer};
#[cfg(feature = "test-util")]
use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr;
use rdkafka_sys as rdsys;
use tracing::info;

use crate::config::{ConsumerSettings, KafkaBrokers, KafkaSettings};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start the embedded Kafka cluster: {0}")]
    Embedded(KafkaError),
    #[error("cannot create topic {topic}: {source}")]
    CreateTopic { topic: String, source: KafkaError },
}

/// The embedded librdkafka mock cluster, owned through its C handle (rust-rdkafka's
/// wrapper does not expose the group settings used here).
pub struct EmbeddedCluster {
    handle: *mut rdsys::rd_kafka_mock_cluster_t,
    bootstrap_servers: String,
    /// The client the cluster lives in; released after the cluster.
    _owner: BaseProducer,
}

// SAFETY: librdkafka's mock-cluster API is thread-safe: every call on the handle enqueues an
// operation for the cluster's own thread and waits for its reply. The handle stays valid
// until this value is dropped.
unsafe impl Send for EmbeddedCluster {}
// SAFETY: as above; no method mutates Rust-side state.
unsafe impl Sync for EmbeddedCluster {}

impl EmbeddedCluster {
    /// Starts `brokers` mock brokers on loopback ports. Group joins are answered at once
    /// (no initial rebalance delay), which suits one process and tests.
    pub fn start(brokers: i32) -> Result<Self, KafkaError> {
        let owner: BaseProducer = ClientConfig::new().create()?;
        // SAFETY: the owner's handle is valid for the call; the cluster it creates is
        // destroyed in `Drop` before the owner is released.
        let handle = unsafe {
            rdsys::rd_kafka_mock_cluster_new(owner.client().native_ptr(), brokers.max(1))
        };
        if handle.is_null() {
            return Err(KafkaError::MockCluster(RDKafkaErrorCode::Fail));
        }
        // SAFETY: `handle` is a live cluster; the returned string is owned by it and copied.
        let bootstrap_servers =
            unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(handle)) }
                .to_string_lossy()
                .into_owned();
        // SAFETY: `handle` is a live cluster.
        unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(handle, 0) };
        Ok(Self {
            handle,
            bootstrap_servers,
            _owner: owner,
        })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The session timeout and heartbeat interval the cluster gives members of groups on
    /// the `consumer` protocol (KIP-848: the broker owns them). Classic-protocol members
    /// bring their own.
    pub fn set_group_consumer_timeouts(&self, settings: &ConsumerSettings) {
        let session = i32::try_from(settings.session_timeout_ms).unwrap_or(i32::MAX);
        let heartbeat = i32::try_from(settings.heartbeat_interval_ms).unwrap_or(i32::MAX);
        // SAFETY: `handle` is a live cluster.
        unsafe {
            rdsys::rd_kafka_mock_set_group_consumer_session_timeout_ms(self.handle, session);
            rdsys::rd_kafka_mock_set_group_consumer_heartbeat_interval_ms(self.handle, heartbeat);
        }
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        let name = CString::new(topic)
            .map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::InvalidTopic))?;
        // SAFETY: `handle` is a live cluster and `name` outlives the call.
        let code =
            unsafe { rdsys::rd_kafka_mock_topic_create(self.handle, name.as_ptr(), partitions, 1) };
        mock_result(code)
    }

    /// Makes the next `errors.len()` requests of `api_key` fail with these errors, in order
    /// (fault injection, for tests).
    #[cfg(feature = "test-util")]
    pub fn fail_requests(&self, api_key: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
        // SAFETY: `handle` is a live cluster; the array outlives the call.
        unsafe {
            rdsys::rd_kafka_mock_push_request_errors_array(
                self.handle,
                api_key.into(),
                errors.len(),
                errors.as_ptr(),
            )
        }
    }

    /// Takes a broker down (`false`) or brings it back (`true`) (fault injection, for tests).
    #[cfg(feature = "test-util")]
    pub fn set_broker_up(&self, broker_id: i32, up: bool) -> Result<(), KafkaError> {
        // SAFETY: `handle` is a live cluster.
        let code = unsafe {
            if up {
                rdsys::rd_kafka_mock_broker_set_up(self.handle, broker_id)
            } else {
                rdsys::rd_kafka_mock_broker_set_down(self.handle, broker_id)
            }
        };
        mock_result(code)
    }
}

fn mock_result(code: RDKafkaRespErr) -> Result<(), KafkaError> {
    if code == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(KafkaError::MockCluster(code.into()))
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        // SAFETY: created in `start`, destroyed exactly once, before its owner client.
        unsafe { rdsys::rd_kafka_mock_cluster_destroy(self.handle) };
    }
}

/// The Kafka cluster this process uses.
pub enum KafkaCluster {
    Embedded {
        cluster: EmbeddedCluster,
        bootstrap_servers: String,
    },
    External {
        bootstrap_servers: String,
    },
}

impl KafkaCluster {
    /// Starts the embedded cluster or points at the configured one.
    pub fn connect(settings: &KafkaSettings) -> Result<Self, ClusterError> {
        match settings.brokers() {
            KafkaBrokers::Embedded => {
                let cluster = EmbeddedCluster::start(settings.embedded_brokers)
                    .map_err(ClusterError::Embedded)?;
                cluster.set_group_consumer_timeouts(&settings.consumer);
                let bootstrap_servers = cluster.bootstrap_servers().to_string();
                info!(
                    bootstrap_servers = %bootstrap_servers,
                    brokers = settings.embedded_brokers,
                    "embedded Kafka cluster started (kcat -b {bootstrap_servers} -L)"
                );
                Ok(KafkaCluster::Embedded {
                    cluster,
                    bootstrap_servers,
                })
            }
            KafkaBrokers::External(bootstrap_servers) => {
                info!(bootstrap_servers = %bootstrap_servers, "using external Kafka cluster");
                Ok(KafkaCluster::External { bootstrap_servers })
            }
        }
    }

    /// Whether the cluster lives (in memory) in this process: it starts empty each time.
    pub fn is_embedded(&self) -> bool {
        matches!(self, KafkaCluster::Embedded { .. })
    }

    pub fn bootstrap_servers(&self) -> &str {
        match self {
            KafkaCluster::Embedded {
                bootstrap_servers, ..
            }
            | KafkaCluster::External { bootstrap_servers } => bootstrap_servers,
        }
    }

    /// Creates the topics that do not exist yet; existing topics are left as they are.
    pub async fn ensure_topics(
        &self,
        topics: &[String],
        settings: &KafkaSettings,
    ) -> Result<(), ClusterError> {
        match self {
            KafkaCluster::Embedded { cluster, .. } => {
                for topic in topics {
                    cluster
                        .create_topic(topic, settings.partitions)
                        .map_err(|source| ClusterError::CreateTopic {
                            topic: topic.clone(),
                            source,
                        })?;
                }
                Ok(())
            }
            KafkaCluster::External { bootstrap_servers } => {
                let for_every_topic = |source| ClusterError::CreateTopic {
                    topic: topics.join(","),
                    source,
                };
                let admin = admin_client(bootstrap_servers, settings).map_err(for_every_topic)?;
                // Only what is missing is created: clusters often refuse CreateTopics to
                // applications, and there is nothing to ask for when the topics exist.
                let existing = existing_topics(&admin).map_err(for_every_topic)?;
                let missing: Vec<&str> = topics
                    .iter()
                    .filter(|topic| !existing.contains(topic))
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
                create_topics(&admin, &missing, settings).await
            }
        }
    }
}

/// An admin client of an external cluster.
fn admin_client(
    bootstrap_servers: &str,
    settings: &KafkaSettings,
) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("client.id", format!("{}-admin", settings.client_id))
        .create()
}

/// The names of the topics the cluster has.
fn existing_topics(admin: &AdminClient<DefaultClientContext>) -> Result<Vec<String>, KafkaError> {
    Ok(admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(30))?
        .topics()
        .iter()
        .map(|topic| topic.name().to_string())
        .collect())
}

/// Creates the `missing` topics with the configured partitions and replication factor; a
/// topic created meanwhile by someone else is as good as created.
async fn create_topics(
    admin: &AdminClient<DefaultClientContext>,
    missing: &[&str],
    settings: &KafkaSettings,
) -> Result<(), ClusterError> {
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|topic| {
            NewTopic::new(
                topic,
                settings.partitions,
                TopicReplication::Fixed(settings.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|source| ClusterError::CreateTopic {
            topic: missing.join(","),
            source,
        })?;
    for result in results {
        match result {
            Ok(topic) => info!(topic = %topic, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(ClusterError::CreateTopic {
                    topic,
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}
