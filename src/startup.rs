//! Wiring: builds every component from the settings, runs them, and shuts them down in
//! order.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Recipient};
use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use futures::future::join_all;
use tracing::{error, info, warn};
use tracing_actix_web::TracingLogger;

use crate::actors::ArbiterPool;
use crate::actors::consumer_group::{ConsumerGroup, ConsumerGroupSpec};
use crate::actors::domain::{DomainActor, ProcessBatch};
use crate::actors::tree::ActorTree;
use crate::api::{self, AppState};
use crate::clock::{SharedClock, SystemClock};
use crate::config::Settings;
use crate::coupons::intake::CouponIntake;
use crate::coupons::issuer::CouponIssuer;
use crate::coupons::locks::RedisLocks;
use crate::coupons::notifier::ResultNotifier;
use crate::coupons::sessions::Sessions;
use crate::coupons::store::CouponStore;
use crate::delivery::backoff::BackoffPolicy;
use crate::delivery::forwarder::ExternalForwarder;
use crate::delivery::scheduler::{RetryScheduler, RetrySchedulerWiring, StopScheduler};
use crate::delivery::webhook::{Target, WebhookDeliverer};
use crate::event_log::EventLog;
use crate::events::EventType;
use crate::kafka::cluster::KafkaCluster;
use crate::kafka::consumer::UncommittedStart;
use crate::kafka::dead_letter::DeadLetters;
use crate::kafka::producer::EventPublisher;
use crate::kafka::topics;
use crate::outbox::Outbox;
use crate::outbox::relay::{OutboxRelay, StopRelay};
use crate::ranking::RankingStore;
use crate::ranking::updater::RankingUpdater;
use crate::shop::cache::ProductCache;
use crate::shop::product_events::ProductEventProcessor;
use crate::shop::store::ShopStore;
use crate::stores::{self, RedisStore};

/// How long a product stays in the Redis cache without a change.
const PRODUCT_CACHE_TTL: Duration = Duration::from_secs(3_600);
/// How long the producer may take to deliver what is queued at shutdown.
const PRODUCER_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The consumer group of `product-events`.
pub const PRODUCT_EVENT_GROUP: &str = "product-event-group";
/// The consumer group of `coupon-requests` (the CouponIssuer).
pub const COUPON_REQUEST_GROUP: &str = "coupon-request-group";
/// Each instance's consumer group of `coupon-results` is this prefix and the instance id.
pub const RESULT_NOTIFIER_GROUP_PREFIX: &str = "coupon-result-notifier-";
/// The consumer group of `order-completed` that keeps the ranking (the RankingUpdater).
pub const RANKING_GROUP: &str = "ranking-updater-group";
/// The consumer group of `order-completed` that sends orders to analytics.
pub const ORDER_ANALYTICS_GROUP: &str = "order-analytics-group";
/// The consumer group of `external-events` (the ExternalForwarder).
pub const EXTERNAL_EVENT_GROUP: &str = "external-event-group";
/// How long shutdown waits for the retry scheduler's running attempts.
const SCHEDULER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts consumer groups with the shared settings.
struct GroupFactory<'a> {
    settings: &'a Settings,
    bootstrap_servers: &'a str,
    publisher: &'a EventPublisher,
    event_log: &'a EventLog,
    arbiters: &'a Arc<ArbiterPool>,
}

impl GroupFactory<'_> {
    fn start(
        &self,
        group: &str,
        topic: &str,
        domain: Recipient<ProcessBatch>,
        customize: impl FnOnce(&mut ConsumerGroupSpec),
    ) -> anyhow::Result<ConsumerGroup> {
        let mut spec = ConsumerGroupSpec::from_settings(
            self.settings,
            self.bootstrap_servers,
            group,
            BTreeMap::from([(topic.to_string(), domain)]),
            self.publisher.clone(),
            self.event_log.clone(),
        );
        customize(&mut spec);
        ConsumerGroup::start(spec, self.arbiters.clone())
            .with_context(|| format!("cannot start consumer group {group} on {topic}"))
    }
}

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
    sessions: Sessions,
}

