//! Processes a test or a benchmark runs as an operator would: the built daemon binary
//! ([`Daemon`]: killed, signalled, several sharing one broker, each one's rebalances and
//! error lines read from its JSON log), the embedded cluster alone ([`BrokerProcess`],
//! `commerce-events broker`) and a separate Kafka-protocol broker ([`TansuBroker`]).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::wait::eventually;

/// A separate Kafka-protocol broker process (tansu, in memory) on a free loopback port,
/// killed when dropped.
pub struct TansuBroker {
    process: Child,
    pub address: String,
}

impl TansuBroker {
    pub async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let url = format!("tcp://{address}");
        let process = Command::new("tansu")
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu is installed (scripts/test installs it: cargo install tansu --version 0.6.0 --locked --features dynostore)");
        eventually("the broker listens", Duration::from_secs(20), || async {
            TcpStream::connect(&address).is_ok()
        })
        .await;
        Self { process, address }
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The built daemon binary, run as an operator runs it ([`DaemonCommand`]): its address
/// read from its log, its rebalances and error lines kept, killed when dropped.
pub struct Daemon {
    /// The process; `None` once [`Daemon::exited`] has taken it.
    child: Option<Child>,
    pub address: String,
    rebalances: Arc<Mutex<Vec<Rebalance>>>,
    /// The ERROR lines it has logged, as they were written.
    errors: Arc<Mutex<Vec<String>>>,
    /// The WARN and ERROR lines it has logged since it was told to stop.
    warnings_after_stop: Arc<Mutex<Vec<String>>>,
    /// The thread reading its log; it ends when the process closes its stdout.
    log_reader: Option<std::thread::JoinHandle<()>>,
}

/// How to start the daemon binary: its path and the `APP_…` variables on top of its own
/// configuration.
pub struct DaemonCommand {
    binary: PathBuf,
    environment: Vec<(String, String)>,
    /// Whether the lines it logs above INFO go on to this process's stderr.
    echo_warnings: bool,
}

impl DaemonCommand {
    /// `binary` on an ephemeral HTTP port, logging JSON lines (which [`Daemon`] reads).
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            environment: Vec::new(),
            echo_warnings: false,
        }
        .env("APP_HTTP__PORT", "0")
        .env("APP_LOG__FORMAT", "json")
    }

    /// The `commerce-events` binary built beside the running executable (the bench's).
    pub fn beside_this_executable() -> anyhow::Result<Self> {
        Ok(Self::new(binary_beside_this_executable()?))
    }

    /// A test's daemon: no configuration file, the database at `database_url`, Redis keys
    /// under `key_prefix`, tokens signed with `jwt_secret`, limits no test meets, a quick
    /// reconciler; the embedded cluster unless `brokers` names others.
    pub fn for_test(
        binary: impl Into<PathBuf>,
        database_url: &str,
        key_prefix: &str,
        jwt_secret: &str,
        brokers: Option<&str>,
    ) -> Self {
        let command = Self::new(binary)
            .env("APP_CONFIG_FILE", "/nonexistent/commerce-events.toml")
            .env("APP_DATABASE__URL", database_url)
            .env("APP_DATABASE__MAX_CONNECTIONS", "6")
            .env("APP_DATABASE__HTTP_MAX_CONNECTIONS", "6")
            .env("APP_REDIS__KEY_PREFIX", key_prefix)
            .env("APP_KAFKA__EMBEDDED_BROKERS", "1")
            .env("APP_AUTH__JWT_SECRET", jwt_secret)
            .env("APP_LIMITS__COUPON_ISSUE__PER_SECOND", "100000")
            .env("APP_LIMITS__COUPON_ISSUE__BURST", "100000")
            .env("APP_RECONCILE__AFTER_MS", "3000")
            .env("APP_RECONCILE__INTERVAL_MS", "1000");
        match brokers {
            Some(brokers) => command.env("APP_KAFKA__BROKERS", brokers),
            None => command,
        }
    }

    /// One more `APP_…` variable (a later one wins).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.environment.push((name.into(), value.into()));
        self
    }

    /// Passes the lines it logs above INFO (and any that are not JSON) on to stderr.
    pub fn echoing_warnings(mut self) -> Self {
        self.echo_warnings = true;
        self
    }

    /// Starts it and waits (two minutes at most) for the line that names its address.
    pub fn start(self) -> anyhow::Result<Daemon> {
        let mut command = Command::new(&self.binary);
        command.env_remove("RUST_LOG");
        for (name, value) in &self.environment {
            command.env(name, value);
        }
        let stderr = if self.echo_warnings {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|error| anyhow::anyhow!("starting {}: {error}", self.binary.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, receiver) = std::sync::mpsc::channel::<String>();
        let rebalances = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let warnings_after_stop = Arc::new(Mutex::new(Vec::new()));
        let mut log = Log {
            address: sender,
            rebalances: rebalances.clone(),
            errors: errors.clone(),
            stopping: false,
            warnings_after_stop: warnings_after_stop.clone(),
            echo_warnings: self.echo_warnings,
        };
        // Reads every line for as long as the daemon runs (a full pipe would stall it).
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                log.read(&line);
            }
        });
        let Ok(address) = receiver.recv_timeout(Duration::from_secs(120)) else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the daemon did not start (no \"HTTP listening\" line in 120 s)");
        };
        Ok(Daemon {
            child: Some(child),
            address,
            rebalances,
            errors,
            warnings_after_stop,
            log_reader: Some(log_reader),
        })
    }
}

