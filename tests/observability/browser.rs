//! `/dashboard` in a real headless browser (Debian's chromium, driven by playwright-core
//! from `tests/browser`, both installed by `scripts/test`).

use std::path::Path;
use std::time::Duration;

use awc::http::StatusCode;

use crate::exclusive;
use crate::metrics::{configure_webhooks, receiver_refusing_first_attempts};
use testkit::app::{ADMIN_USER, TestApp};
use testkit::wait::eventually;

const WAIT: Duration = Duration::from_secs(30);

#[actix_rt::test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs chromium and playwright-core (feature external-tools; scripts/test installs it)"
)]
async fn the_dashboard_shows_lag_replays_a_dead_letter_and_pauses_a_group() {
    let _exclusive = exclusive().await;
    let browser_tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_tests.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run scripts/test (or npm ci --prefix tests/browser)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "chromium is not installed: run scripts/test (or apt-get install chromium)"
    );
    // Each webhook's first attempt is refused for good (410): it is dead-lettered at once.
    let receiver = receiver_refusing_first_attempts(410);
    let address = receiver.address.clone();
    let app = TestApp::builder()
        .settings(move |settings| {
            configure_webhooks(settings, &address);
            settings.metrics.dashboard_interval_ms = 200;
        })
        .start()
        .await;

    let buyer = app.create_user(100_000).await;
    let product = app.create_product("dashboarded", 1_000, 10).await;
    let order = app.place_order(buyer, &[(product, 2)]).await;
    app.pay(order).await;
    eventually("the payment's webhook is dead-lettered", WAIT, || async {
        let (_, page) = app.get("/admin/events?status=DEAD_LETTER").await;
        page["events"][0]["eventId"].is_string()
    })
    .await;
    let (_, page) = app.get("/admin/events?status=DEAD_LETTER").await;
    let dead_letter = page["events"][0]["eventId"].as_str().unwrap().to_string();
    let coupon = app.create_coupon(10).await;
    let user = 4_242;
    app.ensure_user(user).await;
    let group = app
        .settings
        .kafka
        .group_id(commerce_events::startup::COUPON_REQUEST_GROUP);

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let mut command = std::process::Command::new("node");
    command
        .arg("dashboard.mjs")
        .current_dir(&browser_tests)
        .env("BASE_URL", &app.address)
        .env("ADMIN_TOKEN", app.token(ADMIN_USER, true))
        .env("USER_TOKEN", app.token(user, false))
        .env("COUPON_ID", coupon.to_string())
        .env("GROUP", &group)
        .env("DEAD_LETTER_EVENT", &dead_letter)
        .env("SCREENSHOT", &screenshot);
    let (succeeded, printed) = crate::run_tool(command, "node").await;
    assert!(succeeded, "the browser run failed:\n{printed}");
    assert!(printed.contains("dashboard: all steps passed"), "{printed}");

    // What the page did, seen through the API.
    let (status, event) = app.get(&format!("/admin/events/{dead_letter}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        event["deadLetters"][0]["replayedAt"].is_string(),
        "the dead letter was replayed: {event}"
    );
    let (_, tree) = app.get("/admin/actors").await;
    assert_eq!(testkit::app::group(&tree, &group)["paused"], false);
}
