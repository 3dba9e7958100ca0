//! Connecting to a unix socket that a just-started VMM will create: retry with
//! a short backoff until it accepts, the deadline passes, or the VMM exits.
//! This is the one readiness loop of the crate; it waits on the socket, not a clock.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use crate::process::VmExit;

pub(crate) enum ConnectFailure {
    /// Deadline passed; the last connect error.
    Timeout(io::Error),
    /// The VMM process ended first.
    Exited(VmExit),
}

pub(crate) async fn connect_when_listening(
    path: &Path,
    timeout: Duration,
    exited: impl Fn() -> Option<VmExit>,
) -> Result<UnixStream, ConnectFailure> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(2);
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Some(exit) = exited() {
                    return Err(ConnectFailure::Exited(exit));
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(ConnectFailure::Timeout(e));
                }
                tokio::time::sleep(backoff.min(deadline - now)).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
        }
    }
}
