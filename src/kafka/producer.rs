//! The one producer of the process, configured as the design document says.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::common::error::{Classify, Dependency, ErrorClass};
use crate::config::KafkaSettings;
use crate::events::EventEnvelope;
use crate::kafka::client_config;
use crate::kafka::close_when_unshared;
use crate::kafka::consumer::TracingContext;

/// Header carrying the event id, so tools can see it without decoding the value.
pub const EVENT_ID_HEADER: &str = "event-id";
/// Header carrying the event type.
pub const EVENT_TYPE_HEADER: &str = "event-type";
/// Header carrying the id of the instance that produced the record (`instance.id`), so a
/// record that arrived late or twice can be traced to the daemon that sent it.
pub const PRODUCER_HEADER: &str = "producer-instance";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot create the Kafka producer: {0}")]
    Create(KafkaError),
    #[error("publishing to {topic} failed: {source}")]
    Delivery { topic: String, source: KafkaError },
}

impl Classify for PublishError {
    fn class(&self) -> ErrorClass {
        match self {
            PublishError::Create(_) => ErrorClass::Fatal,
            PublishError::Delivery { .. } => ErrorClass::Unavailable(Dependency::Kafka),
        }
    }
}

/// Where a record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// A record to publish as it is (dead letters keep the original bytes).
pub struct RawRecord<'a> {
    pub topic: &'a str,
    pub partition: Option<i32>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, String)>,
}

/// Cheap to clone; every clone shares one librdkafka producer.
#[derive(Clone)]
pub struct EventPublisher {
    producer: Arc<FutureProducer<TracingContext>>,
    /// This instance's id, in every event record's [`PRODUCER_HEADER`].
    instance: Arc<str>,
    /// Records whose delivery failed (after librdkafka's own retries).
    failures: Arc<AtomicU64>,
}

impl EventPublisher {
    /// A publisher whose event records name `instance` as their producer.
    pub fn new(
        bootstrap_servers: &str,
        settings: &KafkaSettings,
        instance: &str,
    ) -> Result<Self, PublishError> {
        let producer: FutureProducer<TracingContext> = producer_config(bootstrap_servers, settings)
            .create_with_context(TracingContext::new("producer"))
            .map_err(PublishError::Create)?;
        Ok(Self {
            producer: Arc::new(producer),
            instance: instance.into(),
            failures: Arc::default(),
        })
    }

    /// How many records this publisher failed to deliver since it started.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Publishes an event with its key; resolves once the broker acknowledged it
    /// (acks=all).
    pub async fn publish(
        &self,
        topic: &str,
        envelope: &EventEnvelope,
    ) -> Result<Delivered, PublishError> {
        let value = envelope.encode();
        let event_id = envelope.event_id.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: EVENT_ID_HEADER,
                value: Some(event_id.as_str()),
            })
            .insert(Header {
                key: EVENT_TYPE_HEADER,
                value: Some(envelope.event_type().as_str()),
            })
            .insert(Header {
                key: PRODUCER_HEADER,
                value: Some(&*self.instance),
            });
        if let Some(traceparent) = &envelope.traceparent {
            headers = headers.insert(Header {
                key: crate::observability::trace::TRACEPARENT,
                value: Some(traceparent.as_str()),
            });
        }
        let record = FutureRecord::to(topic)
            .key(envelope.key.as_bytes())
            .payload(&value)
            .headers(headers);
        self.send(topic, record).await
    }

    /// Publishes bytes as they are, with the headers given and [`PRODUCER_HEADER`].
    pub async fn publish_raw(&self, raw: RawRecord<'_>) -> Result<Delivered, PublishError> {
        let mut headers = OwnedHeaders::new_with_capacity(raw.headers.len() + 1);
        for (key, value) in &raw.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        headers = headers.insert(Header {
            key: PRODUCER_HEADER,
            value: Some(&*self.instance),
        });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(raw.topic).headers(headers);
        if let Some(partition) = raw.partition {
            record = record.partition(partition);
        }
        if let Some(key) = raw.key {
            record = record.key(key);
        }
        if let Some(value) = raw.value {
            record = record.payload(value);
        }
        self.send(raw.topic, record).await
    }

    async fn send<K, P>(
        &self,
        topic: &str,
        record: FutureRecord<'_, K, P>,
    ) -> Result<Delivered, PublishError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        // A full local queue is waited out (the delivery timeout bounds the wait).
        match self.producer.send(record, Timeout::Never).await {
            Ok(delivery) => {
                crate::observability::metrics::record_produced(topic);
                Ok(Delivered {
                    partition: delivery.partition,
                    offset: delivery.offset,
                })
            }
            Err((source, _message)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                crate::observability::metrics::record_produce_failed(topic);
                Err(PublishError::Delivery {
                    topic: topic.to_string(),
                    source,
                })
            }
        }
    }

    /// Waits for every queued record to be delivered. Blocks: call from a blocking thread.
    pub fn flush_blocking(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    /// Releases the producer once this is its last handle, waiting up to `timeout` for the
    /// others (the actors that publish) to go. Returns whether it is closed (see
    /// [`close_when_unshared`]). Blocks: call from a blocking thread.
    pub fn close_blocking(self, timeout: Duration) -> bool {
        close_when_unshared(self.producer, std::time::Instant::now() + timeout)
    }

    /// Blocks for up to `timeout` asking the cluster for its metadata; used by readiness.
    pub fn check_cluster_blocking(&self, timeout: Duration) -> Result<usize, KafkaError> {
        let metadata = self.producer.client().fetch_metadata(None, timeout)?;
        Ok(metadata.brokers().len())
    }
}

fn producer_config(bootstrap_servers: &str, settings: &KafkaSettings) -> ClientConfig {
    let producer = &settings.producer;
    let properties = [
        ("bootstrap.servers", bootstrap_servers.to_string()),
        ("client.id", settings.client_id.clone()),
        ("acks", producer.acks.clone()),
        (
            "enable.idempotence",
            producer.enable_idempotence.to_string(),
        ),
        ("compression.type", producer.compression_type.clone()),
        ("linger.ms", producer.linger_ms.to_string()),
        ("batch.size", producer.batch_size.to_string()),
        (
            "queue.buffering.max.kbytes",
            (producer.buffer_memory / 1024).max(1).to_string(),
        ),
        (
            "max.in.flight.requests.per.connection",
            producer.max_in_flight.to_string(),
        ),
        ("retries", producer.retries.to_string()),
        (
            "delivery.timeout.ms",
            producer.delivery_timeout_ms.to_string(),
        ),
        (
            "request.timeout.ms",
            producer.request_timeout_ms.to_string(),
        ),
    ];
    client_config(properties, &producer.extra)
}
