//! The coupon scenario's chart, a PNG over one time axis (seconds since the intake
//! started):
//!
//! - above: accepted requests/s and issued coupons/s through every phase (intake, drain,
//!   backlog write, backlog issuance, push latency), the phases shaded and their starts
//!   marked with a line and a label;
//! - below: the push latency, p50 and p99 of the requests sent in each second of the
//!   push-latency phase.
//!
//! A [`Sampler`] records the totals every 500 ms for the whole scenario; [`rates`] and
//! [`latency_buckets`] turn samples and pushes into what is drawn. Text needs a TrueType
//! font loaded at run time ([`register_font`]); without one the chart is drawn without
//! text.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use plotters::prelude::*;
use sqlx::MySqlPool;

/// How often the [`Sampler`] records the totals.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// The fonts tried, after `BENCH_FONT`, in this order.
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// The totals at one moment: requests accepted (202) and coupons issued so far.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the timeline started.
    pub at: f64,
    pub accepted: u64,
    pub issued: u64,
}

/// A phase of the scenario, in seconds since the timeline started.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub start: f64,
    pub end: f64,
}

/// One push of the push-latency phase: when its request was sent (seconds since the
/// timeline started) and how long until its result arrived on the WebSocket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Push {
    pub sent: f64,
    pub latency_ms: f64,
}

/// The clock of the scenario's load and the phases on it.
pub struct Timeline {
    started: Instant,
    phases: Vec<Phase>,
}

impl Timeline {
    /// A timeline starting now.
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            phases: Vec::new(),
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Seconds from the start to `at`.
    pub fn seconds(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64()
    }

    /// Records the phase `name` from `start` to `end`.
    pub fn phase(&mut self, name: &'static str, start: Instant, end: Instant) {
        self.phases.push(Phase {
            name,
            start: self.seconds(start),
            end: self.seconds(end),
        });
    }

    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }
}

/// A task on this thread recording a [`Sample`] every 500 ms: the requests the bench's
/// clients saw accepted and `SUM(issued_quantity)` of every coupon.
pub struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: actix_rt::task::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    /// Starts sampling `accepted` and the coupons' issued quantities in `pool`, the times
    /// relative to `started`.
    pub fn start(pool: MySqlPool, accepted: Rc<Cell<u64>>, started: Instant) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = actix_rt::spawn(async move {
            let mut samples = Vec::new();
            let mut interval = tokio::time::interval(SAMPLE_EVERY);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let last = tokio::select! {
                    _ = interval.tick() => false,
                    _ = &mut stopped => true,
                };
                let at = Instant::now();
                let accepted = accepted.get();
                let issued: Result<(u64,), _> = sqlx::query_as(
                    "SELECT CAST(COALESCE(SUM(issued_quantity), 0) AS UNSIGNED) FROM coupon_stock",
                )
                .fetch_one(&pool)
                .await;
                if let Ok((issued,)) = issued {
                    samples.push(Sample {
                        at: at.saturating_duration_since(started).as_secs_f64(),
                        accepted,
                        issued,
                    });
                }
                if last {
                    return samples;
                }
            }
        });
        Self { stop, task }
    }

    /// Takes a last sample and returns them all.
    pub async fn finish(self) -> anyhow::Result<Vec<Sample>> {
        let _ = self.stop.send(());
        Ok(self.task.await?)
    }
}

/// The rates between two consecutive samples, placed at the middle of their interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub at: f64,
    pub accepted_per_second: f64,
    pub issued_per_second: f64,
}

/// Accepted requests/s and issued coupons/s over each interval between two samples (the
/// difference of the totals over the time between them); intervals of no time are
/// skipped.
pub fn rates(samples: &[Sample]) -> Vec<Rate> {
    samples
        .windows(2)
        .filter_map(|pair| {
            let (from, to) = (pair[0], pair[1]);
            let seconds = to.at - from.at;
            (seconds > 0.0).then(|| Rate {
                at: (from.at + to.at) / 2.0,
                accepted_per_second: to.accepted.saturating_sub(from.accepted) as f64 / seconds,
                issued_per_second: to.issued.saturating_sub(from.issued) as f64 / seconds,
            })
        })
        .collect()
}

/// The push latency of the requests sent in one second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencyBucket {
    /// The second's start, in seconds since the timeline started.
    pub second: f64,
    pub pushes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// p50 and p99 of the pushes per second of their send time, in time order.
pub fn latency_buckets(pushes: &[Push]) -> Vec<LatencyBucket> {
    let mut buckets: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for push in pushes {
        buckets
            .entry(push.sent.max(0.0).floor() as u64)
            .or_default()
            .push(push.latency_ms);
    }
    buckets
        .into_iter()
        .map(|(second, mut latencies)| {
            latencies.sort_by(f64::total_cmp);
            LatencyBucket {
                second: second as f64,
                pushes: latencies.len(),
                p50_ms: nearest_rank(&latencies, 50.0),
                p99_ms: nearest_rank(&latencies, 99.0),
            }
        })
        .collect()
}

