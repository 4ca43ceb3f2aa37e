//! Where each partition actor of this instance stands: the next offset to process and the
//! timestamp of the oldest record in flight, published by the partition actor and read by
//! the lag monitor (`lag.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use dashmap::DashMap;

use crate::kafka::TopicPartition;

const UNKNOWN: i64 = i64::MIN;

/// Where one partition actor stands, shared with the lag monitor.
#[derive(Debug)]
pub struct PartitionProgress {
    next_offset: AtomicI64,
    /// Milliseconds since the epoch of the first record of the batch in flight.
    oldest_in_flight_ms: AtomicI64,
}

impl Default for PartitionProgress {
    fn default() -> Self {
        Self {
            next_offset: AtomicI64::new(UNKNOWN),
            oldest_in_flight_ms: AtomicI64::new(UNKNOWN),
        }
    }
}

impl PartitionProgress {
    /// A batch whose first record was written at `timestamp_ms` is being processed.
    pub fn batch_started(&self, timestamp_ms: Option<i64>) {
        let at = timestamp_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
        self.oldest_in_flight_ms.store(at, Ordering::Relaxed);
    }

    /// The batch is settled; `next_offset` is the next record to process, when known.
    pub fn batch_settled(&self, next_offset: Option<i64>) {
        if let Some(next_offset) = next_offset {
            self.next_offset.store(next_offset, Ordering::Relaxed);
        }
        self.oldest_in_flight_ms.store(UNKNOWN, Ordering::Relaxed);
    }

    pub fn next_offset(&self) -> Option<i64> {
        Some(self.next_offset.load(Ordering::Relaxed)).filter(|offset| *offset != UNKNOWN)
    }

    pub fn oldest_in_flight_ms(&self) -> Option<i64> {
        Some(self.oldest_in_flight_ms.load(Ordering::Relaxed)).filter(|at| *at != UNKNOWN)
    }
}

/// The progress of a group's partitions on this instance, by partition.
#[derive(Clone, Debug, Default)]
pub struct GroupProgress(Arc<DashMap<TopicPartition, Arc<PartitionProgress>>>);

impl GroupProgress {
    /// A partition was assigned: its actor reports to the returned progress.
    pub fn assigned(&self, partition: &TopicPartition) -> Arc<PartitionProgress> {
        let progress = Arc::new(PartitionProgress::default());
        self.0.insert(partition.clone(), progress.clone());
        progress
    }

    pub fn revoked(&self, partition: &TopicPartition) {
        self.0.remove(partition);
    }

    pub fn of(&self, partition: &TopicPartition) -> Option<Arc<PartitionProgress>> {
        self.0.get(partition).map(|entry| entry.value().clone())
    }
}
