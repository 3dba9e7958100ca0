//! VMM backends of Hearth behind one trait.
//!
//! A [`Vmm`] backend turns a [`VmConfig`] into a running-but-paused [`Vm`]:
//! it prepares the VM directory (copy-on-write root overlay, sockets, logs),
//! starts the VMM process in its own session so it outlives the daemon, and
//! records `vm.json` so a restarted daemon can [`Vmm::adopt`] it. The caller
//! (the node agent) then connects the guest agent channel and calls
//! [`Vm::start`], so the guest's first message cannot be lost.
//!
//! Snapshots: [`Vm::save_snapshot`] writes a [`snapshot`] directory (state,
//! RAM, disk layer, manifest); [`Vmm::restore`] starts a paused VM from one with
//! its RAM mapped copy-on-write. Firecracker's snapshot API (`/snapshot/create`,
//! `/snapshot/load` with a file memory backend) fits the same two calls.
//!
//! Backends: [`qemu::QemuVmm`] (QEMU `microvm`, driven over [`qmp`]).
//! Firecracker slots in behind the same traits later.

pub mod config;
mod connect;
pub mod error;
pub mod migration;
pub mod probe;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod record;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;

pub use config::{Accel, AccelChoice, GuestMemory, HostLimits, NetDevice, VmConfig};
pub use error::VmmError;
pub use migration::{MigrationParams, MigrationProgress, MigrationState};
pub use probe::{choose_accel, probe_accel, AccelReport, PROBE_TIMEOUT};
pub use process::VmExit;
pub use qemu::migrate::SwitchoverGate;
pub use qemu::{recorded_machine, recorded_net_hub, MachineLayout, QemuVm, QemuVmm};
pub use qmp::RunStateTimes;
pub use record::{destroy, is_alive, kill_recorded, VmRecord};
pub use snapshot::{HostIdentity, RamStorage, SnapshotManifest, Verify};

/// What happens to a VM once its snapshot is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSave {
    /// Keep running (or stay paused, if it was paused).
    Resume,
    /// End the VM; its RAM file becomes the snapshot's without a copy (templates).
    Quit,
}

/// What the caller knows about a VM that the snapshot manifest records.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// SHA-256 of the guest kernel the VM booted.
    pub kernel_sha256: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// The read-only base root filesystem under the VM's disk layer.
    pub base_rootfs: PathBuf,
    pub after: AfterSave,
}

/// A VM started from a snapshot: paused, state loaded, agent channel connected.
pub struct RestoredVm {
    pub vm: Box<dyn Vm>,
    /// Connected before the state was loaded, so the guest never saw its host leave.
    pub agent: UnixStream,
}

/// A VMM backend.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync {
    /// Prepares `cfg.dir`, starts the VMM paused and returns once its control
    /// socket answers. On failure nothing is left running and the files it made are removed.
    async fn create(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>, VmmError>;

    /// Re-opens the VM recorded in `dir/vm.json` (after a daemon restart).
    /// [`VmmError::VmGone`] when its process is gone or the pid was recycled.
    async fn adopt(&self, dir: &Path) -> Result<Box<dyn Vm>, VmmError>;

    /// Starts a VM of `cfg` that, instead of booting, waits for a migration
    /// stream on the unix socket `incoming` (see [`migration`]). It stays paused
    /// until [`Vm::start`]; [`Vm::wait_incoming`] says when the stream is complete.
    ///
    /// `disk_bytes`: the disk is a standalone empty one of that size, which the
    /// stream fills (the source's whole disk moves); `None`: an overlay over
    /// `cfg.rootfs` as [`Vmm::create`] makes.
    async fn create_incoming(
        &self,
        cfg: &VmConfig,
        incoming: &Path,
        disk_bytes: Option<u64>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        let _ = (incoming, disk_bytes);
        Err(VmmError::Unsupported {
            id: cfg.id.clone(),
            what: "incoming live migration",
        })
    }
    /// Starts a VM from the snapshot in `snapshot` (already checked against this
    /// host with [`SnapshotManifest::check`]): `cfg` gives id, directory and
    /// hostname; vCPUs and memory come from the manifest. The VM is paused with its
    /// state loaded; [`Vm::start`] resumes it. On failure nothing is left running.
    async fn restore(
        &self,
        cfg: &VmConfig,
        snapshot: &Path,
        manifest: &SnapshotManifest,
    ) -> Result<RestoredVm, VmmError>;

    /// Short backend name, as recorded in vm.json (`qemu`).
    fn name(&self) -> &'static str;

    /// The VMM's version string.
    fn version(&self) -> String;
}

/// A running (or paused) VM owned by a backend.
///
/// Dropping the handle leaves the VM running: only [`Vm::shutdown`] and
/// [`Vm::kill`] end it.
#[async_trait::async_trait]
pub trait Vm: Send + Sync {
    fn id(&self) -> &str;
    /// Pid of the VMM process.
    fn pid(&self) -> u32;
    fn dir(&self) -> &Path;
    fn accel(&self) -> Accel;
    /// The host end of the guest agent channel.
    fn agent_socket(&self) -> &Path;
    /// The guest serial console (`DIR/console.log`), for explaining crashes.
    fn console_log(&self) -> PathBuf;

