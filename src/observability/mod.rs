//! What an operator sees: Prometheus metrics, the log, the W3C trace context and its export
//! over OTLP, the register of dependency outages, and alerts.

pub mod alerts;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod outages;
pub mod trace;
