//! Kafka plumbing: the cluster (embedded mock or real), the producer, consumer groups with
//! split partition queues, and dead-letter topics.

pub mod cluster;
pub mod consumer;
pub mod dead_letter;
pub mod producer;

use std::fmt;

use serde::Serialize;

/// The design document's topics.
pub mod topics {
    pub const COUPON_REQUESTS: &str = "coupon-requests";
    pub const COUPON_RESULTS: &str = "coupon-results";
    pub const ORDER_COMPLETED: &str = "order-completed";
    pub const EXTERNAL_EVENTS: &str = "external-events";
    pub const PRODUCT_EVENTS: &str = "product-events";

    pub const ALL: [&str; 5] = [
        COUPON_REQUESTS,
        COUPON_RESULTS,
        ORDER_COMPLETED,
        EXTERNAL_EVENTS,
        PRODUCT_EVENTS,
    ];

    /// Where records of `topic` that cannot be processed go.
    pub fn dead_letter_topic(topic: &str) -> String {
        format!("{topic}.DLT")
    }

    /// Every topic the daemon makes sure exists: the business topics and their dead-letter
    /// topics.
    pub fn all_with_dead_letters() -> Vec<String> {
        ALL.iter()
            .flat_map(|topic| [topic.to_string(), dead_letter_topic(topic)])
            .collect()
    }
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
