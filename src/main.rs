//! The daemon's command line: `commerce-events [serve]` runs everything;
//! `commerce-events migrate` applies the database migrations and exits.

use clap::{Parser, Subcommand};
use commerce_events::config::Settings;
use commerce_events::startup::{self, Application};
use commerce_events::telemetry;
use tracing::info;

/// An actor-based Kafka event processor for an e-commerce backend. Settings come from
/// `commerce-events.toml` (or `APP_CONFIG_FILE`) and `APP_<SECTION>__<KEY>` variables.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the daemon: HTTP API, consumer groups, outbox relay, retry scheduler (the default).
    Serve,
    /// Creates the database if missing, applies the migrations and exits.
    Migrate,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load()?;
    telemetry::init(&settings.log);
    actix_rt::System::new().block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let application = Application::build(settings).await?;
                application.run_until_stopped(shutdown_signal()).await
            }
            Command::Migrate => {
                startup::migrate(&settings).await?;
                info!("migrations applied");
                Ok(())
            }
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
