//! Wiring: builds every component from the settings, runs them, and shuts them down in
//! order. [`Application::build_with_clock`] reads as the list of its steps: the connections, Kafka,
//! then each slice's actors and consumer groups, the outbox relay, and the HTTP server.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, Supervisor};
use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use futures::future::join_all;
use sqlx::MySqlPool;
use tracing::{error, info, warn};
use tracing_actix_web::TracingLogger;

use crate::actors::ArbiterPool;
use crate::actors::consumer_group::{ConsumerGroup, ConsumerGroupSpec};
use crate::actors::domain::{DomainActor, DomainHandler, PipelineProbes};
use crate::actors::lag::{LagMonitor, LagView};
use crate::actors::tree::ActorTree;
use crate::api::error::BodyLimits;
use crate::api::{
    self, AppState, CouponsState, LimitsState, OperationsState, RankingState, ShopState,
};
use crate::common::clock::{SharedClock, SystemClock};
use crate::common::connections::{self, RedisConnection};
use crate::config::{RecordOrdering, Settings};
use crate::coupons::intake::CouponIntake;
use crate::coupons::issuer::CouponIssuer;
use crate::coupons::locks::RedisLocks;
use crate::coupons::notifier::ResultNotifier;
use crate::coupons::owners::PartitionOwners;
use crate::coupons::sessions::PushTickets;
use crate::coupons::sessions::Sessions;
use crate::coupons::settlement::ResultSettlement;
use crate::coupons::store::CouponStore;
use crate::delivery::backoff::BackoffPolicy;
use crate::delivery::forwarder::Forwarder;
use crate::delivery::scheduler::{RetryScheduler, StopScheduler};
use crate::delivery::webhook::WebhookDeliverer;
use crate::delivery::{self, Deliveries, DeliveriesWiring};
use crate::event_log::EventLog;
use crate::event_log::progress::{ConsumerSpec, RecordedIn};
use crate::events::topics;
use crate::guards::limits::RateLimiter;
use crate::guards::tokens::Authenticator;
use crate::kafka::cluster::KafkaCluster;
use crate::kafka::consumer::UncommittedStart;
use crate::kafka::dead_letter::DeadLetterLog;
use crate::kafka::dead_letter::DeadLetters;
use crate::kafka::offsets::GroupOffsets;
use crate::kafka::producer::EventPublisher;
use crate::observability::outages::Outages;
use crate::outbox::reconciler::{Reconciler, ReconcilerWiring, StopReconciler};
use crate::outbox::relay::{OutboxRelay, StopRelay};
use crate::outbox::settlement::{Consumers, RowSettlement, Settlement};
use crate::outbox::{Outbox, OutboxBacklogView, PublishedMarks};
use crate::ranking::RankingStore;
use crate::ranking::rebuild::{RebuildReport, rebuild};
use crate::ranking::settlement::RankingSettlement;
use crate::ranking::updater::RankingUpdater;
use crate::shop::cache::ProductCache;
use crate::shop::orders::{OrderIntake, Orders};
use crate::shop::payments::{PaymentIntake, Payments};
use crate::shop::product_events::ProductEventProcessor;
use crate::shop::store::ShopStore;

/// How long a product stays in the Redis cache without a change.
const PRODUCT_CACHE_TTL: Duration = Duration::from_secs(3_600);
/// How long the spans still queued may take to reach the trace collector at shutdown.
const SPANS_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the producer may take to deliver what is queued at shutdown.
const PRODUCER_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits, once the actors have stopped, for the last handles on the
/// producer and on each offset client.
const CLIENT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the retry scheduler's running attempts.
const SCHEDULER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Applies the migrations to the configured database (creating it if missing) and returns.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    connections::create_database_if_missing(&settings.database).await?;
    let pool = connections::connect_mysql(&settings.database, 1).await?;
    connections::migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