/// The `commerce-events` binary built beside the running executable (the bench's).
pub fn binary_beside_this_executable() -> anyhow::Result<PathBuf> {
    let binary = std::env::current_exe()?.with_file_name("commerce-events");
    if !binary.exists() {
        anyhow::bail!(
            "{} is missing: build it first (cargo build --release --workspace)",
            binary.display()
        );
    }
    Ok(binary)
}

/// What the daemon's log tells, as its lines come.
struct Log {
    address: std::sync::mpsc::Sender<String>,
    rebalances: Arc<Mutex<Vec<Rebalance>>>,
    errors: Arc<Mutex<Vec<String>>>,
    /// Whether it has logged that a stop signal came.
    stopping: bool,
    warnings_after_stop: Arc<Mutex<Vec<String>>>,
    echo_warnings: bool,
}

impl Log {
    fn read(&mut self, line: &str) {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            if self.echo_warnings {
                eprintln!("{line}");
            }
            return;
        };
        if entry["level"] == "ERROR" {
            self.errors.lock().unwrap().push(line.to_string());
        }
        if matches!(
            entry["message"].as_str(),
            Some("SIGTERM received" | "SIGINT received")
        ) {
            self.stopping = true;
        }
        if self.stopping && matches!(entry["level"].as_str(), Some("WARN" | "ERROR")) {
            self.warnings_after_stop
                .lock()
                .unwrap()
                .push(line.to_string());
        }
        if self.echo_warnings && !matches!(entry["level"].as_str(), Some("INFO" | "DEBUG")) {
            eprintln!("{line}");
        }
        if entry["message"] == "HTTP listening"
            && let Some(address) = entry["address"].as_str()
        {
            let _ = self.address.send(address.to_string());
        } else if let Some(rebalance) = Rebalance::from_log(&entry) {
            self.rebalances.lock().unwrap().push(rebalance);
        }
    }
}

/// A change of a daemon's assignment, from its log.
#[derive(Clone, Debug)]
pub struct Rebalance {
    pub at: Instant,
    pub group: String,
    /// Assigned (`true`) or revoked.
    pub assigned: bool,
    /// `topic[partition]`.
    pub partitions: Vec<String>,
}

