//! The QEMU `microvm` backend.
//!
//! `create`: validate → make DIR → `qemu-img` overlay → spawn QEMU paused (`-S`)
//! in its own session → record vm.json → connect QMP. `adopt`: vm.json → verify
//! pid + start time → reconnect QMP. Run-state changes go through QMP and wait
//! for QEMU's STOP/RESUME events.

pub mod argv;
pub mod migrate;
mod overlay;
pub mod snapshot;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::process::Command;

use crate::config::{Accel, GuestMemory, HostLimits, VmConfig};
use crate::connect::{connect_when_listening, ConnectFailure};
use crate::error::VmmError;
use crate::process::{watch_child, ExitWatch, ProcessHandle, VmExit};
use crate::qmp::Qmp;
use crate::record::{check_alive, remove_file_if_exists, VmRecord, RECORD_VERSION};
use crate::{log_tail, Vm, Vmm};
pub use argv::Layout;

/// Backend name recorded in vm.json.
pub const BACKEND: &str = "qemu";
/// Bound on QEMU creating and serving its QMP socket.
pub const QMP_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on QEMU accepting on the agent chardev socket.
pub const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on a STOP/RESUME event after `stop`/`cont`.
pub const RUN_STATE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on the process disappearing after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TAIL_BYTES: usize = 2000;
/// How long a closed QMP socket may precede the process exit it signals.
const EXIT_AFTER_CLOSE: Duration = Duration::from_secs(2);

/// Creates and adopts QEMU microvm VMs.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    qemu: PathBuf,
    qemu_img: PathBuf,
    version: String,
    host: HostLimits,
}

impl QemuVmm {
    /// Uses `qemu-system-x86_64` and `qemu-img` from PATH.
    pub fn new() -> Result<QemuVmm, VmmError> {
        Self::with_binaries(Path::new("qemu-system-x86_64"), Path::new("qemu-img"))
    }

    /// Uses the given binaries (a bare name is looked up on PATH).
    pub fn with_binaries(qemu: &Path, qemu_img: &Path) -> Result<QemuVmm, VmmError> {
        let qemu_path = find_binary(qemu).ok_or_else(|| VmmError::QemuNotFound {
            binary: qemu.to_path_buf(),
        })?;
        let qemu_img = find_binary(qemu_img).ok_or_else(|| VmmError::QemuImgNotFound {
            binary: qemu_img.to_path_buf(),
        })?;
        let out = std::process::Command::new(&qemu_path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|_| VmmError::QemuNotFound {
                binary: qemu_path.clone(),
            })?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(QemuVmm {
            qemu: qemu_path,
            qemu_img,
            version,
            host: HostLimits::detect(),
        })
    }

    /// The resolved `qemu-system-x86_64` (also what the accelerator probe runs).
    pub fn qemu_binary(&self) -> &Path {
        &self.qemu
    }

    /// Like [`Vmm::create`], returning the concrete type.
    pub async fn create_qemu(&self, cfg: &VmConfig) -> Result<QemuVm, VmmError> {
        let ram = match cfg.memory {
            GuestMemory::Anonymous => RamBacking::Anonymous,
            GuestMemory::SharedFile => {
                RamBacking::Shared(Layout::new(&absolute(&cfg.id, &cfg.dir)?).ram)
            }
        };
        self.launch(cfg, Disk::NewOverlay, ram, Vec::new()).await
    }

    /// [`QemuVmm::create_qemu`] with `extra` appended to the contract's command line.
    pub(crate) async fn create_with_args(
        &self,
        cfg: &VmConfig,
        extra: &[String],
    ) -> Result<QemuVm, VmmError> {
        let ram = match cfg.memory {
            GuestMemory::Anonymous => RamBacking::Anonymous,
            GuestMemory::SharedFile => {
                RamBacking::Shared(Layout::new(&absolute(&cfg.id, &cfg.dir)?).ram)
            }
        };
        self.launch(cfg, Disk::NewOverlay, ram, extra.to_vec())
            .await
    }

    /// Validates, prepares the directory and spawns QEMU paused with `extra` arguments.
    /// On failure nothing is left running and the files it made are removed.
    pub(crate) async fn launch(
        &self,
        cfg: &VmConfig,
        disk: Disk,
        ram: RamBacking,
        extra: Vec<String>,
    ) -> Result<QemuVm, VmmError> {
        self.launch_as(cfg, disk, ram, extra, Lifetime::OwnSession)
            .await
    }

