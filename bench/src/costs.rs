//! Costs as counts: what MariaDB, Redis, Kafka and the processes did for a phase's work.
//!
//! A [`Meters`] reading takes MariaDB's global counters (`information_schema.GLOBAL_STATUS`),
//! Redis's `total_commands_processed`, the daemon's `kafka_records_produced_total` (from its
//! `/metrics`) and the CPU time of the daemon, MariaDB and Redis processes (`/proc/{pid}/stat`).
//! The difference of two readings divided by the phase's units of work (accepted requests,
//! issued coupons) is what docs/benchmarks/ compares across commits: counts do not drift with a
//! noisy machine as times do. The counters are the server's, so anything else using the same
//! MariaDB or Redis during the run is counted too: run the bench on a quiet machine.

use std::collections::BTreeMap;

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::MySqlPool;

use crate::report::{Cell, Column, Table};

/// The MariaDB counters read: (status variable, table header, JSON key).
const MYSQL_COUNTERS: [(&str, &str, &str); 9] = [
    ("QUESTIONS", "statements", "statements"),
    // Pings and the protocol's other administrative commands, which `Questions` leaves out.
    ("COM_ADMIN_COMMANDS", "pings", "pings"),
    ("COM_COMMIT", "commits", "commits"),
    ("HANDLER_WRITE", "row inserts", "row_inserts"),
    ("HANDLER_UPDATE", "row updates", "row_updates"),
    ("HANDLER_READ_KEY", "key reads", "key_reads"),
    ("HANDLER_READ_NEXT", "index next reads", "index_next_reads"),
    (
        "HANDLER_ICP_ATTEMPTS",
        "index-condition checks",
        "icp_attempts",
    ),
    ("INNODB_DATA_FSYNCS", "fsyncs", "fsyncs"),
];

/// The processes whose CPU time is read: (name, table header, JSON key).
const PROCESSES: [(&str, &str, &str); 3] = [
    ("daemon", "daemon CPU µs", "daemon_cpu_us"),
    ("MariaDB", "MariaDB CPU µs", "mariadb_cpu_us"),
    ("Redis", "Redis CPU µs", "redis_cpu_us"),
];

/// A reading's own statements: the `GLOBAL_STATUS` query counts itself.
const OWN_STATEMENTS_PER_READING: u64 = 1;

