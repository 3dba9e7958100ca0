//! After a snapshot restore: this guest's memory is a copy of another VM's, so
//! its RNG state, clock and identity are stale. The host's [`Restored`] message
//! carries fresh ones; they are applied before any other request is read.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hearth_proto::{Restored, RestoredAck};

use crate::boot;

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Largest seed mixed in (the kernel caps one write at a page anyway).
const MAX_SEED: usize = 512;

/// The sandbox id this VM serves, once a restore told it.
static SANDBOX_ID: Mutex<String> = Mutex::new(String::new());

/// The network identity eth0 holds from the last applied [`Restored`] (`None`:
/// none, eth0 down, or the last reconfiguration failed). Lets a `Restored` that
/// says `net_kept` skip reconfiguring an eth0 that already holds exactly it.
static TAKEN_NET: Mutex<Option<crate::net::Identity>> = Mutex::new(None);

/// Why this guest must not start processes: set when applying the last
/// [`Restored`] failed in a way that would leak the snapshot's state into them
/// (the RNG not reseeded, or a given network not taken).
static REFUSE_EXEC: Mutex<Option<String>> = Mutex::new(None);

/// Why an exec must be refused now (see [`REFUSE_EXEC`]).
pub fn exec_refusal() -> Option<String> {
    REFUSE_EXEC
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Process groups stopped by [`freeze`]; part of the snapshot's memory, so a
/// restored guest knows what to continue after [`apply`].
static FROZEN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Bumped by every [`freeze`] and [`thaw`]: a bound watching an older freeze ends.
static FREEZE_GEN: AtomicU64 = AtomicU64::new(0);

/// Seconds after a [`freeze`] that the guest thaws on its own when no Thaw,
/// Resume or Restored came (the host's Thaw was lost, or the host died).
/// Counted as separate one-second sleeps, not as a deadline: a snapshot saved
/// meanwhile and restored much later shortens at most one of them, so a
/// restored copy still applies its `Restored` (queued before it runs) first.
const FREEZE_BOUND_SECS: u32 = 60;

/// Stops the process group of every running session (before a snapshot is
/// saved); returns how many. They continue after [`FREEZE_BOUND_SECS`] at the
/// latest, unless a restore could not be applied (see [`exec_refusal`]).
pub fn freeze(sessions: &crate::session::Sessions) -> u32 {
    let pids = sessions.running_pids();
    let mut frozen = FROZEN.lock().unwrap_or_else(|p| p.into_inner());
    for pid in pids {
        // SAFETY: kill(2) takes no pointers. Each session leads its own process
        // group (setsid), so -pid stops its children too.
        if unsafe { libc::kill(-(pid as i32), libc::SIGSTOP) } == 0 {
            frozen.push(pid as i32);
        }
    }
    let generation = FREEZE_GEN.fetch_add(1, Ordering::SeqCst) + 1;
    let bound = std::thread::Builder::new()
        .name("freeze-bound".into())
        .spawn(move || {
            for _ in 0..FREEZE_BOUND_SECS {
                std::thread::sleep(Duration::from_secs(1));
                if FREEZE_GEN.load(Ordering::SeqCst) != generation {
                    return;
                }
            }
            if thaw_unless_refused() {
                crate::log!(
                    "no Thaw came within {FREEZE_BOUND_SECS} s of a Freeze; continued the stopped processes"
                );
            }
        });
    if let Err(e) = bound {
        crate::log!("cannot start the freeze bound thread ({e}); the host's Thaw must come");
    }
    frozen.len() as u32
}

/// Continues what [`freeze`] stopped.
pub fn thaw() {
    FREEZE_GEN.fetch_add(1, Ordering::SeqCst);
    let pids = std::mem::take(&mut *FROZEN.lock().unwrap_or_else(|p| p.into_inner()));
    for pid in pids {
        // SAFETY: kill(2) takes no pointers.
        unsafe { libc::kill(-pid, libc::SIGCONT) };
    }
}

/// [`thaw`], unless the last restore could not be applied (its processes would
/// run on the snapshot's RNG state or network); returns whether it thawed.
pub fn thaw_unless_refused() -> bool {
    if exec_refusal().is_some() {
        return false;
    }
    thaw();
    true
}

/// Records the refusal a restore left (`None`: it was applied) and continues
/// the snapshot's stopped processes only when there is none; they stay stopped
/// otherwise, until a later `Restored` is applied.
fn settle(refusal: Option<String>) {
    *REFUSE_EXEC.lock().unwrap_or_else(|p| p.into_inner()) = refusal;
    thaw_unless_refused();
}

/// The ack to a `Restored` this guest could not read: nothing was applied, so
/// it refuses execs (and keeps its processes stopped) as after a failed reseed,
/// and says so at once instead of leaving the host waiting.
pub fn unreadable(err: &str) -> RestoredAck {
    let w = format!(
        "reseeding the RNG: the Restored message is unreadable ({err}); nothing of it was applied"
    );
    crate::log!("after restore: {w}");
    settle(refusal(std::slice::from_ref(&w), None, false));
    RestoredAck {
        warnings: vec![w],
        sessions: Vec::new(),
        net_applied: false,
        restore_guard: true,
        sent_first: true,
    }
}

/// Applies `msg`; what fails is reported in the ack, never fatal.
pub fn apply(msg: &Restored) -> RestoredAck {
    let mut warnings = Vec::new();
    if let Err(e) = reseed(&msg.seed) {
        warnings.push(format!("reseeding the RNG: {e}"));
    }
    if let Err(e) = set_clock(msg.unix_ms) {
        warnings.push(format!("setting the clock: {e}"));
    }
    if !msg.hostname.is_empty() {
        if let Err(e) = boot::set_hostname(&msg.hostname) {
            warnings.push(e.to_string());
        }
    }
    *SANDBOX_ID.lock().unwrap_or_else(|p| p.into_inner()) = msg.sandbox_id.clone();
    let mut net_applied = false;
    if msg.net_given {
        let id = msg
            .net
            .as_ref()
            .map(crate::net::Identity::parse)
            .transpose();
        let mut taken = TAKEN_NET.lock().unwrap_or_else(|p| p.into_inner());
        match id {
            Ok(Some(id)) if keeps_net(msg.net_kept, taken.as_ref(), &id) && kernel_holds(&id) => {
                // why: a warm-pool VM took this network at fill time and ran
                // only its warm-up since (one short process of the image
                // itself, with no tap attached); the kernel still shows exactly
                // that identity on eth0 (`kernel_holds`: up, MAC, address,
                // netmask, its host and default routes — not the absence of
                // extra addresses or rules). Reconfiguring eth0 again is the
                // slowest step of a pool start under TCG. Its tap is attached
                // only now, so it announces itself again.
                if let Err(e) = crate::net::announce(&id) {
                    crate::log!("gratuitous ARP not sent: {e}");
                }
                net_applied = true;
            }
            Ok(id) => {
                *taken = None;
                match crate::net::reconfigure(id.as_ref(), boot::SYSROOT) {
                    Ok(()) => {
                        net_applied = true;
                        *taken = id;
                    }
                    Err(e) => warnings.push(format!("configuring the network: {e}")),
                }
            }
            Err(e) => {
                *taken = None;
                warnings.push(format!("configuring the network: {e}"));
            }
        }
    }
    for w in &warnings {
        crate::log!("after restore: {w}");
    }
    // why: last: the snapshot's own processes continue only with the new RNG
    // state, clock, hostname and network in place, and never without them.
    settle(refusal(
        &warnings,
        msg.net_given.then_some(msg.net.is_some()),
        net_applied,
    ));
    RestoredAck {
        warnings,
        sessions: Vec::new(),
        net_applied,
        restore_guard: true,
        sent_first: true,
    }
}

/// Whether eth0 may stay as it is for a `Restored` giving `id`: only when the
/// host says it is the network of its previous `Restored` (`net_kept`) and eth0
/// holds exactly that identity (`taken`) from it.
fn keeps_net(
    net_kept: bool,
    taken: Option<&crate::net::Identity>,
    id: &crate::net::Identity,
) -> bool {
    net_kept && taken == Some(id)
}

/// Whether the kernel's eth0 holds `id` now (see [`crate::net::holds`]); a
/// state that cannot be read counts as not held (eth0 is reconfigured).
fn kernel_holds(id: &crate::net::Identity) -> bool {
    match crate::net::holds(id) {
        Ok(held) => held,
        Err(e) => {
            crate::log!("cannot read eth0's state ({e}); reconfiguring it");
            false
        }
    }
}

/// Why execs must be refused after applying a `Restored` with these outcomes
/// (`net`: it was told about the network, `Some(true)`: given one to take,
/// `Some(false)`: to have none, so eth0 must go down).
fn refusal(warnings: &[String], net: Option<bool>, net_applied: bool) -> Option<String> {
    if let Some(w) = warnings.iter().find(|w| w.starts_with("reseeding the RNG")) {
        Some(format!(
            "this restored guest could not reseed its RNG ({w})"
        ))
    } else if net == Some(true) && !net_applied {
        Some("this restored guest could not take its network address and MAC".to_string())
    } else if net == Some(false) && !net_applied {
        Some(
            "this restored guest could not take eth0 down, and its sandbox must have no network"
                .to_string(),
        )
    } else {
        None
    }
}

/// `struct rand_pool_info` with its flexible buffer.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_SEED],
}