/// Rebuilds the ranking from MySQL (the `rebuild-ranking` command).
pub async fn rebuild_ranking(settings: &Settings) -> anyhow::Result<RebuildReport> {
    let pool = connections::connect_mysql(&settings.database, 2).await?;
    let redis = RedisConnection::new(&settings.redis)?;
    redis
        .try_connect()
        .await
        .context("cannot connect to Redis")?;
    let ranking = RankingStore::new(redis, settings.ranking.retention_days);
    let report = rebuild(
        &ranking,
        &EventLog::new(pool.clone()),
        chrono::Utc::now().date_naive(),
    )
    .await?;
    pool.close().await;
    Ok(report)
}

/// The running daemon.
pub struct Application {
    port: u16,
    server: Server,
    kafka: Arc<KafkaCluster>,
    publisher: EventPublisher,
    actors: ActorTree,
    relay: Addr<OutboxRelay>,
    scheduler: Addr<RetryScheduler>,
    reconciler: Addr<Reconciler>,
    group_offsets: Arc<GroupOffsets>,
    arbiters: Arc<ArbiterPool>,
    sessions: Sessions,
    spans: crate::observability::otlp::Spans,
}

/// What every slice is wired from.
struct Wiring {
    settings: Settings,
    clock: SharedClock,
    /// The actors' pool. The HTTP handlers have their own (see [`Connections`]).
    outbox: Outbox,
    /// The writer that marks published rows in batches, for both outboxes; on an actors'
    /// arbiter, through the actors' pool (HTTP workers stop first).
    published_marks: PublishedMarks,
    redis: RedisConnection,
    publisher: EventPublisher,
    bootstrap_servers: String,
    arbiters: Arc<ArbiterPool>,
    probes: PipelineProbes,
    /// Where the partitions report the outages they wait out.
    outages: Outages,
    /// The consumers started so far, each with its settlement.
    consumers: Vec<Arc<dyn Settlement>>,
    /// Every long-lived actor, as it is started.
    tree: ActorTree,
}

/// A consumer to start: its domain actor's name, group, topic, where it records its
/// progress, and the settlement that reads it there (none: the event's own row).
struct Consumer<'a> {
    name: &'static str,
    group: &'a str,
    topic: &'static str,
    recorded_in: RecordedIn,
    settlement: Option<MakeSettlement>,
}

type MakeSettlement = Box<dyn FnOnce(ConsumerSpec) -> Arc<dyn Settlement>>;

impl<'a> Consumer<'a> {
    fn recording_in_rows(name: &'static str, group: &'a str, topic: &'static str) -> Self {
        Self {
            name,
            group,
            topic,
            recorded_in: RecordedIn::EventLog,
            settlement: None,
        }
    }
}

/// The connections of one daemon.
///
/// Two MySQL pools, for one reason: a connection is registered with the I/O driver of the
/// runtime that opened it, and the HTTP workers' runtimes end first at shutdown while the
/// actors still drain their partitions. The actors' connections must not come from them.
struct Connections {
    /// Opened and used by the actors' arbiters (`database.max_connections`).
    actors: MySqlPool,
    /// Opened and used by the HTTP workers (`database.http_max_connections`).
    http: MySqlPool,
    redis: RedisConnection,
}

impl Connections {
    async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        connections::create_database_if_missing(&settings.database).await?;
        let actors =
            connections::connect_mysql(&settings.database, settings.database.max_connections)
                .await?;
        connections::migrate(&actors).await?;
        let http = connections::connect_mysql_waiting(
            &settings.database,
            settings.database.http_max_connections,
            Duration::from_millis(settings.database.http_acquire_timeout_ms),
        )
        .await?;
        let redis = RedisConnection::new(&settings.redis)?;
        redis.connect().await;
        Ok(Self {
            actors,
            http,
            redis,
        })
    }
}

