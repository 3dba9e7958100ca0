//! Snapshots on QEMU: the migration stream written to a file.
//!
//! Save: `stop`, `migrate` to `exec:cat > DIR/state` with `x-ignore-shared`, so
//! RAM that is a shared memory-backend-file stays out of the stream and is
//! copied (or, when the VM quits, moved) as `DIR/ram`; the qcow2 layer is copied
//! while the VM is paused. Restore: QEMU with `-incoming defer`, the snapshot's
//! RAM file as a `share=off` memory-backend-file (a private copy-on-write
//! mapping: pages fault in lazily and the snapshot is never written, so one
//! snapshot serves any number of restores), the agent channel connected, then
//! `migrate-incoming` from `exec:cat DIR/state`.
//!
//! A VM whose RAM is private (restored from a snapshot or template) cannot
//! have its RAM skipped: it saves the state with all RAM, and a helper QEMU
//! turns that into `DIR/ram` + a device-only `DIR/state`
//! ([`QemuVm::convert_ram`]), so every snapshot restores lazily.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::sync::broadcast;

use super::argv::memory_backend_args;
use super::{Disk, Lifetime, QemuVm, QemuVmm, RamBacking, LOG_TAIL_BYTES};
use crate::config::{option_path, GuestMemory, NetDevice, VmConfig};
use crate::error::VmmError;
use crate::qmp::QmpEvent;
use crate::record::VmRecord;
use crate::snapshot::{
    copy_sparse, describe_files, sync_files, RamStorage, SnapshotManifest, DISK_FILE, RAM_FILE,
    SNAPSHOT_FORMAT, STATE_FILE,
};
use crate::{log_tail, AfterSave, SaveOptions, Vm};

/// Bound on writing or reading the state stream (TCG hosts are slow and busy).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on converting a snapshot of a VM with private RAM (helper QEMU start,
/// loading all its RAM, saving its device state, quitting).
pub const CONVERT_TIMEOUT: Duration = Duration::from_secs(120);

/// In a snapshot directory being saved: the state stream with all RAM that a
/// VM with private RAM writes; removed once converted.
const RAM_STREAM_FILE: &str = ".state-with-ram";

/// `'path'` for QEMU's `exec:` migration URIs, which run through `sh -c`.
fn shell_quoted(id: &str, path: &Path) -> Result<String, VmmError> {
    let s = option_path(id, path)?;
    if s.contains('\'') {
        return Err(VmmError::InvalidPath {
            id: id.to_string(),
            path: path.to_path_buf(),
            reason: "contains a single quote",
        });
    }
    Ok(format!("'{s}'"))
}

impl QemuVm {
    /// The capabilities of a save or load. `ignore_shared`: RAM blocks mapped
    /// shared stay out of the stream (every file-RAM snapshot's state, and
    /// every load of one); off, every block's pages are in it (the stream a
    /// VM with private RAM writes for its conversion, see [`QemuVm::convert_ram`]).
    async fn enable_migration_caps(&self, ignore_shared: bool) -> Result<(), VmmError> {
        self.qmp
            .execute(
                "migrate-set-capabilities",
                // why: capabilities live as long as the QEMU process; a live
                // migration attempted earlier (and cancelled) left its own on,
                // and `pause-before-switchover` would stall this save.
                json!({"capabilities": [
                    {"capability": "x-ignore-shared", "state": ignore_shared},
                    {"capability": "events", "state": true},
                    {"capability": "block", "state": false},
                    {"capability": "auto-converge", "state": false},
                    {"capability": "pause-before-switchover", "state": false},
                ]}),
            )
            .await?;
        Ok(())
    }

