//! The daemon: `commerce-events [serve]` runs everything; `commerce-events migrate` applies
//! the database migrations and exits.

use anyhow::bail;
use commerce_events::config::Settings;
use commerce_events::startup::{self, Application};
use commerce_events::telemetry;
use tracing::info;

fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    telemetry::init(&settings.log);
    let command = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
    actix_rt::System::new().block_on(async move {
        match command.as_str() {
            "serve" => {
                let application = Application::build(settings).await?;
                application.run_until_stopped(shutdown_signal()).await
            }
            "migrate" => {
                startup::migrate(&settings).await?;
                info!("migrations applied");
                Ok(())
            }
            other => bail!("unknown command {other:?}; expected `serve` or `migrate`"),
        }
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail");
    let mut interrupt =
        signal(SignalKind::interrupt()).expect("installing a SIGINT handler cannot fail");
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM received"),
        _ = interrupt.recv() => info!("SIGINT received"),
    }
}