/// Starts the embedded cluster or points at the configured one, and makes sure the topics
/// exist.
async fn connect_kafka(settings: &Settings) -> anyhow::Result<(Arc<KafkaCluster>, EventPublisher)> {
    let kafka = Arc::new(KafkaCluster::connect(&settings.kafka)?);
    kafka
        .ensure_topics(&topics::all_with_dead_letters(), &settings.kafka)
        .await?;
    let publisher = EventPublisher::new(
        kafka.bootstrap_servers(),
        &settings.kafka,
        &settings.instance.id,
    )?;
    Ok((kafka, publisher))
}

impl Wiring {
    /// The wiring of the actors: on the actors' pool, with no actor started yet.
    fn new(
        settings: Settings,
        clock: SharedClock,
        connections: &Connections,
        kafka: &KafkaCluster,
        publisher: EventPublisher,
        arbiters: Arc<ArbiterPool>,
        spans: &crate::observability::otlp::Spans,
    ) -> Self {
        let actors_event_log = EventLog::new(connections.actors.clone());
        let published_marks = PublishedMarks::start(&arbiters.next(), actors_event_log.clone());
        Self {
            outbox: Outbox::new(actors_event_log.clone(), publisher.clone())
                .with_marks(published_marks.clone()),
            published_marks,
            probes: PipelineProbes::new(actors_event_log).with_spans(spans.clone()),
            redis: connections.redis.clone(),
            publisher,
            bootstrap_servers: kafka.bootstrap_servers().to_string(),
            arbiters,
            clock,
            tree: ActorTree::default(),
            consumers: Vec::new(),
            outages: Outages::new(
                Duration::from_secs(settings.retry.outage_alert_after_secs),
                Some(settings.external.alert_url.clone()).filter(|url| !url.is_empty()),
            ),
            settings,
        }
    }

    fn event_log(&self) -> &EventLog {
        self.outbox.event_log()
    }

    /// Adds the push sessions' counters and the outages to the actor tree's views.
    fn observe_sessions_and_outages(&mut self, sessions: &Sessions) {
        let observed_sessions = sessions.clone();
        self.tree.views.push((
            "pushSessions",
            Arc::new(move || {
                serde_json::to_value(observed_sessions.state()).expect("session counters serialize")
            }),
        ));
        let observed_outages = self.outages.clone();
        self.tree.views.push((
            "outages",
            Arc::new(move || {
                serde_json::to_value(observed_outages.state()).expect("outages serialize")
            }),
        ));
    }

    /// What the HTTP handlers work with. They have their own MySQL pool (see [`Connections`]),
    /// and their own outbox on it.
    fn app_state(
        &self,
        connections: &Connections,
        sessions: &Sessions,
        auth: Authenticator,
        started: StartedForHttp,
    ) -> AppState {
        let settings = &self.settings;
        let http_outbox = Outbox::new(
            EventLog::new(connections.http.clone()),
            self.publisher.clone(),
        )
        .with_marks(self.published_marks.clone());
        AppState {
            auth,
            limits: LimitsState {
                limiter: RateLimiter::new(connections.redis.clone()),
                settings: settings.limits.clone(),
                trusted_proxy_header: settings.http.trusted_proxy_header.clone(),
            },
            coupons: coupons_state(
                settings,
                connections,
                &http_outbox,
                sessions,
                started.intake,
            ),
            shop: ShopState {
                store: ShopStore::new(http_outbox.clone()),
                cache: started.product_cache,
                orders: started.orders,
                payments: started.payments,
            },
            ranking: RankingState {
                store: started.ranking,
                max_days: settings
                    .ranking
                    .max_days
                    .min(settings.ranking.retention_days),
            },
            operations: OperationsState {
                event_log: http_outbox.event_log().clone(),
                outbox: http_outbox,
                redis: connections.redis.clone(),
                publisher: self.publisher.clone(),
                actors: self.tree.clone(),
                scheduler: started.scheduler,
                reconciler: started.reconciler,
                outages: self.outages.clone(),
                dead_letters: DeadLetterLog::new(connections.http.clone()),
                consumers: Consumers::new(self.consumers.clone()),
                pools: vec![
                    ("actors", connections.actors.clone()),
                    ("http", connections.http.clone()),
                ],
                lag: started.lag,
                outbox_backlog: started.outbox_backlog,
                dashboard_interval_ms: settings.metrics.dashboard_interval_ms,
            },
            clock: self.clock.clone(),
        }
    }

