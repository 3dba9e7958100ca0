//! Where a sandbox start spends its time: each step's offset from the API
//! request, logged as one line at debug level once the first output arrived
//! and the `running` record is saved
//! (`RUST_LOG=info,hearth_agent::start_trace=debug`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sandbox::lock;

/// Step offsets of one sandbox start.
pub(crate) struct StartTrace {
    began: Mutex<Instant>,
    steps: Mutex<Vec<(&'static str, Duration)>>,
}

impl StartTrace {
    pub(crate) fn new() -> StartTrace {
        StartTrace {
            began: Mutex::new(Instant::now()),
            steps: Mutex::new(Vec::new()),
        }
    }

    /// Counts from `t0` (the API request) instead of the record's creation.
    pub(crate) fn began_at(&self, t0: Instant) {
        *lock(&self.began) = t0;
    }

    /// Records that `step` is done now.
    pub(crate) fn mark(&self, step: &'static str) {
        let at = lock(&self.began).elapsed();
        lock(&self.steps).push((step, at));
    }

    /// `step=ms step=ms ...` in order, e.g. `registered=2.1 restored=60.3`.
    pub(crate) fn timeline(&self) -> String {
        lock(&self.steps)
            .iter()
            .map(|(s, d)| format!("{s}={:.1}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Logs the timeline of sandbox `id` (at debug level).
    pub(crate) fn log(&self, id: &str) {
        tracing::debug!(sandbox = %id, "start timeline (ms since the API request): {}", self.timeline());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_lists_steps_in_order_with_offsets() {
        let t = StartTrace::new();
        t.began_at(Instant::now() - Duration::from_millis(5));
        t.mark("registered");
        t.mark("restored");
        let line = t.timeline();
        let names: Vec<&str> = line
            .split(' ')
            .map(|kv| kv.split('=').next().unwrap())
            .collect();
        assert_eq!(names, ["registered", "restored"]);
        let first: f64 = line.split(' ').next().unwrap()[11..].parse().unwrap();
        assert!(first >= 5.0, "{line}");
    }
}
