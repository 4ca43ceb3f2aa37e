//! A scripted HTTP receiver on a loopback port: the external system a test or a benchmark
//! delivers webhooks to, the alert URL, an OTLP collector. It keeps every request (path,
//! headers, body, arrival) and answers each webhook as scripted per `webhook-id`: queued
//! replies first, then a standing one, then 200; optionally every webhook's first attempt
//! with a given status, and every answer after a fixed latency.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

/// One answer of the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// A `Retry-After` header to send with it.
    pub retry_after: Option<&'static str>,
}

/// An answer with `status` and no `Retry-After`.
pub fn reply(status: u16) -> Reply {
    Reply {
        status,
        retry_after: None,
    }
}

/// A request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    /// Every header, by lower-case name (the last value of a repeated one).
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn webhook_id(&self) -> Option<&str> {
        self.header("webhook-id")
    }

    pub fn timestamp(&self) -> Option<i64> {
        self.header("webhook-timestamp")
            .and_then(|value| value.parse().ok())
    }

    pub fn signature(&self) -> Option<&str> {
        self.header("webhook-signature")
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// How the receiver answers besides its script.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Waited before each answer.
    pub latency: Duration,
    /// The answer to each webhook's first attempt (unless scripted).
    pub first_attempt: Option<Reply>,
}

#[derive(Default)]
struct Script {
    /// Answers per webhook-id, in order; then `after`, then 200.
    queued: HashMap<String, VecDeque<Reply>>,
    after: HashMap<String, Reply>,
    attempts: HashMap<String, usize>,
    received: Vec<Received>,
    last_answer: Option<Instant>,
}

struct State {
    options: Options,
    script: Mutex<Script>,
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
}

/// The receiver, on its own HTTP worker on the current actix system.
pub struct Receiver {
    /// `http://127.0.0.1:{port}`.
    pub address: String,
    state: Arc<State>,
    server: actix_web::dev::ServerHandle,
}

impl Receiver {
    /// Answers 200 to everything not scripted.
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Self {
        let state = Arc::new(State {
            options,
            script: Mutex::default(),
            in_flight: AtomicU64::new(0),
            most_in_flight: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("a receiver port");
        let address = format!("http://{}", listener.local_addr().expect("bound"));
        let shared = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                .default_service(web::to(receive))
        })
        .workers(1)
        .backlog(4_096)
        .disable_signals()
        .listen(listener)
        .expect("the receiver listens")
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Self {
            address,
            state,
            server: handle,
        }
    }

    /// The answers to the deliveries of the webhook `id`, in order; any later one gets
    /// `then`.
    pub fn script(&self, id: impl ToString, replies: impl IntoIterator<Item = Reply>, then: Reply) {
        let mut script = self.state.script.lock().unwrap();
        script
            .queued
            .insert(id.to_string(), replies.into_iter().collect());
        script.after.insert(id.to_string(), then);
    }

    /// Every request received, in order.
    pub fn received(&self) -> Vec<Received> {
        self.reading(<[Received]>::to_vec)
    }

    /// How many requests arrived.
    pub fn received_count(&self) -> usize {
        self.reading(<[Received]>::len)
    }

    /// The requests to `path`, in order.
    pub fn received_at(&self, path: &str) -> Vec<Received> {
        self.matching(|received| received.path == path)
    }

    /// The deliveries of the webhook `id`, in order.
    pub fn deliveries_of(&self, id: impl ToString) -> Vec<Received> {
        let id = id.to_string();
        self.matching(|received| received.webhook_id() == Some(id.as_str()))
    }

    fn matching(&self, keep: impl Fn(&Received) -> bool) -> Vec<Received> {
        self.reading(|received| {
            received
                .iter()
                .filter(|received| keep(received))
                .cloned()
                .collect()
        })
    }

    /// Reads the requests received so far, in order, under the receiver's lock.
    fn reading<T>(&self, read: impl FnOnce(&[Received]) -> T) -> T {
        read(&self.state.script.lock().unwrap().received)
    }

    /// How many different webhooks (`webhook-id`s) arrived: cheap to ask often.
    pub fn distinct_webhooks(&self) -> usize {
        self.state.script.lock().unwrap().attempts.len()
    }

    /// Each webhook request's `webhook-id`, in the order they arrived.
    pub fn webhook_ids(&self) -> Vec<String> {
        self.reading(|received| {
            received
                .iter()
                .filter_map(|received| received.webhook_id().map(str::to_string))
                .collect()
        })
    }

    /// When the first request arrived.
    pub fn first_arrival(&self) -> Option<Instant> {
        self.reading(|received| received.first().map(|received| received.at))
    }

    /// The most requests it was answering at once.
    pub fn most_in_flight(&self) -> u64 {
        self.state.most_in_flight.load(Ordering::Relaxed)
    }

    /// When it sent its last answer.
    pub fn last_answer(&self) -> Option<Instant> {
        self.state.script.lock().unwrap().last_answer
    }

    /// Stops listening (requests in flight are answered first).
    pub async fn stop(self) {
        self.server.stop(true).await;
    }
}

async fn receive(request: HttpRequest, body: web::Bytes, state: web::Data<State>) -> HttpResponse {
    let now = state.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    state.most_in_flight.fetch_max(now, Ordering::Relaxed);
    let received = Received {
        path: request.path().to_string(),
        headers: request
            .headers()
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
            })
            .collect(),
        body: body.to_vec(),
        at: Instant::now(),
    };
    let answer = {
        let mut script = state.script.lock().unwrap();
        let answer = answer_to(&mut script, &received, state.options.first_attempt);
        script.received.push(received);
        answer
    };
    if !state.options.latency.is_zero() {
        actix_rt::time::sleep(state.options.latency).await;
    }
    state.script.lock().unwrap().last_answer = Some(Instant::now());
    state.in_flight.fetch_sub(1, Ordering::Relaxed);
    let mut response =
        HttpResponse::build(StatusCode::from_u16(answer.status).expect("a valid status"));
    if let Some(after) = answer.retry_after {
        response.insert_header(("retry-after", after));
    }
    response.finish()
}

/// The scripted answer to `received`: its webhook's queued replies, its standing one, the
/// first attempt's, or 200.
fn answer_to(script: &mut Script, received: &Received, first_attempt: Option<Reply>) -> Reply {
    let Some(id) = received.webhook_id() else {
        return reply(200);
    };
    let attempt = {
        let count = script.attempts.entry(id.to_string()).or_default();
        *count += 1;
        *count
    };
    if let Some(queued) = script.queued.get_mut(id).and_then(VecDeque::pop_front) {
        return queued;
    }
    if let Some(then) = script.after.get(id) {
        return *then;
    }
    match first_attempt {
        Some(first) if attempt == 1 => first,
        _ => reply(200),
    }
}