    /// Starts a domain actor (its handler built by `factory` on the actor's arbiter) and the
    /// consumer group `group` feeding it `topic`.
    fn consume<H: DomainHandler>(
        &mut self,
        consumer: Consumer<'_>,
        factory: impl Fn() -> H + Send + 'static,
        customize: impl FnOnce(&mut ConsumerGroupSpec),
    ) -> anyhow::Result<()> {
        let Consumer {
            name,
            group,
            topic,
            recorded_in,
            settlement,
        } = consumer;
        let spec = ConsumerSpec {
            name,
            group_id: self.settings.kafka.group_id(group),
            topic,
            recorded_in,
        };
        self.consumers.push(match settlement {
            Some(make) => make(spec),
            None => Arc::new(RowSettlement::new(spec, self.publisher.clone())),
        });
        let domain = DomainActor::start(&self.arbiters.next(), self.probes.clone(), factory);
        let mut spec = ConsumerGroupSpec::from_settings(
            &self.settings,
            &self.bootstrap_servers,
            group,
            BTreeMap::from([(topic.to_string(), domain.clone().recipient())]),
            self.publisher.clone(),
            self.event_log().clone(),
            self.outages.clone(),
        );
        customize(&mut spec);
        let group = ConsumerGroup::start(spec, self.arbiters.clone())
            .with_context(|| format!("cannot start consumer group {group} on {topic}"))?;
        self.tree.consumer_groups.push(Arc::new(group));
        self.tree.domain_actors.push(domain.recipient());
        Ok(())
    }

    /// The CouponIssuer on `coupon-requests`, this instance's ResultNotifier on
    /// `coupon-results`, and the intake.
    fn start_coupons(&mut self, sessions: &Sessions) -> anyhow::Result<CouponIntake> {
        let coupons = &self.settings.coupons;
        let lock_ttl = Duration::from_millis(coupons.lock_ttl_ms);
        let (outbox, redis) = (self.outbox.clone(), self.redis.clone());
        let owners =
            PartitionOwners::new(self.event_log().pool().clone(), &self.settings.instance.id);
        self.consume(
            Consumer::recording_in_rows(
                "CouponIssuer",
                COUPON_REQUEST_GROUP,
                topics::COUPON_REQUESTS,
            ),
            {
                let owners = owners.clone();
                move || {
                    CouponIssuer::new(
                        CouponStore::new(outbox.clone()),
                        RedisLocks::new(redis.clone(), lock_ttl),
                        owners.clone(),
                    )
                }
            },
            // Each assignment of a partition takes its owner epoch before its first batch.
            |spec| spec.partitions.on_assigned = Some(Arc::new(owners)),
        )?;
        let (sessions, event_log) = (sessions.clone(), self.event_log().clone());
        let notifier_group = format!(
            "{RESULT_NOTIFIER_GROUP_PREFIX}{}",
            self.settings.instance.id
        );
        self.consume(
            Consumer {
                name: "ResultNotifier",
                group: &notifier_group,
                topic: topics::COUPON_RESULTS,
                recorded_in: RecordedIn::RequestRow,
                settlement: Some(Box::new({
                    let publisher = self.publisher.clone();
                    move |spec| Arc::new(ResultSettlement::new(spec, publisher))
                })),
            },
            move || ResultNotifier::new(sessions.clone(), event_log.clone()),
            // An instance's own group only serves its live sessions: it starts at the end
            // of the results when the instance starts (a reconnecting session reads what it
            // missed from MySQL) and commits nothing, so an instance that goes away for good
            // leaves no offsets behind. It keeps static membership: a broker that never
            // expires a killed dynamic member (tansu) would give a restarted instance's
            // notifier no partition.
            |spec| spec.uncommitted_start = UncommittedStart::End,
        )?;
        Ok(CouponIntake::start(
            self.outbox.clone(),
            self.settings.coupons.intake_writers,
            self.settings.coupons.intake_max_batch,
            self.settings.coupons.intake_queue,
        ))
    }

