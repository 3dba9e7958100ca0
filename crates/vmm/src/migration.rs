//! Live migration, backend-neutral: what a caller asks for ([`MigrationParams`]),
//! what it observes ([`MigrationProgress`]), and the pure rule that decides when
//! a pre-copy that does not converge is abandoned ([`judge`]).
//!
//! The data path is a byte stream on a unix socket: the source VMM writes its
//! state into it ([`crate::Vm::migrate_out`]), the target VMM reads it
//! ([`crate::Vmm::create_incoming`]). What carries the stream between hosts (an
//! authenticated, bandwidth-capped tunnel) is the caller's business. QEMU fills
//! the stream with its native pre-copy migration; a Firecracker backend would
//! fill it with a full snapshot followed by dirty-page diff snapshots.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default pause budget for the final switch-over.
pub const DEFAULT_DOWNTIME_LIMIT: Duration = Duration::from_millis(100);
/// Default cap on the migration stream: 1 GiB/s (effectively "the link").
pub const DEFAULT_MAX_BANDWIDTH: u64 = 1 << 30;
/// Default number of dirty-memory passes before giving up.
pub const DEFAULT_MAX_ITERATIONS: u64 = 60;
/// Default bound on the whole pre-copy before giving up.
pub const DEFAULT_GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// How a migration should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationParams {
    /// Largest pause the switch-over may take; pre-copy iterates until the
    /// remaining dirty memory fits this budget at the measured bandwidth.
    #[serde(with = "millis")]
    pub downtime_limit: Duration,
    /// Bytes per second the stream may use.
    pub max_bandwidth: u64,
    /// Throttle the guest's vCPUs when it dirties memory faster than the link
    /// drains it (QEMU auto-converge).
    pub auto_converge: bool,
    /// Give up (the source keeps running) after this many dirty-memory passes...
    pub max_iterations: u64,
    /// ...or after this long.
    #[serde(with = "millis")]
    pub give_up_after: Duration,
    /// Send only the writable layer (qcow2 overlay) of the disk, reading the
    /// rest from the target's own base image. Only correct when the target's
    /// base is byte-identical to the source's; otherwise the whole disk as the
    /// guest sees it is sent (zero blocks as markers).
    #[serde(default)]
    pub overlay_only: bool,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            auto_converge: true,
            max_iterations: DEFAULT_MAX_ITERATIONS,
            give_up_after: DEFAULT_GIVE_UP_AFTER,
            overlay_only: false,
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Where a migration stands, as the VMM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    #[default]
    Setup,
    /// Pre-copy: memory (and the writable disk layer) streams while the VM runs.
    Active,
    /// The VM is paused for the final transfer.
    Switchover,
    /// All state is on the target; the source VM is paused for good.
    Completed,
    /// Cancelled or failed; the source VM runs again.
    Failed,
}

/// A point-in-time view of one migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub state: MigrationState,
    /// Milliseconds since the migration started.
    pub elapsed_ms: u64,
    /// Guest memory in bytes.
    pub ram_total: u64,
    /// Bytes sent so far (memory + disk + device state).
    pub bytes_sent: u64,
    /// Memory still to send in this pass.
    pub ram_remaining: u64,
    /// Guest pages dirtied per second (the last measurement).
    pub dirty_pages_rate: u64,
    /// Dirty-memory passes so far (1 = the first full copy).
    pub iterations: u64,
    /// Measured link throughput, bytes per second.
    pub throughput_bps: u64,
    /// vCPU throttle applied by auto-converge, percent.
    pub cpu_throttle_percent: u64,
    /// The switch-over pause, once known.
    pub downtime_ms: Option<u64>,
    /// Writable disk layer: bytes transferred and still to transfer.
    pub disk_transferred: u64,
    pub disk_remaining: u64,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// What to do with a pre-copy that is still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Cancel: the source keeps running. The reason names the bound hit.
    GiveUp(String),
}

