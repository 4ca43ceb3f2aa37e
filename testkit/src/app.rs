use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use commerce_events::common::clock::{SharedClock, SystemClock};
use commerce_events::common::connections;
use commerce_events::common::ids::UserId;
use commerce_events::config::Settings;
use commerce_events::event_log::{EventLog, EventRecord, OutboxEvent};
use commerce_events::events::topics;
use commerce_events::events::{EventEnvelope, EventId, EventPayload, PipelineProbe};
use commerce_events::guards::tokens::Authenticator;
use commerce_events::kafka::cluster::KafkaCluster;
use commerce_events::kafka::producer::EventPublisher;
use commerce_events::outbox::{Committed, Outbox};
use commerce_events::startup::Application;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::database::{TestDatabase, init_tracing};
use crate::records::coupon_request_for;
use crate::wait::eventually;

/// How long a test request may take: generous, because eight tests may share two cores;
/// tests assert outcomes, never speed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP client of the tests.
pub fn client() -> awc::Client {
    awc::Client::builder().timeout(REQUEST_TIMEOUT).finish()
}

/// The user id of the tests' administrator.
pub const ADMIN_USER: u64 = 999_999;

/// Requests made with one identity (or none).
pub struct Calls<'a> {
    app: &'a TestApp,
    authorization: Option<String>,
}