    /// The ProductEventProcessor on `product-events`, keeping the product cache, and the
    /// order and payment intakes (group commit, on the actors' outbox as the coupon intake).
    fn start_shop(&mut self) -> anyhow::Result<(ProductCache, OrderIntake, PaymentIntake)> {
        let cache = ProductCache::new(self.redis.clone(), PRODUCT_CACHE_TTL);
        let (processor_cache, event_log) = (cache.clone(), self.event_log().clone());
        self.consume(
            Consumer::recording_in_rows(
                "ProductEventProcessor",
                PRODUCT_EVENT_GROUP,
                topics::PRODUCT_EVENTS,
            ),
            move || ProductEventProcessor::new(processor_cache.clone(), event_log.clone()),
            |_| {},
        )?;
        let shop = &self.settings.shop;
        let orders = OrderIntake::start(
            Orders::new(self.outbox.clone()),
            shop.order_writers,
            shop.order_max_batch,
        );
        let payments = PaymentIntake::start(
            Payments::new(self.outbox.clone()),
            shop.payment_writers,
            shop.payment_max_batch,
        );
        Ok((cache, orders, payments))
    }

    /// The RankingUpdater on `order-completed`.
    fn start_ranking(&mut self) -> anyhow::Result<RankingStore> {
        let ranking = RankingStore::new(self.redis.clone(), self.settings.ranking.retention_days);
        let updater_ranking = ranking.clone();
        self.consume(
            Consumer {
                name: "RankingUpdater",
                group: RANKING_GROUP,
                topic: topics::ORDER_COMPLETED,
                recorded_in: RecordedIn::RankingMarks,
                // Its MySQL reads (rebuilds, dead letters) run on the reconciler's arbiter,
                // on the actors' pool.
                settlement: Some(Box::new({
                    let (ranking, event_log) = (ranking.clone(), self.event_log().clone());
                    move |spec| {
                        let dead_letters = DeadLetterLog::new(event_log.pool().clone());
                        Arc::new(RankingSettlement::new(
                            spec,
                            ranking,
                            event_log,
                            dead_letters,
                        ))
                    }
                })),
            },
            move || RankingUpdater::new(updater_ranking.clone()),
            // The ranking's progress is its applied marks in Redis; the event-log row of a
            // completed order belongs to the analytics delivery.
            |spec| {
                spec.partitions.dead_letters =
                    spec.partitions.dead_letters.clone().leaving_event_rows();
            },
        )?;
        Ok(ranking)
    }