    /// Connects to the guest agent channel (one connection at a time).
    async fn connect_agent(&self) -> Result<UnixStream, VmmError>;
    /// Starts the vCPUs of a VM created paused; waits for the RESUME event.
    async fn start(&self) -> Result<(), VmmError>;
    /// Starts the vCPUs of a VM this process paused itself and knows to be
    /// paused (a parked warm-pool VM): like [`Vm::start`] without asking
    /// first whether it runs (one VMM round trip less on a warm start's path).
    async fn start_paused(&self) -> Result<(), VmmError> {
        self.start().await
    }
    /// Pauses the vCPUs; waits for the STOP event. A VM that is not running is left as is.
    async fn pause(&self) -> Result<(), VmmError>;
    /// Resumes paused vCPUs; waits for the RESUME event. A running VM is left as is.
    async fn resume(&self) -> Result<(), VmmError>;
    /// Whether the vCPUs run (not paused, not stopped for a migration).
    async fn is_running(&self) -> Result<bool, VmmError> {
        Err(VmmError::Unsupported {
            id: self.id().to_string(),
            what: "asking the run state",
        })
    }
    /// When the VMM last stopped and resumed the vCPUs, by its own clock
    /// (QEMU's `STOP`/`RESUME` event timestamps); empty if it does not say.
    fn run_state_times(&self) -> qmp::RunStateTimes {
        qmp::RunStateTimes::default()
    }
    /// Changes whenever [`Vm::run_state_times`] does, so a waiter learns
    /// of a stop as the VMM reports it; None if the VMM does not say.
    fn run_state_changes(&self) -> Option<tokio::sync::watch::Receiver<qmp::RunStateTimes>> {
        None
    }
    /// Asks the VMM to quit, SIGKILLs it after `grace`, and waits until it is gone.
    async fn shutdown(&self, grace: Duration) -> Result<VmExit, VmmError>;
    /// SIGKILLs the VMM process (does not wait; see [`Vm::wait`]).
    async fn kill(&self) -> Result<(), VmmError>;
    /// Resolves when the VMM process is gone.
    async fn wait(&self) -> Result<VmExit, VmmError>;

    /// Live-migrates the running VM into the stream on the unix socket `dest`,
    /// publishing progress. With a `gate`, stops at the switch-over (VM paused,
    /// final pass pending) until the caller says go. `Ok`: the VM is paused for
    /// good and its state is on the target. `Err`: the VM runs here again.
    async fn migrate_out(
        &self,
        dest: &Path,
        params: &MigrationParams,
        progress: &tokio::sync::watch::Sender<MigrationProgress>,
        gate: Option<SwitchoverGate>,
    ) -> Result<MigrationProgress, VmmError> {
        let _ = (dest, params, progress, gate);
        Err(VmmError::Unsupported {
            id: self.id().to_string(),
            what: "live migration",
        })
    }

    /// The last outgoing migration's statistics as the VMM reports them now
    /// (after [`Vm::migrate_out`] answered `Ok` from the VMM's completion event,
    /// its progress may predate the last pass: bytes, downtime). `None`: the
    /// backend keeps none.
    async fn migration_stats(&self) -> Result<Option<MigrationProgress>, VmmError> {
        Ok(None)
    }

    /// On a VM from [`Vmm::create_incoming`]: waits until the migration stream is complete.
    async fn wait_incoming(&self, timeout: Duration) -> Result<(), VmmError> {
        let _ = timeout;
        Err(VmmError::Unsupported {
            id: self.id().to_string(),
            what: "incoming live migration",
        })
    }
    /// Joins the existing tap `tap` to the hub its network device sits on (a
    /// VM made with [`NetDevice::hub`]), e.g. a warm-pool VM taken by a networked
    /// sandbox. Call while the VM is paused.
    async fn attach_tap(&self, tap: &str) -> Result<(), VmmError> {
        let _ = tap;
        Err(VmmError::Unsupported {
            id: self.id().to_string(),
            what: "attaching a tap to a running VM",
        })
    }

    /// Pauses the VM and writes a snapshot (state, RAM, disk layer, manifest) into
    /// the new directory `dest`; then resumes or quits it as `opts.after` says.
    async fn save_snapshot(
        &self,
        dest: &Path,
        opts: &SaveOptions,
    ) -> Result<SnapshotManifest, VmmError>;

    /// [`Vm::save_snapshot`] that sends on `resumed` as soon as the VM's part is
    /// done (the state is written and the VM runs again, or is quitting), while
    /// the rest (converting private RAM to a file, flushing and checksumming)
    /// goes on; dropped unsent when the save fails before that. The default
    /// (a backend whose save has no such point, e.g. Firecracker's
    /// `PUT /snapshot/create` on a paused VM) sends when the whole save is
    /// done: correct, only later; a backend with an earlier point overrides it.
    async fn save_snapshot_notify(
        &self,
        dest: &Path,
        opts: &SaveOptions,
        resumed: tokio::sync::oneshot::Sender<()>,
    ) -> Result<SnapshotManifest, VmmError> {
        let saved = self.save_snapshot(dest, opts).await;
        if saved.is_ok() {
            let _ = resumed.send(());
        }
        saved
    }
}

/// The last `max_bytes` of a log file, lossily decoded; empty if unreadable.
pub fn log_tail(path: &Path, max_bytes: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    // why: logs may be guest-controlled and huge; read only the tail.
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(max_bytes as u64)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = f.take(max_bytes as u64).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}