/// Where the readings come from.
pub struct Meters {
    /// `None` when the scenario does not use MySQL (its columns stay empty).
    mysql: Option<MySqlPool>,
    redis: redis::aio::MultiplexedConnection,
    /// The daemons' `/metrics`; empty when the consumers run in the bench's process (the
    /// Kafka records column stays empty: the scenario knows what it produced).
    metrics_urls: Vec<String>,
    http: awc::Client,
    /// The processes whose CPU time is read: (name, pid); several daemons' are summed.
    processes: Vec<(&'static str, u32)>,
    /// The kernel's clock ticks per second (`/proc/{pid}/stat` counts CPU time in them).
    ticks_per_second: u64,
}

/// One reading of every counter.
#[derive(Clone, Debug)]
pub struct Reading {
    /// Empty when MySQL is not read.
    mysql: BTreeMap<&'static str, u64>,
    redis_commands: u64,
    records_produced: Option<f64>,
    cpu_us: BTreeMap<&'static str, u64>,
}

/// What happened between two readings.
#[derive(Clone, Debug)]
pub struct Costs {
    /// Empty when MySQL is not read.
    mysql: Vec<(&'static str, u64)>,
    redis_commands: u64,
    records_produced: Option<u64>,
    cpu_us: Vec<(&'static str, u64)>,
}

impl Meters {
    /// `daemon` is the daemon's process id and its `/metrics` address.
    pub async fn connect(
        mysql: MySqlPool,
        redis_url: &str,
        daemon_address: &str,
        daemon_pid: u32,
    ) -> anyhow::Result<Self> {
        Self::of_daemons(mysql, redis_url, &[(daemon_address, daemon_pid)]).await
    }

    /// The meters of one daemon process, with MySQL through `mysql` and Redis as `settings`
    /// name it.
    pub async fn of_daemon(
        mysql: MySqlPool,
        settings: &commerce_events::config::Settings,
        daemon: &testkit::process::Daemon,
    ) -> anyhow::Result<Self> {
        use secrecy::ExposeSecret;
        let pid = daemon.pid().context("the daemon runs")?;
        Self::connect(
            mysql,
            settings.redis.url.expose_secret(),
            &daemon.address,
            pid,
        )
        .await
    }

    /// Several daemon processes (address, pid), counted together: their CPU time is summed
    /// in the "daemon" column, their records produced in the Kafka column.
    pub async fn of_daemons(
        mysql: MySqlPool,
        redis_url: &str,
        daemons: &[(&str, u32)],
    ) -> anyhow::Result<Self> {
        Self::with(
            Some(mysql),
            redis_url,
            daemons
                .iter()
                .map(|(address, _)| format!("{address}/metrics"))
                .collect(),
            daemons.iter().map(|(_, pid)| *pid).collect(),
        )
        .await
    }

    /// For a scenario whose consumers run in the bench's process: its CPU time is the
    /// "daemon" column.
    pub async fn in_process(redis_url: &str) -> anyhow::Result<Self> {
        Self::with(None, redis_url, Vec::new(), vec![std::process::id()]).await
    }

    async fn with(
        mysql: Option<MySqlPool>,
        redis_url: &str,
        metrics_urls: Vec<String>,
        daemon_pids: Vec<u32>,
    ) -> anyhow::Result<Self> {
        let redis = redis::Client::open(redis_url)?
            .get_multiplexed_async_connection()
            .await
            .context("connecting to Redis")?;
        let mut processes: Vec<(&'static str, u32)> =
            daemon_pids.into_iter().map(|pid| ("daemon", pid)).collect();
        for (name, command) in [("MariaDB", "mariadbd"), ("Redis", "redis-server")] {
            if let Some(pid) = pid_of(command) {
                processes.push((name, pid));
            }
        }
        Ok(Self {
            mysql,
            redis,
            metrics_urls,
            http: awc::Client::default(),
            processes,
            ticks_per_second: clock_ticks_per_second(),
        })
    }

    /// Every daemon's `/metrics`, one after another.
    async fn scrape(&self) -> anyhow::Result<String> {
        if self.metrics_urls.is_empty() {
            anyhow::bail!("no daemon to scrape: its consumers run in this process");
        }
        let mut all = String::new();
        for url in &self.metrics_urls {
            let body = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|error| anyhow::anyhow!("scraping {url}: {error}"))?
                .body()
                .limit(16 * 1024 * 1024)
                .await?;
            all.push_str(&String::from_utf8_lossy(&body));
            all.push('\n');
        }
        Ok(all)
    }

    /// The buckets of histogram `name` (upper bound in seconds, cumulative count), summed
    /// over every daemon.
    pub async fn histogram(&self, name: &str) -> anyhow::Result<Histogram> {
        let exposition = self.scrape().await?;
        let prefix = format!("{name}_bucket{{");
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for line in exposition.lines().filter(|line| line.starts_with(&prefix)) {
            let Some(bound) = line
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            else {
                continue;
            };
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse()?
            };
            let count: f64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
            let entry = buckets.entry(bound.to_bits()).or_insert((bound, 0.0));
            entry.1 += count;
        }
        let mut buckets: Vec<(f64, f64)> = buckets.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Histogram(buckets))
    }

    /// Waits until the daemon has nothing left to do: no consumer group lags and no outbox
    /// row waits, in two scrapes a second apart (the lag is refreshed periodically). Asks the
    /// daemon rather than the database, so the wait costs no statements of its own.
    pub async fn wait_settled(&self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        let mut quiet = 0;
        while quiet < 2 {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("the daemon did not settle in 300 s");
            }
            let metrics = self.scrape().await?;
            let idle = metric_sum(&metrics, "kafka_consumergroup_lag") == 0.0
                && metric_sum(&metrics, "outbox_pending_rows") == 0.0;
            quiet = if idle { quiet + 1 } else { 0 };
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        Ok(())
    }

    pub async fn read(&self) -> anyhow::Result<Reading> {
        let names: Vec<&str> = MYSQL_COUNTERS.iter().map(|(name, ..)| *name).collect();
        let rows: Vec<(String, String)> =
            match &self.mysql {
                Some(mysql) => sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT VARIABLE_NAME, VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
                     WHERE VARIABLE_NAME IN ('{}')",
                    names.join("', '")
                )))
                .fetch_all(mysql)
                .await?,
                None => Vec::new(),
            };
        let mut mysql = BTreeMap::new();
        for (name, value) in rows {
            if let Some((known, ..)) = MYSQL_COUNTERS.iter().find(|(known, ..)| *known == name) {
                mysql.insert(*known, value.parse().unwrap_or(0));
            }
        }
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut self.redis.clone())
            .await?;
        let redis_commands = info_field(&info, "total_commands_processed").unwrap_or(0);
        let records_produced = if self.metrics_urls.is_empty() {
            None
        } else {
            Some(metric_sum(
                &self.scrape().await?,
                "kafka_records_produced_total",
            ))
        };
        let mut cpu_us: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (name, pid) in &self.processes {
            if let Some(us) = cpu_us_of(*pid, self.ticks_per_second) {
                *cpu_us.entry(*name).or_default() += us;
            }
        }
        Ok(Reading {
            mysql,
            redis_commands,
            records_produced,
            cpu_us,
        })
    }
}

