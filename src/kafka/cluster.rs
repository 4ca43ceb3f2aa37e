//! Which Kafka the process talks to, and making sure its topics exist.
//!
//! With `kafka.brokers = "embedded"` the process starts an in-process librdkafka mock
//! cluster: real Kafka protocol on loopback ports, so `kcat -b <bootstrap>` or a second
//! process on this machine can use it too. Everything else talks to it exactly as to a real
//! cluster; only topic creation differs, because the mock broker does not implement the
//! CreateTopics admin request.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tracing::info;

use crate::config::{KafkaBrokers, KafkaSettings};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start the embedded Kafka cluster: {0}")]
    Embedded(KafkaError),
    #[error("cannot create topic {topic}: {source}")]
    CreateTopic { topic: String, source: KafkaError },
}

/// The embedded mock cluster. Its handle is a raw pointer into librdkafka, hence the wrapper.
pub struct EmbeddedCluster(MockCluster<'static, DefaultProducerContext>);

// SAFETY: librdkafka's mock-cluster API is thread-safe: every call on the handle enqueues an
// operation for the cluster's own thread and waits for its reply. The handle stays valid
// until this wrapper is dropped.
unsafe impl Send for EmbeddedCluster {}
// SAFETY: as above; no method mutates Rust-side state.
unsafe impl Sync for EmbeddedCluster {}

impl EmbeddedCluster {
    /// The mock cluster itself, for fault injection in tests.
    pub fn mock(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.0
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
                let mock = MockCluster::new(settings.embedded_brokers.max(1))
                    .map_err(ClusterError::Embedded)?;
                let bootstrap_servers = mock.bootstrap_servers();
                info!(
                    bootstrap_servers = %bootstrap_servers,
                    brokers = settings.embedded_brokers,
                    "embedded Kafka cluster started (kcat -b {bootstrap_servers} -L)"
                );
                Ok(KafkaCluster::Embedded {
                    cluster: EmbeddedCluster(mock),
                    bootstrap_servers,
                })
            }
            KafkaBrokers::External(bootstrap_servers) => {
                info!(bootstrap_servers = %bootstrap_servers, "using external Kafka cluster");
                Ok(KafkaCluster::External { bootstrap_servers })
            }
        }
    }

    pub fn bootstrap_servers(&self) -> &str {
        match self {
            KafkaCluster::Embedded {
                bootstrap_servers, ..
            }
            | KafkaCluster::External { bootstrap_servers } => bootstrap_servers,
        }
    }

    pub fn embedded(&self) -> Option<&EmbeddedCluster> {
        match self {
            KafkaCluster::Embedded { cluster, .. } => Some(cluster),
            KafkaCluster::External { .. } => None,
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
                        .mock()
                        .create_topic(topic, settings.partitions, 1)
                        .map_err(|source| ClusterError::CreateTopic {
                            topic: topic.clone(),
                            source,
                        })?;
                }
                Ok(())
            }
            KafkaCluster::External { bootstrap_servers } => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", bootstrap_servers)
                    .set("client.id", format!("{}-admin", settings.client_id))
                    .create()
                    .map_err(|source| ClusterError::CreateTopic {
                        topic: topics.join(","),
                        source,
                    })?;
                let new_topics: Vec<NewTopic<'_>> = topics
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
                let results =
                    admin
                        .create_topics(&new_topics, &options)
                        .await
                        .map_err(|source| ClusterError::CreateTopic {
                            topic: topics.join(","),
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
        }
    }
}