impl Application {
    /// Connects the stores, applies migrations, starts Kafka (embedded or external), the
    /// actors and the HTTP listener. Must run inside an actix system.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// [`Application::build`] with the clock the retry schedule reads (tests move it).
    pub async fn build_with_clock(settings: Settings, clock: SharedClock) -> anyhow::Result<Self> {
        // Bad external settings fail the start, before anything is running.
        let external_targets = WebhookDeliverer::external_targets(&settings.external)?;
        let delivers_externally = !external_targets.is_empty();
        let mut targets = external_targets;
        targets.insert(
            EventType::OrderCompleted,
            if settings.analytics.url.is_empty() {
                Target::File(PathBuf::from(&settings.analytics.file))
            } else {
                Target::Http(settings.analytics.url.clone())
            },
        );
        let deliverer = WebhookDeliverer::from_settings(targets, &settings.external)?;
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

        // The CouponIssuer and the ResultNotifier run on their own arbiters; each gets a pool
        // whose connections are opened (and their I/O driven) there.
        let issuer_pool =
            stores::connect_mysql(&settings.database, settings.database.max_connections).await?;
        let notifier_pool =
            stores::connect_mysql(&settings.database, settings.database.max_connections).await?;
        let worker_event_log = EventLog::new(worker_pool.clone());
        let worker_outbox = Outbox::new(worker_event_log.clone(), publisher.clone());
        let arbiters = Arc::new(ArbiterPool::new(settings.kafka.consumer.partition_threads));
        let sessions = Sessions::default();
        let groups = GroupFactory {
            settings: &settings,
            bootstrap_servers: &bootstrap_servers,
            publisher: &publisher,
            event_log: &worker_event_log,
            arbiters: &arbiters,
        };

        let product_cache = ProductCache::new(redis.clone(), PRODUCT_CACHE_TTL);
        let product_events = DomainActor::new(
            ProductEventProcessor::new(product_cache.clone()),
            worker_event_log.clone(),
        )
        .start_supervised(&arbiters.next());
        let product_event_group = groups.start(
            PRODUCT_EVENT_GROUP,
            topics::PRODUCT_EVENTS,
            product_events.clone().recipient(),
            |_| {},
        )?;

        let coupon_issuer = DomainActor::new(
            CouponIssuer::new(
                CouponStore::new(issuer_pool.clone()),
                Outbox::new(EventLog::new(issuer_pool), publisher.clone()),
                RedisLocks::new(
                    redis.clone(),
                    Duration::from_millis(settings.coupons.lock_ttl_ms),
                ),
            ),
            worker_event_log.clone(),
        )
        .start_supervised(&arbiters.next());
        let coupon_request_group = groups.start(
            COUPON_REQUEST_GROUP,
            topics::COUPON_REQUESTS,
            coupon_issuer.clone().recipient(),
            |_| {},
        )?;

        let result_notifier = DomainActor::new(
            ResultNotifier::new(sessions.clone(), EventLog::new(notifier_pool)),
            worker_event_log.clone(),
        )
        .start_supervised(&arbiters.next());
        let result_notifier_group = groups.start(
            &format!("{RESULT_NOTIFIER_GROUP_PREFIX}{}", settings.instance.id),
            topics::COUPON_RESULTS,
            result_notifier.clone().recipient(),
            // An instance's own group only serves its live sessions: a new instance starts
            // at the end of the results, not with the history of every result.
            |spec| spec.uncommitted_start = UncommittedStart::End,
        )?;

        let ranking = RankingStore::new(redis.clone(), settings.ranking.retention_days);
        let ranking_updater = DomainActor::new(
            RankingUpdater::new(ranking.clone()),
            worker_event_log.clone(),
        )
        .start_supervised(&arbiters.next());
        let ranking_group = groups.start(
            RANKING_GROUP,
            topics::ORDER_COMPLETED,
            ranking_updater.clone().recipient(),
            |_| {},
        )?;

        // Deliveries (external webhooks, analytics) share one retry scheduler.
        let external = &settings.external;
        let lease = Duration::from_millis(external.lease_ms);
        let dead_letters_of =
            |group: &str| DeadLetters::new(publisher.clone(), worker_event_log.clone(), group);
        let wiring = RetrySchedulerWiring {
            event_log: worker_event_log.clone(),
            event_types: deliverer.event_types(),
            deliverer: deliverer.clone(),
            dead_letters: BTreeMap::from([
                (
                    topics::EXTERNAL_EVENTS.to_string(),
                    dead_letters_of(EXTERNAL_EVENT_GROUP),
                ),
                (
                    topics::ORDER_COMPLETED.to_string(),
                    dead_letters_of(ORDER_ANALYTICS_GROUP),
                ),
            ]),
            policy: BackoffPolicy::from_settings(&external.backoff),
            clock: clock.clone(),
            lease,
            poll_interval: Duration::from_millis(external.poll_interval_ms.max(1)),
            claim_batch: external.claim_batch.max(1),
            alert_url: Some(external.alert_url.clone()).filter(|url| !url.is_empty()),
        };
        let scheduler =
            RetryScheduler::start_in_arbiter(&arbiters.next(), |_| RetryScheduler::new(wiring));
        let forwarder = |name: &'static str| {
            DomainActor::new(
                ExternalForwarder::new(
                    name,
                    deliverer.clone(),
                    worker_event_log.clone(),
                    scheduler.clone(),
                    clock.clone(),
                    lease,
                ),
                worker_event_log.clone(),
            )
            .start_supervised(&arbiters.next())
        };
        let mut deliveries = Vec::new();
        let analytics = forwarder("OrderAnalytics");
        let analytics_group = groups.start(
            ORDER_ANALYTICS_GROUP,
            topics::ORDER_COMPLETED,
            analytics.clone().recipient(),
            |_| {},
        )?;
        deliveries.push((analytics.recipient(), analytics_group));
        if delivers_externally {
            let external_forwarder = forwarder("ExternalForwarder");
            let group = groups.start(
                EXTERNAL_EVENT_GROUP,
                topics::EXTERNAL_EVENTS,
                external_forwarder.clone().recipient(),
                |_| {},
            )?;
            deliveries.push((external_forwarder.recipient(), group));
        } else {
            info!("external.base_url is empty: external-events is not consumed");
        }