impl Rebalance {
    fn from_log(entry: &Value) -> Option<Self> {
        let assigned = match entry["message"].as_str()? {
            "partitions assigned" => true,
            "partitions revoked: draining" => false,
            _ => return None,
        };
        let partitions = entry["partitions"].as_str()?;
        Some(Self {
            at: Instant::now(),
            group: entry["group"].as_str()?.to_string(),
            assigned,
            partitions: partitions
                .split(", ")
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

/// `commerce-events broker`: the embedded cluster alone in its own process, shared by
/// several daemons; killed when dropped.
pub struct BrokerProcess {
    process: Child,
    pub address: String,
}

impl BrokerProcess {
    /// Starts `binary broker` with one mock broker; members on the `consumer` group
    /// protocol get `session_timeout_ms`.
    pub fn start(binary: &Path, session_timeout_ms: u64) -> Self {
        let mut process = Command::new(binary)
            .args(["broker", "--brokers", "1"])
            .env_remove("RUST_LOG")
            .env("APP_CONFIG_FILE", "/nonexistent/commerce-events.toml")
            .env(
                "APP_KAFKA__CONSUMER__SESSION_TIMEOUT_MS",
                session_timeout_ms.to_string(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the broker starts");
        let mut stdout = BufReader::new(process.stdout.take().expect("stdout is piped"));
        let mut address = String::new();
        stdout
            .read_line(&mut address)
            .expect("the broker prints its address");
        // Keeps reading (a full pipe would stall the broker's log).
        std::thread::spawn(move || for _ in stdout.lines().map_while(Result::ok) {});
        let address = address.trim().to_string();
        assert!(!address.is_empty(), "the broker printed no address");
        Self { process, address }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Drop for Daemon {
    /// A drill that fails half-way must not leave its daemon running (holding MySQL
    /// connections the next drills need).
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Daemon {
    /// A test's daemon ([`DaemonCommand::for_test`]).
    pub fn start(
        binary: &Path,
        database_url: &str,
        key_prefix: &str,
        jwt_secret: &str,
        brokers: Option<&str>,
    ) -> Self {
        Self::start_with(binary, database_url, key_prefix, jwt_secret, brokers, &[])
    }

    /// [`Daemon::start`] with further `APP_…` variables (an instance id, group settings).
    pub fn start_with(
        binary: &Path,
        database_url: &str,
        key_prefix: &str,
        jwt_secret: &str,
        brokers: Option<&str>,
        environment: &[(&str, &str)],
    ) -> Self {
        let mut command =
            DaemonCommand::for_test(binary, database_url, key_prefix, jwt_secret, brokers);
        for (name, value) in environment {
            command = command.env(*name, *value);
        }
        command.start().expect("the daemon starts")
    }

    /// Waits until it answers `/readyz` with 200 (a minute at most).
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        wait_until_ready(&self.address).await
    }

    /// Stops it with SIGTERM, as an operator would, and waits for it to exit 0.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.signal("-TERM");
        match self.exited().await {
            Some(0) => Ok(()),
            other => anyhow::bail!("the daemon exited with {other:?}"),
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The ERROR lines this daemon logs, as they come (kept after it exits).
    pub fn error_log(&self) -> Arc<Mutex<Vec<String>>> {
        self.errors.clone()
    }

    /// The WARN and ERROR lines this daemon logs once it has received SIGTERM or SIGINT
    /// (all of them, once [`Daemon::exited`] has returned).
    pub fn warnings_after_stop(&self) -> Arc<Mutex<Vec<String>>> {
        self.warnings_after_stop.clone()
    }

    /// The assignments and revocations this daemon has logged so far.
    pub fn rebalances(&self) -> Vec<Rebalance> {
        self.rebalances.lock().unwrap().clone()
    }

    /// The partitions of `group` this daemon holds now, by its log.
    pub fn holds(&self, group: &str) -> BTreeSet<String> {
        let mut held = BTreeSet::new();
        for rebalance in self.rebalances().iter().filter(|r| r.group == group) {
            for partition in &rebalance.partitions {
                if rebalance.assigned {
                    held.insert(partition.clone());
                } else {
                    held.remove(partition);
                }
            }
        }
        held
    }

    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([
                signal,
                &self.child.as_ref().expect("running").id().to_string(),
            ])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    }

    /// Waits for the process to end and for its last log line to be read; its exit code
    /// (`None`: killed by a signal).
    pub async fn exited(mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let log_reader = self.log_reader.take();
        actix_rt::task::spawn_blocking(move || {
            let code = child.wait().expect("the daemon ends").code();
            if let Some(reader) = log_reader {
                reader.join().expect("the log reader ends with the log");
            }
            code
        })
        .await
        .unwrap()
    }
}

/// Waits until the daemon at `address` answers `/readyz` with 200 (a minute at most).
pub async fn wait_until_ready(address: &str) -> anyhow::Result<()> {
    let client = awc::Client::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(format!("{address}/readyz")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the daemon at {address} did not become ready")
}