    /// [`QemuVmm::launch`] with the process's [`Lifetime`].
    pub(crate) async fn launch_as(
        &self,
        cfg: &VmConfig,
        disk: Disk,
        ram: RamBacking,
        extra: Vec<String>,
        lifetime: Lifetime,
    ) -> Result<QemuVm, VmmError> {
        cfg.validate(&self.host)?;
        cfg.check_artifacts()?;
        let layout = Layout::new(&absolute(&cfg.id, &cfg.dir)?);
        layout.check_socket_paths(&cfg.id)?;
        let mut args = argv::qemu_args(cfg, &layout)?;
        args.extend(extra);

        let created_dir = !layout.dir.exists();
        std::fs::create_dir_all(&layout.dir).map_err(|source| VmmError::Io {
            op: "create VM directory",
            path: layout.dir.clone(),
            source,
        })?;
        if VmRecord::path(&layout.dir).exists() {
            return Err(VmmError::DirInUse {
                id: cfg.id.clone(),
                dir: layout.dir.clone(),
            });
        }
        let result = self.spawn(cfg, &layout, args, disk, ram, lifetime).await;
        if result.is_err() {
            // why: a failed create leaves nothing behind; the error carries qemu.log's tail.
            for f in layout.files() {
                let _ = remove_file_if_exists(&f);
            }
            let _ = remove_file_if_exists(&VmRecord::path(&layout.dir));
            if created_dir {
                let _ = std::fs::remove_dir(&layout.dir);
            }
        }
        result
    }

