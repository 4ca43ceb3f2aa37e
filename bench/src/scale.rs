//! Scenario `scale`: the coupon flow through 1, 2 and 3
//! daemon processes (the `commerce-events` binary beside the bench's) in one consumer group,
//! on one separate broker process (`commerce-events broker`), one MySQL database and one
//! Redis. A user's requests always go to the same daemon (user id modulo the members).
//!
//! Each run starts a fresh broker process and database, the first member (it migrates the
//! database), then the others, and waits until they share the `coupon-requests` partitions.
//! Then:
//! 1. Intake: `clients` concurrent clients, each sending its next request once the previous
//!    is answered, for `seconds`: distinct users, one hot coupon with ample stock. Accepted/s
//!    is counted by the clients; issued/s is the coupon's issued quantity over the time from
//!    the first coupon issued to the last (sampled every 250 ms).
//! 2. Push latency: `latency-rate` requests/s for `latency-seconds` from users with an open
//!    WebSocket on their daemon (each round of users asks for a coupon of its own; a user's
//!    next request waits until its previous one is answered): the time from sending a
//!    request to its result arriving on the socket. The result is pushed by
//!    the result notifier of the daemon the user is connected to, whichever member decided
//!    the request.
//! 3. The shared checker (`commerce_events::faults`): accepted but lost or never decided,
//!    over-issued, applied twice, dead-lettered, pushes lost, users decided out of order.
//!
//! Costs per accepted request (the intake and its issuing, every daemon summed) come from
//! [`crate::costs`]; each member's CPU time and partitions show how the work was shared.
//! On a 2-core machine more processes cannot add throughput: the point is that they share
//! the work correctly, and what each costs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use commerce_events::config::Settings;
use commerce_events::guards::tokens::Authenticator;
use commerce_events::startup::COUPON_REQUEST_GROUP;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use testkit::faults::{Checker, Ledger, Report as CheckerReport, coupon_body, user_rows};
use testkit::process::{BrokerProcess, Daemon, wait_until_ready};
use testkit::wait::eventually;

use crate::chart::nearest_rank;
use crate::costs::{CostTable, Costs, Meters, clock_ticks_per_second, cpu_us_of};
use crate::coupons::drop_database;
use crate::load;
use crate::report::{Cell, Column, Report, Table};

const JWT_SECRET: &str = "bench-secret-of-the-scale-scenario";
/// The broker's session timeout for its members.
const SESSION_TIMEOUT_MS: u64 = 10_000;
/// Partitions of `coupon-requests` (the default).
const PARTITIONS: usize = 3;
/// The intake's users are 1..=INTAKE_USERS; the push-latency phase's follow.
const INTAKE_USERS: u64 = 400_000;
/// Users with an open WebSocket in the push-latency phase (divisible by 1, 2 and 3).
const LATENCY_USERS: u64 = 240;

#[derive(clap::Args)]
pub struct Options {
    /// The numbers of daemon processes to run, in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub members: Vec<usize>,
    /// Runs of each number (the table gives the median and its range).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// How long the intake phase sends requests.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Concurrent HTTP clients of the intake phase, spread over the members.
    #[arg(long, default_value_t = 256)]
    pub clients: usize,
    /// Requests per second of the push-latency phase.
    #[arg(long, default_value_t = 500)]
    pub latency_rate: u64,
    /// How long the push-latency phase runs.
    #[arg(long, default_value_t = 10)]
    pub latency_seconds: u64,
}

/// What one run with `members` daemons measured.
struct Run {
    members: usize,
    accepted: u64,
    refused: u64,
    accepted_per_second: f64,
    issued_per_second: f64,
    push_p50_ms: f64,
    push_p99_ms: f64,
    checked: CheckerReport,
    costs: Costs,
    /// Per member: `coupon-requests` partitions held, intake requests it accepted, its CPU
    /// time over the intake and issuing, in µs.
    shares: Vec<(usize, u64, u64)>,
}