    /// The forwarders (order analytics always; external events when `external.base_url`
    /// is set) and the retry scheduler they share.
    fn start_deliveries(
        &mut self,
        deliverer: WebhookDeliverer,
        delivers_externally: bool,
    ) -> anyhow::Result<Addr<RetryScheduler>> {
        let external = &self.settings.external;
        let dead_letters_of = |group: &str| {
            DeadLetters::new(
                self.publisher.clone(),
                self.event_log().clone(),
                self.settings.kafka.group_id(group),
            )
        };
        let deliveries = Deliveries::new(DeliveriesWiring {
            deliverer,
            event_log: self.event_log().clone(),
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
            clock: self.clock.clone(),
            lease: Duration::from_millis(external.lease_ms),
            alert_url: Some(external.alert_url.clone()).filter(|url| !url.is_empty()),
            target_down_after_failures: external.target_down_after_failures,
            outages: self.outages.clone(),
        });
        let analytics_order = self.settings.analytics.order();
        let external_order = external.order();
        let key_ordered = [
            (topics::ORDER_COMPLETED, analytics_order),
            (topics::EXTERNAL_EVENTS, external_order),
        ]
        .into_iter()
        .filter(|(_, order)| order.ordering == RecordOrdering::Key)
        .map(|(topic, _)| topic.to_string())
        .collect();
        let scheduler = RetryScheduler::new(
            deliveries.clone(),
            Duration::from_millis(external.poll_interval_ms.max(1)),
            external.claim_batch,
            key_ordered,
        );
        let scheduler = Supervisor::start_in_arbiter(&self.arbiters.next(), move |_| scheduler);
        self.tree
            .background
            .push(("retryScheduler", scheduler.clone().recipient()));
        let mut forwarders = vec![(
            ORDER_ANALYTICS_GROUP,
            topics::ORDER_COMPLETED,
            "OrderAnalytics",
            analytics_order,
        )];
        if delivers_externally {
            forwarders.push((
                EXTERNAL_EVENT_GROUP,
                topics::EXTERNAL_EVENTS,
                "ExternalForwarder",
                external_order,
            ));
        } else {
            info!("external.base_url is empty: external-events is not consumed");
        }
        for (group, topic, name, order) in forwarders {
            let deliveries = deliveries.clone();
            self.consume(
                Consumer::recording_in_rows(name, group, topic),
                move || Forwarder::new(name, deliveries.clone(), order),
                |_| {},
            )?;
        }
        Ok(scheduler)
    }

    /// The reconciler, on an arbiter of its own.
    fn start_reconciler(&mut self, fresh_cluster: bool) -> (Addr<Reconciler>, Arc<GroupOffsets>) {
        let offsets = Arc::new(GroupOffsets::new(
            &self.bootstrap_servers,
            &self.settings.kafka,
        ));
        let groups = self.tree.consumer_groups.clone();
        let wiring = ReconcilerWiring {
            consumers: Consumers::new(self.consumers.clone()),
            event_log: self.event_log().clone(),
            offsets: offsets.clone(),
            settings: self.settings.reconcile.clone(),
            fresh_cluster_since: fresh_cluster.then(chrono::Utc::now),
            groups_ready: Arc::new({
                let groups = groups.clone();
                move || groups.iter().all(|group| group.health().joined())
            }),
            local_positions: Arc::new(move |group_id, topic| {
                groups
                    .iter()
                    .find(|group| group.group_id() == group_id)
                    .and_then(|group| group.local_positions(topic))
            }),
        };
        let reconciler = Reconciler::start_supervised(&self.arbiters.next(), move || wiring);
        self.tree
            .background
            .push(("reconciler", reconciler.clone().recipient()));
        (reconciler, offsets)
    }

    /// The lag monitor and the outbox backlog count, on a partition arbiter (their broker
    /// requests and queries run on blocking threads and the actors' pool).
    fn start_monitors(&mut self, offsets: Arc<GroupOffsets>) -> (LagView, OutboxBacklogView) {
        crate::observability::metrics::install();
        let metrics = &self.settings.metrics;
        let monitor = LagMonitor::new(self.tree.consumer_groups.clone(), offsets);
        let lag = monitor.view();
        self.arbiters
            .next()
            .spawn(monitor.run(Duration::from_millis(metrics.lag_interval_ms.max(50))));
        let backlog = OutboxBacklogView::default();
        self.arbiters.next().spawn(backlog.clone().keep_counting(
            self.event_log().clone(),
            Duration::from_millis(metrics.outbox_interval_ms.max(50)),
        ));
        (lag, backlog)
    }

    /// The outbox relay, supervised on an actors' arbiter (so that it is gone, with its
    /// producer handle, once the arbiters stop).
    fn start_relay(&mut self) -> Addr<OutboxRelay> {
        let relay = OutboxRelay::new(self.outbox.clone(), &self.settings.outbox);
        let relay = Supervisor::start_in_arbiter(&self.arbiters.next(), move |_| relay);
        self.tree
            .background
            .push(("outboxRelay", relay.clone().recipient()));
        relay
    }
}