/// The convergence bound: a pure function of what the VMM reports.
///
/// Pre-copy ends by itself once the dirty remainder fits the downtime budget;
/// auto-converge throttles a guest that dirties faster than the link. This
/// only decides when to stop trying.
pub fn judge(p: &MigrationProgress, params: &MigrationParams) -> Verdict {
    if matches!(
        p.state,
        MigrationState::Completed | MigrationState::Failed | MigrationState::Switchover
    ) {
        return Verdict::Continue;
    }
    if p.iterations > params.max_iterations {
        return Verdict::GiveUp(format!(
            "memory did not converge after {} passes (limit {}); dirty rate {} pages/s, throttle {}%{}",
            p.iterations,
            params.max_iterations,
            p.dirty_pages_rate,
            p.cpu_throttle_percent,
            remainder_hint(p, params)
        ));
    }
    if p.elapsed_ms > params.give_up_after.as_millis() as u64 {
        return Verdict::GiveUp(format!(
            "pre-copy did not finish within {}s ({} passes, {} bytes sent){}",
            params.give_up_after.as_secs(),
            p.iterations,
            p.bytes_sent,
            remainder_hint(p, params)
        ));
    }
    Verdict::Continue
}

/// What was still to send when pre-copy gave up, and — when that alone
/// cannot fit the downtime budget at the bandwidth cap — what to change.
///
/// why: QEMU tracks a written disk block in 1 MiB chunks, so one dirty chunk
/// takes 1000/cap ms (500 ms at 2 MiB/s): a guest that writes its disk now
/// and then never fits a 100 ms budget at a cap below 10 MiB/s, however idle
/// its memory is.
fn remainder_hint(p: &MigrationProgress, params: &MigrationParams) -> String {
    let left = p.ram_remaining + p.disk_remaining;
    let mut hint = format!(
        "; {} bytes of memory and {} bytes of disk still to send",
        p.ram_remaining, p.disk_remaining
    );
    if params.max_bandwidth > 0 && left > 0 {
        let ms = left.saturating_mul(1000) / params.max_bandwidth;
        if ms > params.downtime_limit.as_millis() as u64 {
            hint.push_str(&format!(
                ", {ms} ms at the {} MiB/s cap against a {} ms downtime budget: raise the downtime budget (--downtime-ms) or the bandwidth cap",
                params.max_bandwidth >> 20,
                params.downtime_limit.as_millis()
            ));
        }
    }
    hint
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(iterations: u64, elapsed_ms: u64) -> MigrationProgress {
        MigrationProgress {
            state: MigrationState::Active,
            iterations,
            elapsed_ms,
            ..Default::default()
        }
    }

    #[test]
    fn converging_precopy_continues() {
        let p = MigrationParams::default();
        assert_eq!(judge(&active(3, 2_000), &p), Verdict::Continue);
    }

    #[test]
    fn too_many_passes_give_up_naming_the_bound() {
        let p = MigrationParams {
            max_iterations: 5,
            ..Default::default()
        };
        let Verdict::GiveUp(why) = judge(&active(6, 10), &p) else {
            panic!("expected give up");
        };
        assert!(why.contains("6 passes (limit 5)"), "{why}");
        assert!(!why.contains("raise"), "{why}");
    }

    #[test]
    fn a_dirty_disk_chunk_that_cannot_fit_the_budget_at_the_cap_says_what_to_change() {
        let p = MigrationParams {
            max_bandwidth: 2 << 20,
            ..Default::default()
        };
        let stuck = MigrationProgress {
            disk_remaining: 1 << 20,
            ram_remaining: 4096,
            ..active(61, 30_000)
        };
        let Verdict::GiveUp(why) = judge(&stuck, &p) else {
            panic!("expected give up");
        };
        assert!(
            why.contains("4096 bytes of memory and 1048576 bytes of disk still to send")
                && why.contains("501 ms at the 2 MiB/s cap against a 100 ms downtime budget")
                && why.contains("--downtime-ms"),
            "{why}"
        );
    }

    #[test]
    fn too_long_gives_up_but_switchover_in_progress_is_never_cut() {
        let p = MigrationParams {
            give_up_after: Duration::from_secs(1),
            ..Default::default()
        };
        assert!(matches!(judge(&active(2, 1_001), &p), Verdict::GiveUp(_)));
        let switching = MigrationProgress {
            state: MigrationState::Switchover,
            ..active(100, 100_000)
        };
        assert_eq!(judge(&switching, &p), Verdict::Continue);
    }

    #[test]
    fn params_round_trip_with_millisecond_durations() {
        let p = MigrationParams::default();
        let j = serde_json::to_value(p).unwrap();
        assert_eq!(j["downtime_limit"], 100);
        assert_eq!(serde_json::from_value::<MigrationParams>(j).unwrap(), p);
    }
}