    /// Waits for the MIGRATION event that ends the current save or load.
    async fn wait_migration(
        &self,
        events: &mut broadcast::Receiver<QmpEvent>,
        op: &'static str,
    ) -> Result<(), VmmError> {
        let failed = |detail: String| VmmError::SnapshotFailed {
            id: self.id.clone(),
            op,
            detail,
            log_tail: log_tail(&self.layout.qemu_log, LOG_TAIL_BYTES),
        };
        let deadline = tokio::time::Instant::now() + STATE_TIMEOUT;
        loop {
            let ev = tokio::select! {
                ev = self.qmp.wait_event(events, "MIGRATION", STATE_TIMEOUT) => ev,
                x = self.exit.wait() => return Err(failed(format!("QEMU exited ({x})"))),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(failed(format!("no end of migration within {STATE_TIMEOUT:?}")))
                }
            };
            let ev = match ev {
                Ok(ev) => ev,
                Err(e @ VmmError::QmpClosed { .. }) => {
                    let x = super::exit_soon(&self.exit).await;
                    return Err(failed(match x {
                        Some(x) => format!("QEMU exited ({x})"),
                        None => e.to_string(),
                    }));
                }
                Err(e) => return Err(e),
            };
            match ev.data["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                s @ ("failed" | "cancelled") => return Err(failed(format!("migration {s}"))),
                _ => continue,
            }
        }
    }

    /// See [`Vm::save_snapshot`] and [`Vm::save_snapshot_notify`] (`on_resumed`).
    pub async fn save_qemu(
        &self,
        dest: &Path,
        opts: &SaveOptions,
        on_resumed: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<SnapshotManifest, VmmError> {
        let io = |op, p: &Path| {
            let path = p.to_path_buf();
            move |source| VmmError::Io { op, path, source }
        };
        std::fs::create_dir_all(dest).map_err(io("create snapshot directory", dest))?;
        let status = self.qmp.execute("query-status", Value::Null).await?;
        let was_running = status["running"].as_bool() == Some(true);
        let t0 = Instant::now();
        let saved = self.write_state(dest, opts).await;
        let paused_for = t0.elapsed();
        let resumed = match opts.after {
            AfterSave::Resume if was_running => self.set_running(true).await,
            _ => Ok(()),
        };
        let mut ram = saved?;
        resumed?;
        if opts.after == AfterSave::Quit {
            let _ = self.shutdown(Duration::from_secs(5)).await?;
            if let RamBacking::Shared(p) = &self.ram {
                // why: the VM is gone, so its RAM file is final: take it instead of copying.
                std::fs::rename(p, dest.join(RAM_FILE)).map_err(io("move RAM file", p))?;
            }
        }
        let vm_done = t0.elapsed();
        if let Some(tx) = on_resumed {
            let _ = tx.send(());
        }
        if ram == RamStorage::InState {
            // why: a restore of an `in_state` snapshot reads all RAM up front; a
            // RAM file is mapped lazily. The stream is consistent with the disk
            // copy already, so this runs after the VM was resumed.
            ram = match self.convert_ram(dest, opts).await {
                Ok(r) => r,
                Err(e) => {
                    // why: the stream with all RAM is a complete snapshot in the
                    // older `in_state` format; a failed optimisation must not fail it.
                    tracing::warn!(vm = %self.id, error = %e, "snapshot RAM not converted; the snapshot keeps its RAM in the state");
                    RamStorage::InState
                }
            };
            if ram == RamStorage::InState {
                let _ = std::fs::remove_file(dest.join(RAM_FILE));
                let stream = dest.join(RAM_STREAM_FILE);
                std::fs::rename(&stream, dest.join(STATE_FILE))
                    .map_err(io("rename the state stream with RAM", &stream))?;
            }
        }
        let mut names = vec![STATE_FILE, DISK_FILE];
        if ram == RamStorage::File {
            names.push(RAM_FILE);
        }
        let dir = dest.to_path_buf();
        // why: the data is durable before the manifest (written last) says the snapshot exists.
        let files = tokio::task::spawn_blocking(move || {
            sync_files(&dir, &names)?;
            describe_files(&dir, &names)
        })
        .await
        .map_err(|e| io("checksum snapshot", dest)(std::io::Error::other(e)))??;
        let manifest = SnapshotManifest {
            format_version: SNAPSHOT_FORMAT,
            backend: super::BACKEND.to_string(),
            vmm_version: self.vmm_version.clone(),
            kernel_sha256: opts.kernel_sha256.clone(),
            accel: self.accel,
            cpus: opts.cpus,
            memory_mib: opts.memory_mib,
            // why: the RAM this VM really has (a migrated VM keeps its source's
            // pad, which may not be this build's); restores rebuild that size.
            ram_pad_kib: super::recorded_ram_kib(&self.layout.dir)
                .unwrap_or_else(|| super::argv::ram_kib(opts.memory_mib, self.accel))
                .saturating_sub(u64::from(opts.memory_mib) * 1024),
            ram,
            base_rootfs: opts.base_rootfs.clone(),
            files,
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        manifest.store(dest)?;
        tracing::info!(vm = %self.id, ?paused_for, ?vm_done, total = ?t0.elapsed(), ram = ?ram, "snapshot saved");
        Ok(manifest)
    }

    /// Pauses and writes state, disk layer and (when resuming) the RAM copy.
    /// [`RamStorage::InState`]: the VM's RAM is private, and the state with
    /// all its RAM is in [`RAM_STREAM_FILE`] (for [`QemuVm::convert_ram`]).
    async fn write_state(&self, dest: &Path, opts: &SaveOptions) -> Result<RamStorage, VmmError> {
        self.set_running(false).await?;
        let shared = matches!(self.ram, RamBacking::Shared(_));
        self.enable_migration_caps(shared).await?;
        let file = if shared { STATE_FILE } else { RAM_STREAM_FILE };
        self.save_stream_to(&dest.join(file), "saving the VM state")
            .await?;
        // why: a `cont` right after the `completed` event is refused ("Migration is
        // not finalized yet") while the run state is still `finish-migrate`.
        self.settle_after_completion().await;
        // why: QEMU flushed the disk when the migration completed and nothing runs
        // until we resume, so these copies are consistent with the state stream.
        let disk = dest.join(DISK_FILE);
        std::fs::copy(&self.layout.overlay, &disk).map_err(|source| VmmError::Io {
            op: "copy the disk layer to",
            path: disk.clone(),
            source,
        })?;
        match (&self.ram, opts.after) {
            (RamBacking::Shared(_), AfterSave::Quit) => Ok(RamStorage::File),
            (RamBacking::Shared(p), AfterSave::Resume) => {
                let to = dest.join(RAM_FILE);
                copy_sparse(p, &to).map_err(|source| VmmError::Io {
                    op: "copy guest RAM to",
                    path: to,
                    source,
                })?;
                Ok(RamStorage::File)
            }
            (RamBacking::Anonymous | RamBacking::Private, _) => Ok(RamStorage::InState),
        }
    }
}

impl QemuVm {
    /// Waits, at most `timeout`, until the processes QEMU started for `exec:`
    /// migration URIs (`sh -c 'cat > FILE'`) have exited.
    ///
    /// why: QEMU reports a save `completed` once the stream is in the pipe; the
    /// `cat` writing it to the file may still be draining the pipe then (seen:
    /// a state file 125 KB longer moments after its checksum was taken), so the
    /// file is whole only once that process is gone.
    pub async fn wait_exec_children(&self, timeout: Duration) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let pid = self.process.pid();
        loop {
            let kids = children_of(pid);
            if kids.is_empty() {
                return Ok(());
            }
            for kid in kids {
                let watch = crate::process::start_time(kid)
                    .and_then(|st| crate::process::ProcessHandle::open(kid, st))
                    .and_then(|h| h.watch_adopted());
                // why: a child that is gone already cannot be opened; the next
                // round finds it no longer listed.
                let Ok(watch) = watch else {
                    // why: bounded even if a child cannot be opened persistently.
                    if tokio::time::Instant::now() >= deadline {
                        return Err(VmmError::Timeout {
                            id: self.id.clone(),
                            awaited: format!(
                                "the process writing the migration stream (pid {kid}) to exit"
                            ),
                            after: timeout,
                            log_tail: log_tail(&self.layout.qemu_log, LOG_TAIL_BYTES),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                if tokio::time::timeout_at(deadline, watch.wait())
                    .await
                    .is_err()
                {
                    return Err(VmmError::Timeout {
                        id: self.id.clone(),
                        awaited: format!(
                            "the process writing the migration stream (pid {kid}) to exit"
                        ),
                        after: timeout,
                        log_tail: log_tail(&self.layout.qemu_log, LOG_TAIL_BYTES),
                    });
                }
            }
        }
    }

    /// Turns the stream with all RAM that this VM (whose RAM is private) saved
    /// in `dest` into a RAM file plus a device-state stream, so the snapshot
    /// restores lazily (`ram: file`) like any other.
    ///
    /// A helper QEMU of this VM's machine (vCPUs, RAM size with its pad, device
    /// set, a blank disk of the same size) whose RAM is a shared memfd loads
    /// the stream, saves with `x-ignore-shared` (device state only) to
    /// `DEST/state`; its RAM is then copied to `DEST/ram` (zero pages left as
    /// holes) and it quits. Bounded by [`CONVERT_TIMEOUT`]; on failure the helper is killed and its directory,
    /// the RAM file and the partial state removed. The helper dies with the
    /// thread that started it ([`Lifetime::TiedToCaller`]), so a daemon that
    /// dies mid-way leaves no QEMU behind, and when this future is dropped.
    ///
    /// Returns [`RamStorage::InState`] without converting when the host has
    /// less memory available than the helper's RAM plus [`CONVERT_MARGIN_BYTES`]
    /// (the helper's RAM all gets allocated while it loads); the caller then
    /// keeps the stream with all RAM as the snapshot's state, as on an error.
    async fn convert_ram(&self, dest: &Path, opts: &SaveOptions) -> Result<RamStorage, VmmError> {
        let t0 = Instant::now();
        let failed = |detail: String| VmmError::SnapshotFailed {
            id: self.id.clone(),
            op: "converting the snapshot's RAM to a file",
            detail: format!("snapshot {}: {detail}", dest.display()),
            log_tail: String::new(),
        };
        let machine = super::recorded_machine(&self.layout.dir)
            .map_err(|e| failed(format!("reading the VM's machine: {e}")))?;
        let argv = VmRecord::load(&self.layout.dir)
            .map_err(|e| failed(format!("reading the VM's record: {e}")))?
            .argv;
        let helper_bytes = machine.ram_kib * 1024;
        let available = mem_available();
        // why: held until the conversion ends: a second conversion (another
        // VM's snapshot at the same time) counts this helper's RAM as taken
        // even before the load allocated it (review6 F4).
        let Some(_reserved) = CONVERSIONS.reserve(available, helper_bytes) else {
            // why: the helper's shmem RAM gets all allocated (QEMU reads every
            // zero page of the stream too) and cannot be reclaimed while it runs.
            tracing::info!(
                vm = %self.id,
                helper_bytes,
                mem_available = ?available,
                margin = CONVERT_MARGIN_BYTES,
                reserved = CONVERSIONS.reserved(),
                "snapshot RAM not converted (too little host memory available beside the conversions running); the snapshot keeps its RAM in the state"
            );
            return Ok(RamStorage::InState);
        };
        let arg = |flag: &str| {
            argv.windows(2)
                .find(|w| w[0] == flag)
                .map(|w| PathBuf::from(&w[1]))
        };
        let (Some(kernel), Some(initrd)) = (arg("-kernel"), arg("-initrd")) else {
            return Err(failed(
                "no `-kernel` and `-initrd` on the VM's recorded command line".to_string(),
            ));
        };
        let ram = super::absolute(&self.id, &dest.join(RAM_FILE))?;
        let cfg = VmConfig {
            id: helper_id(&self.id),
            dir: helper_dir(&self.id, dest)?,
            kernel,
            initrd,
            rootfs: opts.base_rootfs.clone(),
            cpus: machine.cpus,
            memory_mib: opts.memory_mib,
            hostname: "ramconv".to_string(),
            extra_cmdline: Vec::new(),
            accel: self.accel,
            // why: the device set must be the VM's; only the backend may differ.
            // A device directly on a tap negotiated offloads only a tap gives, so
            // its helper gets a tap of its own, created by QEMU and gone with it.
            net: machine.nic.map(|(mac, hub)| NetDevice {
                tap: (!hub).then(unique_tap_name),
                mac,
                hub,
            }),
            memory: GuestMemory::Anonymous,
            ram_kib: Some(machine.ram_kib),
        };
        // why: memfd, not a file in DEST: loading writes every non-zero page
        // and reads every zero one through the mapping, and page faults on a
        // shared ext4 mapping made that ~4x slower than on shmem followed by
        // one pass of plain writes; a memfd also goes away with its process.
        let mut extra = memory_backend_args(&format!(
            "memory-backend-memfd,id=ram,size={}K,share=on",
            machine.ram_kib,
        ));
        extra.extend(["-incoming".to_string(), "defer".to_string()]);
        let remove_outputs = || {
            let _ = std::fs::remove_file(&ram);
            let _ = std::fs::remove_file(dest.join(STATE_FILE));
        };
        let helper = match self
            .backend
            .launch_as(
                &cfg,
                Disk::Blank(machine.disk_bytes),
                RamBacking::Shared(ram.clone()),
                extra,
                Lifetime::TiedToCaller,
            )
            .await
        {
            Ok(h) => h,
            Err(e) => {
                remove_outputs();
                // why: a QEMU that exited at start left its log and record there.
                let _ = std::fs::remove_dir_all(&cfg.dir);
                return Err(failed(format!("starting the helper QEMU: {e}")));
            }
        };
        // why: a caller that drops this future mid-way (a cancelled request)
        // must not leave the helper running; PDEATHSIG only covers the thread.
        let mut guard = KillOnDrop {
            vm: &helper,
            dir: &cfg.dir,
            armed: true,
        };
        let work = async {
            helper.convert_stream(dest).await?;
            copy_helper_ram(&helper, &ram, helper_bytes).await
        };
        let result = match tokio::time::timeout(CONVERT_TIMEOUT, work).await {
            Ok(r) => r.map_err(|e| failed(e.to_string())),
            Err(_) => Err(VmmError::SnapshotFailed {
                id: self.id.clone(),
                op: "converting the snapshot's RAM to a file",
                detail: format!(
                    "snapshot {}: the helper QEMU did not finish within {CONVERT_TIMEOUT:?}",
                    dest.display()
                ),
                log_tail: log_tail(&helper.layout.qemu_log, LOG_TAIL_BYTES),
            }),
        };
        let ended = match &result {
            Ok(()) => helper.shutdown(Duration::from_secs(5)).await.map(|_| ()),
            Err(_) => match helper.kill().await {
                Ok(()) => helper
                    .wait_timeout(Duration::from_secs(10))
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            },
        };
        guard.armed = false;
        let removed = crate::record::destroy(&cfg.dir);
        let result = result
            .and_then(|()| ended.map_err(|e| failed(format!("ending the helper QEMU: {e}"))))
            .and_then(|()| {
                removed.map_err(|e| failed(format!("removing the helper's directory: {e}")))
            });
        match result {
            Ok(()) => {
                let stream = dest.join(RAM_STREAM_FILE);
                std::fs::remove_file(&stream).map_err(|source| VmmError::Io {
                    op: "remove the converted state stream",
                    path: stream,
                    source,
                })?;
                tracing::info!(vm = %self.id, took = ?t0.elapsed(), "snapshot RAM converted to a file");
                Ok(RamStorage::File)
            }
            Err(e) => {
                remove_outputs();
                Err(e)
            }
        }
    }

    /// On a helper of [`QemuVm::convert_ram`]: loads the stream with all RAM
    /// into its memfd RAM, then saves the device state.
    async fn convert_stream(&self, dest: &Path) -> Result<(), VmmError> {
        // why: connected before the load, as a restore does: a port whose host
        // connection differs from the loaded state is told so by QEMU (a change
        // the guest would see), and the state saved here must say "connected"
        // for the restores of the snapshot, which connect before loading too.
        let _agent = self.connect_agent().await?;
        // why: the stream was written without `x-ignore-shared` (its RAM block
        // was private); with it on, this shared block would be refused.
        self.enable_migration_caps(false).await?;
        self.load_stream_from(&dest.join(RAM_STREAM_FILE), "loading the state with RAM")
            .await?;
        self.enable_migration_caps(true).await?;
        self.save_stream_to(&dest.join(STATE_FILE), "saving the device state")
            .await
    }

    /// Saves the VM's migration stream to `file` (`exec:cat > FILE`) and
    /// waits until it completed and the writer process exited (`what` names
    /// the step in a timeout).
    async fn save_stream_to(&self, file: &Path, what: &'static str) -> Result<(), VmmError> {
        let uri = format!("exec:cat > {}", shell_quoted(&self.id, file)?);
        let mut events = self.qmp.subscribe();
        self.qmp.execute("migrate", json!({ "uri": uri })).await?;
        self.wait_migration(&mut events, what).await?;
        self.wait_exec_children(STATE_TIMEOUT).await
    }

    /// Loads the migration stream in `file` into this `-incoming defer` QEMU
    /// and waits until it completed.
    async fn load_stream_from(&self, file: &Path, what: &'static str) -> Result<(), VmmError> {
        let uri = format!("exec:cat {}", shell_quoted(&self.id, file)?);
        let mut events = self.qmp.subscribe();
        self.qmp
            .execute("migrate-incoming", json!({ "uri": uri }))
            .await?;
        self.wait_migration(&mut events, what).await
    }
}

/// Host memory that must stay available beyond the helper's RAM for
/// [`QemuVm::convert_ram`] to run.
const CONVERT_MARGIN_BYTES: u64 = 256 << 20;

/// Whether a conversion whose helper has `helper_bytes` of RAM may run with
/// `mem_available` bytes available on the host (None: unknown, so no).
fn conversion_fits(mem_available: Option<u64>, helper_bytes: u64) -> bool {
    mem_available.is_some_and(|a| a >= helper_bytes.saturating_add(CONVERT_MARGIN_BYTES))
}

/// The helpers' RAM of the conversions running in this process.
static CONVERSIONS: ConversionBudget = ConversionBudget::new();

/// Host memory the running conversions' helpers may still allocate: a
/// conversion runs only when what is available, less every running helper's
/// RAM and margin, fits its own helper and margin ([`conversion_fits`]). Conservative: a helper
/// that already allocated its RAM is counted in `MemAvailable` and here.
struct ConversionBudget {
    reserved: std::sync::Mutex<u64>,
}

impl ConversionBudget {
    const fn new() -> Self {
        Self {
            reserved: std::sync::Mutex::new(0),
        }
    }

    fn reserved(&self) -> u64 {
        *self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `helper_bytes` when they fit beside the reservations held;
    /// released when the returned guard drops.
    fn reserve(&self, mem_available: Option<u64>, helper_bytes: u64) -> Option<Reservation<'_>> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let left = mem_available.map(|a| a.saturating_sub(*reserved));
        if !conversion_fits(left, helper_bytes) {
            return None;
        }
        // why: each helper is a QEMU process of its own, with its own
        // overhead beyond its RAM: each reserves the margin too.
        let bytes = helper_bytes.saturating_add(CONVERT_MARGIN_BYTES);
        *reserved += bytes;
        Some(Reservation {
            budget: self,
            bytes,
        })
    }
}

struct Reservation<'a> {
    budget: &'a ConversionBudget,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self
            .budget
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *reserved = reserved.saturating_sub(self.bytes);
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Kills a helper of [`QemuVm::convert_ram`] (and removes its directory)
/// when the conversion is dropped before it ended the helper itself.
struct KillOnDrop<'a> {
    vm: &'a QemuVm,
    dir: &'a Path,
    armed: bool,
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.vm.process.signal(libc::SIGKILL);
            let _ = std::fs::remove_dir_all(self.dir);
        }
    }
}

/// Copies the RAM of a helper of [`QemuVm::convert_ram`] (its memfd, found
/// among its open files) to `to`, leaving zero pages as holes.
async fn copy_helper_ram(helper: &QemuVm, to: &Path, bytes: u64) -> Result<(), VmmError> {
    let fds = PathBuf::from(format!("/proc/{}/fd", helper.process.pid()));
    let to_path = to.to_path_buf();
    let copied = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let memfd = std::fs::read_dir(&fds)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                std::fs::read_link(p).is_ok_and(|l| {
                    l.to_string_lossy()
                        .starts_with("/memfd:memory-backend-memfd")
                })
            })
            .ok_or_else(|| std::io::Error::other("the helper QEMU has no memfd open"))?;
        let src = std::fs::File::open(memfd)?;
        crate::snapshot::copy_nonzero_pages(&src, &to_path, bytes)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    match copied {
        Ok(n) => {
            tracing::debug!(vm = %helper.id, bytes = n, "helper RAM copied");
            Ok(())
        }
        Err(source) => Err(VmmError::Io {
            op: "copy the helper QEMU's RAM to",
            path: to.to_path_buf(),
            source,
        }),
    }
}