    async fn spawn(
        &self,
        cfg: &VmConfig,
        layout: &Layout,
        args: Vec<String>,
        disk: Disk,
        ram: RamBacking,
        lifetime: Lifetime,
    ) -> Result<QemuVm, VmmError> {
        let t0 = Instant::now();
        match disk {
            Disk::NewOverlay => {
                overlay::create_overlay(&self.qemu_img, &cfg.id, &cfg.rootfs, &layout.overlay)
                    .await?
            }
            Disk::CopyOf(src) => {
                std::fs::copy(&src, &layout.overlay).map_err(|source| VmmError::Io {
                    op: "copy the snapshot's disk layer",
                    path: src.clone(),
                    source,
                })?;
            }
            Disk::Blank(bytes) => {
                overlay::create_blank(&self.qemu_img, &cfg.id, bytes, &layout.overlay).await?
            }
        }
        let overlay_time = t0.elapsed();

        let io_err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| VmmError::Io { op, path, source }
        };
        let log = File::create(&layout.qemu_log).map_err(io_err("create", &layout.qemu_log))?;
        let log2 = log.try_clone().map_err(io_err("open", &layout.qemu_log))?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        let parent = std::process::id();
        let tied = lifetime == Lifetime::TiedToCaller;
        // SAFETY: setsid(2), prctl(2) and getppid(2) are async-signal-safe and touch
        // no memory of the parent; setsid puts QEMU in its own session so it
        // outlives the daemon's signals, and a helper's PR_SET_PDEATHSIG ends it
        // with the thread that spawned it (the check after it covers a parent
        // that died before the prctl).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if tied {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::getppid() as u32 != parent {
                        return Err(io::Error::other("the spawning process is gone"));
                    }
                }
                Ok(())
            });
        }
        let spawned = Instant::now();
        let child = cmd.spawn().map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                VmmError::QemuNotFound {
                    binary: self.qemu.clone(),
                }
            } else {
                VmmError::Spawn {
                    id: cfg.id.clone(),
                    binary: self.qemu.clone(),
                    source,
                }
            }
        })?;
        let pid = child.id().unwrap_or(0);
        let exit = watch_child(child);
        let handle = process_handle(pid).map_err(|source| VmmError::Spawn {
            id: cfg.id.clone(),
            binary: self.qemu.clone(),
            source,
        });
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                exit.wait().await;
                return Err(e);
            }
        };
        let (handle, start_time) = handle;

        let abort = |e: VmmError| async {
            let _ = handle.signal(libc::SIGKILL);
            exit.wait().await;
            Err(e)
        };

        let mut argv = vec![self.qemu.display().to_string()];
        argv.extend(args);
        let record = VmRecord {
            version: RECORD_VERSION,
            backend: BACKEND.to_string(),
            id: cfg.id.clone(),
            pid,
            pid_start_time: start_time,
            control_socket: layout.qmp_socket.clone(),
            agent_socket: layout.agent_socket.clone(),
            console_log: layout.console_log.clone(),
            accel: cfg.accel,
            argv,
            files: layout.files(),
        };
        if let Err(e) = record.store(&layout.dir) {
            return abort(e).await;
        }
        let qmp = match connect_qmp(&cfg.id, layout, &exit).await {
            Ok(q) => q,
            Err(e) => return abort(e).await,
        };
        let spawn_to_qmp = spawned.elapsed();
        tracing::info!(vm = %cfg.id, pid, ?overlay_time, ?spawn_to_qmp, accel = %cfg.accel, "QEMU started paused");
        Ok(QemuVm {
            id: cfg.id.clone(),
            layout: layout.clone(),
            accel: cfg.accel,
            process: handle,
            exit,
            qmp,
            timings: Some(CreateTimings {
                overlay: overlay_time,
                spawn_to_qmp,
            }),
            ram,
            vmm_version: self.version.clone(),
            backend: self.clone(),
        })
    }

    /// Like [`Vmm::adopt`], returning the concrete type.
    pub async fn adopt_qemu(&self, dir: &Path) -> Result<QemuVm, VmmError> {
        let rec = VmRecord::load(dir)?;
        if rec.backend != BACKEND {
            return Err(VmmError::WrongBackend {
                dir: dir.to_path_buf(),
                backend: rec.backend,
                expected: BACKEND,
            });
        }
        check_alive(dir, &rec)?;
        let gone = |reason: String| VmmError::VmGone {
            dir: dir.to_path_buf(),
            pid: rec.pid,
            reason,
        };
        let process = ProcessHandle::open(rec.pid, rec.pid_start_time)
            .map_err(|e| gone(format!("exited while being adopted: {e}")))?;
        let exit = process.watch_adopted().map_err(|source| VmmError::Io {
            op: "watch pidfd of",
            path: dir.to_path_buf(),
            source,
        })?;
        let layout = Layout::new(&absolute(&rec.id, dir)?);
        let qmp = connect_qmp(&rec.id, &layout, &exit).await?;
        tracing::info!(vm = %rec.id, pid = rec.pid, "adopted running QEMU");
        let ram = RamBacking::from_argv(&rec.argv, &layout);
        Ok(QemuVm {
            id: rec.id,
            layout,
            accel: rec.accel,
            process,
            exit,
            qmp,
            timings: None,
            ram,
            vmm_version: self.version.clone(),
            backend: self.clone(),
        })
    }
}

/// `dir` made absolute, so vm.json's paths do not depend on the daemon's cwd.
pub(crate) fn absolute(id: &str, dir: &Path) -> Result<PathBuf, VmmError> {
    std::path::absolute(dir).map_err(|_| VmmError::InvalidPath {
        id: id.to_string(),
        path: dir.to_path_buf(),
        reason: "cannot be made absolute",
    })
}

fn process_handle(pid: u32) -> io::Result<(ProcessHandle, u64)> {
    let start_time = crate::process::start_time(pid)?;
    Ok((ProcessHandle::open(pid, start_time)?, start_time))
}