/// What the started slices hand to the HTTP handlers.
struct StartedForHttp {
    intake: CouponIntake,
    product_cache: ProductCache,
    orders: OrderIntake,
    payments: PaymentIntake,
    ranking: RankingStore,
    scheduler: Addr<RetryScheduler>,
    reconciler: Addr<Reconciler>,
    lag: LagView,
    outbox_backlog: OutboxBacklogView,
}

/// The bearer-token verifier; warns when tokens are signed with the development secret.
fn authenticator(settings: &Settings) -> anyhow::Result<Authenticator> {
    let auth = Authenticator::from_settings(&settings.auth, &settings.kafka)?;
    if auth.uses_development_secret() {
        warn!(
            "auth.jwt_secret is not set: tokens are signed with the development secret \
             (embedded Kafka only); mint one with `commerce-events token --user <id>`"
        );
    }
    Ok(auth)
}

/// What the coupon handlers work with: the store on the HTTP handlers' outbox, the intake,
/// this instance's push sessions and tickets, and the configured bounds.
fn coupons_state(
    settings: &Settings,
    connections: &Connections,
    http_outbox: &Outbox,
    sessions: &Sessions,
    intake: CouponIntake,
) -> CouponsState {
    CouponsState {
        store: CouponStore::new(http_outbox.clone())
            .with_stock_shards(settings.coupons.stock_shards),
        intake,
        sessions: sessions.clone(),
        push: settings.push.clone(),
        tickets: PushTickets::new(
            connections.redis.clone(),
            Duration::from_secs(settings.push.ticket_ttl_secs),
        ),
        allowed_origins: settings.http.allowed_origins.clone(),
        max_total_quantity: settings.coupons.max_total_quantity,
        max_discount_amount: settings.coupons.max_discount_amount,
    }
}

/// The HTTP server on the configured listener; returns it with its port.
fn serve_http(
    settings: &Settings,
    state: AppState,
    spans: crate::observability::otlp::Spans,
) -> anyhow::Result<(Server, u16)> {
    let state = web::Data::new(state);
    let http = &settings.http;
    let listener = TcpListener::bind((http.host.as_str(), http.port))
        .with_context(|| format!("cannot listen on {}:{}", http.host, http.port))?;
    let port = listener.local_addr()?.port();
    let body_limits = BodyLimits {
        max_bytes: http.body_limit_bytes,
        timeout: Duration::from_millis(http.body_timeout_ms),
    };
    let server = HttpServer::new(move || {
        App::new()
            .wrap(api::json_errors())
            .wrap(TracingLogger::default())
            .wrap(api::metrics::Observed::new(spans.clone()))
            .app_data(state.clone())
            .app_data(body_limits)
            .configure(api::configure)
    })
    .workers(http.workers.max(1))
    .client_request_timeout(Duration::from_millis(http.header_timeout_ms))
    .shutdown_timeout(http.shutdown_timeout_secs)
    .disable_signals()
    .listen(listener)?
    .run();
    info!(address = %format!("http://{}:{port}", http.host), "HTTP listening");
    Ok((server, port))
}

