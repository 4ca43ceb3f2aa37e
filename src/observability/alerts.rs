//! Alerts for an administrator. Whoever raises one (a dependency outage that outlasts
//! `retry.outage_alert_after_secs`, an event dead-lettered by the retry scheduler) writes an
//! error-level log line with `alert = true` and counts it (`alerts_total{kind}`); when
//! `external.alert_url` is set, the alert, a JSON document, is also posted there with
//! [`post`].

use std::time::Duration;

thread_local! {
    /// One HTTP client per arbiter thread: awc's client is bound to the thread that made it.
    static CLIENT: awc::Client = awc::Client::builder().disable_redirects().finish();
}

/// How long an alert post may take.
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// Posts `alert` to `url`; a failure (no answer, or not 2xx) is the caller's to log.
pub async fn post(url: &str, alert: &serde_json::Value) -> Result<(), String> {
    let response = CLIENT
        .with(|client| client.post(url))
        .timeout(POST_TIMEOUT)
        .send_json(alert)
        .await
        .map_err(|error| error.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", response.status().as_u16()))
    }
}
