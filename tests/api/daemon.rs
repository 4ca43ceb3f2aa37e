//! The built binary, as an operator runs it.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use sqlx::Connection;

use testkit::database::{TEST_JWT_SECRET, TestDatabase};
use testkit::faults::{Clients, coupon_body, user_rows};
use testkit::process::Daemon;
use testkit::wait::eventually;

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-events");

fn daemon_command(database: &TestDatabase) -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_remove("RUST_LOG")
        .env("APP_CONFIG_FILE", "/nonexistent/commerce-events.toml")
        .env("APP_HTTP__PORT", "0")
        .env("APP_DATABASE__URL", database.url())
        .env("APP_DATABASE__MAX_CONNECTIONS", "4")
        .env("APP_DATABASE__HTTP_MAX_CONNECTIONS", "4")
        .env("APP_REDIS__KEY_PREFIX", format!("{}:", database.name))
        .env("APP_KAFKA__EMBEDDED_BROKERS", "1")
        .env("APP_LOG__FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    command
}

/// Reads the daemon's JSON log lines on a thread; sends each parsed line.
fn follow_logs(child: &mut Child) -> mpsc::Receiver<serde_json::Value> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = sender.send(entry);
            }
        }
    });
    receiver
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("child status") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[actix_web::test]
async fn the_daemon_serves_until_sigterm_and_then_exits_0_within_10_seconds() {
    let _slot = testkit::app::DaemonSlot::claim().await;
    let database = TestDatabase::new();
    let mut child = daemon_command(&database)
        .spawn()
        .expect("the daemon starts");
    let logs = follow_logs(&mut child);
    let address = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(entry) = logs.recv_timeout(Duration::from_millis(100))
                && entry["message"] == "HTTP listening"
            {
                return entry["address"].as_str().map(str::to_string);
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("the daemon logs its address");

    let client = awc::Client::default();
    eventually("the daemon is ready", Duration::from_secs(30), || async {
        match client.get(format!("{address}/readyz")).send().await {
            Ok(response) => response.status() == StatusCode::OK,
            Err(_) => false,
        }
    })
    .await;
    // The container health check says so too, and fails once the daemon is gone.
    let port = address.rsplit(':').next().unwrap().to_string();
    let ready = |port: String| {
        let mut command = daemon_command(&database);
        command.env("APP_HTTP__PORT", port).arg("ready");
        async move {
            tokio::task::spawn_blocking(move || command.status().expect("ready runs").code())
                .await
                .unwrap()
        }
    };
    assert_eq!(
        ready(port.clone()).await,
        Some(0),
        "`ready` on a ready daemon"
    );
    // A token from the binary itself (the development secret: no secret configured, the
    // embedded cluster), as the README's curl examples mint it.
    let minted = daemon_command(&database)
        .args(["token", "--user", "1", "--admin"])
        .output()
        .expect("the token command runs");
    assert!(minted.status.success());
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_string();
    assert_eq!(
        client
            .get(format!("{address}/admin/actors"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let tree: serde_json::Value = client
        .get(format!("{address}/admin/actors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        testkit::app::group(&tree, commerce_events::startup::PRODUCT_EVENT_GROUP)["partitions"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let terminated = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(terminated.success());
    let status =
        tokio::task::spawn_blocking(move || wait_for_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the daemon exits within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        ready(port).await,
        Some(1),
        "`ready` once the daemon is gone"
    );
}

#[actix_web::test]
async fn migrate_applies_the_schema_and_exits() {
    let database = TestDatabase::new();
    let status = tokio::task::spawn_blocking({
        let mut command = daemon_command(&database);
        move || command.arg("migrate").stdout(Stdio::null()).status()
    })
    .await
    .unwrap()
    .expect("migrate runs");
    assert!(status.success());

    let mut connection = sqlx::MySqlConnection::connect(&database.url())
        .await
        .expect("database exists");
    let tables: Vec<(String,)> = sqlx::query_as("SHOW TABLES")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    assert!(
        tables.iter().any(|(name,)| name == "event_log"),
        "{tables:?}"
    );
}

#[actix_web::test]
async fn an_unknown_command_is_refused() {
    let database = TestDatabase::new();
    let mut command = daemon_command(&database);
    let output = tokio::task::spawn_blocking(move || {
        command.arg("frobnicate").stderr(Stdio::piped()).output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unrecognized subcommand 'frobnicate'"),
        "{stderr}"
    );
}

#[actix_web::test]
async fn a_setting_that_names_nothing_stops_the_start_naming_it_and_the_closest() {
    let database = TestDatabase::new();
    let mut child = daemon_command(&database)
        .env("APP_HTTP__PROT", "9999")
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // A daemon that ignored the setting would serve: it is stopped, and the test fails.
    let deadline = Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(status) = child.try_wait().expect("the child's status") {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("the daemon started despite APP_HTTP__PROT");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!exited.success());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr is piped")
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("APP_HTTP__PROT: no such setting; did you mean http.port?"),
        "{stderr}"
    );
}

#[actix_web::test]
async fn a_500_logs_one_json_line_with_its_error_chain_and_no_backtrace() {
    let _slot = testkit::app::DaemonSlot::claim().await;
    let database = TestDatabase::new();
    let mut child = daemon_command(&database)
        .env("RUST_BACKTRACE", "1")
        .spawn()
        .expect("the daemon starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (sender, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let (address, lines) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(100))
                && let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line)
                && entry["message"] == "HTTP listening"
            {
                return (entry["address"].as_str().map(str::to_string), lines);
            }
        }
        (None, lines)
    })
    .await
    .unwrap();
    let address = address.expect("the daemon logs its address");
    let client = awc::Client::default();
    eventually("the daemon is ready", Duration::from_secs(30), || async {
        match client.get(format!("{address}/readyz")).send().await {
            Ok(response) => response.status() == StatusCode::OK,
            Err(_) => false,
        }
    })
    .await;
    let minted = daemon_command(&database)
        .args(["token", "--user", "1", "--admin"])
        .output()
        .expect("the token command runs");
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_string();

    // Break the schema under the daemon: the next user insert fails inside MySQL.
    let mut connection = <sqlx::MySqlConnection as sqlx::Connection>::connect(&database.url())
        .await
        .unwrap();
    sqlx::query("DROP TABLE app_user")
        .execute(&mut connection)
        .await
        .unwrap();
    let response = client
        .post(format!("{address}/users"))
        .bearer_auth(&token)
        .insert_header(("content-type", "application/json"))
        .send_body(r#"{"name": "Kim"}"#)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || wait_for_exit(&mut child, Duration::from_secs(10)))
        .await;
    let logged: Vec<String> = lines.try_iter().collect();
    for line in &logged {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "every line is JSON: {line}"
        );
    }
    let failure = logged
        .iter()
        .find(|line| line.contains("request failed"))
        .expect("the 500 is logged");
    assert!(
        failure.contains("app_user"),
        "the error chain names the cause: {failure}"
    );
    assert!(
        !failure.contains("backtrace") && failure.len() < 4_096,
        "no backtrace: {failure}"
    );
}

/// A deploy right after a burst: every client of the embedded cluster (producer, group
/// members, offset clients) is closed before the cluster stops, so the stop logs nothing that
/// log-based alerting fires on.
#[actix_web::test]
async fn a_sigterm_right_after_a_burst_of_requests_logs_no_warning_and_exits_0() {
    let _slot = testkit::app::DaemonSlot::claim().await;
    let database = TestDatabase::new();
    let daemon = Daemon::start(
        Path::new(BINARY),
        &database.url(),
        &format!("{}:", database.name),
        TEST_JWT_SECRET,
        None,
    );
    let clients = Clients::new(&daemon.address, &database.settings());
    clients.wait_ready().await;
    user_rows(&database.url(), 500).await;
    let (status, coupon) = clients.admin("/coupons", coupon_body(100)).await;
    assert_eq!(status, StatusCode::CREATED, "{coupon}");
    let coupon = coupon["couponId"].as_u64().unwrap();
    clients.load(1..=500, coupon, 32).await;
    assert_eq!(
        clients.accepted(),
        500,
        "{:?}",
        clients.ledger.lock().unwrap()
    );

    let warnings = daemon.warnings_after_stop();
    daemon.signal("-TERM");
    assert_eq!(
        daemon.exited().await,
        Some(0),
        "SIGTERM ends the daemon cleanly"
    );
    let warnings = warnings.lock().unwrap();
    assert!(
        warnings.is_empty(),
        "{} WARN/ERROR lines after SIGTERM:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
}