/// Sends `request` until its answer is not `503 UNAVAILABLE`, for a minute at most.
async fn until_available<F, Fut>(mut request: F) -> (StatusCode, Value)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (StatusCode, Value)>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = request().await;
        if status != StatusCode::SERVICE_UNAVAILABLE
            || body["error"]["code"] != "UNAVAILABLE"
            || std::time::Instant::now() > deadline
        {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Calls<'_> {
    fn request_to(&self, method: awc::http::Method, path: &str) -> awc::ClientRequest {
        let request = client().request(method, format!("{}{path}", self.app.address));
        match &self.authorization {
            Some(authorization) => request.insert_header(("authorization", authorization.as_str())),
            None => request,
        }
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(awc::http::Method::GET, path).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.request_json(awc::http::Method::POST, path, body).await
    }

    /// [`Calls::post`] with extra headers.
    pub async fn post_with(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut request = self
            .request_to(awc::http::Method::POST, path)
            .insert_header(("content-type", "application/json"));
        for header in headers {
            request = request.insert_header(*header);
        }
        let mut response = request
            .send_body(body.to_string())
            .await
            .expect("request sent");
        let body = response.body().await.expect("body read");
        (response.status(), parse(&body))
    }

    /// A `POST` of a JSON body answered as it comes (a 503 is not asked again), with the
    /// answer's headers.
    pub async fn post_once(
        &self,
        path: &str,
        body: &str,
    ) -> (StatusCode, awc::http::header::HeaderMap, Value) {
        self.send_json(awc::http::Method::POST, path, body).await
    }

    /// A request with a JSON body. Like any client it asks again after a `503 UNAVAILABLE`
    /// (a pool that had no connection within its acquire timeout on this shared machine),
    /// which changed nothing.
    pub async fn request_json(
        &self,
        method: awc::http::Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, Value) {
        until_available(|| self.request_json_once(method.clone(), path, body)).await
    }

    async fn request_json_once(
        &self,
        method: awc::http::Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, Value) {
        let (status, _, body) = self.send_json(method, path, body).await;
        (status, body)
    }

    /// One request with a JSON body: its status, headers and body.
    async fn send_json(
        &self,
        method: awc::http::Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, awc::http::header::HeaderMap, Value) {
        let mut response = self
            .request_to(method, path)
            .insert_header(("content-type", "application/json"))
            .send_body(body.to_string())
            .await
            .expect("request sent");
        let headers = response.headers().clone();
        let body = response.body().await.expect("body read");
        (response.status(), headers, parse(&body))
    }

    /// A `GET` whose answer is text (the metrics, a page).
    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let mut response = self
            .request_to(awc::http::Method::GET, path)
            .send()
            .await
            .expect("request sent");
        let body = response.body().limit(64 << 20).await.expect("body read");
        (
            response.status(),
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// A request without a body; asks again after a `503 UNAVAILABLE`, as above.
    pub async fn request(&self, method: awc::http::Method, path: &str) -> (StatusCode, Value) {
        until_available(|| self.request_once(method.clone(), path)).await
    }

    async fn request_once(&self, method: awc::http::Method, path: &str) -> (StatusCode, Value) {
        let mut response = self
            .request_to(method, path)
            .send()
            .await
            .expect("request sent");
        let body = response.body().await.expect("body read");
        (response.status(), parse(&body))
    }
}

pub struct TestApp {
    pub address: String,
    /// Mints the tests' tokens.
    pub auth: Authenticator,
    pub kafka: Arc<KafkaCluster>,
    pub publisher: EventPublisher,
    /// The test's own view of the event log (its own pool).
    pub event_log: EventLog,
    /// The settings the daemon was started with.
    pub settings: Settings,
    shutdown: Option<oneshot::Sender<()>>,
    running: Option<actix_rt::task::JoinHandle<anyhow::Result<()>>>,
    /// Users whose rows exist (so `as_user` asks MySQL once per user).
    known_users: std::sync::Mutex<std::collections::HashSet<u64>>,
    _database: TestDatabase,
    /// Stops the daemon's arbiters when the test is over (see `Drop`).
    arbiters: commerce_events::actors::ArbiterStopper,
    /// Dropped last, after the database (whose drop closes the daemon's connections).
    _slot: DaemonSlot,
}

impl Drop for TestApp {
    /// A test that ends without stopping its daemon would leave its actors running on their
    /// arbiters, each holding connections: stopping the arbiters lets them go, so the
    /// database can be dropped and the server's 151 connections suffice.
    fn drop(&mut self) {
        self.arbiters.stop();
    }
}

/// Tests running daemons at once, whatever `--test-threads` says: each daemon with its test
/// pool holds about a dozen MariaDB connections (and a test may run two), and the server
/// takes 151.
const DAEMON_TESTS_AT_ONCE: usize = 4;
static DAEMON_TESTS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(DAEMON_TESTS_AT_ONCE);

thread_local! {
    /// The slot of the test running on this thread, shared by its daemons.
    static THIS_TEST: std::cell::RefCell<(usize, Option<tokio::sync::SemaphorePermit<'static>>)> =
        const { std::cell::RefCell::new((0, None)) };
}

/// A test's claim on one of the [`DAEMON_TESTS_AT_ONCE`] slots; the test's second daemon
/// shares the first one's (each test runs on a thread of its own).
pub struct DaemonSlot;

impl DaemonSlot {
    pub async fn claim() -> Self {
        let held = THIS_TEST.with(|slot| slot.borrow().0 > 0);
        let permit = if held {
            None
        } else {
            Some(
                DAEMON_TESTS
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            )
        };
        THIS_TEST.with(|slot| {
            let mut slot = slot.borrow_mut();
            slot.0 += 1;
            if permit.is_some() {
                slot.1 = permit;
            }
        });
        DaemonSlot
    }
}

impl Drop for DaemonSlot {
    fn drop(&mut self) {
        THIS_TEST.with(|slot| {
            let mut slot = slot.borrow_mut();
            slot.0 -= 1;
            if slot.0 == 0 {
                slot.1 = None;
            }
        });
    }
}

/// The daemon with the test settings, once it is ready: `TestApp::builder().start()`.
pub async fn spawn_app() -> TestApp {
    TestApp::builder().start().await
}

/// How a test's daemon starts: the test settings ([`TestDatabase::settings`]) adjusted by
/// the test, the clock its retry schedule reads, and whether to wait until it is ready
/// (`/readyz` answers 200 and a first reconciler pass is behind it).
pub struct AppBuilder<'a> {
    customize: Box<dyn FnOnce(&mut Settings) + 'a>,
    clock: SharedClock,
    wait_until_ready: bool,
}

impl<'a> AppBuilder<'a> {
    /// Adjusts the test settings.
    pub fn settings(mut self, customize: impl FnOnce(&mut Settings) + 'a) -> Self {
        self.customize = Box::new(customize);
        self
    }

    /// The clock the retry schedule reads (a test moves it instead of waiting).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Answers as soon as the daemon is built, before it is ready.
    pub fn not_waiting_until_ready(mut self) -> Self {
        self.wait_until_ready = false;
        self
    }

    pub async fn start(self) -> TestApp {
        let app = TestApp::build(self.clock, self.customize).await;
        if self.wait_until_ready {
            eventually("the daemon is ready", Duration::from_secs(30), || async {
                app.get("/readyz").await.0 == StatusCode::OK
            })
            .await;
            app.after_first_reconcile().await;
        }
        app
    }
}

impl TestApp {
    /// Starts a daemon in the test's process: see [`AppBuilder`].
    pub fn builder<'a>() -> AppBuilder<'a> {
        AppBuilder {
            customize: Box::new(|_| {}),
            clock: Arc::new(SystemClock),
            wait_until_ready: true,
        }
    }

    async fn build(clock: SharedClock, customize: Box<dyn FnOnce(&mut Settings) + '_>) -> Self {
        init_tracing();
        let slot = DaemonSlot::claim().await;
        let database = TestDatabase::new();
        let mut settings = database.settings();
        customize(&mut settings);
        let application = Application::build_with_clock(settings.clone(), clock)
            .await
            .expect("the daemon starts");
        let address = format!("http://127.0.0.1:{}", application.port());
        let kafka = application.kafka();
        let publisher = application.publisher();
        let arbiters = application.arbiter_stopper();
        let pool = connections::connect_mysql(&settings.database, 2)
            .await
            .expect("test pool");
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();
        let running = actix_rt::spawn(application.run_until_stopped(async move {
            let _ = shutdown_signal.await;
        }));
        TestApp {
            auth: Authenticator::from_settings(&settings.auth, &settings.kafka)
                .expect("the test settings authenticate"),
            address,
            kafka,
            publisher,
            event_log: EventLog::new(pool),
            settings,
            shutdown: Some(shutdown),
            running: Some(running),
            known_users: Default::default(),
            _database: database,
            arbiters,
            _slot: slot,
        }
    }
}

impl TestApp {
    /// Waits for a complete reconciler pass, so that what the daemon does once at start-up
    /// (a ranking rebuild when `ranking:built` is missing) is behind the test, not racing it.
    pub async fn after_first_reconcile(&self) {
        let (status, body) = self.post("/admin/reconcile", "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    pub fn database_url(&self) -> String {
        self._database.url()
    }

    pub fn bootstrap_servers(&self) -> String {
        self.kafka.bootstrap_servers().to_string()
    }

    /// A token for `user` (valid an hour), signed as the daemon expects.
    pub fn token(&self, user: u64, admin: bool) -> String {
        self.auth
            .mint(
                UserId::from_u64(user).expect("a positive user id"),
                admin,
                Duration::from_secs(3_600),
            )
            .expect("HS256 tokens are minted")
    }

    /// Requests as `user` (the token's subject), creating the user's row first if missing,
    /// so a test can use any id.
    pub async fn as_user(&self, user: u64) -> Calls<'_> {
        self.ensure_user(user).await;
        Calls {
            app: self,
            authorization: Some(format!("Bearer {}", self.token(user, false))),
        }
    }

    /// Requests with a token naming `user`, whether or not the user exists.
    pub fn as_token_of(&self, user: u64) -> Calls<'_> {
        Calls {
            app: self,
            authorization: Some(format!("Bearer {}", self.token(user, false))),
        }
    }

    /// Requests as the support administrator (user [`ADMIN_USER`], admin role).
    pub fn as_admin(&self) -> Calls<'_> {
        Calls {
            app: self,
            authorization: Some(format!("Bearer {}", self.token(ADMIN_USER, true))),
        }
    }

    /// Requests without a token.
    pub fn anonymous(&self) -> Calls<'_> {
        Calls {
            app: self,
            authorization: None,
        }
    }

    /// Requests with this `Authorization` header value.
    pub fn with_authorization(&self, authorization: &str) -> Calls<'_> {
        Calls {
            app: self,
            authorization: Some(authorization.to_string()),
        }
    }

    /// Creates the user's row (any id) unless it exists.
    pub async fn ensure_user(&self, user: u64) {
        if self.known_users.lock().unwrap().contains(&user) {
            return;
        }
        sqlx::query("INSERT IGNORE INTO app_user (user_id, name) VALUES (?, ?)")
            .bind(user)
            .bind(format!("user {user}"))
            .execute(self.event_log.pool())
            .await
            .expect("user row written");
        self.known_users.lock().unwrap().insert(user);
    }

    /// Creates the rows of users `first..=last` (one statement) unless they exist.
    pub async fn ensure_users(&self, first: u64, last: u64) {
        sqlx::query(
            "INSERT IGNORE INTO app_user (user_id, name) \
             SELECT seq, CONCAT('user ', seq) FROM seq_1_to_100000000 WHERE seq BETWEEN ? AND ?",
        )
        .bind(first)
        .bind(last)
        .execute(self.event_log.pool())
        .await
        .expect("user rows written");
        self.known_users.lock().unwrap().extend(first..=last);
    }

    /// `GET` as the administrator.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.as_admin().get(path).await
    }

    /// A `GET` of text as the administrator.
    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        self.as_admin().get_text(path).await
    }

    /// `POST` of a JSON body as the administrator.
    pub async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.as_admin().post(path, body).await
    }

    /// A request with a JSON body as the administrator.
    pub async fn request_json(
        &self,
        method: awc::http::Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, Value) {
        self.as_admin().request_json(method, path, body).await
    }

    /// A request without a body as the administrator.
    pub async fn request(&self, method: awc::http::Method, path: &str) -> (StatusCode, Value) {
        self.as_admin().request(method, path).await
    }

    pub async fn event(&self, id: EventId) -> Option<EventRecord> {
        self.event_log.find(id).await.expect("event log readable")
    }

    /// Commits a PENDING probe row without publishing it, as a request that died right
    /// after its commit would leave it.
    pub async fn commit_unpublished_probe(&self, note: &str) -> EventId {
        let envelope = EventEnvelope::new(
            format!("probe:{note}"),
            EventPayload::PipelineProbe(PipelineProbe {
                note: Some(note.to_string()),
            }),
        );
        let event_id = envelope.event_id;
        self.record_in_outbox(&OutboxEvent::probe(topics::PRODUCT_EVENTS, envelope))
            .await;
        event_id
    }

    /// Creates a coupon valid from `valid_from` to `valid_until`; returns its id.
    pub async fn create_coupon_between(
        &self,
        total_quantity: u32,
        valid_from: chrono::DateTime<chrono::Utc>,
        valid_until: chrono::DateTime<chrono::Utc>,
    ) -> u64 {
        let body = serde_json::json!({
            "name": "Black Friday",
            "discountAmount": 5000,
            "totalQuantity": total_quantity,
            "validFrom": valid_from,
            "validUntil": valid_until,
        });
        let (status, coupon) = self.post("/coupons", &body.to_string()).await;
        assert_eq!(status, StatusCode::CREATED, "{coupon}");
        coupon["couponId"].as_u64().expect("a coupon id")
    }

    /// Creates a coupon valid from an hour ago for a day.
    pub async fn create_coupon(&self, total_quantity: u32) -> u64 {
        let now = chrono::Utc::now();
        self.create_coupon_between(
            total_quantity,
            now - chrono::Duration::hours(1),
            now + chrono::Duration::days(1),
        )
        .await
    }

    /// Asks for a coupon; returns the answer's status and request id: 202 and a new request,
    /// or 200 and the user's earlier request for this coupon. Like any client, it asks again
    /// after a 503's `Retry-After` (an overloaded pool under many parallel tests); asking
    /// again is safe, since a repeated request names the first one.
    pub async fn issue_any(&self, user_id: u64, coupon_id: u64) -> (StatusCode, String) {
        let body = format!(r#"{{"userId": {user_id}, "couponId": {coupon_id}}}"#);
        let calls = self.as_user(user_id).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let (status, answer) = loop {
            let (status, answer) = calls.post("/coupons/issue", &body).await;
            if status != StatusCode::SERVICE_UNAVAILABLE || std::time::Instant::now() > deadline {
                break (status, answer);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            [StatusCode::ACCEPTED, StatusCode::OK].contains(&status),
            "{status}: {answer}"
        );
        let request_id = answer["requestId"].as_str().expect("a request id");
        (status, request_id.to_string())
    }

    /// Asks for a coupon; returns the request id of the 202.
    pub async fn issue(&self, user_id: u64, coupon_id: u64) -> String {
        let (status, accepted) = self
            .as_user(user_id)
            .await
            .post(
                "/coupons/issue",
                &format!(r#"{{"userId": {user_id}, "couponId": {coupon_id}}}"#),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        assert_eq!(accepted["status"], "PENDING");
        accepted["requestId"]
            .as_str()
            .expect("a request id")
            .to_string()
    }

    /// Waits until the request is decided and notified; returns its view.
    pub async fn wait_until_notified(&self, request_id: &str) -> Value {
        let path = format!("/coupons/requests/{request_id}");
        eventually("the request notified", Duration::from_secs(30), || async {
            self.get(&path).await.1["status"] == "NOTIFIED"
        })
        .await;
        self.get(&path).await.1
    }

    /// Commits a PENDING coupon request without publishing it (a request that died right
    /// after its commit).
    pub async fn commit_unpublished_coupon_request(&self, user_id: u64, coupon_id: u64) -> EventId {
        let envelope = coupon_request_for(user_id, coupon_id);
        let event_id = envelope.event_id;
        self.record_in_outbox(&OutboxEvent::new(envelope)).await;
        event_id
    }

    /// Commits a coupon request as the intake records it (PUBLISHED, proven by the issuer's
    /// progress) without publishing it: a request whose publication failed after its
    /// commit, or whose daemon died before it.
    pub async fn commit_proven_coupon_request(&self, user_id: u64, coupon_id: u64) -> EventId {
        let envelope = coupon_request_for(user_id, coupon_id);
        let event_id = envelope.event_id;
        let outbox = Outbox::new(self.event_log.clone(), self.publisher.clone());
        let mut transaction = outbox.begin().await.unwrap();
        transaction
            .record_proven(vec![OutboxEvent::new(envelope)])
            .await
            .unwrap();
        // Never published: the reconciler is what may publish it.
        let _unpublished = transaction.commit().await.unwrap();
        event_id
    }

    /// Commits a coupon request decided as the issuer decides it (its row COMPLETED with
    /// the decision, a refusal for lack of stock here, and its result's event id) without
    /// publishing the result: an issuer that died between its commit and the result's
    /// publication. Returns the request's and the result's event ids.
    pub async fn commit_decided_request_unpublished(
        &self,
        user_id: u64,
        coupon_id: u64,
    ) -> (EventId, EventId) {
        use commerce_events::coupons::RefusalReason;
        use commerce_events::coupons::results::RecordedDecision;
        use commerce_events::event_log::{Move, StatusChange};
        let request_id = self.commit_proven_coupon_request(user_id, coupon_id).await;
        let result_id = EventId::generate();
        let decision = RecordedDecision {
            result_event_id: Some(result_id),
            coupon_history_id: None,
            reason: Some(RefusalReason::OutOfStock),
        };
        let mut connection = self.event_log.pool().acquire().await.unwrap();
        let moved = EventLog::change_status_of_many_with_results_in(
            &mut connection,
            &[(request_id, decision.to_json())],
            StatusChange::new(Move::Complete),
        )
        .await
        .unwrap();
        assert_eq!(moved, 1);
        (request_id, result_id)
    }

    /// Creates a user and charges `balance` (when positive); returns the user id.
    pub async fn create_user(&self, balance: u64) -> u64 {
        let (status, user) = self.post("/users", r#"{"name": "Kim"}"#).await;
        assert_eq!(status, StatusCode::CREATED, "{user}");
        assert_eq!(user["balance"], 0);
        let user_id = user["userId"].as_u64().unwrap();
        if balance > 0 {
            let (status, charged) = self
                .as_user(user_id)
                .await
                .post(
                    &format!("/users/{user_id}/balance/charge"),
                    &serde_json::json!({ "amount": balance }).to_string(),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{charged}");
            assert_eq!(charged["balance"], balance);
        }
        user_id
    }

    /// Creates a product; returns its id.
    pub async fn create_product(&self, name: &str, price: u64, stock: u32) -> u64 {
        let (status, product) = self
            .post(
                "/products",
                &serde_json::json!({"name": name, "price": price, "stock": stock}).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{product}");
        product["productId"].as_u64().unwrap()
    }

    /// Places an order of `(productId, quantity)` lines; returns the order id.
    pub async fn place_order(&self, user_id: u64, lines: &[(u64, u32)]) -> u64 {
        let items: Vec<Value> = lines
            .iter()
            .map(|(product_id, quantity)| {
                serde_json::json!({"productId": product_id, "quantity": quantity})
            })
            .collect();
        let (status, order) = self
            .as_user(user_id)
            .await
            .post(
                "/orders",
                &serde_json::json!({"userId": user_id, "items": items}).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{order}");
        order["orderId"].as_u64().unwrap()
    }

    /// The user who placed an order.
    pub async fn buyer_of(&self, order_id: u64) -> u64 {
        let (status, order) = self.get(&format!("/orders/{order_id}")).await;
        assert_eq!(status, StatusCode::OK, "{order}");
        order["userId"].as_u64().expect("an order's user")
    }

    /// Pays an order as its buyer; returns the answer.
    pub async fn try_pay(&self, order_id: u64) -> (StatusCode, Value) {
        let buyer = self.buyer_of(order_id).await;
        self.pay_as(buyer, order_id).await
    }

    /// Pays an order as `buyer`; returns the answer.
    pub async fn pay_as(&self, buyer: u64, order_id: u64) -> (StatusCode, Value) {
        self.as_user(buyer)
            .await
            .post(&format!("/orders/{order_id}/pay"), "")
            .await
    }

    /// Pays an order, which must succeed.
    pub async fn pay(&self, order_id: u64) {
        let (status, paid) = self.try_pay(order_id).await;
        assert_eq!(status, StatusCode::OK, "{paid}");
    }

    /// Commits `event` PENDING in the event log (the outbox), unpublished.
    pub async fn record_in_outbox(&self, event: &OutboxEvent) {
        // Never published: the relay is what may publish it.
        let _unpublished = self.commit_in_outbox(event).await;
    }

    /// Records `event` in the outbox and publishes it, as a request would.
    pub async fn publish_through_outbox(&self, event: &OutboxEvent) {
        let publication = self.commit_in_outbox(event).await.publish().await;
        assert_eq!(publication.published, 1, "the event was published");
    }

    async fn commit_in_outbox(&self, event: &OutboxEvent) -> Committed {
        let outbox = Outbox::new(self.event_log.clone(), self.publisher.clone());
        let mut transaction = outbox.begin().await.unwrap();
        transaction.record(vec![event.clone()]).await.unwrap();
        transaction.commit().await.unwrap()
    }

    /// Sends SIGTERM's equivalent and waits for the daemon to finish.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        match self.running.take() {
            Some(running) => running.await.expect("the daemon task does not panic"),
            None => Ok(()),
        }
    }
}

/// The consumer group named `group_id` in an `/admin/actors` answer.
pub fn group<'a>(tree: &'a Value, group_id: &str) -> &'a Value {
    tree["consumerGroups"]
        .as_array()
        .and_then(|groups| groups.iter().find(|group| group["groupId"] == group_id))
        .unwrap_or_else(|| panic!("no group {group_id} in {tree}"))
}

/// The domain actor named `name` in an `/admin/actors` answer.
pub fn domain_actor<'a>(tree: &'a Value, name: &str) -> &'a Value {
    tree["domainActors"]
        .as_array()
        .and_then(|actors| actors.iter().find(|actor| actor["name"] == name))
        .unwrap_or_else(|| panic!("no domain actor {name} in {tree}"))
}

fn parse(body: &[u8]) -> Value {
    if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
    }
}

/// Produces every record of `topic` again, from offset 0; returns how many.
pub async fn replay_from_offset_zero(app: &TestApp, topic: &'static str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let bootstrap = app.bootstrap_servers();
    let records = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "replayer")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        let mut expected = 0;
        for partition in 0..3 {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(5))
                .unwrap();
            expected += (high - low) as usize;
        }
        consumer.assign(&assignment).unwrap();
        let mut records = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while records.len() < expected && std::time::Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                records.push((
                    message.partition(),
                    message.key().map(<[u8]>::to_vec),
                    message.payload().map(<[u8]>::to_vec),
                ));
            }
        }
        assert_eq!(records.len(), expected, "the whole topic was read");
        records
    })
    .await
    .unwrap();
    for (partition, key, value) in &records {
        app.publisher
            .publish_raw(commerce_events::kafka::producer::RawRecord {
                topic,
                partition: Some(*partition),
                key: key.as_deref(),
                value: value.as_deref(),
                headers: Vec::new(),
            })
            .await
            .unwrap();
    }
    records.len()
}