impl Reading {
    /// What happened from `self` to `later`, the readings' own statements and commands
    /// left out.
    pub fn until(&self, later: &Reading) -> Costs {
        let mysql = if later.mysql.is_empty() {
            Vec::new()
        } else {
            MYSQL_COUNTERS
                .iter()
                .map(|(name, ..)| {
                    let count = |reading: &Reading| reading.mysql.get(name).copied().unwrap_or(0);
                    let moved = count(later).saturating_sub(count(self));
                    let own = if *name == "QUESTIONS" {
                        OWN_STATEMENTS_PER_READING
                    } else {
                        0
                    };
                    (*name, moved.saturating_sub(own))
                })
                .collect()
        };
        let cpu_us = later
            .cpu_us
            .iter()
            .map(|(name, us)| {
                (
                    *name,
                    us.saturating_sub(self.cpu_us.get(name).copied().unwrap_or(*us)),
                )
            })
            .collect();
        Costs {
            mysql,
            // The INFO command of the later reading.
            redis_commands: later
                .redis_commands
                .saturating_sub(self.redis_commands)
                .saturating_sub(1),
            records_produced: later
                .records_produced
                .zip(self.records_produced)
                .map(|(later, earlier)| (later - earlier).max(0.0) as u64),
            cpu_us,
        }
    }
}

/// A histogram as scraped: (upper bound in seconds, cumulative count), by bound.
#[derive(Clone, Debug, Default)]
pub struct Histogram(Vec<(f64, f64)>);

impl Histogram {
    /// What was observed from `self` to `later`.
    pub fn until(&self, later: &Histogram) -> Histogram {
        Histogram(
            later
                .0
                .iter()
                .map(|(bound, count)| {
                    let before = self
                        .0
                        .iter()
                        .find(|(earlier, _)| earlier == bound)
                        .map_or(0.0, |(_, count)| *count);
                    (*bound, count - before)
                })
                .collect(),
        )
    }

    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, count)| *count)
    }

    /// The `quantile` (0 to 1) in seconds, interpolated linearly within its bucket (the
    /// bucket's upper bound when it is the last, unbounded one).
    pub fn quantile(&self, quantile: f64) -> f64 {
        let rank = quantile * self.count();
        let (mut lower, mut below) = (0.0, 0.0);
        for (bound, count) in &self.0 {
            if *count >= rank && *count > below {
                if bound.is_infinite() {
                    return lower;
                }
                return lower + (bound - lower) * (rank - below) / (count - below);
            }
            (lower, below) = (*bound, *count);
        }
        lower
    }

    /// The share of observations at most `bound` seconds (a bucket's bound).
    pub fn share_within(&self, bound: f64) -> f64 {
        let within = self
            .0
            .iter()
            .find(|(upper, _)| *upper >= bound)
            .map_or(0.0, |(_, count)| *count);
        within / self.count().max(1.0)
    }
}

/// A table of costs per unit of work, one row per phase.
pub struct CostTable {
    rows: Vec<(String, String, u64, Costs)>,
}

impl CostTable {
    pub fn new() -> Self {
        Self { rows: Vec::new() }
    }

    /// `costs` of `phase`, divided by its `units` of `unit` (e.g. "accepted request").
    pub fn add(
        &mut self,
        phase: impl Into<String>,
        unit: impl Into<String>,
        units: u64,
        costs: Costs,
    ) {
        self.rows.push((phase.into(), unit.into(), units, costs));
    }