/// The pids of `pid`'s live children (all its threads'; zombies, which have
/// exited, left out), from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let zombie = |kid: u32| {
        std::fs::read_to_string(format!("/proc/{kid}/stat"))
            .ok()
            .and_then(|st| {
                st.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .filter(|&kid| !zombie(kid))
        .collect()
}

/// The id of the helper converting a snapshot of VM `id` (ids are at most 64 bytes).
fn helper_id(id: &str) -> String {
    let mut h = format!("{id}-ramconv");
    if h.len() > 64 {
        h = format!("ramconv-{}", &id[..id.len().min(56)]);
    }
    h
}

/// The helper's VM directory: `DEST/vm` (a restarted daemon stops the VM
/// recorded there when it removes an unfinished snapshot), or, when its socket
/// paths would be too long, a new directory in the temp dir.
fn helper_dir(id: &str, dest: &Path) -> Result<PathBuf, VmmError> {
    let dir = super::absolute(id, &dest.join("vm"))?;
    if super::Layout::new(&dir).check_socket_paths(id).is_ok() {
        return Ok(dir);
    }
    Ok(std::env::temp_dir().join(format!("hearth-ramconv-{}", unique_suffix())))
}

/// A host interface name no other process uses: `hrc` and 8 hex digits.
fn unique_tap_name() -> String {
    format!("hrc{}", &unique_suffix()[..8])
}

/// 16 hex digits from the clock, the pid and a counter.
fn unique_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mixed =
        nanos ^ (u64::from(std::process::id()) << 40) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{mixed:016x}")
}