/// Mixes `seed` into the input pool (crediting it) and forces a reseed of the
/// CRNG, so the very next read of /dev/urandom differs from a sibling restore's.
///
/// why: since Linux 5.18 added entropy only reaches the output CRNG at the next
/// periodic reseed (up to a minute later); RNDRESEEDCRNG makes it immediate.
fn reseed(seed: &[u8]) -> io::Result<()> {
    if seed.is_empty() {
        return Err(io::Error::other("the host sent no seed"));
    }
    let n = seed.len().min(MAX_SEED);
    let mut info = RandPoolInfo {
        entropy_count: (n * 8) as libc::c_int,
        buf_size: n as libc::c_int,
        buf: [0; MAX_SEED],
    };
    info.buf[..n].copy_from_slice(&seed[..n]);
    let f = OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: `info` is a valid rand_pool_info whose buffer holds `buf_size` bytes
    // and lives across the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &info) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_clock(unix_ms: u64) -> io::Result<()> {
    let ts = libc::timespec {
        // why: `as _` takes the field's own type (`time_t`, deprecated as a name on musl).
        tv_sec: (unix_ms / 1000) as _,
        tv_nsec: ((unix_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that lives across the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// The state letter of `pid` in /proc (`T` = stopped).
    fn state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.chars().next().unwrap()
    }

    fn wait_state(pid: u32, want: char) -> char {
        for _ in 0..200 {
            if state(pid) == want {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        state(pid)
    }

    // why: one test, since the refusal and the frozen list are process-wide.
    #[test]
    fn a_refused_restore_keeps_the_snapshots_processes_stopped_until_one_is_applied() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        // SAFETY: kill(2) takes no pointers.
        assert_eq!(unsafe { libc::kill(-(pid as i32), libc::SIGSTOP) }, 0);
        assert_eq!(wait_state(pid, 'T'), 'T');
        FROZEN.lock().unwrap().push(pid as i32);

        let ack = unreadable("expected value at line 1 column 1");
        assert!(ack.warnings[0].starts_with("reseeding the RNG"), "{ack:?}");
        assert!(ack.restore_guard && !ack.net_applied, "{ack:?}");
        assert!(exec_refusal().is_some());
        assert!(
            !thaw_unless_refused(),
            "a Resume or the bound must not thaw now"
        );
        assert_eq!(wait_state(pid, 'T'), 'T', "stopped after a refused restore");
        assert_eq!(*FROZEN.lock().unwrap(), vec![pid as i32]);

        settle(refusal(&[], Some(true), true));
        assert_eq!(exec_refusal(), None);
        assert_ne!(
            wait_state(pid, 'S'),
            'T',
            "continued after an applied restore"
        );
        assert!(FROZEN.lock().unwrap().is_empty());
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn eth0_is_kept_only_when_the_host_says_so_and_it_holds_that_identity() {
        let n = |ip: &str| hearth_proto::GuestNet {
            ip: ip.into(),
            prefix: 32,
            gateway: "169.254.1.1".into(),
            mac: "02:68:0a:58:00:07".into(),
            dns: Vec::new(),
        };
        let a = crate::net::Identity::parse(&n("10.88.0.7")).unwrap();
        let b = crate::net::Identity::parse(&n("10.88.0.8")).unwrap();
        assert!(keeps_net(true, Some(&a), &a));
        assert!(
            !keeps_net(false, Some(&a), &a),
            "a snapshot restore always reconfigures"
        );
        assert!(
            !keeps_net(true, Some(&b), &a),
            "another identity is taken, not kept"
        );
        assert!(
            !keeps_net(true, None, &a),
            "nothing taken (down, or a failed reconfigure)"
        );
    }

    #[test]
    fn execs_are_refused_only_after_a_failed_reseed_or_a_network_not_taken_or_not_taken_down() {
        let none: Vec<String> = Vec::new();
        assert_eq!(refusal(&none, Some(true), true), None);
        assert_eq!(refusal(&none, Some(false), true), None);
        assert_eq!(refusal(&none, None, false), None, "no network device");
        assert_eq!(
            refusal(&["setting the clock: EPERM".into()], None, false),
            None
        );
        let rng = refusal(&["reseeding the RNG: EPERM".into()], None, false).unwrap();
        assert!(rng.contains("could not reseed its RNG"), "{rng}");
        let net = refusal(&none, Some(true), false).unwrap();
        assert!(net.contains("network address"), "{net}");
        let down = refusal(
            &["configuring the network: take eth0 down: EPERM".into()],
            Some(false),
            false,
        )
        .unwrap();
        assert!(down.contains("could not take eth0 down"), "{down}");
    }
}