fn find_binary(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

async fn connect_qmp(id: &str, layout: &Layout, exit: &ExitWatch) -> Result<Qmp, VmmError> {
    let awaited = format!("QMP socket {} to accept", layout.qmp_socket.display());
    let exited = |x: VmExit, awaited: String| VmmError::QemuExited {
        id: id.to_string(),
        exit: x.to_string(),
        awaited,
        log_tail: log_tail(&layout.qemu_log, LOG_TAIL_BYTES),
    };
    let stream = connect_when_listening(&layout.qmp_socket, QMP_READY_TIMEOUT, || exit.exited())
        .await
        .map_err(|f| match f {
            ConnectFailure::Exited(x) => exited(x, awaited.clone()),
            ConnectFailure::Timeout(e) => VmmError::Timeout {
                id: id.to_string(),
                awaited: format!("{awaited} (last error: {e})"),
                after: QMP_READY_TIMEOUT,
                log_tail: log_tail(&layout.qemu_log, LOG_TAIL_BYTES),
            },
        })?;
    match Qmp::handshake(id, &layout.qmp_socket, stream, QMP_READY_TIMEOUT).await {
        Ok(qmp) => Ok(qmp),
        Err(e @ VmmError::QmpClosed { .. }) => match exit_soon(exit).await {
            // why: QEMU listens before it loads the kernel, so a bad kernel shows up here.
            Some(x) => Err(exited(x, "the QMP handshake".to_string())),
            None => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// After a closed QMP connection: the exit, if the process ends within a moment.
async fn exit_soon(exit: &ExitWatch) -> Option<VmExit> {
    tokio::time::timeout(EXIT_AFTER_CLOSE, exit.wait())
        .await
        .ok()
}

/// How long a spawned QEMU may live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// A VM: its own session, outliving the daemon (which re-adopts it).
    OwnSession,
    /// A short-lived helper (converting a snapshot): killed (SIGKILL) when the
    /// thread that spawned it ends, so a daemon that dies mid-way leaves none.
    TiedToCaller,
}

/// Where a VM's writable disk layer comes from.
pub(crate) enum Disk {
    /// A new empty qcow2 overlay over the read-only base.
    NewOverlay,
    /// A copy of a snapshot's layer (a small qcow2 over the same base).
    CopyOf(PathBuf),
    /// A standalone empty qcow2 of this many bytes, no backing file (a
    /// migration target's disk, which the whole-disk block migration fills).
    Blank(u64),
}

/// How a running VM's RAM is backed, which decides how it is snapshotted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RamBacking {
    /// Anonymous memory: a snapshot streams the RAM with the device state.
    Anonymous,
    /// This file, mapped shared: a snapshot copies (or takes) the file.
    Shared(PathBuf),
    /// A snapshot's RAM file mapped private (copy-on-write): its pages are the
    /// snapshot's plus this VM's private changes, so a snapshot streams them.
    Private,
}

/// How the network device of the QEMU VM recorded in `dir/vm.json` is
/// connected, read off its command line (what the running QEMU really has,
/// whatever its caller recorded): `None`: no network device; `Some(true)`: on
/// hub 0 (`-netdev hubport,id=net0`); `Some(false)`: directly on a tap
/// (`-netdev tap,id=net0`).
pub fn recorded_net_hub(dir: &Path) -> Result<Option<bool>, VmmError> {
    Ok(net_hub_from_argv(&VmRecord::load(dir)?.argv))
}

/// The machine a running VM really is, which a VM that loads its migration
/// stream must match: however it started (a cold boot, a restore of a template
/// or snapshot with its own RAM size and device set, a warm-pool VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineLayout {
    pub cpus: u32,
    /// Guest RAM in KiB, the TCG pad included (a restored VM has its snapshot's).
    pub ram_kib: u64,
    /// The network device: its MAC and whether it sits on hub 0 (else directly
    /// on a tap); `None`: the VM has none.
    pub nic: Option<(String, bool)>,
    /// Virtual size of the disk in bytes.
    pub disk_bytes: u64,
}

/// The [`MachineLayout`] of the QEMU VM recorded in `dir`: vCPUs, RAM and
/// network device off its command line in vm.json (the last `-m` wins, as in
/// QEMU: a restore overrides the contract's), the disk size off its qcow2 header.
pub fn recorded_machine(dir: &Path) -> Result<MachineLayout, VmmError> {
    let rec = VmRecord::load(dir)?;
    let bad = |detail: String| VmmError::BadRecord {
        path: VmRecord::path(dir),
        detail,
    };
    let (cpus, ram_kib, nic) = machine_from_argv(&rec.argv).map_err(bad)?;
    let overlay = Layout::new(dir).overlay;
    let disk_bytes = overlay::virtual_size(&overlay)?;
    Ok(MachineLayout {
        cpus,
        ram_kib,
        nic,
        disk_bytes,
    })
}

/// Guest RAM in KiB of the VM recorded in `dir`, off its command line.
pub(crate) fn recorded_ram_kib(dir: &Path) -> Option<u64> {
    let rec = VmRecord::load(dir).ok()?;
    machine_from_argv(&rec.argv).ok().map(|m| m.1)
}

type MachineArgs = (u32, u64, Option<(String, bool)>);

fn machine_from_argv(argv: &[String]) -> Result<MachineArgs, String> {
    let last = |flag: &str| {
        argv.windows(2)
            .rev()
            .find(|w| w[0] == flag)
            .map(|w| w[1].as_str())
    };
    let cpus = last("-smp")
        .and_then(|v| v.split(',').next()?.parse().ok())
        .ok_or("no `-smp N` on the QEMU command line")?;
    let ram_kib = last("-m")
        .and_then(ram_size_kib)
        .ok_or("no `-m <size>` (K, M or G, or a bare number of MiB) on the QEMU command line")?;
    let nic = match net_hub_from_argv(argv) {
        None => None,
        Some(hub) => {
            let mac = argv
                .windows(2)
                .filter(|w| w[0] == "-device")
                .find_map(|w| {
                    let mut parts = w[1].split(',');
                    if parts.next()? != "virtio-net-device" {
                        return None;
                    }
                    parts.find_map(|p| p.strip_prefix("mac=").map(str::to_string))
                })
                .ok_or("a network device without `mac=` on the QEMU command line")?;
            Some((mac, hub))
        }
    };
    Ok((cpus, ram_kib, nic))
}

/// KiB of QEMU's `-m` value: a bare number is MiB (as in QEMU, and in the
/// command lines of VMs started before the exact KiB size), or with a `K`, `M`
/// or `G` suffix.
fn ram_size_kib(v: &str) -> Option<u64> {
    let (num, unit) = match v.char_indices().last()? {
        (i, 'K' | 'k') => (&v[..i], 1),
        (i, 'M' | 'm') => (&v[..i], 1024),
        (i, 'G' | 'g') => (&v[..i], 1024 * 1024),
        _ => (v, 1024),
    };
    num.parse::<u64>().ok()?.checked_mul(unit)
}

fn net_hub_from_argv(argv: &[String]) -> Option<bool> {
    argv.windows(2).filter(|w| w[0] == "-netdev").find_map(|w| {
        let mut parts = w[1].split(',');
        let kind = parts.next()?;
        if !parts.any(|p| p == "id=net0") {
            return None;
        }
        match kind {
            "hubport" => Some(true),
            "tap" => Some(false),
            _ => None,
        }
    })
}

impl RamBacking {
    fn from_argv(argv: &[String], layout: &Layout) -> RamBacking {
        match argv.iter().find(|a| a.starts_with("memory-backend-")) {
            Some(a) if a.contains("share=on") => RamBacking::Shared(layout.ram.clone()),
            Some(_) => RamBacking::Private,
            None => RamBacking::Anonymous,
        }
    }
}

/// How long the parts of `create` took.
#[derive(Debug, Clone, Copy)]
pub struct CreateTimings {
    /// `qemu-img create` of the overlay.
    pub overlay: Duration,
    /// From spawning QEMU to QMP capabilities negotiated.
    pub spawn_to_qmp: Duration,
}

/// A QEMU microvm process and its QMP connection.
pub struct QemuVm {
    id: String,
    layout: Layout,
    accel: Accel,
    process: ProcessHandle,
    exit: ExitWatch,
    qmp: Qmp,
    timings: Option<CreateTimings>,
    ram: RamBacking,
    /// [`Vmm::version`] of the backend that started it, recorded in its snapshots.
    vmm_version: String,
    /// The backend that started (or adopted) it, for helper QEMUs its snapshots need.
    backend: QemuVmm,
}

impl QemuVm {
    /// The QMP connection, for QEMU-specific operations (snapshots, migration).
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// Timings of `create`; None for an adopted VM.
    pub fn timings(&self) -> Option<CreateTimings> {
        self.timings
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Brings the VM to running (`cont`, RESUME) or not running (`stop`, STOP);
    /// a VM already in that state is left alone (QEMU sends no event then).
    async fn set_running(&self, running: bool) -> Result<(), VmmError> {
        match self.try_set_running(running).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.explain(e).await),
        }
    }

    async fn try_set_running(&self, running: bool) -> Result<(), VmmError> {
        let mut status = self.qmp.execute("query-status", Value::Null).await?;
        // why: an outgoing migration that just completed leaves the VM in
        // `finish-migrate` a moment longer (QEMU says `completed` first, and
        // `migrate_out` does not wait: issue 7); a `cont` then would be undone
        // when QEMU moves it on to `postmigrate`.
        // Only then: a migration parked at its switch-over gate (a hearthd
        // that died there) also shows `finish-migrate`, for good (review8 F3).
        // One `query-migrate` decides; from then on only `query-status` is
        // polled (a completed migration stays completed).
        if running
            && status["status"].as_str() == Some("finish-migrate")
            && self
                .qmp
                .execute("query-migrate", Value::Null)
                .await
                .is_ok_and(|m| m["status"].as_str() == Some("completed"))
        {
            status = self.wait_out_finish_migrate(status).await?;
        }
        if status["running"].as_bool() == Some(running) {
            return Ok(());
        }
        let (command, event) = if running {
            ("cont", "RESUME")
        } else {
            ("stop", "STOP")
        };
        let mut events = self.qmp.subscribe();
        self.qmp.execute(command, Value::Null).await?;
        self.qmp
            .wait_event(&mut events, event, RUN_STATE_TIMEOUT)
            .await?;
        Ok(())
    }

    /// A closed QMP connection after QEMU exited is reported as that exit, with qemu.log.
    async fn explain(&self, e: VmmError) -> VmmError {
        let VmmError::QmpClosed { awaited, .. } = &e else {
            return e;
        };
        match exit_soon(&self.exit).await {
            Some(x) => VmmError::QemuExited {
                id: self.id.clone(),
                exit: x.to_string(),
                awaited: awaited.clone(),
                log_tail: log_tail(&self.layout.qemu_log, LOG_TAIL_BYTES),
            },
            None => e,
        }
    }
}