impl QemuVmm {
    /// See [`crate::Vmm::restore`].
    pub async fn restore_qemu(
        &self,
        cfg: &VmConfig,
        snapshot: &Path,
        manifest: &SnapshotManifest,
    ) -> Result<(QemuVm, UnixStream), VmmError> {
        // why: the RAM block must be as long as the saved one: the snapshot's size,
        // with or without the TCG pad it was made with (an older snapshot has none).
        let kib = u64::from(manifest.memory_mib) * 1024 + manifest.ram_pad_kib;
        let object = match manifest.ram {
            RamStorage::File => format!(
                "memory-backend-file,id=ram,size={kib}K,mem-path={},share=off",
                option_path(&cfg.id, &snapshot.join(RAM_FILE))?
            ),
            RamStorage::InState => {
                format!("memory-backend-ram,id=ram,size={kib}K")
            }
        };
        let mut extra = memory_backend_args(&object);
        // why: QEMU merges repeated `-m` options (the last wins); this one
        // overrides the contract's `-m`, which has this build's pad.
        extra.extend(["-m".to_string(), format!("{kib}K")]);
        extra.extend(["-incoming".to_string(), "defer".to_string()]);
        let cfg = VmConfig {
            cpus: manifest.cpus,
            memory_mib: manifest.memory_mib,
            memory: GuestMemory::Anonymous,
            ..cfg.clone()
        };
        let t0 = Instant::now();
        let vm = self
            .launch(
                &cfg,
                Disk::CopyOf(snapshot.join(DISK_FILE)),
                RamBacking::Private,
                extra,
            )
            .await?;
        match load_state(&vm, snapshot).await {
            Ok(agent) => {
                tracing::info!(vm = %cfg.id, took = ?t0.elapsed(), "restored from {}", snapshot.display());
                Ok((vm, agent))
            }
            Err(e) => {
                let _ = vm.kill().await;
                let _ = vm.wait_timeout(Duration::from_secs(10)).await;
                let _ = crate::record::destroy(vm.dir());
                Err(e)
            }
        }
    }
}