/// The `percentile` of sorted values (the value at the nearest rank); NaN when empty.
pub fn nearest_rank(sorted: &[f64], percentile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((percentile / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Registers the first TrueType font found (`BENCH_FONT`, then DejaVu Sans, then
/// Liberation Sans) as the chart's sans-serif; the path of the font, or `None` when none
/// is installed.
pub fn register_font() -> Option<PathBuf> {
    let candidates = std::env::var_os("BENCH_FONT")
        .map(PathBuf::from)
        .into_iter()
        .chain(FONTS.iter().map(PathBuf::from));
    for path in candidates {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
            return Some(path);
        }
    }
    None
}

/// What the chart shows.
pub struct Chart<'a> {
    pub samples: &'a [Sample],
    pub phases: &'a [Phase],
    pub pushes: &'a [Push],
}

const ACCEPTED: RGBColor = RGBColor(31, 119, 180);
const ISSUED: RGBColor = RGBColor(214, 39, 40);
const P50: RGBColor = RGBColor(44, 160, 44);
const P99: RGBColor = RGBColor(148, 103, 189);
const MARKER: RGBColor = RGBColor(90, 90, 90);

/// Writes the chart to `path` (a PNG, its parent directories created); with `text` false
/// (no font registered) without captions, axis labels or legends.
pub fn draw(path: &Path, chart: &Chart, text: bool) -> anyhow::Result<()> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)?;
    }
    let rates = rates(chart.samples);
    let buckets = latency_buckets(chart.pushes);
    let end = chart
        .samples
        .iter()
        .map(|sample| sample.at)
        .chain(chart.phases.iter().map(|phase| phase.end))
        .fold(1.0, f64::max);
    let rate_max = rates
        .iter()
        .map(|rate| rate.accepted_per_second.max(rate.issued_per_second))
        .fold(1.0, f64::max)
        * 1.15;
    let latency_max = buckets
        .iter()
        .map(|bucket| bucket.p99_ms)
        .filter(|latency| latency.is_finite())
        .fold(1.0, f64::max)
        * 1.15;

    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(640);
    let axis = "seconds since the intake started";

    // Above the throughput plot: its caption, then a strip for the phases' labels.
    let upper = if text {
        upper.titled(
            "coupon scenario: accepted requests/s and issued coupons/s",
            ("sans-serif", 26),
        )?
    } else {
        upper
    };
    let (strip, upper) = upper.split_vertically(48);
    let mut builder = ChartBuilder::on(&upper);
    builder.margin(16).margin_top(0).margin_right(30);
    if text {
        builder.x_label_area_size(46).y_label_area_size(80);
    }
    let mut throughput = builder.build_cartesian_2d(0.0..end, 0.0..rate_max)?;
    draw_phases(&mut throughput, chart.phases, rate_max)?;
    let mut mesh = throughput.configure_mesh();
    mesh.disable_x_mesh().light_line_style(TRANSPARENT);
    if text {
        mesh.x_desc(axis)
            .y_desc("per second")
            .y_label_formatter(&|value| format!("{value:.0}"))
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18));
    }
    mesh.draw()?;
    for (label, color, rate) in [
        (
            "accepted requests/s",
            ACCEPTED,
            (|rate: &Rate| rate.accepted_per_second) as fn(&Rate) -> f64,
        ),
        ("issued coupons/s", ISSUED, |rate: &Rate| {
            rate.issued_per_second
        }),
    ] {
        let series = throughput.draw_series(LineSeries::new(
            rates.iter().map(|point| (point.at, rate(point))),
            color.stroke_width(2),
        ))?;
        if text {
            series.label(label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        }
    }
    if text {
        throughput
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        // The phases' labels in the strip above the plot, on two rows so that short phases
        // keep theirs readable.
        let (strip_x, _) = strip.get_base_pixel();
        for (index, phase) in chart.phases.iter().enumerate() {
            let (x, _) = throughput.backend_coord(&(phase.start, rate_max));
            let row = if index % 2 == 0 { 4 } else { 26 };
            strip.draw(&Text::new(
                phase.name,
                (x - strip_x + 3, row),
                ("sans-serif", 16).into_font().color(&MARKER),
            ))?;
        }
    }

    let mut builder = ChartBuilder::on(&lower);
    builder.margin(16).margin_right(30);
    if text {
        builder
            .caption(
                "push latency: p50 and p99 of the requests sent in each second (ms)",
                ("sans-serif", 22),
            )
            .x_label_area_size(46)
            .y_label_area_size(80);
    }
    let mut latency = builder.build_cartesian_2d(0.0..end, 0.0..latency_max)?;
    draw_phases(&mut latency, chart.phases, latency_max)?;
    let mut mesh = latency.configure_mesh();
    mesh.disable_x_mesh().light_line_style(TRANSPARENT);
    if text {
        mesh.x_desc(axis)
            .y_desc("ms")
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18));
    }
    mesh.draw()?;
    for (label, color, percentile) in [
        (
            "p50",
            P50,
            (|bucket: &LatencyBucket| bucket.p50_ms) as fn(&LatencyBucket) -> f64,
        ),
        ("p99", P99, |bucket: &LatencyBucket| bucket.p99_ms),
    ] {
        let series = latency.draw_series(
            LineSeries::new(
                buckets
                    .iter()
                    .map(|bucket| (bucket.second + 0.5, percentile(bucket))),
                color.filled().stroke_width(2),
            )
            .point_size(4),
        )?;
        if text {
            series.label(label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        }
    }
    if text {
        latency
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Shades every other phase and draws a dashed line at each phase's start and at the
/// last one's end.
fn draw_phases<DB: DrawingBackend>(
    chart: &mut ChartContext<
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    phases: &[Phase],
    top: f64,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let shade = MARKER.mix(0.12).filled();
    chart
        .draw_series(
            phases
                .iter()
                .step_by(2)
                .map(|phase| Rectangle::new([(phase.start, 0.0), (phase.end, top)], shade)),
        )
        .map_err(|error| anyhow::anyhow!("chart: {error}"))?;
    let boundaries = phases
        .iter()
        .map(|phase| phase.start)
        .chain(phases.last().map(|phase| phase.end));
    chart
        .draw_series(boundaries.map(|at| {
            plotters::element::DashedPathElement::new(
                vec![(at, 0.0), (at, top)],
                6,
                4,
                MARKER.stroke_width(1),
            )
        }))
        .map_err(|error| anyhow::anyhow!("chart: {error}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, accepted: u64, issued: u64) -> Sample {
        Sample {
            at,
            accepted,
            issued,
        }
    }

    #[test]
    fn rates_are_the_differences_over_the_time_between_samples() {
        let samples = [
            sample(0.0, 0, 0),
            sample(0.5, 5_000, 1_000),
            sample(1.5, 9_000, 4_000),
            sample(1.5, 9_000, 4_000),
        ];
        assert_eq!(
            rates(&samples),
            vec![
                Rate {
                    at: 0.25,
                    accepted_per_second: 10_000.0,
                    issued_per_second: 2_000.0
                },
                Rate {
                    at: 1.0,
                    accepted_per_second: 4_000.0,
                    issued_per_second: 3_000.0
                },
            ]
        );
        assert!(rates(&samples[..1]).is_empty());
    }

    #[test]
    fn pushes_are_bucketed_per_second_of_their_send_time() {
        let mut pushes: Vec<Push> = (1..=100)
            .map(|n| Push {
                sent: 10.0 + n as f64 / 101.0,
                latency_ms: n as f64,
            })
            .collect();
        pushes.push(Push {
            sent: 12.2,
            latency_ms: 7.0,
        });
        let buckets = latency_buckets(&pushes);
        assert_eq!(buckets.len(), 2);
        assert_eq!(
            buckets[0],
            LatencyBucket {
                second: 10.0,
                pushes: 100,
                p50_ms: 51.0,
                p99_ms: 99.0
            }
        );
        assert_eq!((buckets[1].second, buckets[1].p50_ms), (12.0, 7.0));
        assert_eq!(buckets[1].p99_ms, 7.0);
    }

    #[test]
    fn the_nearest_rank_of_nothing_is_nan() {
        assert!(nearest_rank(&[], 50.0).is_nan());
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0], 100.0), 3.0);
    }

    fn chart_data() -> (Vec<Sample>, Vec<Phase>, Vec<Push>) {
        let samples = (0..40)
            .map(|n| sample(n as f64 * 0.5, n * n * 100, n * n * 60))
            .collect();
        let phases = vec![
            Phase {
                name: "intake",
                start: 0.0,
                end: 8.0,
            },
            Phase {
                name: "push latency",
                start: 12.0,
                end: 19.5,
            },
        ];
        let pushes = (0..700)
            .map(|n| Push {
                sent: 12.0 + n as f64 / 100.0,
                latency_ms: 5.0 + (n % 50) as f64,
            })
            .collect();
        (samples, phases, pushes)
    }

    #[test]
    fn a_chart_without_a_font_is_drawn_without_text() {
        let (samples, phases, pushes) = chart_data();
        let path = std::env::temp_dir().join(format!("bench-chart-{}.png", std::process::id()));
        let chart = Chart {
            samples: &samples,
            phases: &phases,
            pushes: &pushes,
        };
        draw(&path, &chart, false).expect("drawn");
        assert!(std::fs::metadata(&path).expect("written").len() > 0);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_chart_with_a_font_is_drawn() {
        if register_font().is_none() {
            return;
        }
        let (samples, phases, pushes) = chart_data();
        let path = std::env::temp_dir().join(format!(
            "bench-chart-text-{}/coupons.png",
            std::process::id()
        ));
        let chart = Chart {
            samples: &samples,
            phases: &phases,
            pushes: &pushes,
        };
        draw(&path, &chart, true).expect("drawn");
        assert!(std::fs::metadata(&path).expect("written").len() > 0);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