#[async_trait::async_trait]
impl Vm for QemuVm {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn dir(&self) -> &Path {
        &self.layout.dir
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn agent_socket(&self) -> &Path {
        &self.layout.agent_socket
    }

    fn console_log(&self) -> PathBuf {
        self.layout.console_log.clone()
    }

    async fn connect_agent(&self) -> Result<UnixStream, VmmError> {
        let path = &self.layout.agent_socket;
        let awaited = format!("agent socket {} to accept", path.display());
        connect_when_listening(path, AGENT_CONNECT_TIMEOUT, || self.exit.exited())
            .await
            .map_err(|f| match f {
                ConnectFailure::Exited(x) => VmmError::QemuExited {
                    id: self.id.clone(),
                    exit: x.to_string(),
                    awaited,
                    log_tail: log_tail(&self.layout.qemu_log, LOG_TAIL_BYTES),
                },
                ConnectFailure::Timeout(e) => VmmError::Timeout {
                    id: self.id.clone(),
                    awaited: format!("{awaited} (last error: {e})"),
                    after: AGENT_CONNECT_TIMEOUT,
                    log_tail: log_tail(&self.layout.qemu_log, LOG_TAIL_BYTES),
                },
            })
    }

    async fn start(&self) -> Result<(), VmmError> {
        self.set_running(true).await
    }