pub async fn run(options: Options, report: &mut Report) -> anyhow::Result<()> {
    let binary = testkit::process::binary_beside_this_executable()?;
    report.note(format!(
        "scenario scale: {:?} daemon processes on one `commerce-events broker` process, \
         {} runs each; intake {} s from {} clients (one hot coupon, distinct users), push \
         latency at {} requests/s for {} s from {} users with a WebSocket; consumers fetch \
         with fetch.wait.max.ms = 10 (the mock broker holds an empty fetch for the whole wait)",
        options.members,
        options.runs,
        options.seconds,
        options.clients,
        options.latency_rate,
        options.latency_seconds,
        LATENCY_USERS,
    ));
    let mut runs: Vec<Run> = Vec::new();
    for run in 0..options.runs.max(1) {
        for &members in &options.members {
            eprintln!("scale: run {} with {members} members", run + 1);
            runs.push(one_run(&binary, members, run, &options).await?);
        }
    }
    report.table(flow_table(&options, &runs));
    report.table(share_table(&options, &runs));
    let mut costs = CostTable::new();
    for &members in &options.members {
        if let Some(first) = runs.iter().find(|run| run.members == members) {
            costs.add(
                format!("{members} members (first run)"),
                "accepted request",
                first.accepted,
                first.costs.clone(),
            );
        }
    }
    report.table(costs.table("costs per accepted request, intake and issuing"));
    Ok(())
}

/// The median of `values` with their range: `median (low–high)`.
fn median_range(values: Vec<f64>, decimals: usize) -> Cell {
    let mut sorted = values;
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let (low, high) = (sorted[0], sorted[sorted.len() - 1]);
    Cell::new(
        format!("{median:.decimals$} ({low:.decimals$}–{high:.decimals$})"),
        json!({"median": median, "min": low, "max": high, "runs": sorted}),
    )
}

fn flow_table(options: &Options, runs: &[Run]) -> Table {
    let mut table = Table::new(
        "coupon flow through several daemon processes, median (range)",
        vec![
            Column::right("daemons", "members"),
            Column::right("runs", "runs"),
            Column::right("accepted/s", "accepted_per_second"),
            Column::right("issued/s", "issued_per_second"),
            Column::right("push p50 ms", "push_p50_ms"),
            Column::right("push p99 ms", "push_p99_ms"),
            Column::right("accepted", "accepted"),
            Column::right("refused", "refused"),
            Column::right("lost", "lost"),
            Column::right("stranded", "stranded"),
            Column::right("over-issued", "over_issued"),
            Column::right("applied or held twice", "applied_twice"),
            Column::right("dead-lettered", "dead_lettered"),
            Column::right("pushes lost", "pushes_lost"),
            Column::right("users out of order", "out_of_order"),
        ],
    );
    for &members in &options.members {
        let of: Vec<&Run> = runs.iter().filter(|run| run.members == members).collect();
        let values = |figure: fn(&Run) -> f64| of.iter().map(|run| figure(run)).collect();
        let sum = |count: fn(&CheckerReport) -> u64| -> Cell {
            Cell::count(of.iter().map(|run| count(&run.checked)).sum::<u64>())
        };
        table.row(vec![
            Cell::count(members as u64),
            Cell::count(of.len() as u64),
            median_range(values(|run| run.accepted_per_second), 0),
            median_range(values(|run| run.issued_per_second), 0),
            median_range(values(|run| run.push_p50_ms), 1),
            median_range(values(|run| run.push_p99_ms), 1),
            sum(|checked| checked.accepted),
            Cell::count(of.iter().map(|run| run.refused).sum::<u64>()),
            sum(|checked| checked.lost),
            sum(|checked| checked.stranded),
            sum(|checked| checked.over_issued),
            sum(|checked| checked.applied_twice + checked.held_twice),
            sum(|checked| checked.dead_lettered),
            sum(|checked| checked.pushes_lost),
            sum(|checked| checked.out_of_order),
        ]);
    }
    table
}

fn share_table(options: &Options, runs: &[Run]) -> Table {
    let mut table = Table::new(
        "how the members shared the work (first run of each)",
        vec![
            Column::right("daemons", "members"),
            Column::right("member", "member"),
            Column::right("coupon-requests partitions", "partitions"),
            Column::right("requests accepted", "accepted"),
            Column::right("CPU ms", "cpu_ms"),
            Column::right("share of daemon CPU", "cpu_share"),
            Column::right(
                "daemon CPU µs per accepted request, all members",
                "cpu_us_per_request",
            ),
        ],
    );
    for &members in &options.members {
        let Some(first) = runs.iter().find(|run| run.members == members) else {
            continue;
        };
        let total: u64 = first.shares.iter().map(|(_, _, cpu)| cpu).sum();
        for (member, (partitions, accepted, cpu)) in first.shares.iter().enumerate() {
            table.row(vec![
                Cell::count(members as u64),
                Cell::count(member as u64 + 1),
                Cell::count(*partitions as u64),
                Cell::count(*accepted),
                Cell::number(*cpu as f64 / 1_000.0, 0),
                Cell::number(*cpu as f64 / total.max(1) as f64, 2),
                Cell::number(total as f64 / first.accepted.max(1) as f64, 0),
            ]);
        }
    }
    table
}