/// Connects the agent channel, then loads the state into the waiting QEMU.
///
/// why: connecting first means the guest's port stays "host connected" across the
/// restore, so its agent never sees the host vanish and never has to poll for it.
async fn load_state(vm: &QemuVm, snapshot: &Path) -> Result<UnixStream, VmmError> {
    let t0 = Instant::now();
    let agent = vm.connect_agent().await?;
    let connected = t0.elapsed();
    // why: file-RAM snapshots were saved with it (their shared RAM skipped), and
    // so were the `in_state` ones of older builds; an `in_state` one whose RAM
    // conversion failed was saved without (see [`QemuVm::convert_ram`]). QEMU
    // refuses a stream whose setting differs, so it is read from the stream.
    let state = snapshot.join(STATE_FILE);
    let ignore_shared = stream_ignores_shared(&state).map_err(|source| VmmError::Io {
        op: "read the header of the state stream",
        path: state.clone(),
        source,
    })?;
    vm.enable_migration_caps(ignore_shared).await?;
    vm.load_stream_from(&state, "loading the snapshot state")
        .await?;
    tracing::debug!(vm = %vm.id, ?connected, loaded = ?t0.elapsed(), "snapshot state loaded");
    Ok(agent)
}

/// Whether the migration stream at `path` was saved with `x-ignore-shared`
/// on: its configuration section (first in the stream, QEMU 7.2 format:
/// magic, version, `QEMU_VM_CONFIGURATION`, machine name, subsections) lists
/// the capability in its `configuration/capabilities` subsection.
fn stream_ignores_shared(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(1024);
    std::fs::File::open(path)?
        .take(1024)
        .read_to_end(&mut head)?;
    Ok(header_ignores_shared(&head))
}

