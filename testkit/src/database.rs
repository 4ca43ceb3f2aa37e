//! A test's own database, Redis key prefix and embedded Kafka cluster (its settings), and
//! the tests' log.

use std::sync::Once;

use commerce_events::config::{LogFormat, LogSettings, Settings};
use commerce_events::observability::logging;
use secrecy::SecretString;
use sqlx::Connection;
use uuid::Uuid;

pub const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";

/// The HS256 secret of the tests' daemons.
pub const TEST_JWT_SECRET: &str = "test-secret-of-the-commerce-events-suite";

/// Logs go to the test output when `TEST_LOG` is set (`TEST_LOG=debug cargo test`).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            logging::init(&LogSettings {
                filter,
                format: LogFormat::Pretty,
            });
        }
    });
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub fn new() -> Self {
        Self {
            name: format!("test_{}", Uuid::new_v4().simple()),
        }
    }

    pub fn url(&self) -> String {
        format!("{MYSQL_SERVER}/{}", self.name)
    }

    /// Settings for a test: its own database and Redis key prefix, an embedded cluster of
    /// one broker, an ephemeral HTTP port and short delays.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::default();
        settings.http.port = 0;
        settings.http.workers = 1;
        settings.http.shutdown_timeout_secs = 2;
        settings.database.url = SecretString::from(self.url());
        settings.database.max_connections = 4;
        settings.database.http_max_connections = 4;
        settings.redis.key_prefix = format!("{}:", self.name);
        settings.kafka.embedded_brokers = 1;
        settings.kafka.consumer.fetch_wait_max_ms = 50;
        settings.kafka.consumer.fetch_min_bytes = 1;
        settings.kafka.consumer.drain_timeout_ms = 3_000;
        settings.kafka.consumer.session_timeout_ms = 6_000;
        settings.kafka.consumer.heartbeat_interval_ms = 1_000;
        settings.kafka.consumer.partition_threads = 2;
        settings.retry.delay_ms = 50;
        settings.outbox.poll_interval_ms = 100;
        settings.outbox.republish_after_ms = 2_000;
        settings.instance.id = "test".into();
        settings.auth.jwt_secret = SecretString::from(TEST_JWT_SECRET);
        // Limits a test's bursts never meet; the rate-limit tests set their own.
        let generous = commerce_events::config::RateLimit {
            per_second: 100_000.0,
            burst: 100_000,
        };
        settings.limits.coupon_issue = generous;
        settings.limits.order_create = generous;
        settings.limits.payment = generous;
        settings.limits.charge = generous;
        settings.limits.anonymous = generous;
        settings.analytics.file = std::env::temp_dir()
            .join(format!("{}-analytics.jsonl", self.name))
            .to_string_lossy()
            .into_owned();
        settings
    }
}

impl Default for TestDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropping happens outside any runtime the test may still be driving.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async move {
                    if let Ok(mut connection) = sqlx::MySqlConnection::connect(MYSQL_SERVER).await {
                        drop_database(&mut connection, &name).await;
                    }
                });
            }
        })
        .join();
    }
}

/// Drops the database of a test whose daemon may still run. The daemon's connections are
/// killed first: the test's thread, now blocked here, may drive one of them in the middle of
/// a transaction, whose metadata lock would hold `DROP DATABASE` forever.
async fn drop_database(connection: &mut sqlx::MySqlConnection, name: &str) {
    let _ = sqlx::query("SET SESSION lock_wait_timeout = 5")
        .execute(&mut *connection)
        .await;
    for _ in 0..5 {
        let sessions: Vec<u64> =
            sqlx::query_scalar("SELECT id FROM information_schema.processlist WHERE db = ?")
                .bind(name)
                .fetch_all(&mut *connection)
                .await
                .unwrap_or_default();
        for session in sessions {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL CONNECTION {session}")))
                .execute(&mut *connection)
                .await;
        }
        let statement = format!("DROP DATABASE IF EXISTS `{name}`");
        if sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut *connection)
            .await
            .is_ok()
        {
            return;
        }
    }
}