/// The members' clients: one HTTP client per member, a user always sent to the same one.
struct Members {
    addresses: Vec<String>,
    clients: Vec<awc::Client>,
    auth: Authenticator,
}

impl Members {
    fn of(user: u64, count: usize) -> usize {
        (user % count as u64) as usize
    }

    fn token(&self, user: u64, admin: bool) -> String {
        load::token(&self.auth, user, admin)
    }

    /// An issue request of `user`; its request id when accepted (202), else what happened.
    async fn issue(&self, user: u64, coupon: u64) -> Result<String, String> {
        let member = Self::of(user, self.addresses.len());
        let sent = self.clients[member]
            .post(format!("{}/coupons/issue", self.addresses[member]))
            .bearer_auth(self.token(user, false))
            .insert_header(("content-type", "application/json"))
            .send_body(format!(r#"{{"userId":{user},"couponId":{coupon}}}"#))
            .await;
        match sent {
            Ok(mut response) if response.status().as_u16() == 202 => {
                let body: Value = response.json().await.map_err(|error| error.to_string())?;
                body["requestId"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "no requestId".to_string())
            }
            Ok(mut response) => Err(load::refusal(&mut response).await),
            Err(error) => Err(error.to_string()),
        }
    }

    async fn create_coupon(&self, stock: u32) -> anyhow::Result<u64> {
        let mut response = self.clients[0]
            .post(format!("{}/coupons", self.addresses[0]))
            .bearer_auth(self.token(1, true))
            .send_json(&coupon_body(stock))
            .await
            .map_err(|error| anyhow::anyhow!("create coupon: {error}"))?;
        let created: Value = response.json().await?;
        created["couponId"].as_u64().context("a coupon id")
    }
}

/// Records an accepted request in the ledger the checker reads.
fn accepted(ledger: &RefCell<Ledger>, user: u64, coupon: u64, request_id: String) {
    let mut ledger = ledger.borrow_mut();
    ledger.ok += 1;
    ledger
        .in_order
        .entry(user)
        .or_default()
        .push(request_id.clone());
    ledger.accepted.insert((user, coupon), request_id);
}

async fn one_run(
    binary: &Path,
    count: usize,
    run: usize,
    options: &Options,
) -> anyhow::Result<Run> {
    let name = format!("bench_scale_{count}_{run}_{}", std::process::id());
    let url = format!("mysql://root@127.0.0.1:3306/{name}");
    let broker = BrokerProcess::start(binary, SESSION_TIMEOUT_MS);
    let prefix = format!("{name}:");
    let defaults = Settings::default();
    let connections = defaults.database.max_connections.to_string();
    let http_connections = defaults.database.http_max_connections.to_string();
    let start = |member: usize| {
        let instance = format!("member-{}", member + 1);
        Daemon::start_with(
            binary,
            &url,
            &prefix,
            JWT_SECRET,
            Some(&broker.address),
            &[
                ("APP_INSTANCE__ID", instance.as_str()),
                ("APP_DATABASE__MAX_CONNECTIONS", connections.as_str()),
                (
                    "APP_DATABASE__HTTP_MAX_CONNECTIONS",
                    http_connections.as_str(),
                ),
                ("APP_KAFKA__CONSUMER__FETCH_WAIT_MAX_MS", "10"),
                ("APP_KAFKA__CONSUMER__FETCH_MIN_BYTES", "1"),
                (
                    "APP_LOG__FILTER",
                    "warn,commerce_events::startup=info,commerce_events::kafka::consumer=info",
                ),
            ],
        )
    };
    // The first member creates and migrates the database before the others start.
    let mut daemons = vec![start(0)];
    wait_until_ready(&daemons[0].address).await?;
    for member in 1..count {
        daemons.push(start(member));
    }
    for daemon in &daemons {
        wait_until_ready(&daemon.address).await?;
    }
    let mut settings = Settings::default();
    settings.auth.jwt_secret = SecretString::from(JWT_SECRET);
    let group = settings.kafka.group_id(COUPON_REQUEST_GROUP);
    let shared = |daemons: &[Daemon]| {
        let held: Vec<usize> = daemons
            .iter()
            .map(|daemon| requests_partitions(daemon, &group))
            .collect();
        held.iter().sum::<usize>() == PARTITIONS
            && (daemons.len() > PARTITIONS || held.iter().all(|held| *held > 0))
    };
    eventually(
        "the members share the partitions",
        Duration::from_secs(120),
        || async { shared(&daemons) },
    )
    .await;

    let members = Members {
        addresses: daemons
            .iter()
            .map(|daemon| daemon.address.clone())
            .collect(),
        clients: daemons
            .iter()
            .map(|_| {
                awc::Client::builder()
                    .connector(
                        awc::Connector::new().limit(options.clients + LATENCY_USERS as usize + 64),
                    )
                    .timeout(Duration::from_secs(60))
                    .finish()
            })
            .collect(),
        auth: Authenticator::from_settings(&settings.auth, &settings.kafka)?,
    };
    user_rows(&url, INTAKE_USERS + LATENCY_USERS).await;
    let hot = members.create_coupon(10_000_000).await?;
    let rounds = (options.latency_rate * options.latency_seconds)
        .div_ceil(LATENCY_USERS)
        .max(1) as usize;
    let mut latency_coupons = Vec::new();
    for _ in 0..rounds {
        latency_coupons.push(members.create_coupon(LATENCY_USERS as u32).await?);
    }
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    let pids: Vec<u32> = daemons
        .iter()
        .map(|daemon| daemon.pid().expect("running"))
        .collect();
    let meters = Meters::of_daemons(
        pool.clone(),
        defaults.redis.url.expose_secret(),
        &daemons
            .iter()
            .zip(&pids)
            .map(|(daemon, pid)| (daemon.address.as_str(), *pid))
            .collect::<Vec<_>>(),
    )
    .await?;
    let ledger: Rc<RefCell<Ledger>> = Rc::default();
    let members = Rc::new(members);

    // 1. Intake and its issuing.
    let ticks = clock_ticks_per_second();
    let cpu = |pids: &[u32]| -> Vec<u64> {
        pids.iter()
            .map(|pid| cpu_us_of(*pid, ticks).unwrap_or(0))
            .collect()
    };
    let before = meters.read().await?;
    let cpu_before = cpu(&pids);
    let refused = Rc::new(std::cell::Cell::new(0u64));
    let next_user = Rc::new(std::cell::Cell::new(1u64));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.seconds);
    let samples: Rc<RefCell<Vec<(Instant, u64)>>> = Rc::default();
    let watching = Rc::new(std::cell::Cell::new(true));
    let watcher = actix_rt::spawn({
        let (pool, samples, watching) = (pool.clone(), samples.clone(), watching.clone());
        async move {
            while watching.get() {
                if let Ok((issued,)) = sqlx::query_as::<_, (u64,)>(
                    "SELECT CAST(issued_quantity AS UNSIGNED) FROM coupon_stock \
                     WHERE coupon_id = ?",
                )
                .bind(hot)
                .fetch_one(&pool)
                .await
                {
                    samples.borrow_mut().push((Instant::now(), issued));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    let workers: Vec<_> = (0..options.clients)
        .map(|_| {
            let (members, ledger, refused, next_user) = (
                members.clone(),
                ledger.clone(),
                refused.clone(),
                next_user.clone(),
            );
            actix_rt::spawn(async move {
                while Instant::now() < deadline {
                    let user = next_user.get();
                    if user > INTAKE_USERS {
                        break;
                    }
                    next_user.set(user + 1);
                    match members.issue(user, hot).await {
                        Ok(request_id) => accepted(&ledger, user, hot, request_id),
                        Err(error) => load::count_failure(
                            &refused,
                            format!("scale: intake request of user {user}: {error}"),
                        ),
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    let intake_elapsed = started.elapsed();
    let intake_accepted = ledger.borrow().ok;
    eventually(
        "every accepted intake request issued",
        Duration::from_secs(600),
        || async {
            samples
                .borrow()
                .last()
                .is_some_and(|(_, issued)| *issued >= intake_accepted)
        },
    )
    .await;
    watching.set(false);
    watcher.await?;
    meters.wait_settled().await?;
    let after = meters.read().await?;
    let cpu_after = cpu(&pids);
    let issued_per_second = {
        let samples = samples.borrow();
        let from = samples
            .iter()
            .take_while(|(_, issued)| *issued == 0)
            .last()
            .map(|(at, _)| *at)
            .unwrap_or(started);
        let (done, issued) = samples.last().copied().unwrap_or((started, 0));
        issued as f64 / done.duration_since(from).as_secs_f64().max(0.001)
    };
    let shares = daemons
        .iter()
        .enumerate()
        .map(|(member, daemon)| {
            let accepted = ledger
                .borrow()
                .accepted
                .keys()
                .filter(|(user, _)| Members::of(*user, count) == member)
                .count() as u64;
            (
                requests_partitions(daemon, &group),
                accepted,
                cpu_after[member].saturating_sub(cpu_before[member]),
            )
        })
        .collect();

    // 2. Push latency.
    let (push_p50_ms, push_p99_ms) =
        push_latency(&members, &ledger, &latency_coupons, options).await?;

    // 3. The checker.
    let checker = Checker::connect(&url).await;
    let mut coupons = vec![hot];
    coupons.extend(&latency_coupons);
    let settle_deadline = Instant::now() + Duration::from_secs(120);
    // Every request is answered by now.
    let ledger = std::mem::take(&mut *ledger.borrow_mut());
    let checked = loop {
        let checked = checker.report(&ledger, &coupons).await;
        if checked.settled() || Instant::now() > settle_deadline {
            break checked;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("scale: {count} members: {checked:?}");
    checker.pool.close().await;
    pool.close().await;
    for daemon in &daemons {
        daemon.signal("-TERM");
    }
    for daemon in daemons {
        daemon.exited().await;
    }
    drop(broker);
    drop_database(&name).await?;
    Ok(Run {
        members: count,
        accepted: intake_accepted,
        refused: refused.get(),
        accepted_per_second: intake_accepted as f64 / intake_elapsed.as_secs_f64(),
        issued_per_second,
        push_p50_ms,
        push_p99_ms,
        checked,
        costs: before.until(&after),
        shares,
    })
}

/// The `coupon-requests` partitions `daemon` holds, by its log.
fn requests_partitions(daemon: &Daemon, group: &str) -> usize {
    daemon
        .holds(group)
        .iter()
        .filter(|partition| partition.starts_with("coupon-requests["))
        .count()
}

/// Requests at `latency_rate` from users with a WebSocket open on their own daemon; the
/// p50 and p99 in ms of the time from sending a request to its result on the socket.
async fn push_latency(
    members: &Rc<Members>,
    ledger: &Rc<RefCell<Ledger>>,
    coupons: &[u64],
    options: &Options,
) -> anyhow::Result<(f64, f64)> {
    let first = INTAKE_USERS + 1;
    let received = load::Arrivals::default();
    let mut readers = Vec::new();
    for user in first..first + LATENCY_USERS {
        let member = Members::of(user, members.addresses.len());
        let address = members.addresses[member].replace("http://", "ws://");
        // A client of its own: a WebSocket holds its connection for good.
        let client = awc::Client::default();
        let token = members.token(user, false);
        readers.push(load::read_results(&client, &address, user, token, &received).await?);
    }
    let sent: Rc<RefCell<HashMap<String, Instant>>> = Rc::default();
    // A user's client sends its next request once the previous one is answered (the order
    // the checker holds the users to).
    let turns: Rc<Vec<Rc<tokio::sync::Mutex<()>>>> =
        Rc::new((0..LATENCY_USERS).map(|_| Rc::default()).collect());
    let tick = Duration::from_millis(5);
    let per_tick = (options.latency_rate as f64 * tick.as_secs_f64())
        .round()
        .max(1.0) as u64;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let duration = Duration::from_secs(options.latency_seconds);
    let started = Instant::now();
    let mut requests = Vec::new();
    let mut next = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        for _ in 0..per_tick {
            let user = first + next % LATENCY_USERS;
            let coupon = coupons[((next / LATENCY_USERS) as usize).min(coupons.len() - 1)];
            next += 1;
            let (members, ledger, sent) = (members.clone(), ledger.clone(), sent.clone());
            let turn = turns[((user - first) as usize) % turns.len()].clone();
            requests.push(actix_rt::spawn(async move {
                let _turn = turn.lock().await;
                let at = Instant::now();
                if let Ok(request_id) = members.issue(user, coupon).await {
                    sent.borrow_mut().insert(request_id.clone(), at);
                    accepted(&ledger, user, coupon, request_id);
                }
            }));
        }
    }
    futures::future::join_all(requests).await;
    let expected = sent.borrow().len();
    eventually("every result pushed", Duration::from_secs(60), || async {
        let received = received.borrow();
        sent.borrow()
            .keys()
            .filter(|id| received.contains_key(*id))
            .count()
            >= expected
    })
    .await;
    for reader in readers {
        reader.abort();
    }
    let mut latencies: Vec<f64> = sent
        .borrow()
        .iter()
        .map(|(request_id, at)| {
            received.borrow()[request_id]
                .saturating_duration_since(*at)
                .as_secs_f64()
                * 1_000.0
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok((
        nearest_rank(&latencies, 50.0),
        nearest_rank(&latencies, 99.0),
    ))
}
