//! How a failure is treated, shared by every module's error type.
//!
//! | class              | meaning                                              | what the partition actor does                   |
//! |--------------------|------------------------------------------------------|-------------------------------------------------|
//! | `Retryable`        | transient, this event's (a deadlock, a lock wait)    | retries in place (1 s × 3), then dead-letters   |
//! | `Unavailable(dep)` | a dependency every record needs does not answer      | pauses the partition and retries with back-off until it answers; never dead-letters |
//! | `Permanent`        | this event can never succeed (bad data)              | dead-letters the event (alone: see batch isolation) |
//! | `Fatal`            | the domain actor's own state is broken               | the actor is restarted, the event retried       |
//!
//! The HTTP API answers `Unavailable` with 503 and `Retry-After`.

use serde::Serialize;

/// A dependency whose outage pauses the work that needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum Dependency {
    Mysql,
    Redis,
    Kafka,
    /// An external delivery target (a webhook or the analytics platform) failing for every
    /// event.
    DeliveryTarget,
    /// The ranking is being rebuilt from MySQL; counting waits until it is done.
    RankingRebuild,
}

impl Dependency {
    pub const ALL: [Dependency; 5] = [
        Dependency::Mysql,
        Dependency::Redis,
        Dependency::Kafka,
        Dependency::DeliveryTarget,
        Dependency::RankingRebuild,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Dependency::Mysql => "mysql",
            Dependency::Redis => "redis",
            Dependency::Kafka => "kafka",
            Dependency::DeliveryTarget => "deliveryTarget",
            Dependency::RankingRebuild => "rankingRebuild",
        }
    }
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorClass {
    Retryable,
    Unavailable(Dependency),
    Permanent,
    Fatal,
}

impl ErrorClass {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Unavailable(_) => "unavailable",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Fatal => "fatal",
        }
    }

    /// The dependency whose outage this is, if it is one.
    pub fn outage(&self) -> Option<Dependency> {
        match self {
            ErrorClass::Unavailable(dependency) => Some(*dependency),
            _ => None,
        }
    }

    pub fn is_unavailable(&self) -> bool {
        self.outage().is_some()
    }
}

/// Implemented by every error type a domain actor can meet.
pub trait Classify {
    fn class(&self) -> ErrorClass;
}

impl Classify for sqlx::Error {
    fn class(&self) -> ErrorClass {
        // MySQL/MariaDB error numbers that a second attempt can clear.
        const DEADLOCK: u16 = 1213;
        const LOCK_WAIT_TIMEOUT: u16 = 1205;
        const SERVER_GONE: u16 = 2006;
        const LOST_CONNECTION: u16 = 2013;
        const TOO_MANY_CONNECTIONS: u16 = 1040;
        match self {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_) => ErrorClass::Unavailable(Dependency::Mysql),
            sqlx::Error::Database(database_error) => {
                let number = database_error
                    .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .map(|mysql| mysql.number());
                match number {
                    Some(DEADLOCK | LOCK_WAIT_TIMEOUT) => ErrorClass::Retryable,
                    Some(SERVER_GONE | LOST_CONNECTION | TOO_MANY_CONNECTIONS) => {
                        ErrorClass::Unavailable(Dependency::Mysql)
                    }
                    _ => ErrorClass::Permanent,
                }
            }
            _ => ErrorClass::Permanent,
        }
    }
}

impl Classify for redis::RedisError {
    fn class(&self) -> ErrorClass {
        if self.is_io_error() || self.is_timeout() || self.is_connection_dropped() {
            ErrorClass::Unavailable(Dependency::Redis)
        } else {
            ErrorClass::Permanent
        }
    }
}

/// The text of a caught panic, prefixed with who panicked.
pub fn panic_message(name: &str, panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic".into());
    format!("{name} panicked: {text}")
}