    pub fn table(&self, title: &'static str) -> Table {
        let mut columns = vec![
            Column::left("phase", "phase"),
            Column::left("per", "unit"),
            Column::right("units", "units"),
        ];
        for (_, header, key) in MYSQL_COUNTERS {
            columns.push(Column::right(header, key));
        }
        columns.push(Column::right("Redis commands", "redis_commands"));
        columns.push(Column::right("Kafka records", "kafka_records"));
        for (_, header, key) in PROCESSES {
            columns.push(Column::right(header, key));
        }
        let mut table = Table::new(title, columns);
        for (phase, unit, units, costs) in &self.rows {
            let per = |count: u64| -> Cell {
                let value = count as f64 / (*units).max(1) as f64;
                Cell::new(format_per_unit(value), per_unit_json(value, count))
            };
            let mut cells = vec![
                Cell::text(phase.clone()),
                Cell::text(unit.clone()),
                Cell::count(*units),
            ];
            if costs.mysql.is_empty() {
                cells.extend(MYSQL_COUNTERS.iter().map(|_| Cell::empty()));
            }
            for (_, count) in &costs.mysql {
                cells.push(per(*count));
            }
            cells.push(per(costs.redis_commands));
            cells.push(costs.records_produced.map_or_else(Cell::empty, per));
            for (process, ..) in PROCESSES {
                match costs.cpu_us.iter().find(|(name, _)| *name == process) {
                    Some((_, us)) => cells.push(per(*us)),
                    None => cells.push(Cell::empty()),
                }
            }
            table.row(cells);
        }
        table
    }
}

fn format_per_unit(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn per_unit_json(value: f64, total: u64) -> Value {
    json!({"per_unit": crate::report::number(value), "total": total})
}

/// A field of Redis's `INFO` answer.
fn info_field(info: &str, field: &str) -> Option<u64> {
    info.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name == field).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The sum of every sample of `name` in a Prometheus text exposition.
fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// User + system CPU time of a process, in microseconds.
pub fn cpu_us_of(pid: u32, ticks_per_second: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_us_from_stat(&stat, ticks_per_second)
}

fn cpu_us_from_stat(stat: &str, ticks_per_second: u64) -> Option<u64> {
    // The command name (field 2) may hold spaces: the fields after it follow its ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the whole line (utime, stime) are the 12th and 13th after it.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 1_000_000 / ticks_per_second.max(1))
}

pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// The first process whose command is `command`.
fn pid_of(command: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == command).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_time_after_a_command_name_with_spaces() {
        let stat = "1234 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(cpu_us_from_stat(stat, 100), Some(3_000_000));
    }

    #[test]
    fn sums_a_metric_over_its_labels_only() {
        let exposition = "# TYPE kafka_records_produced_total counter\n\
            kafka_records_produced_total{topic=\"a\"} 3\n\
            kafka_records_produced_total{topic=\"b\"} 4\n\
            kafka_records_produced_total_other 100\n";
        assert_eq!(metric_sum(exposition, "kafka_records_produced_total"), 7.0);
    }

    #[test]
    fn finds_an_info_field() {
        let info = "# Stats\r\ntotal_connections_received:5\r\ntotal_commands_processed:42\r\n";
        assert_eq!(info_field(info, "total_commands_processed"), Some(42));
    }

    #[test]
    fn a_histograms_quantiles_are_interpolated_within_the_phases_buckets() {
        let before = Histogram(vec![(0.01, 10.0), (0.1, 10.0), (f64::INFINITY, 10.0)]);
        let after = Histogram(vec![(0.01, 60.0), (0.1, 110.0), (f64::INFINITY, 110.0)]);
        let phase = before.until(&after);
        assert_eq!(phase.count(), 100.0);
        assert!(
            (phase.quantile(0.5) - 0.01).abs() < 1e-9,
            "{}",
            phase.quantile(0.5)
        );
        assert!(
            (phase.quantile(0.75) - 0.055).abs() < 1e-9,
            "{}",
            phase.quantile(0.75)
        );
        assert_eq!(phase.share_within(0.1), 1.0);
        assert_eq!(phase.share_within(0.01), 0.5);
    }

    #[test]
    fn a_phase_costs_the_difference_less_the_readings_own() {
        let reading = |questions: u64, writes: u64, redis: u64| Reading {
            mysql: BTreeMap::from([("QUESTIONS", questions), ("HANDLER_WRITE", writes)]),
            redis_commands: redis,
            records_produced: Some(10.0),
            cpu_us: BTreeMap::from([("daemon", 1_000)]),
        };
        let costs = reading(100, 50, 7).until(&reading(131, 90, 28));
        assert!(costs.mysql.contains(&("QUESTIONS", 30)));
        assert!(costs.mysql.contains(&("HANDLER_WRITE", 40)));
        assert_eq!(costs.redis_commands, 20);
        assert_eq!(costs.records_produced, Some(0));
        assert_eq!(costs.cpu_us, vec![("daemon", 0)]);
    }
}
