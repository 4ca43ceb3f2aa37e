//! Outages of the dependencies every record needs, as the work that waits for them sees
//! them.
//!
//! A partition (or the retry scheduler) whose work fails because MySQL, Redis, Kafka or a
//! delivery target does not answer [`Outages::report`]s it each time it retries, and
//! [`Outages::recovered`] once its work goes through again. A dependency is down while at
//! least one reporter waits for it. `/readyz` and `/admin/actors` show who waits for what
//! and since when; an outage that lasts longer than `retry.outage_alert_after_secs` raises
//! one alert: an error log line with `alert=true` and, when `external.alert_url` is set, a
//! post of `{"alert": "DEPENDENCY_OUTAGE", ...}` to it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use tracing::{error, info, warn};

use crate::common::error::Dependency;
use crate::observability::alerts;

/// The shared register of outages (cheap to clone).
#[derive(Clone)]
pub struct Outages {
    inner: Arc<Inner>,
}

struct Inner {
    alert_after: Duration,
    alert_url: Option<String>,
    current: Mutex<BTreeMap<Dependency, Outage>>,
    /// Outages that began, and alerts raised.
    began: AtomicU64,
    alerts: AtomicU64,
}

struct Outage {
    since: DateTime<Utc>,
    started: std::time::Instant,
    /// Who waits for the dependency (a partition like `coupon-requests/2`, or an actor).
    waiting: BTreeSet<String>,
    last_error: String,
    retries: u64,
    alerted: bool,
}

/// What `/readyz` and `/admin/actors` show of one outage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutageView {
    pub dependency: Dependency,
    pub since: DateTime<Utc>,
    pub waiting: Vec<String>,
    pub last_error: String,
    pub retries: u64,
    pub alerted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutagesState {
    pub current: Vec<OutageView>,
    pub began: u64,
    pub alerts: u64,
}

impl Default for Outages {
    /// Alerts after a minute, in the log only.
    fn default() -> Self {
        Self::new(Duration::from_secs(60), None)
    }
}

impl Outages {
    pub fn new(alert_after: Duration, alert_url: Option<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                alert_after,
                alert_url,
                current: Mutex::default(),
                began: AtomicU64::new(0),
                alerts: AtomicU64::new(0),
            }),
        }
    }

    /// `waiter` could not do its work because `dependency` did not answer, and will retry.
    pub fn report(&self, dependency: Dependency, waiter: &str, error: &str) {
        let alert = {
            let mut current = self.inner.current.lock().expect("outage register");
            let outage = current.entry(dependency).or_insert_with(|| {
                self.inner.began.fetch_add(1, Ordering::Relaxed);
                warn!(%dependency, waiter, error, "dependency outage: work waits for it");
                Outage {
                    since: Utc::now(),
                    started: std::time::Instant::now(),
                    waiting: BTreeSet::new(),
                    last_error: String::new(),
                    retries: 0,
                    alerted: false,
                }
            });
            outage.waiting.insert(waiter.to_string());
            outage.last_error = error.to_string();
            outage.retries += 1;
            let due = !outage.alerted && outage.started.elapsed() >= self.inner.alert_after;
            if due {
                outage.alerted = true;
            }
            due.then(|| {
                (
                    outage.since,
                    outage.waiting.len(),
                    outage.last_error.clone(),
                )
            })
        };
        if let Some((since, waiting, last_error)) = alert {
            self.alert(dependency, since, waiting, last_error);
        }
    }

    /// `waiter`'s work went through again; the outage ends when nobody waits any more.
    pub fn recovered(&self, dependency: Dependency, waiter: &str) {
        let mut current = self.inner.current.lock().expect("outage register");
        let Some(outage) = current.get_mut(&dependency) else {
            return;
        };
        outage.waiting.remove(waiter);
        if outage.waiting.is_empty() {
            let lasted = outage.started.elapsed();
            info!(%dependency, lasted_ms = lasted.as_millis() as u64, retries = outage.retries, "dependency outage over");
            current.remove(&dependency);
        }
    }

    /// Whether some work waits for `dependency`.
    pub fn is_down(&self, dependency: Dependency) -> bool {
        self.inner
            .current
            .lock()
            .expect("outage register")
            .contains_key(&dependency)
    }

    pub fn current(&self) -> Vec<OutageView> {
        self.inner
            .current
            .lock()
            .expect("outage register")
            .iter()
            .map(|(dependency, outage)| OutageView {
                dependency: *dependency,
                since: outage.since,
                waiting: outage.waiting.iter().cloned().collect(),
                last_error: outage.last_error.clone(),
                retries: outage.retries,
                alerted: outage.alerted,
            })
            .collect()
    }

    pub fn state(&self) -> OutagesState {
        OutagesState {
            current: self.current(),
            began: self.inner.began.load(Ordering::Relaxed),
            alerts: self.inner.alerts.load(Ordering::Relaxed),
        }
    }

    fn alert(&self, dependency: Dependency, since: DateTime<Utc>, waiting: usize, error: String) {
        self.inner.alerts.fetch_add(1, Ordering::Relaxed);
        crate::observability::metrics::alert_raised("dependency_outage");
        error!(
            alert = true,
            %dependency,
            since = %since,
            waiting,
            error,
            "dependency outage outlasted retry.outage_alert_after_secs: work is paused until it answers"
        );
        let Some(url) = self.inner.alert_url.clone() else {
            return;
        };
        let body = json!({
            "alert": "DEPENDENCY_OUTAGE",
            "dependency": dependency,
            "since": since,
            "waiting": waiting,
            "lastError": error,
        });
        actix_rt::spawn(async move {
            if let Err(post_error) = alerts::post(&url, &body).await {
                warn!(%dependency, error = %post_error, "outage alert not delivered");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dependency_is_down_while_anyone_waits_for_it() {
        let outages = Outages::new(Duration::from_secs(60), None);
        outages.report(Dependency::Mysql, "coupon-requests/0", "refused");
        outages.report(Dependency::Mysql, "coupon-requests/1", "refused");
        assert!(outages.is_down(Dependency::Mysql));
        assert!(!outages.is_down(Dependency::Redis));
        outages.recovered(Dependency::Mysql, "coupon-requests/0");
        assert!(outages.is_down(Dependency::Mysql));
        outages.recovered(Dependency::Mysql, "coupon-requests/1");
        assert!(!outages.is_down(Dependency::Mysql));
        assert_eq!(outages.state().began, 1);
    }

    #[actix_rt::test]
    async fn an_outage_longer_than_the_bound_alerts_once() {
        let outages = Outages::new(Duration::ZERO, None);
        outages.report(Dependency::Redis, "ranking", "timeout");
        outages.report(Dependency::Redis, "ranking", "timeout");
        let state = outages.state();
        assert_eq!(state.alerts, 1);
        assert!(state.current[0].alerted);
        assert_eq!(state.current[0].retries, 2);
    }
}
