//! Kafka plumbing: the cluster (embedded mock or real), the producer, consumer groups with
//! split partition queues, dead-letter topics, and groups' offsets.

pub mod cluster;
pub mod consumer;
pub mod dead_letter;
pub mod offsets;
pub mod producer;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use serde::Serialize;

/// A librdkafka configuration: `properties`, then the `extra` ones the settings pass through
/// unchanged (they win). Every client reconnects to a broker that went away at most 2 s
/// apart (librdkafka's default grows to 10 s), so work resumes within seconds of a broker's
/// return.
pub(crate) fn client_config<'a>(
    properties: impl IntoIterator<Item = (&'a str, String)>,
    extra: &'a BTreeMap<String, String>,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("reconnect.backoff.max.ms", "2000");
    for (key, value) in properties.into_iter().chain(
        extra
            .iter()
            .map(|(key, value)| (key.as_str(), value.clone())),
    ) {
        config.set(key, value);
    }
    config
}

/// Drops a client once `client` is its last handle, waiting until `deadline` for the others
/// to go (dropping a librdkafka client joins its threads: call from a blocking thread).
/// Returns whether it was the last: if not, the client closes with its last handle, later.
pub(crate) fn close_when_unshared<T>(client: Arc<T>, deadline: Instant) -> bool {
    while Arc::strong_count(&client) > 1 {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(client);
    true
}

/// One partition of one topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}
