//! Progress of long work (pre-training, fine-tuning, learning): a bar on a terminal; otherwise
//! a line at most every ten seconds with the step, the rate and an ETA, so that logs (a pod, CI,
//! a redirected run) show progress instead of minutes of silence.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Time between progress lines when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    /// Names the work in log lines, e.g. "atlas-serve: demo world".
    prefix: String,
    stage: Option<Stage>,
    terminal: bool,
}

struct Stage {
    name: String,
    total: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(prefix: &str) -> Self {
        Progress {
            prefix: prefix.to_string(),
            stage: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// A new stage of `total` units (the previous one ends).
    pub fn stage(&mut self, name: &str, total: u64) {
        self.finish();
        let bar = self.terminal.then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{prefix:>22} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(name.to_string());
            bar
        });
        if bar.is_none() {
            eprintln!("{}: {name}: {total} steps", self.prefix);
        }
        let now = Instant::now();
        self.stage = Some(Stage {
            name: name.to_string(),
            total,
            started: now,
            last_line: now,
            bar,
        });
    }

    /// `done` units of the stage are finished; `message` says how it goes (loss, epoch).
    pub fn tick(&mut self, done: u64, message: &str) {
        let Some(s) = &mut self.stage else { return };
        if let Some(bar) = &s.bar {
            bar.set_position(done);
            bar.set_message(message.to_string());
            return;
        }
        let last = done >= s.total;
        if s.last_line.elapsed() < LINE_EVERY && !last {
            return;
        }
        s.last_line = Instant::now();
        eprintln!("{}: {}", self.prefix, s.line(done, message));
    }

    /// A line of its own, between bar updates.
    pub fn note(&mut self, line: &str) {
        match self.stage.as_ref().and_then(|s| s.bar.as_ref()) {
            Some(bar) => bar.println(line),
            None => eprintln!("{}: {line}", self.prefix),
        }
    }

    /// Ends the current stage's bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.stage.take().and_then(|s| s.bar) {
            bar.finish();
        }
    }
}

impl Stage {
    fn line(&self, done: u64, message: &str) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta =
            (done > 0).then(|| elapsed / done as f64 * self.total.saturating_sub(done) as f64);
        let eta = eta.map_or("unknown".into(), |s| format!("{s:.0} s"));
        let pct = 100.0 * done as f64 / self.total.max(1) as f64;
        format!(
            "{}: {done}/{} ({pct:.0} %), {elapsed:.0} s, eta {eta}  {message}",
            self.name, self.total
        )
    }
}

impl atlas_demo::world::Progress for Progress {
    fn stage(&mut self, name: &str, total: u64) {
        Progress::stage(self, name, total)
    }
    fn tick(&mut self, done: u64, message: &str) {
        Progress::tick(self, done, message)
    }
    fn note(&mut self, line: &str) {
        Progress::note(self, line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_the_step_and_an_eta() {
        let s = Stage {
            name: "pre-training".into(),
            total: 100,
            started: Instant::now() - Duration::from_secs(20),
            last_line: Instant::now(),
            bar: None,
        };
        let line = s.line(25, "loss 1.5");
        assert!(
            line.starts_with("pre-training: 25/100 (25 %), 20 s, eta 60 s"),
            "{line}"
        );
        assert!(line.ends_with("loss 1.5"), "{line}");
        assert!(s.line(0, "").contains("eta unknown"));
    }
}
