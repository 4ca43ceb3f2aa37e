//! Progress bars of the scenarios' long phases, in one style, on stderr (indicatif's
//! default target: hidden when stderr is not a terminal, so stdout carries only the
//! report).
//!
//! - [`counting`]: a bar counting items (requests, coupons, records) to a known total.
//! - [`timed`]: a bar of a phase that lasts a known time, `elapsed/total s`, with a message
//!   refreshed by the bar's ticker.
//! - [`waiting`]: a spinner for a wait of unknown length, with the time waited so far.
//! - [`follow`]: any of these updated every 200 ms from what the phase counts.
//!
//! Every bar is cleared when it finishes, before the scenario prints what it measured.

use std::fmt::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// How often a ticking bar is redrawn.
const TICK: Duration = Duration::from_millis(200);

/// The template every bar shares: the phase, left-aligned in a fixed width, then the bar.
fn style(progress: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!("{{prefix:<22.cyan}} {progress} {{msg}}"))
        .expect("the bench's progress templates are valid")
        .progress_chars("=> ")
        .with_key("seconds", |state: &ProgressState, out: &mut dyn Write| {
            let total = state.len().unwrap_or(0) as f64 / 1000.0;
            let _ = write!(out, "{:.0}/{total:.0} s", state.pos() as f64 / 1000.0);
        })
}

/// A bar of `phase` counting to `total`: `phase [=====>    ] 1,234/8,000 message`.
pub fn counting(phase: &str, total: u64) -> ProgressBar {
    ProgressBar::new(total)
        .with_style(style("[{bar:36}] {human_pos}/{human_len}"))
        .with_prefix(phase.to_string())
}

/// A bar of `phase` running for `duration`: `phase [===>      ] 12/60 s message`, the
/// message taken from `message` at every redraw.
pub fn timed(phase: &str, duration: Duration, message: impl Fn() -> String + 'static) -> Ticking {
    let total = duration.as_millis() as u64;
    let bar = ProgressBar::new(total)
        .with_style(style("[{bar:36}] {seconds}"))
        .with_prefix(phase.to_string());
    let started = Instant::now();
    Ticking::start(bar, move |bar| {
        bar.set_position((started.elapsed().as_millis() as u64).min(total));
        bar.set_message(message());
    })
}

/// A spinner of `phase` for a wait of unknown length: `phase ⠋ 12s message`, the message
/// taken from `message` at every redraw.
pub fn waiting(phase: &str, message: impl Fn() -> String + 'static) -> Ticking {
    let bar = ProgressBar::new_spinner()
        .with_style(style("{spinner} {elapsed}"))
        .with_prefix(phase.to_string());
    Ticking::start(bar, move |bar| {
        bar.set_message(message());
        bar.tick();
    })
}

/// `bar` updated by `update` every 200 ms (a phase whose count is read, not pushed).
pub fn follow(bar: ProgressBar, update: impl Fn(&ProgressBar) + 'static) -> Ticking {
    Ticking::start(bar, update)
}

/// A bar with a task on this thread's actix system that updates it every [`TICK`];
/// finishing or dropping it stops the task and clears the bar.
pub struct Ticking {
    bar: ProgressBar,
    ticker: actix_rt::task::JoinHandle<()>,
}

impl Ticking {
    fn start(bar: ProgressBar, update: impl Fn(&ProgressBar) + 'static) -> Self {
        update(&bar);
        let ticked = bar.clone();
        let ticker = actix_rt::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            loop {
                interval.tick().await;
                update(&ticked);
            }
        });
        Self { bar, ticker }
    }

    /// Sets the message shown after the bar (kept until the next update sets one).
    pub fn set_message(&self, message: impl Into<std::borrow::Cow<'static, str>>) {
        self.bar.set_message(message);
    }

    /// Stops the updates and clears the bar.
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}
