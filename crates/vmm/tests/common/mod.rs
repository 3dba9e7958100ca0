//! Helpers shared by the VMM's integration tests.

/// Kills a test's VM if the test panics: VMs run in their own session and
/// would otherwise outlive the test binary.
pub struct KillOnPanic(pub u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() && pid_exists(self.0) {
            // SAFETY: kill(2) on the pid of a VM this test started and has not reaped.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

/// Whether `pid` is a live process (a zombie awaiting reaping is gone for our purposes).
pub fn pid_exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        })
        .unwrap_or(false)
}