fn header_ignores_shared(head: &[u8]) -> bool {
    const MAGIC: &[u8] = b"QEVM";
    const QEMU_VM_CONFIGURATION: u8 = 0x07;
    const QEMU_VM_SUBSECTION: u8 = 0x05;
    const SUBSECTION: &[u8] = b"configuration/capabilities";
    let be32 = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if head.get(..4) != Some(MAGIC) || head.get(8) != Some(&QEMU_VM_CONFIGURATION) {
        return false;
    }
    let Some(name_len) = be32(9) else {
        return false;
    };
    // why: parsed strictly from where the machine name ends: the sections
    // after it carry guest RAM, which a guest could fill with these bytes.
    let mut off = 13 + name_len;
    if head.get(off) != Some(&QEMU_VM_SUBSECTION)
        || head.get(off + 1).map(|&l| usize::from(l)) != Some(SUBSECTION.len())
        || head.get(off + 2..off + 2 + SUBSECTION.len()) != Some(SUBSECTION)
    {
        return false;
    }
    // then version (be32), count (be32), and each name: len (u8), bytes.
    off += 2 + SUBSECTION.len() + 4;
    let Some(count) = be32(off) else {
        return false;
    };
    off += 4;
    for _ in 0..count.min(64) {
        let Some(&len) = head.get(off) else {
            return false;
        };
        let name = head.get(off + 1..off + 1 + usize::from(len));
        if name == Some(b"x-ignore-shared".as_slice()) {
            return true;
        }
        off += 1 + usize::from(len);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_conversions_reserve_their_helpers_ram() {
        let budget = ConversionBudget::new();
        let gib = 1u64 << 30;
        let avail = Some(2 * (gib + CONVERT_MARGIN_BYTES));
        let first = budget.reserve(avail, gib).expect("the first fits");
        let second = budget
            .reserve(avail, gib)
            .expect("two fit beside each other");
        assert!(
            budget.reserve(avail, gib).is_none(),
            "a third would need RAM the first two may still allocate"
        );
        drop(first);
        let third = budget
            .reserve(avail, gib)
            .expect("the first one's RAM is free again");
        drop((second, third));
        assert_eq!(budget.reserved(), 0);
        assert!(
            budget.reserve(None, 1).is_none(),
            "unknown memory: no conversion"
        );
    }

    #[test]
    fn conversion_runs_only_with_the_helpers_ram_and_a_margin_available() {
        let gib = 1u64 << 30;
        assert!(conversion_fits(Some(gib + CONVERT_MARGIN_BYTES), gib));
        assert!(conversion_fits(Some(8 * gib), gib));
        assert!(!conversion_fits(Some(gib + CONVERT_MARGIN_BYTES - 1), gib));
        assert!(!conversion_fits(Some(gib), gib));
        assert!(!conversion_fits(None, gib));
        assert!(!conversion_fits(Some(u64::MAX - 1), u64::MAX));
    }

    #[test]
    fn mem_available_is_read_from_meminfo() {
        let meminfo = "MemTotal:       24683812 kB\nMemFree:        18855352 kB\nMemAvailable:   23778136 kB\nBuffers:          123 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(23_778_136 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert!(mem_available().is_some());
    }

    #[test]
    fn x_ignore_shared_is_read_from_the_streams_configuration_section() {
        // The first bytes of QEMU 7.2 streams (microvm) saved with and without it.
        let mut on =
            b"QEVM\0\0\0\x03\x07\0\0\0\x07microvm\x05\x1aconfiguration/capabilities".to_vec();
        on.extend(b"\0\0\0\x01\0\0\0\x01\x0fx-ignore-shared\x01\0\0\0\x02\x03ram\0");
        assert!(header_ignores_shared(&on));
        let mut off = b"QEVM\0\0\0\x03\x07\0\0\0\x07microvm\x01\0\0\0\x02\x03ram\0".to_vec();
        assert!(!header_ignores_shared(&off));
        // Guest RAM after the configuration section never counts.
        off.extend(&on[20..]);
        assert!(!header_ignores_shared(&off));
        assert!(!header_ignores_shared(&on[..60]));
        assert!(!header_ignores_shared(b""));
    }
}