        let outbox_relay = OutboxRelay::new(worker_outbox.clone(), &settings.outbox).start();
        let intake = CouponIntake::start(
            worker_outbox,
            settings.coupons.intake_writers,
            settings.coupons.intake_max_batch,
        );

        let mut actors = ActorTree {
            consumer_groups: vec![
                Arc::new(coupon_request_group),
                Arc::new(result_notifier_group),
                Arc::new(product_event_group),
                Arc::new(ranking_group),
            ],
            domain_actors: vec![
                coupon_issuer.recipient(),
                result_notifier.recipient(),
                product_events.recipient(),
                ranking_updater.recipient(),
            ],
            outbox_relay: Some(outbox_relay),
            retry_scheduler: Some(scheduler),
        };
        for (forwarder, group) in deliveries {
            actors.consumer_groups.push(Arc::new(group));
            actors.domain_actors.push(forwarder);
        }

        let http_event_log = EventLog::new(http_pool.clone());
        let state = web::Data::new(AppState {
            outbox: Outbox::new(http_event_log.clone(), publisher.clone()),
            event_log: http_event_log,
            redis: redis.clone(),
            publisher: publisher.clone(),
            actors: actors.clone(),
            coupons: CouponStore::new(http_pool.clone()),
            intake,
            sessions: sessions.clone(),
            max_total_quantity: settings.coupons.max_total_quantity,
            shop: ShopStore::new(http_pool.clone()),
            clock: clock.clone(),
            ranking,
            product_cache,
            max_ranking_days: settings
                .ranking
                .max_days
                .min(settings.ranking.retention_days),
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
            sessions,
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
    /// (drain and commit), the outbox relay, the producer (flush), WebSocket and SSE
    /// sessions with the HTTP server's remaining connections, and the arbiters.
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
        if let Some(scheduler) = &self.actors.retry_scheduler {
            let _ = scheduler
                .send(StopScheduler {
                    timeout: SCHEDULER_STOP_TIMEOUT,
                })
                .await;
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

        info!("shutdown: closing WebSocket and SSE sessions and remaining connections");
        self.sessions.close_all();
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
