//! Consumer lag: how far each consumer group of this instance is behind the end of each
//! partition, in records and in time.
//!
//! Each partition actor publishes where it stands ([`PartitionProgress`], in
//! [`crate::actors::progress`]: the next offset to
//! process, and the timestamp of the oldest record of the batch it is working on). Every
//! `metrics.lag_interval_ms` the [`LagMonitor`] reads each group's committed offsets and
//! each partition's high watermark from the brokers (on a blocking thread), joins them with
//! the local progress, sets the `kafka_consumergroup_*` gauges and keeps the result for the
//! dashboard.
//!
//! - `lag` = high watermark − next offset to process. For a partition another instance
//!   owns, the next offset is the group's committed offset.
//! - `lag_seconds` = age of the oldest record not yet processed: the timestamp of the first
//!   record of the batch in flight; when nothing is in flight but records wait (fetching
//!   paused), the time since the lag was first seen above zero, a lower bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::debug;

use crate::actors::consumer_group::ConsumerGroup;
use crate::actors::progress::PartitionProgress;
use crate::kafka::TopicPartition;
use crate::kafka::offsets::GroupOffsets;
use crate::observability::metrics;

/// One partition of one group's topic.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLag {
    pub consumer_group: String,
    pub topic: String,
    pub partition: i32,
    /// The offset the next record written to the partition will get.
    pub high_watermark: i64,
    pub committed: Option<i64>,
    /// The next record to process.
    pub next_offset: i64,
    pub lag: i64,
    pub lag_seconds: f64,
    /// Whether this instance owns the partition now.
    pub owned_here: bool,
}

/// The lag of every group of this instance, as last measured.
#[derive(Clone, Default)]
pub struct LagView(Arc<Mutex<Vec<PartitionLag>>>);

impl LagView {
    pub fn current(&self) -> Vec<PartitionLag> {
        self.0.lock().expect("lag view").clone()
    }
}

/// Measures the lag every `interval`.
pub struct LagMonitor {
    groups: Vec<Arc<ConsumerGroup>>,
    offsets: Arc<GroupOffsets>,
    view: LagView,
    /// When each partition's lag was first seen above zero.
    lagging_since: HashMap<(String, TopicPartition), Instant>,
}

impl LagMonitor {
    pub fn new(groups: Vec<Arc<ConsumerGroup>>, offsets: Arc<GroupOffsets>) -> Self {
        Self {
            groups,
            offsets,
            view: LagView::default(),
            lagging_since: HashMap::new(),
        }
    }

    pub fn view(&self) -> LagView {
        self.view.clone()
    }

    /// Measures until the arbiter running it stops.
    pub async fn run(mut self, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let offsets = self.offsets.clone();
            let wanted: Vec<(String, String)> = self
                .groups
                .iter()
                .flat_map(|group| {
                    group
                        .topics()
                        .iter()
                        .map(|topic| (group.group_id().to_string(), topic.clone()))
                })
                .collect();
            let read = tokio::task::spawn_blocking(move || {
                wanted
                    .into_iter()
                    .filter_map(
                        |(group, topic)| match offsets.positions_blocking(&group, &topic) {
                            Ok(positions) => Some((group, topic, positions)),
                            Err(error) => {
                                debug!(group, topic, %error, "cannot read the group's positions");
                                None
                            }
                        },
                    )
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(read) = read else { continue };
            let mut lags = Vec::new();
            for (group_id, topic, positions) in read {
                let Some(group) = self
                    .groups
                    .iter()
                    .find(|group| group.group_id() == group_id)
                    .cloned()
                else {
                    continue;
                };
                for position in positions {
                    let source = TopicPartition {
                        topic: topic.clone(),
                        partition: position.partition,
                    };
                    let local = group.progress().of(&source);
                    lags.push(self.measure(
                        &group_id,
                        source,
                        position,
                        local.as_deref(),
                        group.starts_at_end(),
                    ));
                }
            }
            for lag in &lags {
                metrics::partition_lag(
                    &lag.consumer_group,
                    &lag.topic,
                    lag.partition,
                    lag.lag,
                    lag.lag_seconds,
                    lag.committed,
                    lag.high_watermark,
                );
            }
            *self.view.0.lock().expect("lag view") = lags;
        }
    }

    fn measure(
        &mut self,
        group_id: &str,
        source: TopicPartition,
        position: crate::kafka::offsets::PartitionPosition,
        local: Option<&PartitionProgress>,
        starts_at_end: bool,
    ) -> PartitionLag {
        // Nothing processed here and nothing committed: where the group will start.
        let start = if starts_at_end {
            position.end
        } else {
            position.start
        };
        let next_offset = local
            .and_then(PartitionProgress::next_offset)
            .or(position.committed)
            .unwrap_or(start);
        let lag = (position.end - next_offset).max(0);
        let key = (group_id.to_string(), source.clone());
        let lag_seconds = if lag == 0 {
            self.lagging_since.remove(&key);
            0.0
        } else {
            let since = *self.lagging_since.entry(key).or_insert_with(Instant::now);
            match local.and_then(PartitionProgress::oldest_in_flight_ms) {
                Some(at) => ((chrono::Utc::now().timestamp_millis() - at).max(0) as f64) / 1_000.0,
                None => since.elapsed().as_secs_f64(),
            }
        };
        PartitionLag {
            consumer_group: group_id.to_string(),
            topic: source.topic,
            partition: source.partition,
            high_watermark: position.end,
            committed: position.committed,
            next_offset,
            lag,
            lag_seconds,
            owned_here: local.is_some(),
        }
    }
}