impl Application {
    /// Connects the connections, applies migrations, starts Kafka (embedded or external), the
    /// actors and the HTTP listener. Must run inside an actix system.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// [`Application::build`] with the clock the retry schedule, payments and the ranking
    /// read (tests move it).
    pub async fn build_with_clock(settings: Settings, clock: SharedClock) -> anyhow::Result<Self> {
        // Bad delivery settings fail the start, before anything is running.
        let targets = delivery::targets(&settings.external, &settings.analytics)?;
        let delivers_externally = !settings.external.base_url.is_empty();
        let spans = crate::observability::otlp::Spans::start(&settings.otlp, &settings.instance)?;
        let deliverer =
            WebhookDeliverer::from_settings(targets, &settings.external)?.with_spans(spans.clone());

        let connections = Connections::connect(&settings).await?;
        let (kafka, publisher) = connect_kafka(&settings).await?;
        let arbiters = Arc::new(ArbiterPool::new(settings.kafka.consumer.partition_threads));
        let mut wiring = Wiring::new(
            settings,
            clock.clone(),
            &connections,
            &kafka,
            publisher.clone(),
            arbiters.clone(),
            &spans,
        );
        let sessions = Sessions::default();
        wiring.observe_sessions_and_outages(&sessions);

        let intake = wiring.start_coupons(&sessions)?;
        let (product_cache, orders, payments) = wiring.start_shop()?;
        let ranking = wiring.start_ranking()?;
        let scheduler = wiring.start_deliveries(deliverer, delivers_externally)?;
        let relay = wiring.start_relay();
        let (reconciler, group_offsets) = wiring.start_reconciler(kafka.is_embedded());
        let (lag, outbox_backlog) = wiring.start_monitors(group_offsets.clone());

        let auth = authenticator(&wiring.settings)?;
        let started = StartedForHttp {
            intake,
            product_cache,
            orders,
            payments,
            ranking,
            scheduler: scheduler.clone(),
            reconciler: reconciler.clone(),
            lag,
            outbox_backlog,
        };
        let state = wiring.app_state(&connections, &sessions, auth, started);
        let (server, port) = serve_http(&wiring.settings, state, spans.clone())?;

        Ok(Self {
            port,
            server,
            kafka,
            publisher,
            actors: wiring.tree,
            relay,
            scheduler,
            reconciler,
            group_offsets,
            arbiters,
            sessions,
            spans,
        })
    }

    /// Stops the daemon's arbiters at once (no ordered shutdown): see
    /// [`crate::actors::ArbiterStopper`].
    pub fn arbiter_stopper(&self) -> crate::actors::ArbiterStopper {
        self.arbiters.stopper()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn kafka(&self) -> Arc<KafkaCluster> {
        self.kafka.clone()
    }

    pub fn publisher(&self) -> EventPublisher {
        self.publisher.clone()
    }

    /// Serves until `shutdown` resolves, then stops in order: HTTP intake, partitions
    /// (drain and commit), the outbox relay and the retry scheduler, the producer (flush),
    /// WebSocket and SSE sessions with the HTTP server's remaining connections, and the
    /// arbiters.
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

        let _ = self.relay.send(StopRelay).await;
        let _ = self.reconciler.send(StopReconciler).await;
        let _ = self
            .scheduler
            .send(StopScheduler {
                timeout: SCHEDULER_STOP_TIMEOUT,
            })
            .await;

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

        info!("shutdown: closing the cluster's clients, then the cluster");
        let arbiters = self.arbiters.clone();
        let kafka = self.kafka;
        let publisher = self.publisher;
        let group_offsets = self.group_offsets;
        let actors = self.actors;
        let _ = tokio::task::spawn_blocking(move || {
            // Every client goes before the cluster (an embedded one stops when `kafka` is
            // dropped): a client that outlives it logs a refused connection per broker.
            // Releasing librdkafka handles joins their threads: keep it off the arbiters.
            // The actors hold the producer's other handles and use the offset clients (the
            // lag monitor, the reconciler): they go with their arbiters.
            arbiters.stop_blocking();
            drop(actors);
            if !group_offsets.close_blocking(CLIENT_CLOSE_TIMEOUT) {
                warn!("an offset client is still in use after the actors stopped");
            }
            if !publisher.close_blocking(CLIENT_CLOSE_TIMEOUT) {
                warn!("the producer is still in use after the actors stopped");
            }
            drop(kafka);
        })
        .await;
        self.spans.flush(SPANS_FLUSH_TIMEOUT).await;
        info!("shutdown complete");
        Ok(())
    }
}
