//! Where a consumer group stands on a topic: its committed offset and the end of each
//! partition, read through a client of that group id that never joins it.
//!
//! The reconciler asks before driving a group's events again: an unsettled event is only
//! stranded once the group has read (and committed) past where it was published. Every call
//! blocks on broker requests: run them on a blocking thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::KafkaSettings;
use crate::kafka::close_when_unshared;
use crate::kafka::consumer::{TracingContext, consumer_config};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One partition of a group's topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionPosition {
    pub partition: i32,
    /// The group's committed offset (the next record it will read); `None` before its
    /// first commit.
    pub committed: Option<i64>,
    /// The partition's end: the offset the next record will get.
    pub end: i64,
    /// The oldest offset still held (the low watermark).
    pub start: i64,
}

impl PartitionPosition {
    /// Records the group has not committed yet.
    pub fn lag(&self) -> i64 {
        (self.end - self.committed.unwrap_or(0)).max(0)
    }
}

/// Clients that read groups' offsets, one per group id, created on first use.
pub struct GroupOffsets {
    bootstrap_servers: String,
    settings: KafkaSettings,
    /// `None` once closed: no client is created after that.
    clients: Mutex<Option<HashMap<String, Arc<BaseConsumer<TracingContext>>>>>,
}

impl GroupOffsets {
    pub fn new(bootstrap_servers: &str, settings: &KafkaSettings) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.to_string(),
            settings: settings.clone(),
            clients: Mutex::new(Some(HashMap::new())),
        }
    }

    fn client(&self, group_id: &str) -> Result<Arc<BaseConsumer<TracingContext>>, KafkaError> {
        let mut clients = self.clients.lock().expect("offset clients");
        let Some(clients) = clients.as_mut() else {
            return Err(KafkaError::ClientCreation(
                "the offset clients are closed".into(),
            ));
        };
        if let Some(client) = clients.get(group_id) {
            return Ok(client.clone());
        }
        let client: Arc<BaseConsumer<TracingContext>> = Arc::new(
            consumer_config(&self.bootstrap_servers, &self.settings, group_id)
                .create_with_context(TracingContext::new("group-offsets"))?,
        );
        clients.insert(group_id.to_string(), client.clone());
        Ok(client)
    }

    /// The group's position on every partition of `topic`. Blocks.
    pub fn positions_blocking(
        &self,
        group_id: &str,
        topic: &str,
    ) -> Result<Vec<PartitionPosition>, KafkaError> {
        let client = self.client(group_id)?;
        let metadata = client.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|described| described.name() == topic)
            .flat_map(|described| {
                described
                    .partitions()
                    .iter()
                    .map(|partition| partition.id())
            })
            .collect();
        let mut list = TopicPartitionList::new();
        for partition in &partitions {
            list.add_partition(topic, *partition);
        }
        let committed = client.committed_offsets(list, REQUEST_TIMEOUT)?;
        partitions
            .into_iter()
            .map(|partition| {
                let (start, end) = client.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)?;
                let committed = committed
                    .find_partition(topic, partition)
                    .and_then(|element| match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
                Ok(PartitionPosition {
                    partition,
                    committed,
                    end,
                    start,
                })
            })
            .collect()
    }

    /// Releases the clients, each once the calls using it have returned (up to `timeout` for
    /// all); none is created afterwards. Returns whether every one is closed. Blocks: call
    /// from a blocking thread.
    pub fn close_blocking(&self, timeout: Duration) -> bool {
        let clients = self.clients.lock().expect("offset clients").take();
        let deadline = Instant::now() + timeout;
        clients
            .unwrap_or_default()
            .into_values()
            .map(|client| close_when_unshared(client, deadline))
            // Every client is closed, so count the failures rather than stop at the first.
            .filter(|closed| !closed)
            .count()
            == 0
    }
}
