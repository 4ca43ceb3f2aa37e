//! Wiring: builds every component from the settings, runs them, and shuts them down in
//! order.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use futures::future::join_all;
use tracing::{error, info, warn};
use tracing_actix_web::TracingLogger;

use crate::actors::ArbiterPool;
use crate::actors::consumer_group::{ConsumerGroup, ConsumerGroupSpec};
use crate::actors::domain::DomainActor;
use crate::actors::outbox_relay::{OutboxRelay, StopRelay};
use crate::actors::product_events::ProductEventProcessor;
use crate::actors::tree::ActorTree;
use crate::api::{self, AppState};
use crate::config::Settings;
use crate::event_log::EventLog;
use crate::kafka::cluster::KafkaCluster;
use crate::kafka::producer::EventPublisher;
use crate::kafka::topics;
use crate::outbox::Outbox;
use crate::stores::{self, RedisStore};

/// How long the producer may take to deliver what is queued at shutdown.
const PRODUCER_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The consumer group of `product-events`.
pub const PRODUCT_EVENT_GROUP: &str = "product-event-group";

/// Applies the migrations to the configured database (creating it if missing) and returns.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    stores::create_database_if_missing(&settings.database).await?;
    let pool = stores::connect_mysql(&settings.database, 1).await?;
    stores::migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

/// The running daemon.
pub struct Application {
    port: u16,
    server: Server,
    kafka: Arc<KafkaCluster>,
    publisher: EventPublisher,
    actors: ActorTree,
    arbiters: Arc<ArbiterPool>,
    redis: RedisStore,
}

impl Application {
    /// Connects the stores, applies migrations, starts Kafka (embedded or external), the
    /// actors and the HTTP listener. Must run inside an actix system.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        stores::create_database_if_missing(&settings.database).await?;
        let worker_pool =
            stores::connect_mysql(&settings.database, settings.database.max_connections).await?;
        stores::migrate(&worker_pool).await?;
        let http_pool =
            stores::connect_mysql(&settings.database, settings.database.max_connections).await?;

        let redis = RedisStore::new(&settings.redis)?;
        redis.connect().await;

        let kafka = Arc::new(KafkaCluster::connect(&settings.kafka)?);
        kafka
            .ensure_topics(&topics::all_with_dead_letters(), &settings.kafka)
            .await?;
        let bootstrap_servers = kafka.bootstrap_servers().to_string();
        let publisher = EventPublisher::new(&bootstrap_servers, &settings.kafka)?;

        let worker_event_log = EventLog::new(worker_pool);
        let arbiters = Arc::new(ArbiterPool::new(settings.kafka.consumer.partition_threads));

        let product_events = DomainActor::new(ProductEventProcessor, worker_event_log.clone())
            .start_supervised(&arbiters.next());
        let product_event_group = ConsumerGroup::start(
            ConsumerGroupSpec::from_settings(
                &settings,
                &bootstrap_servers,
                PRODUCT_EVENT_GROUP,
                BTreeMap::from([(
                    topics::PRODUCT_EVENTS.to_string(),
                    product_events.clone().recipient(),
                )]),
                publisher.clone(),
                worker_event_log.clone(),
            ),
            arbiters.clone(),
        )
        .context("cannot start the product-events consumer group")?;

        let outbox_relay = OutboxRelay::new(
            Outbox::new(worker_event_log, publisher.clone()),
            &settings.outbox,
        )
        .start();

        let actors = ActorTree {
            consumer_groups: vec![Arc::new(product_event_group)],
            domain_actors: vec![product_events.recipient()],
            outbox_relay: Some(outbox_relay),
        };

        let http_event_log = EventLog::new(http_pool);
        let state = web::Data::new(AppState {
            outbox: Outbox::new(http_event_log.clone(), publisher.clone()),
            event_log: http_event_log,
            redis: redis.clone(),
            publisher: publisher.clone(),
            actors: actors.clone(),
        });
        let listener = TcpListener::bind((settings.http.host.as_str(), settings.http.port))
            .with_context(|| {
                format!(
                    "cannot listen on {}:{}",
                    settings.http.host, settings.http.port
                )
            })?;
        let port = listener.local_addr()?.port();
        let server = HttpServer::new(move || {
            App::new()
                .wrap(api::json_errors())
                .wrap(TracingLogger::default())
                .app_data(state.clone())
                .configure(api::configure)
        })
        .workers(settings.http.workers.max(1))
        .shutdown_timeout(settings.http.shutdown_timeout_secs)
        .disable_signals()
        .listen(listener)?
        .run();
        info!(address = %format!("http://{}:{port}", settings.http.host), "HTTP listening");

        Ok(Self {
            port,
            server,
            kafka,
            publisher,
            actors,
            arbiters,
            redis,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn kafka(&self) -> Arc<KafkaCluster> {
        self.kafka.clone()
    }

    pub fn actors(&self) -> ActorTree {
        self.actors.clone()
    }

    pub fn publisher(&self) -> EventPublisher {
        self.publisher.clone()
    }

    pub fn redis(&self) -> RedisStore {
        self.redis.clone()
    }

    /// Serves until `shutdown` resolves, then stops in order: HTTP intake, partitions
    /// (drain and commit), the outbox relay, the producer (flush), and finally the HTTP
    /// server's remaining connections and the arbiters.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let server_handle = self.server.handle();
        let mut server = actix_rt::spawn(self.server);
        let server_result = tokio::select! {
            result = &mut server => Some(result),
            _ = shutdown => None,
        };
        if let Some(result) = server_result {
            error!(?result, "HTTP server stopped on its own; shutting down");
        }

        info!("shutdown: stopping HTTP intake");
        let http_stopped = actix_rt::spawn(server_handle.stop(true));

        info!("shutdown: draining partitions and committing offsets");
        join_all(
            self.actors
                .consumer_groups
                .iter()
                .map(|group| group.shutdown()),
        )
        .await;

        if let Some(relay) = &self.actors.outbox_relay {
            let _ = relay.send(StopRelay).await;
        }

        info!("shutdown: flushing the producer");
        let publisher = self.publisher.clone();
        match tokio::task::spawn_blocking(move || publisher.flush_blocking(PRODUCER_FLUSH_TIMEOUT))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                warn!(%error, "producer flush incomplete; unpublished events stay PENDING for the relay")
            }
            Err(error) => warn!(%error, "producer flush failed"),
        }

        info!("shutdown: closing connections");
        let _ = http_stopped.await;
        let _ = server.await;

        let arbiters = self.arbiters.clone();
        let kafka = self.kafka;
        let publisher = self.publisher;
        let _ = tokio::task::spawn_blocking(move || {
            arbiters.stop_blocking();
            // Releasing librdkafka handles joins their threads: keep it off the arbiters.
            drop(publisher);
            drop(kafka);
        })
        .await;
        info!("shutdown complete");
        Ok(())
    }
}