    async fn start_paused(&self) -> Result<(), VmmError> {
        let cont = async {
            let mut events = self.qmp.subscribe();
            self.qmp.execute("cont", Value::Null).await?;
            self.qmp
                .wait_event(&mut events, "RESUME", RUN_STATE_TIMEOUT)
                .await
        };
        match cont.await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.explain(e).await),
        }
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.set_running(false).await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.set_running(true).await
    }

    async fn is_running(&self) -> Result<bool, VmmError> {
        match self.qmp.execute("query-status", Value::Null).await {
            Ok(status) => Ok(status["running"].as_bool() == Some(true)),
            Err(e) => Err(self.explain(e).await),
        }
    }

    fn run_state_times(&self) -> crate::qmp::RunStateTimes {
        self.qmp.run_state_times()
    }
    fn run_state_changes(&self) -> Option<tokio::sync::watch::Receiver<crate::qmp::RunStateTimes>> {
        Some(self.qmp.run_state_changes())
    }

    async fn shutdown(&self, grace: Duration) -> Result<VmExit, VmmError> {
        match self.qmp.execute("quit", Value::Null).await {
            // why: QEMU may close the socket before its reply to `quit` is read.
            Ok(_) | Err(VmmError::QmpClosed { .. }) => {}
            Err(e) => tracing::warn!(vm = %self.id, error = %e, "QMP quit failed; killing"),
        }
        if let Ok(exit) = tokio::time::timeout(grace, self.exit.wait()).await {
            return Ok(exit);
        }
        self.kill().await?;
        self.wait_timeout(KILL_TIMEOUT).await
    }

    async fn kill(&self) -> Result<(), VmmError> {
        self.process
            .signal(libc::SIGKILL)
            .map_err(|source| VmmError::Signal {
                id: self.id.clone(),
                pid: self.process.pid(),
                source,
            })
    }

    async fn wait(&self) -> Result<VmExit, VmmError> {
        // why: unbounded on purpose: a supervisor waits for as long as the VM runs.
        Ok(self.exit.wait().await)
    }

    async fn attach_tap(&self, tap: &str) -> Result<(), VmmError> {
        self.qmp
            .execute(
                "netdev_add",
                json!({"type": "tap", "id": argv::HUB_TAP_ID, "ifname": tap,
                       "script": "no", "downscript": "no"}),
            )
            .await?;
        self.qmp
            .execute(
                "netdev_add",
                json!({"type": "hubport", "id": argv::HUB_TAP_PORT_ID, "hubid": 0,
                       "netdev": argv::HUB_TAP_ID}),
            )
            .await?;
        Ok(())
    }

    async fn migrate_out(
        &self,
        dest: &Path,
        params: &crate::MigrationParams,
        progress: &tokio::sync::watch::Sender<crate::MigrationProgress>,
        gate: Option<migrate::SwitchoverGate>,
    ) -> Result<crate::MigrationProgress, VmmError> {
        self.migrate_out_qemu(dest, params, progress, gate).await
    }

    async fn migration_stats(&self) -> Result<Option<crate::MigrationProgress>, VmmError> {
        let q = self.qmp().execute("query-migrate", Value::Null).await?;
        Ok(Some(migrate::progress_from_query(&q)))
    }

    async fn wait_incoming(&self, timeout: Duration) -> Result<(), VmmError> {
        QemuVm::wait_incoming(self, timeout).await
    }

    async fn save_snapshot(
        &self,
        dest: &Path,
        opts: &crate::SaveOptions,
    ) -> Result<crate::SnapshotManifest, VmmError> {
        self.save_qemu(dest, opts, None).await
    }

    async fn save_snapshot_notify(
        &self,
        dest: &Path,
        opts: &crate::SaveOptions,
        resumed: tokio::sync::oneshot::Sender<()>,
    ) -> Result<crate::SnapshotManifest, VmmError> {
        self.save_qemu(dest, opts, Some(resumed)).await
    }
}

