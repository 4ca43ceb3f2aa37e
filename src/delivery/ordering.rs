//! Key-level concurrency inside a partition, for the forwarders and the retry scheduler
//! (as Confluent's Parallel Consumer and Karafka's virtual partitions do it).
//!
//! A forwarder's group has an ordering ([`RecordOrdering`]) and a `max_in_flight`. The
//! partition's batch is split into **lanes** ([`lanes`]): one lane of every record
//! (`partition`), one lane per key (`key`) or one per record (`unordered`). Lanes run at
//! once, up to `max_in_flight`; a lane's records run one after the other, in offset order.
//! The partition actor stores the offset after the batch, so the stored offset never passes
//! the lowest unfinished record, and a revoke waits for the lanes in flight.
//!
//! Under `key` ordering a failed delivery does not hold its partition (its retry is on the
//! schedule), but it holds its key: the key's later records are **parked** behind it, on
//! the schedule too (FAILED, no attempt spent, `last_error` naming the event they wait
//! behind, due just after it). Whoever picks up a key's record next (the forwarder, a
//! later batch; the scheduler, a later pass; any instance) first asks the event log for
//! the key's unfinished records read from the same partition ([`WaitingBehind`]), and
//! parks the record again if an earlier one is still unfinished. Order per key therefore
//! survives retries, restarts and rebalances; a dead-lettered record releases its key.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::RecordOrdering;
use crate::event_log::{EventStatus, Unfinished};
use crate::events::EventId;

/// How soon a record parked behind an attempt that is running (IN_PROGRESS, whose lease
/// may be long) is looked at again.
pub const RUNNING_RECHECK: Duration = Duration::from_secs(1);

/// The positions of a partition's records grouped into lanes that may run at once; each
/// lane lists its positions in the records' order, and lanes are in the order of their
/// first record.
pub fn lanes<K: Eq + Hash>(
    ordering: RecordOrdering,
    keys: impl IntoIterator<Item = K>,
) -> Vec<Vec<usize>> {
    let positions = keys.into_iter().enumerate();
    match ordering {
        RecordOrdering::Partition => {
            let all: Vec<usize> = positions.map(|(position, _)| position).collect();
            if all.is_empty() {
                Vec::new()
            } else {
                vec![all]
            }
        }
        RecordOrdering::Unordered => positions.map(|(position, _)| vec![position]).collect(),
        RecordOrdering::Key => {
            let mut lane_of: HashMap<K, usize> = HashMap::new();
            let mut lanes: Vec<Vec<usize>> = Vec::new();
            for (position, key) in positions {
                match lane_of.entry(key) {
                    Entry::Occupied(lane) => lanes[*lane.get()].push(position),
                    Entry::Vacant(lane) => {
                        lane.insert(lanes.len());
                        lanes.push(vec![position]);
                    }
                }
            }
            lanes
        }
    }
}

/// The earlier, unfinished record of a key that its later records wait behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingBehind {
    pub event_id: EventId,
    /// The offset it was read from: records of its key after it wait.
    pub offset: i64,
    pub status: EventStatus,
    /// When its retry is due, or its running attempt's lease ends.
    pub due: DateTime<Utc>,
}

impl WaitingBehind {
    /// Whether the record at `offset` of the same key and partition waits behind it.
    pub fn holds(&self, offset: i64) -> bool {
        self.offset < offset
    }

    /// When a record parked behind it is looked at again: just after its retry is due, or
    /// soon while its attempt runs; never in the past.
    pub fn recheck_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let due = match self.status {
            EventStatus::InProgress => self.due.min(now + chrono_duration(RUNNING_RECHECK)),
            _ => self.due,
        };
        due.max(now) + chrono::Duration::milliseconds(1)
    }

    /// The parked record's `last_error`.
    pub fn reason(&self, key: &str) -> String {
        format!(
            "waiting behind event {} of key {key} (offset {}), which is not delivered yet",
            self.event_id, self.offset
        )
    }

    /// The record of a lane whose attempt left it on the schedule until `due`.
    pub fn scheduled(event_id: EventId, offset: i64, due: DateTime<Utc>) -> Self {
        Self {
            event_id,
            offset,
            status: EventStatus::Failed,
            due,
        }
    }
}

/// For each key, its earliest unfinished record that is not one of `handled` (the records
/// being worked on now, whose lane orders them itself).
pub fn waiting_behind(
    unfinished: Vec<Unfinished>,
    handled: &HashSet<EventId>,
) -> HashMap<String, WaitingBehind> {
    let mut earliest: HashMap<String, WaitingBehind> = HashMap::new();
    for row in unfinished {
        if handled.contains(&row.event_id) {
            continue;
        }
        let candidate = WaitingBehind {
            event_id: row.event_id,
            offset: row.offset,
            status: row.status,
            due: row.due,
        };
        match earliest.entry(row.key) {
            Entry::Occupied(mut current) => {
                if candidate.offset < current.get().offset {
                    current.insert(candidate);
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(candidate);
            }
        }
    }
    earliest
}

fn chrono_duration(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).expect("a representable duration")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> EventId {
        EventId::parse(&uuid::Uuid::from_u128(n).to_string()).unwrap()
    }

    #[test]
    fn key_lanes_keep_each_keys_records_in_order() {
        let keys = ["a", "b", "a", "c", "b", "a"];
        assert_eq!(
            lanes(RecordOrdering::Key, keys),
            vec![vec![0, 2, 5], vec![1, 4], vec![3]]
        );
    }

    #[test]
    fn partition_ordering_is_one_lane_and_unordered_one_per_record() {
        let keys = ["a", "b", "a"];
        assert_eq!(lanes(RecordOrdering::Partition, keys), vec![vec![0, 1, 2]]);
        assert_eq!(
            lanes(RecordOrdering::Unordered, keys),
            vec![vec![0], vec![1], vec![2]]
        );
        assert!(lanes(RecordOrdering::Partition, Vec::<&str>::new()).is_empty());
    }

    #[test]
    fn a_key_waits_behind_its_earliest_unfinished_record_not_being_handled() {
        let due = Utc::now();
        let row = |n: u128, key: &str, offset: i64| Unfinished {
            event_id: id(n),
            key: key.to_string(),
            offset,
            status: EventStatus::Failed,
            due,
        };
        let unfinished = vec![
            row(1, "a", 7),
            row(2, "a", 3),
            row(3, "b", 5),
            row(4, "c", 1),
        ];
        let handled = HashSet::from([id(4)]);
        let behind = waiting_behind(unfinished, &handled);
        assert_eq!(behind["a"].event_id, id(2));
        assert_eq!(behind["b"].offset, 5);
        assert!(
            !behind.contains_key("c"),
            "a record being handled orders itself"
        );
        assert!(behind["a"].holds(4));
        assert!(
            !behind["a"].holds(3),
            "a record does not wait behind itself"
        );
    }

    #[test]
    fn a_parked_record_is_looked_at_just_after_a_scheduled_retry_or_soon_behind_a_running_one() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(30);
        let scheduled = WaitingBehind::scheduled(id(1), 1, later);
        assert_eq!(
            scheduled.recheck_at(now),
            later + chrono::Duration::milliseconds(1)
        );
        let running = WaitingBehind {
            status: EventStatus::InProgress,
            ..scheduled.clone()
        };
        assert_eq!(
            running.recheck_at(now),
            now + chrono::Duration::milliseconds(1_001)
        );
        let overdue = WaitingBehind::scheduled(id(1), 1, now - chrono::Duration::seconds(5));
        assert_eq!(
            overdue.recheck_at(now),
            now + chrono::Duration::milliseconds(1)
        );
    }
}
