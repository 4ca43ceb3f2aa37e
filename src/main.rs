//! The daemon's command line: `commerce-events [serve]` runs everything;
//! `commerce-events migrate` applies the database migrations and exits;
//! `commerce-events token --user 42 [--admin] [--ttl 3600]` prints a bearer token;
//! `commerce-events rebuild-ranking` recomputes the ranking from MySQL;
//! `commerce-events broker` runs the embedded Kafka cluster alone, for several daemons;
//! `commerce-events ready` exits 0 when the local daemon's `/readyz` answers 200 (a
//! container health check that needs no curl in the image).

use std::time::Duration;

use clap::{Parser, Subcommand};
use commerce_events::common::ids::UserId;
use commerce_events::config::Settings;
use commerce_events::events::topics;
use commerce_events::guards::tokens::Authenticator;
use commerce_events::kafka::cluster::KafkaCluster;
use commerce_events::observability::logging;
use commerce_events::startup::{self, Application};
use tracing::info;

/// mimalloc, chosen by measurement (docs/benchmarks/README.md, push sessions): with glibc's
/// allocator or jemalloc, the memory of closed push sessions stayed resident; with mimalloc
/// most of it is back within seconds, and an idle session costs about the same.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_arena_eager_commit` (number 4 of its `mi_option_e`).
const MIMALLOC_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Arenas committed as they are used rather than all at once: with mimalloc's default on
/// Linux (eager), the daemon started about 17 MiB larger, for nothing measurable in return.
/// The first arena is reserved by the first allocation, before `main`: this runs as the
/// program is loaded (an `.init_array` entry), before any allocation.
extern "C" fn configure_allocator() {
    // SAFETY: sets one of mimalloc's documented options; nothing else runs yet.
    unsafe { libmimalloc_sys::mi_option_set(MIMALLOC_ARENA_EAGER_COMMIT, 0) };
}

#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE_ALLOCATOR: extern "C" fn() = configure_allocator;

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
    /// Runs the embedded Kafka cluster (librdkafka's mock cluster: the Kafka protocol,
    /// consumer groups and commits, in memory) alone in this process, with every topic
    /// created, so that several daemons on this machine can share it
    /// (`APP_KAFKA__BROKERS=<address>`). Prints its bootstrap address on the first line of
    /// stdout and runs until SIGTERM or SIGINT. Group members on the `consumer` protocol
    /// get `kafka.consumer.session_timeout_ms`.
    Broker {
        /// Mock brokers in the cluster (default: `kafka.embedded_brokers`).
        #[arg(long)]
        brokers: Option<i32>,
    },
    /// Asks the daemon on this host (`http.port`) for `GET /readyz` and exits 0 on 200, 1
    /// otherwise: a container health check.
    Ready {
        /// How long to wait for the answer, in seconds.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
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
    if let Some(Command::Ready { timeout }) = &cli.command {
        let ready = readyz_answers_ok(settings.http.port, Duration::from_secs(*timeout));
        std::process::exit(if ready { 0 } else { 1 });
    }
    if let Some(Command::Broker { brokers }) = &cli.command {
        return run_broker(settings, *brokers);
    }
    logging::init(&settings.log);
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
            Command::Token { .. } | Command::Broker { .. } | Command::Ready { .. } => {
                unreachable!("handled before the runtime starts")
            }
        }
    })
}

/// `GET /readyz` over loopback, HTTP/1.0: whether the status line says 200.
fn readyz_answers_ok(port: u16, timeout: Duration) -> bool {
    use std::io::{Read, Write};
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&address, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
}

/// `commerce-events broker`: the embedded cluster the daemon would start, with the topics
/// the daemon would create; the address first (alone on its line, for scripts), then the
/// log.
fn run_broker(mut settings: Settings, brokers: Option<i32>) -> anyhow::Result<()> {
    use std::io::Write;
    settings.kafka.brokers = "embedded".into();
    if let Some(brokers) = brokers {
        settings.kafka.embedded_brokers = brokers;
    }
    actix_rt::System::new().block_on(async move {
        let cluster = KafkaCluster::connect(&settings.kafka)?;
        cluster
            .ensure_topics(&topics::all_with_dead_letters(), &settings.kafka)
            .await?;
        {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{}", cluster.bootstrap_servers())?;
            stdout.flush()?;
        }
        logging::init(&settings.log);
        info!(
            bootstrap_servers = cluster.bootstrap_servers(),
            brokers = settings.kafka.embedded_brokers,
            partitions = settings.kafka.partitions,
            "Kafka broker listening"
        );
        shutdown_signal().await;
        drop(cluster);
        info!("Kafka broker stopped");
        Ok(())
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
