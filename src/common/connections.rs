//! Connections to MySQL and Redis.

use std::str::FromStr;
use std::time::Duration;

use redis::aio::ConnectionManager;
use secrecy::ExposeSecret;
use sqlx::MySqlPool;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use std::sync::Arc;

use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::common::error::{Classify, Dependency, ErrorClass};
use crate::config::{DatabaseSettings, RedisSettings};

/// Whether MySQL refused a row for a unique key another row holds.
pub fn is_duplicate_key(error: &sqlx::Error) -> bool {
    const DUPLICATE_ENTRY: u16 = 1062;
    error
        .as_database_error()
        .and_then(|error| error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|error| error.number() == DUPLICATE_ENTRY)
}

/// The schema, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("invalid database url: {0}")]
    InvalidUrl(sqlx::Error),
    #[error("cannot create database {database}: {source}")]
    CreateDatabase {
        database: String,
        source: sqlx::Error,
    },
    #[error("cannot connect to MySQL at {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        source: sqlx::Error,
    },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid redis url: {0}")]
    RedisUrl(redis::RedisError),
}

/// Creates the configured database when it does not exist yet.
pub async fn create_database_if_missing(
    settings: &DatabaseSettings,
) -> Result<(), ConnectionError> {
    let url = settings.url.expose_secret();
    let options = MySqlConnectOptions::from_str(url).map_err(ConnectionError::InvalidUrl)?;
    let database = options.get_database().unwrap_or_default().to_string();
    let failed = |source| ConnectionError::CreateDatabase {
        database: database.clone(),
        source,
    };
    if !sqlx::MySql::database_exists(url).await.map_err(failed)? {
        sqlx::MySql::create_database(url).await.map_err(failed)?;
        info!(database, "database created");
    }
    Ok(())
}

/// A connection pool. Use one pool per group of threads that outlive each other equally
/// (HTTP workers, actor arbiters): a connection belongs to the runtime that opened it.
///
/// Sessions run at READ COMMITTED. Correctness rests on locking reads of known rows,
/// conditional updates and unique keys, none of which needs REPEATABLE READ; what that level
/// adds, gap locks on every range an UPDATE scans, made the concurrent event-log inserts of
/// the intake deadlock with batch status updates.
pub async fn connect_mysql(
    settings: &DatabaseSettings,
    max_connections: u32,
) -> Result<MySqlPool, ConnectionError> {
    connect_mysql_waiting(
        settings,
        max_connections,
        Duration::from_millis(settings.acquire_timeout_ms),
    )
    .await
}

/// [`connect_mysql`] whose callers wait at most `acquire_timeout` for a connection.
pub async fn connect_mysql_waiting(
    settings: &DatabaseSettings,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<MySqlPool, ConnectionError> {
    let options = MySqlConnectOptions::from_str(settings.url.expose_secret())
        .map_err(ConnectionError::InvalidUrl)?;
    let (host, port) = (options.get_host().to_string(), options.get_port());
    MySqlPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(acquire_timeout)
        // No ping on every acquire (one round trip per statement run through the pool); idle
        // connections are closed before the server's wait_timeout would.
        .test_before_acquire(false)
        .idle_timeout(Some(Duration::from_secs(settings.idle_timeout_secs.max(1))))
        .after_connect(|connection, _| {
            Box::pin(async move {
                sqlx::query!("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .execute(connection)
                    .await
                    .map(|_| ())
            })
        })
        .connect_with(options)
        .await
        .map_err(|source| ConnectionError::Connect { host, port, source })
}

pub async fn migrate(pool: &MySqlPool) -> Result<(), ConnectionError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// How long a Redis command (or connecting) may take before it fails.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Redis through one multiplexed connection that the connection manager keeps alive.
#[derive(Clone)]
pub struct RedisConnection {
    client: redis::Client,
    connection: Arc<OnceCell<ConnectionManager>>,
    key_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisConnectionError {
    #[error("redis is not connected yet")]
    NotConnected,
    #[error("redis command failed: {0}")]
    Command(#[from] redis::RedisError),
}

impl Classify for RedisConnectionError {
    fn class(&self) -> ErrorClass {
        match self {
            RedisConnectionError::NotConnected => ErrorClass::Unavailable(Dependency::Redis),
            RedisConnectionError::Command(error) => error.class(),
        }
    }
}

impl RedisConnection {
    pub fn new(settings: &RedisSettings) -> Result<Self, ConnectionError> {
        let client =
            redis::Client::open(settings.url.expose_secret()).map_err(ConnectionError::RedisUrl)?;
        Ok(Self {
            client,
            connection: Arc::default(),
            key_prefix: settings.key_prefix.clone(),
        })
    }

    /// Connects on the current arbiter, which must live as long as the process: the
    /// connection's driver task runs there. When Redis is down, keeps trying in the
    /// background every second (readiness reports it meanwhile).
    pub async fn connect(&self) {
        if let Err(error) = self.try_connect().await {
            warn!(%error, "redis unavailable; retrying in the background");
            let store = self.clone();
            actix_rt::spawn(async move {
                while store.try_connect().await.is_err() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                info!("redis connected");
            });
        }
    }

    /// Connects once, now.
    pub async fn try_connect(&self) -> Result<(), redis::RedisError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        self.connection
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await?;
        Ok(())
    }

    /// The shared connection (cheap to clone).
    pub fn connection(&self) -> Result<ConnectionManager, RedisConnectionError> {
        self.connection
            .get()
            .cloned()
            .ok_or(RedisConnectionError::NotConnected)
    }

    /// `key` with this deployment's prefix.
    pub fn key(&self, key: &str) -> String {
        format!("{}{}", self.key_prefix, key)
    }

    pub async fn ping(&self) -> Result<(), RedisConnectionError> {
        let mut connection = self.connection()?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        Ok(())
    }
}
