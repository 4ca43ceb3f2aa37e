//! The daemon's command line: `commerce-events [serve]` runs everything;
//! `commerce-events migrate` applies the database migrations and exits;
//! `commerce-events token --user 42 [--admin] [--ttl 3600]` prints a bearer token;
//! `commerce-events rebuild-ranking` recomputes the ranking from MySQL.

use std::time::Duration;

use clap::{Parser, Subcommand};
use commerce_events::auth::Authenticator;
use commerce_events::config::Settings;
use commerce_events::ids::UserId;
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
    /// Recomputes the best-seller ranking in Redis from the completed orders in MySQL (the
    /// daemon may keep running: live updates wait for it) and prints what was counted.
    RebuildRanking,
    /// Prints a bearer token signed with the configured secret (the development secret with
    /// the embedded Kafka cluster), for curl and tests.
    Token {
        /// The user the token names (`sub`).
        #[arg(long)]
        user: u64,
        /// Grants the admin role.
        #[arg(long)]
        admin: bool,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3_600)]
        ttl: u64,
    },
}

fn main() -> anyhow::Result<()> {
    // Error logs carry the error chain, never a backtrace, whatever RUST_BACKTRACE says:
    // errors do not capture one. SAFETY: no other thread runs yet.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    let cli = Cli::parse();
    let settings = Settings::load()?;
    if let Some(Command::Token { user, admin, ttl }) = &cli.command {
        let user = UserId::from_u64(*user)?;
        let auth = Authenticator::from_settings(&settings.auth, &settings.kafka)?;
        println!("{}", auth.mint(user, *admin, Duration::from_secs(*ttl))?);
        return Ok(());
    }
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
            Command::RebuildRanking => {
                let report = startup::rebuild_ranking(&settings).await?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Token { .. } => unreachable!("handled before the runtime starts"),
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