impl QemuVm {
    /// Waits for the process to be gone, at most `timeout`.
    pub async fn wait_timeout(&self, timeout: Duration) -> Result<VmExit, VmmError> {
        tokio::time::timeout(timeout, self.exit.wait())
            .await
            .map_err(|_| VmmError::Timeout {
                id: self.id.clone(),
                awaited: format!("QEMU pid {} to exit", self.process.pid()),
                after: timeout,
                log_tail: String::new(),
            })
    }
}

#[async_trait::async_trait]
impl Vmm for QemuVmm {
    async fn create(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.create_qemu(cfg).await?))
    }

    async fn adopt(&self, dir: &Path) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.adopt_qemu(dir).await?))
    }

    async fn create_incoming(
        &self,
        cfg: &VmConfig,
        incoming: &Path,
        disk_bytes: Option<u64>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(
            self.create_incoming_sized(cfg, incoming, disk_bytes)
                .await?,
        ))
    }

    async fn restore(
        &self,
        cfg: &VmConfig,
        snapshot: &Path,
        manifest: &crate::SnapshotManifest,
    ) -> Result<crate::RestoredVm, VmmError> {
        let (vm, agent) = self.restore_qemu(cfg, snapshot, manifest).await?;
        Ok(crate::RestoredVm {
            vm: Box::new(vm),
            agent,
        })
    }

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn version(&self) -> String {
        self.version.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_network_device_is_read_off_the_argv() {
        let argv = |s: &str| -> Vec<String> { s.split(' ').map(String::from).collect() };
        assert_eq!(
            net_hub_from_argv(&argv(
                "qemu -netdev tap,id=net0,ifname=ht1,script=no,downscript=no,vnet_hdr=on \
                 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"
            )),
            Some(false)
        );
        // The hub layout: the tap joins hub 0 as net1, the device is on net0.
        assert_eq!(
            net_hub_from_argv(&argv(
                "qemu -netdev hubport,id=net0,hubid=0 -device virtio-net-device,netdev=net0 \
                 -netdev tap,id=tap0,ifname=ht1,script=no,downscript=no \
                 -netdev hubport,id=net1,hubid=0,netdev=tap0"
            )),
            Some(true)
        );
        assert_eq!(net_hub_from_argv(&argv("qemu -m 128")), None);
    }

    #[test]
    fn machine_layout_is_read_off_the_argv_with_the_last_ram_size() {
        let argv = |s: &str| -> Vec<String> { s.split(' ').map(String::from).collect() };
        // A restore of a template: the contract's `-m`, then the snapshot's size;
        // its device on the hub with the template's MAC and no tap.
        let restored = argv(
            "qemu -m 131080K -smp 2 -netdev hubport,id=net0,hubid=0 \
             -device virtio-net-device,netdev=net0,mac=02:68:00:00:00:00 \
             -object memory-backend-file,id=ram,size=131072K,mem-path=/s/ram,share=off \
             -machine memory-backend=ram -m 131072K -incoming defer",
        );
        assert_eq!(
            machine_from_argv(&restored).unwrap(),
            (2, 131072, Some(("02:68:00:00:00:00".to_string(), true)))
        );
        let cold = argv(
            "qemu -m 131080K -smp 1 -netdev tap,id=net0,ifname=ht1,script=no,downscript=no,vnet_hdr=on \
             -device virtio-net-device,netdev=net0,mac=02:00:0a:58:00:02",
        );
        assert_eq!(
            machine_from_argv(&cold).unwrap(),
            (1, 131080, Some(("02:00:0a:58:00:02".to_string(), false)))
        );
        assert_eq!(
            machine_from_argv(&argv("qemu -m 131080K -smp 1")).unwrap(),
            (1, 131080, None)
        );
        assert!(machine_from_argv(&argv("qemu -smp 1")).is_err());
        assert!(machine_from_argv(&argv("qemu -m 128K")).is_err());
    }

    #[test]
    fn ram_size_without_a_suffix_is_mib_as_in_qemu() {
        // why: VMs started before the exact KiB size have `-m 128` in vm.json.
        let argv = |s: &str| -> Vec<String> { s.split(' ').map(String::from).collect() };
        assert_eq!(
            machine_from_argv(&argv("qemu -m 128 -smp 1")).unwrap(),
            (1, 131072, None)
        );
        assert_eq!(ram_size_kib("128M"), Some(131072));
        assert_eq!(ram_size_kib("1G"), Some(1048576));
        assert_eq!(ram_size_kib("131080K"), Some(131080));
        for bad in ["", "K", "12x", "-1M", "99999999999999999999G"] {
            assert_eq!(ram_size_kib(bad), None, "{bad}");
        }
    }

    #[test]
    fn qcow2_virtual_size_is_read_off_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        std::fs::write(&p, &h).unwrap();
        assert_eq!(overlay::virtual_size(&p).unwrap(), 64 << 20);
        std::fs::write(&p, [0u8; 64]).unwrap();
        assert!(overlay::virtual_size(&p).is_err());
    }

    #[test]
    fn adopted_vm_knows_how_its_ram_is_backed_from_its_argv() {
        let layout = Layout::new(Path::new("/v/sb"));
        let argv = |object: &str| -> Vec<String> {
            ["qemu", "-object", object, "-machine", "memory-backend=ram"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        assert_eq!(
            RamBacking::from_argv(
                &argv("memory-backend-file,id=ram,size=128M,mem-path=/v/sb/ram,share=on"),
                &layout
            ),
            RamBacking::Shared(PathBuf::from("/v/sb/ram"))
        );
        assert_eq!(
            RamBacking::from_argv(
                &argv("memory-backend-file,id=ram,size=128M,mem-path=/t/ram,share=off"),
                &layout
            ),
            RamBacking::Private
        );
        assert_eq!(
            RamBacking::from_argv(&["qemu".into(), "-m".into(), "128".into()], &layout),
            RamBacking::Anonymous
        );
    }
}
