//! Sandbox records and their lifecycle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_api::network::NetworkMode;
use hearth_api::stream::Record;
use hearth_api::{
    CreateSandbox, ErrorCode, ExitInfo, Image, Info, Sandbox, SandboxStatus, StartPath,
    DEFAULT_CPUS, DEFAULT_MEMORY_MIB, MIN_MEMORY_MIB,
};
use hearth_image::{
    Credentials, ImageError, ImageRecord, ImageStore, Limits, Puller, RegistryOptions,
};
use hearth_proto::ExecRequest as GuestExec;
use hearth_vmm::{
    Accel, AccelChoice, AccelReport, GuestMemory, NetDevice, QemuVmm, Vm, VmConfig, Vmm,
};
use tokio::sync::{mpsc, watch};

use crate::durable::{self, DirSync};
use crate::guest_conn::{GuestConn, Session, SessionEvent, SessionInput};
pub(crate) use crate::output_log::{LogFollower, OutputLog};
use crate::readopt::{SavedOutcome, WorkloadRecord};
use crate::restore::{GuestLink, Launch, RestoredChannel, WarmState};

/// Guest kernels are built with NR_CPUS=8.
pub const MAX_CPUS: u32 = 8;
/// How long a guest may take from VM start to the agent's hello (TCG is slow).
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopped guest gets to power off before its VMM is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(5);
/// How long recovery waits for the control plane's first heartbeat answer.
const DESIRED_WAIT: Duration = Duration::from_secs(10);
/// How long a request waits for a sandbox that is being recovered after a restart.
const RECOVERY_WAIT: Duration = Duration::from_secs(90);

/// Errors the agent reports; each maps to a stable API error code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("sandbox '{0}' not found; list sandboxes with `hearth ps`")]
    SandboxNotFound(String),
    #[error("exec session {exec} of sandbox '{sandbox}' not found (it may have ended)")]
    ExecNotFound { sandbox: String, exec: u32 },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("image '{0}' has neither Entrypoint nor Cmd; give a command: hearth run {0} -- CMD [ARGS...]")]
    NoCommand(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Conflict(String),
    /// A migration target's sandboxes file system cannot hold one more
    /// incoming migration besides those in flight (409).
    #[error(transparent)]
    NoRoom(crate::migration::reserve::NoRoom),
    #[error("sandbox '{id}': {message}")]
    VmFailed { id: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    /// A migration target lacks the sandbox's image.
    #[error("{0}")]
    ImageMissing(String),
    /// A migration failed; the message says where the sandbox runs now.
    #[error("{0}")]
    Migration(String),
    /// No migration of that sandbox is known here.
    #[error("{0}")]
    NoMigration(String),
    /// A migration target refusing an abort: the sandbox was committed here.
    #[error("{0}")]
    MigrationCommitted(String),
    /// A migration whose outcome is unknown (the source's copy is paused and
    /// the target may run the sandbox).
    #[error("{0}")]
    MigrationUnresolved(String),
    #[error(transparent)]
    Net(#[from] hearth_net::NetError),
    /// The control plane did not lease an address.
    #[error(transparent)]
    Lease(#[from] crate::leases::LeaseError),
    /// A template or snapshot that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A fork failed part-way; the forks it had made were removed.
    #[error("fork {failed} of {count} failed: {source}; {undone}")]
    ForkFailed {
        failed: u32,
        count: u32,
        /// What happened to the forks made before (removed, or which remain).
        undone: String,
        source: Box<AgentError>,
    },
}

impl AgentError {
    /// The API error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::SandboxNotFound(_)
            | AgentError::ExecNotFound { .. }
            | AgentError::NotFound(_) => ErrorCode::NotFound,
            AgentError::Image(e) if e.is_not_found() => ErrorCode::ImageNotFound,
            AgentError::Image(e) if e.is_bad_input() => ErrorCode::InvalidArgument,
            AgentError::Image(_) => ErrorCode::Internal,
            AgentError::NoCommand(_) => ErrorCode::NoCommand,
            AgentError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            AgentError::Conflict(_) | AgentError::NoRoom(_) => ErrorCode::Conflict,
            AgentError::VmFailed { .. } => ErrorCode::VmFailed,
            AgentError::Io { .. } | AgentError::Config(_) => ErrorCode::Internal,
            AgentError::ImageMissing(_) => ErrorCode::ImageNotFound,
            AgentError::Migration(_) => ErrorCode::VmFailed,
            AgentError::NoMigration(_) => ErrorCode::NotFound,
            AgentError::MigrationCommitted(_) => ErrorCode::MigrationCommitted,
            AgentError::MigrationUnresolved(_) => ErrorCode::MigrationUnresolved,
            AgentError::Net(e) if e.is_bad_input() => ErrorCode::InvalidArgument,
            AgentError::Net(e) if e.is_exhausted() => ErrorCode::Exhausted,
            AgentError::Net(e) if e.is_stale() => ErrorCode::PolicySuperseded,
            AgentError::Net(e) if e.is_not_found() => ErrorCode::NotFound,
            AgentError::Net(_) => ErrorCode::Internal,
            AgentError::Lease(crate::leases::LeaseError::Exhausted(_)) => ErrorCode::Exhausted,
            AgentError::Lease(crate::leases::LeaseError::Refused(_)) => ErrorCode::Conflict,
            AgentError::Lease(crate::leases::LeaseError::Unavailable(_))
            | AgentError::Lease(crate::leases::LeaseError::NotJoined(_)) => ErrorCode::Unavailable,
            AgentError::ForkFailed { source, .. } => source.code(),
        }
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    pub accel: AccelChoice,
    pub node: String,
    /// Bounds on what one image import or pull may consume.
    pub image_limits: Limits,
    /// Registries (`HOST[:PORT]`) pulled over plain HTTP; loopback ones always are.
    pub insecure_registries: Vec<String>,
    /// Longest wait for a registry's answer or next bytes.
    pub registry_timeout: Duration,
    /// A running guest that does not answer a ping within this time is
    /// reported hung and stopped; zero disables the watchdog.
    pub guest_watchdog: Duration,
    /// Largest output log of one sandbox; later output is discarded.
    pub max_log_bytes: u64,
    /// Sandbox networking; `None` runs every sandbox without a network.
    pub net: Option<hearth_net::NetConfig>,
    /// Where sandbox addresses are leased (the control plane); `None`: the
    /// node's IPAM picks them alone.
    pub leases: Option<Arc<dyn crate::leases::LeaseAuthority>>,
}

/// How a workload ended: status, exit, error message.
type Outcome = (SandboxStatus, Option<ExitInfo>, Option<String>);

/// Requests to a sandbox's lifecycle task.
pub(crate) enum Control {
    /// SIGTERM the workload, then power off after `grace`.
    Stop { grace: Duration },
    /// Power off now.
    Kill,
    /// Live-migrate to another node (see `migration`).
    Migrate(Box<crate::migration::SourceJob>),
}

/// Longest an exec waits for a snapshot of its sandbox to finish.
const EXEC_SNAPSHOT_WAIT: Duration = Duration::from_secs(120);

/// Longest a request that needs a running sandbox (exec, signal, snapshot,
/// migrate) waits for a started workload's `running` record to be saved.
const RUNNING_SAVE_WAIT: Duration = Duration::from_secs(10);

pub(crate) struct Entry {
    pub(crate) dir: PathBuf,
    pub(crate) record: Mutex<Sandbox>,
    status: watch::Sender<SandboxStatus>,
    /// Bytes in the output log so far.
    pub(crate) written: watch::Sender<u64>,
    /// True once the output log is complete.
    pub(crate) finished: watch::Sender<bool>,
    pub(crate) control: Mutex<Option<mpsc::Sender<Control>>>,
    pub(crate) conn: Mutex<Option<Arc<GuestConn>>>,
    pub(crate) main_input: Mutex<Option<SessionInput>>,
    /// The main workload was started with stdin open.
    pub(crate) stdin_open: std::sync::atomic::AtomicBool,
    execs: Mutex<HashMap<u32, SessionInput>>,
    next_exec: std::sync::atomic::AtomicU32,
    /// A duplicate of the guest channel's socket, to see what is still queued
    /// in it at a migration's switch-over.
    pub(crate) chan_fd: Mutex<Option<std::os::fd::OwnedFd>>,
    /// The running VM, for snapshots.
    pub(crate) vm: Mutex<Option<Arc<dyn Vm>>>,
    /// Guest session id of the main workload, for snapshots.
    pub(crate) main_session: Mutex<Option<u32>>,
    /// Held while a snapshot of this sandbox is being saved (one at a time).
    pub(crate) saving: tokio::sync::Mutex<()>,
    /// Held by a snapshot from before it freezes the guest's processes until
    /// it thawed them (not through the rest of its save); execs wait for it.
    pub(crate) exec_gate: tokio::sync::Mutex<()>,
    /// True while a restarted hearthd takes this sandbox over (or settles it).
    pub(crate) recovering: watch::Sender<bool>,
    /// The VM has a network device (so its snapshots need one on restore).
    pub(crate) nic: std::sync::atomic::AtomicBool,
    /// That device is on its tap directly (`NicMode::Tap`), not on hub 0.
    pub(crate) nic_tap: std::sync::atomic::AtomicBool,
    /// A live migration paused the VM (from the switch-over until it resumes
    /// here or is released): heartbeats report the copy as paused, since the
    /// guest may run on the target.
    pub(crate) migration_paused: std::sync::atomic::AtomicBool,
    /// An outgoing live migration of it runs (handed to its lifecycle task,
    /// up to the end of the commit): heartbeats report it, since the guest
    /// may still switch over to the target.
    pub(crate) migrating_out: std::sync::atomic::AtomicBool,
    /// Held while the record is saved (saves never overtake each other).
    persisting: Mutex<()>,
    /// Where the start of this sandbox spent its time.
    pub(crate) trace: crate::start_trace::StartTrace,
    /// The network prepared for the pool VM this sandbox took with `--network
    /// none`, being given back in the background (true once it is gone): the
    /// sandbox is recorded finished, and a graceful daemon stop ends, only
    /// after it is gone.
    pub(crate) releasing: Mutex<Option<watch::Receiver<bool>>>,
}

impl Entry {
    /// How the VM's network device is connected (meaningful when `nic`).
    pub(crate) fn nic_mode(&self) -> crate::restore::NicMode {
        if self.nic_tap.load(std::sync::atomic::Ordering::Relaxed) {
            crate::restore::NicMode::Tap
        } else {
            crate::restore::NicMode::Hub
        }
    }

    pub(crate) fn new(dir: PathBuf, record: Sandbox) -> Entry {
        let terminal = record.status.is_terminal();
        Entry {
            dir,
            status: watch::channel(record.status).0,
            record: Mutex::new(record),
            written: watch::channel(0).0,
            finished: watch::channel(terminal).0,
            control: Mutex::new(None),
            conn: Mutex::new(None),
            main_input: Mutex::new(None),
            stdin_open: std::sync::atomic::AtomicBool::new(false),
            execs: Mutex::new(HashMap::new()),
            next_exec: std::sync::atomic::AtomicU32::new(1),
            chan_fd: Mutex::new(None),
            vm: Mutex::new(None),
            main_session: Mutex::new(None),
            saving: tokio::sync::Mutex::new(()),
            exec_gate: tokio::sync::Mutex::new(()),
            recovering: watch::channel(false).0,
            nic: std::sync::atomic::AtomicBool::new(false),
            nic_tap: std::sync::atomic::AtomicBool::new(false),
            migration_paused: std::sync::atomic::AtomicBool::new(false),
            migrating_out: std::sync::atomic::AtomicBool::new(false),
            persisting: Mutex::new(()),
            trace: crate::start_trace::StartTrace::new(),
            releasing: Mutex::new(None),
        }
    }

    pub(crate) fn snapshot(&self) -> Sandbox {
        lock(&self.record).clone()
    }

    /// Waits until the status has left `creating` (running, or ended).
    pub(crate) async fn left_creating(&self) {
        let mut st = self.status.subscribe();
        // why: an error means the entry is gone; there is nothing to wait for.
        let _ = st.wait_for(|s| *s != SandboxStatus::Creating).await;
    }

    /// When its workload already runs (it has a main session) but the status
    /// is still `creating`, waits (at most `bound`) for the `running` record's
    /// save: a new start relays the first output while that save runs, so a
    /// client reacting to the output must not be told the sandbox is still
    /// being created. At once otherwise (e.g. while it still boots).
    pub(crate) async fn running_saved(&self, bound: Duration) {
        if lock(&self.main_session).is_some() {
            let _ = tokio::time::timeout(bound, self.left_creating()).await;
        }
    }

    /// Waits until the pool VM network this sandbox gives back (see
    /// `releasing`) is gone; at once when there is none.
    pub(crate) async fn released(&self) {
        let releasing = lock(&self.releasing).clone();
        if let Some(mut rx) = releasing {
            // why: an error means the task ended without saying so (the
            // runtime is shutting down); there is nothing left to wait for.
            let _ = rx.wait_for(|gone| *gone).await;
        }
    }

    /// The record as clients see it: `recovering` while a restarted hearthd
    /// takes the sandbox over (the stored record keeps its last status).
    pub(crate) fn view(&self) -> Sandbox {
        let mut r = self.snapshot();
        if *self.recovering.borrow() && !r.status.is_terminal() {
            r.status = SandboxStatus::Recovering;
        }
        r
    }

    /// Changes the record: saved first, then shown, so a status a client has
    /// seen survives a crash of hearthd right after it (CI killed hearthd the
    /// moment `inspect` said running, before the save, and the restart found a
    /// sandbox still being created). Updates are serialized: an older copy is
    /// never saved over a newer one.
    ///
    /// A change that cannot be saved is not shown either: readers keep the
    /// last saved record and the caller gets the error. Except the end of a
    /// sandbox (a terminal status): it is shown all the same, its `error`
    /// saying the record was not saved, since hiding it would leave clients
    /// waiting for a workload that is gone; a restarted hearthd finds the
    /// older record and reports the sandbox `lost`.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Sandbox)) -> std::io::Result<()> {
        let _saving = lock(&self.persisting);
        let mut rec = self.snapshot();
        f(&mut rec);
        let saved = persist(&self.dir, &rec);
        if let Err(e) = &saved {
            tracing::error!(sandbox = %rec.id, status = ?rec.status, "cannot save sandbox record in {}: {e}", self.dir.display());
            if !rec.status.is_terminal() {
                return saved;
            }
            let note = format!(
                "its record could not be saved in {} ({e}); a restarted hearthd will report it lost",
                self.dir.display()
            );
            rec.error = Some(match rec.error.take() {
                Some(m) => format!("{m}; {note}"),
                None => note,
            });
        }
        let status = rec.status;
        *lock(&self.record) = rec;
        self.status.send_replace(status);
        saved
    }
}

/// Longest hold [`running_save_hold`] takes.
const MAX_RUNNING_SAVE_HOLD_MS: u64 = 30_000;

/// Fault injection for tests: with `HEARTH_RUNNING_SAVE_HOLD=<ms>` the save
/// of a new start's `running` record waits `ms` first (at most 30 s), so a
/// test holds the window between the workload's first output and that save
/// open (requests in it must wait for the save, see
/// [`Entry::running_saved`]). Unset (always, outside tests) it costs one
/// environment lookup. Blocks: called on the save's blocking thread.
fn running_save_hold() {
    let Some(ms) = std::env::var("HEARTH_RUNNING_SAVE_HOLD")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| ms.min(MAX_RUNNING_SAVE_HOLD_MS))
    else {
        return;
    };
    tracing::warn!(
        ms,
        "HEARTH_RUNNING_SAVE_HOLD: holding the save of a running record (fault injection for tests)"
    );
    std::thread::sleep(Duration::from_millis(ms));
}

/// What a new sandbox's record holds from its registration on, when known
/// before it (one record save instead of several on a warm start's path).
#[derive(Default)]
pub(crate) struct Preset {
    /// Its id, when its VM already has one (a pool VM was restored under it).
    pub(crate) id: Option<String>,
    /// Start path, source and note of a warm start.
    pub(crate) path: Option<(StartPath, String, Option<String>)>,
    /// Its network, when it already exists (a pool VM's, the request's
    /// rules written).
    pub(crate) network: Option<hearth_api::network::SandboxNetwork>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `dir/sandbox.json` (file durable, its name once the caller fsyncs `dir`).
pub(crate) fn persist(dir: &Path, rec: &Sandbox) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
    durable::write(
        &dir.join("sandbox.json"),
        &data,
        durable::MODE_DEFAULT,
        DirSync::ByCaller,
    )
}

pub(crate) fn new_id() -> String {
    let mut b = [0u8; 6];
    // why: an id collision is checked for anyway; fall back to time if the RNG fails.
    if getrandom::fill(&mut b).is_err() {
        b.copy_from_slice(&now_ms().to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

pub(crate) struct Inner {
    /// Held for the daemon's lifetime: one hearthd per data dir.
    _lock: std::fs::File,
    pub(crate) cfg: AgentConfig,
    pub(crate) images: ImageStore,
    pub(crate) puller: Puller,
    pub(crate) vmm: QemuVmm,
    pub(crate) accel: AccelReport,
    host_cpus: u32,
    host_memory_mib: u64,
    pub(crate) sandboxes: Mutex<HashMap<String, Arc<Entry>>>,
    /// Random id of this data dir: a migration to the same node is refused.
    pub(crate) node_id: String,
    /// The ingress this process serves for this node's sandboxes (`hearthd
    /// dev --ingress-listen`), reported in [`Agent::info`].
    pub(crate) ingress: std::sync::OnceLock<hearth_api::network::IngressInfo>,
    pub(crate) migrations: crate::migration::Registry,
    net: Option<Arc<hearth_net::NodeNet>>,
    /// Templates, warm pools, snapshot references.
    pub(crate) warm: WarmState,
    /// Sandboxes whose address release failed at `rm`; retried in the background.
    pending_releases: Mutex<std::collections::BTreeSet<String>>,
    /// The control plane's first answer to this daemon's heartbeats (what it
    /// keeps and what it fences here); recovery waits for it (bounded).
    pub(crate) desired: watch::Sender<Option<Arc<hearth_api::cluster::Desired>>>,
}

/// How long `rm` waits for the control plane to release an address before
/// it queues the release for a retry.
pub(crate) const RELEASE_WAIT: Duration = Duration::from_secs(3);
/// How often queued address releases are retried.
const RELEASE_RETRY: Duration = Duration::from_secs(5);

/// The node agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<Inner>,
}

/// How long a start waits for the data dir's lock before it gives up.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Takes the data dir's exclusive lock, so two daemons never manage the same
/// sandboxes (the second would declare the first one's VMs lost). Blocks up
/// to [`LOCK_WAIT`]; called once at start, before anything is served.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, AgentError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("hearthd.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("open {}", path.display())))?;
    // why: a hearthd killed just now (a supervisor restarting it at once)
    // holds the lock until the kernel has closed its files; a few seconds
    // tell that apart from another daemon running on this data dir.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let r = loop {
        // SAFETY: flock(2) on a file descriptor we own for the duration of the call.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 || std::time::Instant::now() >= deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if r != 0 {
        return Err(AgentError::Config(format!(
            "data dir {} is in use by another hearthd (lock {}); stop it, or give this one another --data-dir",
            dir.display(),
            path.display()
        )));
    }
    Ok(f)
}

/// Fails, as [`Agent::start`] would, when another hearthd holds the data dir;
/// for a caller that touches the data dir before starting the agent. The
/// lock is released again at once ([`Agent::start`] takes it for good).
pub fn ensure_data_dir_free(dir: &Path) -> Result<(), AgentError> {
    lock_data_dir(dir).map(drop)
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

impl Agent {
    /// Opens the data dir, probes the accelerator and recovers sandboxes left by
    /// a previous run: running ones whose VMs still run are re-adopted and keep
    /// running; the others are reported lost and their VMs stopped, so no VMM
    /// and no network is orphaned.
    pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        for (what, p) in [("guest kernel", &cfg.kernel), ("initramfs", &cfg.initrd)] {
            if !p.is_file() {
                return Err(AgentError::Config(format!(
                    "{what} not found at {}; build it with scripts/setup or pass its path",
                    p.display()
                )));
            }
        }
        std::fs::create_dir_all(cfg.data_dir.join("sandboxes"))
            .map_err(io_err(format!("create {}", cfg.data_dir.display())))?;
        let images = ImageStore::open(cfg.data_dir.join("images"), cfg.image_limits.clone())?;
        let puller = Puller::new(
            images.clone(),
            RegistryOptions {
                insecure: cfg.insecure_registries.clone(),
                timeout: cfg.registry_timeout,
                credentials: Credentials::new(
                    cfg.data_dir.join("registry-auth.json"),
                    Credentials::default_docker_config(),
                ),
            },
        );
        // why: the data dir holds sandbox records, logs, images and possibly
        // secrets of workloads (argv, env); only the daemon's user may read it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("chmod 700 {}", cfg.data_dir.display())))?;
        }
        let lock = lock_data_dir(&cfg.data_dir)?;
        // why: made before anything is served, so the data dir's contents do not
        // change later behind a client's back (the control link reads it).
        crate::control_link::instance_id(&cfg.data_dir)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let images = ImageStore::open(cfg.data_dir.join("images"), Limits::default())?;
        let vmm = QemuVmm::with_binaries(&cfg.qemu, &cfg.qemu_img)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let accel = hearth_vmm::choose_accel(
            cfg.accel,
            vmm.qemu_binary(),
            &cfg.kernel,
            &cfg.initrd,
            hearth_vmm::PROBE_TIMEOUT,
        )
        .await
        .map_err(|e| AgentError::Config(e.to_string()))?;
        if accel.accel == Accel::Tcg {
            tracing::warn!(
                "accelerator: tcg ({}) — NOT hardware isolation",
                accel.reason
            );
        } else {
            tracing::info!("accelerator: {} ({})", accel.accel, accel.reason);
        }
        let cfg_data_dir = cfg.data_dir.clone();
        let net = match &cfg.net {
            Some(n) => Some(hearth_net::NodeNet::open_watched(n.clone()).map_err(AgentError::Net)?),
            None => None,
        };
        let warm = WarmState::new(&cfg, &vmm, accel.accel).await?;
        let inner = Arc::new(Inner {
            net,
            ingress: std::sync::OnceLock::new(),
            _lock: lock,
            host_cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            host_memory_mib: host_memory_mib(),
            cfg,
            images,
            puller,
            vmm,
            accel,
            sandboxes: Mutex::new(HashMap::new()),
            node_id: crate::migration::node_id(&cfg_data_dir)?,
            migrations: crate::migration::Registry::new(&cfg_data_dir),
            warm,
            pending_releases: Mutex::new(Default::default()),
            desired: watch::channel(None).0,
        });
        let agent = Agent { inner };
        agent.reap_unclaimed_pool_vms().await;
        let pending = agent.load_records().await;
        agent.sync_leases().await;
        agent.start_release_retries();
        agent.start_pools();
        // why: recovering a sandbox can take up to the resume timeout; the API
        // serves meanwhile (those sandboxes read `recovering`).
        let a = agent.clone();
        tokio::spawn(async move { a.recover(pending).await });
        Ok(agent)
    }

    /// Loads every sandbox record. Those a previous hearthd left non-terminal
    /// are marked recovering and returned. Networks of sandboxes that are not
    /// among them, or whose record has no network, are removed now (records
    /// that are gone, sandboxes that had ended, the pool VM network a
    /// `--network none` start was giving back when hearthd stopped): tap,
    /// programs, route, NAT entry and lease (`sync_leases` then frees the
    /// leases upstream).
    async fn load_records(&self) -> Vec<Arc<Entry>> {
        let dir = self.inner.cfg.data_dir.join("sandboxes");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut pending = Vec::new();
        for ent in rd.flatten() {
            let sdir = ent.path();
            let rec: Sandbox = match std::fs::read(sdir.join("sandbox.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => r,
                None if sdir.is_dir() && !sdir.join("sandbox.json").exists() => {
                    // why: an incoming migration that was never committed (or a
                    // create cut short) left it; it would block a later one.
                    // Its network goes with the orphans below; its address
                    // lease is not this copy's to release. The same clean-up
                    // as the pool reaper's (it honours the resumed marker).
                    self.remove_leftover_dir(&sdir).await;
                    continue;
                }
                None => {
                    tracing::warn!("ignoring {}: no readable sandbox.json", sdir.display());
                    continue;
                }
            };
            crate::migration::drop_lone_token(&sdir);
            let entry = Arc::new(Entry::new(sdir.clone(), rec.clone()));
            if !rec.status.is_terminal() {
                entry.recovering.send_replace(true);
                pending.push(entry.clone());
            }
            lock(&self.inner.sandboxes).insert(rec.id.clone(), entry);
        }
        if let Some(net) = &self.inner.net {
            // why: a network is saved in the record before the VM can use it
            // (`setup_network`, `adopt_pool_network`), so a network a record
            // does not name is no running sandbox's.
            let keep = pending
                .iter()
                .map(|e| e.snapshot())
                .filter(|r| r.network.is_some())
                .map(|r| r.id)
                .collect();
            net.remove_orphans(&keep);
        }
        pending
    }

    /// Recovers `pending` (see `recover_sandbox`), at most
    /// `RECOVER_CONCURRENCY` at once: re-adopts the VMs that still run and
    /// settles the others (their networks are removed as they are settled).
    async fn recover(&self, pending: Vec<Arc<Entry>>) {
        /// Clears `recovering` however the recovery ends.
        struct Settled(Arc<Entry>);
        impl Drop for Settled {
            fn drop(&mut self) {
                self.0.recovering.send_replace(false);
            }
        }
        let n = pending.len();
        let t0 = Instant::now();
        let desired = self.wait_desired(&pending).await;
        let limit = Arc::new(tokio::sync::Semaphore::new(
            crate::readopt::RECOVER_CONCURRENCY,
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for entry in pending {
            let (agent, limit) = (self.clone(), limit.clone());
            let fenced = desired.as_ref().and_then(|d| {
                let id = entry.snapshot().id;
                d.stop
                    .iter()
                    .find(|f| f.agent_id == id)
                    .map(|f| f.reason.clone())
            });
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let settled = Settled(entry);
                match fenced {
                    Some(reason) => {
                        agent.recover_fenced(&settled.0, &reason).await;
                        false
                    }
                    None => agent.recover_sandbox(&settled.0).await,
                }
            });
        }
        let mut adopted = 0;
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(true) => adopted += 1,
                Ok(false) => {}
                Err(e) => tracing::error!("recovering a sandbox panicked: {e}"),
            }
        }
        if n > 0 {
            tracing::info!(
                sandboxes = n,
                adopted,
                ms = t0.elapsed().as_millis() as u64,
                "recovery after the restart done"
            );
        }
    }

    /// The control plane's first heartbeat answer, when some of `pending` were
    /// placed by it (they carry an owner tag): what it keeps is taken over,
    /// what it fences is not resumed. Waits at most `DESIRED_WAIT`; without
    /// an answer, recovery goes by the node's own records.
    async fn wait_desired(
        &self,
        pending: &[Arc<Entry>],
    ) -> Option<Arc<hearth_api::cluster::Desired>> {
        if !pending.iter().any(|e| lock(&e.record).owner.is_some()) {
            return None;
        }
        let mut rx = self.inner.desired.subscribe();
        let got = match tokio::time::timeout(DESIRED_WAIT, rx.wait_for(|d| d.is_some())).await {
            Ok(Ok(d)) => d.clone(),
            _ => None,
        };
        match got {
            Some(d) => Some(d),
            None => {
                tracing::warn!(
                    "the control plane did not answer within {}s; recovering sandboxes by this node's records",
                    DESIRED_WAIT.as_secs()
                );
                None
            }
        }
    }

    /// Notes the control plane's answer to a heartbeat (see `wait_desired`).
    pub(crate) fn note_desired(&self, d: &hearth_api::cluster::Desired) {
        if self.inner.desired.borrow().is_none() {
            self.inner.desired.send_replace(Some(Arc::new(d.clone())));
        }
    }

    /// Waits while a restarted hearthd is still taking the sandbox over, so
    /// a request acts on the outcome (at most `RECOVERY_WAIT`).
    pub(crate) async fn settled_entry(&self, id_or_name: &str) -> Result<Arc<Entry>, AgentError> {
        let e = self.entry(id_or_name)?;
        let mut rx = e.recovering.subscribe();
        if tokio::time::timeout(RECOVERY_WAIT, rx.wait_for(|r| !*r))
            .await
            .is_err()
        {
            return Err(AgentError::Conflict(format!(
                "sandbox '{id_or_name}' is still being recovered after a hearthd restart ({}s so far); retry shortly",
                RECOVERY_WAIT.as_secs()
            )));
        }
        Ok(e)
    }

    /// [`Agent::settled_entry`] for a request that needs the sandbox running
    /// (exec, signal, snapshot, migrate): also waits for a started
    /// workload's `running` record ([`Entry::running_saved`]).
    pub(crate) async fn running_entry(&self, id_or_name: &str) -> Result<Arc<Entry>, AgentError> {
        let e = self.settled_entry(id_or_name).await?;
        e.running_saved(RUNNING_SAVE_WAIT).await;
        Ok(e)
    }

    /// Makes the control plane's leases match this node's: frees those of
    /// sandboxes it no longer has a network for (e.g. removed while the agent
    /// was down) and claims the addresses its sandboxes use (e.g. a data dir
    /// from before leases were replicated), so none is handed out again.
    async fn sync_leases(&self) {
        let (Some(net), Some(auth)) = (&self.inner.net, &self.inner.cfg.leases) else {
            return;
        };
        let local = net.leases();
        // why: addresses of sandboxes that migrated away stay leased in this
        // node's slice until the node that runs them removes them.
        let mut keep: Vec<String> = local.keys().cloned().collect();
        keep.extend(crate::migration::net::moved_leases(
            &self.inner.cfg.data_dir,
        ));
        match auth.retain(keep).await {
            Ok(freed) if !freed.is_empty() => {
                tracing::info!(
                    ?freed,
                    "released the addresses of sandboxes this node no longer has"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("syncing address leases with the control plane: {e}"),
        }
        for (id, ip) in local {
            if !net.pool().contains(ip) {
                // why: a sandbox that migrated here; its address is leased in
                // the slice of the node it was started on (`lease-holder.json`).
                continue;
            }
            match auth.acquire(&id, Some(ip)).await {
                Ok(got) if got == ip => {}
                Ok(got) => tracing::error!(
                    sandbox = %id,
                    "the control plane leases {got} to this sandbox, which uses {ip}; remove it (`hearth rm -f`)"
                ),
                Err(e) => tracing::error!(sandbox = %id, "claiming its address {ip}: {e}"),
            }
        }
    }

    /// The sandbox's address from the control plane, when it hands them out.
    pub(crate) async fn acquire_address(
        &self,
        id: &str,
    ) -> Result<Option<std::net::Ipv4Addr>, AgentError> {
        match &self.inner.cfg.leases {
            Some(auth) => Ok(Some(auth.acquire(id, None).await?)),
            None => Ok(None),
        }
    }

    /// Gives the sandbox's address back to the control plane (after its tap
    /// is gone). Waits at most [`RELEASE_WAIT`]; a release that fails or
    /// times out is queued and retried every [`RELEASE_RETRY`].
    pub(crate) async fn release_address(&self, id: &str) {
        let Some(auth) = &self.inner.cfg.leases else {
            return;
        };
        let err = match tokio::time::timeout(RELEASE_WAIT, auth.release(id)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {RELEASE_WAIT:?}"),
        };
        // why: rm must not fail or hang on it; the retry loop frees it later.
        tracing::warn!(
            sandbox = id,
            "releasing the address lease: {err}; retrying in the background"
        );
        lock(&self.inner.pending_releases).insert(id.to_string());
    }

    /// Sandboxes whose address release is still queued.
    pub fn pending_releases(&self) -> Vec<String> {
        lock(&self.inner.pending_releases).iter().cloned().collect()
    }

    /// Retries queued address releases until the agent is dropped.
    fn start_release_retries(&self) {
        let Some(auth) = self.inner.cfg.leases.clone() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELEASE_RETRY).await;
                let Some(inner) = weak.upgrade() else { return };
                let queued: Vec<String> = lock(&inner.pending_releases).iter().cloned().collect();
                drop(inner);
                for id in queued {
                    if let Ok(Ok(())) = tokio::time::timeout(RELEASE_WAIT, auth.release(&id)).await
                    {
                        let Some(inner) = weak.upgrade() else { return };
                        lock(&inner.pending_releases).remove(&id);
                        tracing::info!(sandbox = %id, "released the address lease after a retry");
                    }
                }
            }
        });
    }

    /// The node's sandbox networking, if enabled.
    pub(crate) fn net(&self) -> Option<Arc<hearth_net::NodeNet>> {
        self.inner.net.clone()
    }

    /// What this node is and runs on.
    pub fn info(&self) -> Info {
        let i = &self.inner;
        Info {
            version: env!("CARGO_PKG_VERSION").into(),
            backend: i.vmm.name().into(),
            backend_version: i.vmm.version(),
            accel: i.accel.accel.to_string(),
            accel_reason: i.accel.reason.clone(),
            hardware_isolation: i.accel.accel == Accel::Kvm,
            kernel: i.cfg.kernel.display().to_string(),
            initrd: i.cfg.initrd.display().to_string(),
            data_dir: i.cfg.data_dir.display().to_string(),
            node: i.cfg.node.clone(),
            host_cpus: i.host_cpus,
            host_memory_mib: i.host_memory_mib,
            node_id: i.node_id.clone(),
            ingress: i.ingress.get().cloned(),
            migration_output_resumed: true,
        }
    }

    /// Records the ingress this process serves for the node's sandboxes
    /// (once; a second call changes nothing).
    pub fn set_ingress(&self, info: hearth_api::network::IngressInfo) {
        let _ = self.inner.ingress.set(info);
    }

    pub(crate) fn entry(&self, id_or_name: &str) -> Result<Arc<Entry>, AgentError> {
        let map = lock(&self.inner.sandboxes);
        if let Some(e) = map.get(id_or_name) {
            return Ok(e.clone());
        }
        map.values()
            .find(|e| lock(&e.record).name.as_deref() == Some(id_or_name))
            .cloned()
            .ok_or_else(|| AgentError::SandboxNotFound(id_or_name.into()))
    }

    pub fn get(&self, id_or_name: &str) -> Result<Sandbox, AgentError> {
        Ok(self.entry(id_or_name)?.view())
    }

    pub fn list(&self) -> Vec<Sandbox> {
        let mut v: Vec<Sandbox> = lock(&self.inner.sandboxes)
            .values()
            .map(|e| e.view())
            .collect();
        v.sort_by_key(|s| s.created_ms);
        v
    }

    /// The vCPU and memory bounds a create checks; a migration target checks
    /// an offer's the same way.
    pub(crate) fn validate_resources(&self, cpus: u32, mem: u32) -> Result<(), AgentError> {
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(AgentError::InvalidArgument(format!(
                "cpus {cpus} is out of range: give 1..={MAX_CPUS}"
            )));
        }
        let host = self.inner.host_memory_mib;
        if mem < MIN_MEMORY_MIB || (host > 0 && u64::from(mem) > host) {
            return Err(AgentError::InvalidArgument(format!(
                "memory {mem} MiB is out of range: give {MIN_MEMORY_MIB}..={host} MiB (this host has {host} MiB)"
            )));
        }
        Ok(())
    }

    pub(crate) fn validate(&self, req: &CreateSandbox) -> Result<(u32, u32), AgentError> {
        let cpus = req.cpus.unwrap_or(DEFAULT_CPUS);
        let mem = req.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        self.validate_resources(cpus, mem)?;
        if let Some(n) = &req.name {
            if !valid_name(n) {
                return Err(AgentError::InvalidArgument(format!(
                    "name '{n}' is invalid: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
                )));
            }
        }
        for kv in &req.env {
            if !kv.contains('=') || kv.starts_with('=') {
                return Err(AgentError::InvalidArgument(format!(
                    "environment entry '{kv}' is not KEY=VALUE"
                )));
            }
        }
        Ok((cpus, mem))
    }

    /// Creates a sandbox and starts booting it; returns at once (status `creating`).
    /// A template for the image (and no `cold`) makes it a warm start.
    pub async fn create(&self, req: CreateSandbox) -> Result<Sandbox, AgentError> {
        let t0 = Instant::now();
        if req.from_snapshot.is_some() {
            return self.create_from_snapshot(req).await;
        }
        let (cpus, memory_mib) = self.validate(&req)?;
        let images = self.inner.images.clone();
        let reference = req.image.clone();
        let image = tokio::task::spawn_blocking(move || images.resolve(&reference))
            .await
            .map_err(|e| AgentError::Config(format!("image lookup panicked: {e}")))??;
        let exec = plan_exec(&req, &image)?;
        let policy = match req.network.mode {
            NetworkMode::None => None,
            NetworkMode::Default => Some(crate::network::spec_policy(&req.network)?),
        };
        let chosen = self.choose_launch(&req, &image.digest, cpus, memory_mib);
        // why: from here a Launch holds resources (a pool VM with its network
        // and lease, a template reference, later a restore under way): a
        // client that drops its request drops this future, so the rest runs
        // in its own task, which a cancelled caller cannot drop half-way.
        let agent = self.clone();
        tokio::spawn(async move {
            agent
                .create_launched(req, image, exec, policy, (chosen, cpus, memory_mib), t0)
                .await
        })
        .await
        .map_err(|e| AgentError::Config(format!("creating the sandbox panicked: {e}")))?
    }

    /// [`Agent::create`] once its launch is chosen: registers the sandbox,
    /// sets up its network and starts its lifecycle, undoing the launch on failure.
    async fn create_launched(
        &self,
        req: CreateSandbox,
        image: ImageRecord,
        exec: GuestExec,
        policy: Option<hearth_net::Policy>,
        // the chosen launch (with its cpus and memory), and the requested ones
        (chosen, cpus, memory_mib): ((Launch, u32, u32), u32, u32),
        t0: Instant,
    ) -> Result<Sandbox, AgentError> {
        let nicless = chosen.0.nicless_template().map(str::to_string);
        let (mut launch, cpus, memory_mib) = match nicless {
            // why: a restored VM keeps its saved device set: a template made
            // without a network device cannot serve a networked sandbox.
            Some(t) if policy.is_some() && self.inner.net.is_some() => {
                self.abandon(chosen.0).await;
                let note = format!(
                    "template '{t}' has no network device (made by an older hearthd or on a node without networking); booted cold; recreate it (`hearth template rm {t}` and `hearth template create`) to start networked sandboxes from it"
                );
                (Launch::Cold { note: Some(note) }, cpus, memory_mib)
            }
            _ => chosen,
        };
        // why: a pool VM's network exists before the sandbox (same id): the
        // request's rules are written into it first, so the registration saves
        // the record with its network, one record fsync on the start's path
        // instead of two. A crash in between leaves a pool VM without a
        // sandbox record, which a restarted daemon reaps with its network.
        // Meanwhile the tap joins the paused VM's hub and the VM is resumed
        // (`Launch::wake_pool_vm`; the `cont` is off the start's path): the
        // resumed guest runs nothing but waits for its `Restored`, and until
        // the rules are written its programs hold the deny-everything policy
        // the VM was parked with.
        let mut adopted = None;
        if let Some(policy) = &policy {
            if let Some(pre) = launch.take_pool_network() {
                let id = launch.preset_id().unwrap_or_default();
                let tap = pre.tap.clone();
                let (set, attached) = tokio::join!(
                    self.adopt_pool_network(&id, pre, policy.clone()),
                    launch.wake_pool_vm(&tap)
                );
                match (set, attached) {
                    (Ok(n), Ok(())) => adopted = Some(n),
                    (Ok(n), Err(e)) => {
                        self.release_pool_network(&n.sandbox).await;
                        self.abandon(launch).await;
                        return Err(e);
                    }
                    (Err(e), _) => {
                        self.abandon(launch).await;
                        return Err(e);
                    }
                }
            }
        }
        let preset = Preset {
            id: launch.preset_id(),
            path: launch.preset_path(),
            network: adopted
                .as_ref()
                .map(|n| crate::network::network_to_api(n, new_id() + &new_id())),
        };
        let entry = match self.register(&req, &image.digest, &exec.argv, (cpus, memory_mib), preset)
        {
            Ok(e) => e,
            Err(e) => {
                if let Some(n) = &adopted {
                    self.release_pool_network(&n.sandbox).await;
                }
                self.abandon(launch).await;
                return Err(e);
            }
        };
        entry.trace.began_at(t0);
        entry.trace.mark("registered");
        if policy.is_some() && self.inner.net.is_some() {
            // why: the restore (QEMU spawn, state load) overlaps the host
            // network setup below instead of following it.
            let rec = entry.snapshot();
            launch = self.start_restore_early(
                launch,
                &rec.id,
                req.name.as_deref(),
                (rec.cpus, rec.memory_mib),
            );
        }
        let prepared = launch.take_pool_network();
        let net = match (adopted, prepared, policy) {
            (Some(n), _, _) => Ok(Some(n)),
            (None, Some(pre), None) => {
                // why: given back in the background instead of before (its
                // teardown and lease release were most of such a start): the
                // VM never had the tap attached, the record has no network (so
                // `policy set` finds none), and the sandbox is recorded finished
                // only once it is gone (`Agent::finish_after_release`).
                // A crash before it ran loses nothing: a restarted daemon keeps
                // only the networks of records that have one (`load_records`).
                let (done, released) = watch::channel(false);
                *lock(&entry.releasing) = Some(released);
                let agent = self.clone();
                tokio::spawn(async move {
                    crate::warm_pool::release_hold().await;
                    agent.release_pool_network(&pre.sandbox).await;
                    let _ = done.send(true);
                });
                Ok(None)
            }
            (None, _, policy) => self.setup_network(&entry, policy).await,
        };
        let net = match net {
            Ok(n) => n,
            Err(e) => {
                self.abandon(launch).await;
                // why: an early restore (now ended by abandon) may have written
                // into the directory after the failed setup removed it.
                let _ = std::fs::remove_dir_all(&entry.dir);
                return Err(e);
            }
        };
        entry.trace.mark("network");
        let sb = self.spawn_lifecycle(
            entry,
            &req,
            image.rootfs.clone(),
            exec,
            launch,
            net.as_ref(),
        );
        // why: tokio runs a task spawned from a worker next on that worker
        // (its LIFO slot, which other workers do not steal), but the waking of
        // this request's caller takes that slot and pushes the lifecycle back
        // behind the request's remaining work (3-5 ms here on a loaded host).
        // Yielding once lets the lifecycle send `Restored` and the workload's
        // exec (and resume the VM) first; the API answer, which the start's
        // latency does not wait for, comes right after.
        tokio::task::yield_now().await;
        Ok(sb)
    }

    /// Leases an address and builds the tap, policy and NAT of a registered
    /// sandbox (lease committed before the tap), and records it. On failure the
    /// sandbox is unregistered and its directory removed (the caller undoes the launch).
    pub(crate) async fn setup_network(
        &self,
        entry: &Arc<Entry>,
        policy: Option<hearth_net::Policy>,
    ) -> Result<Option<hearth_net::SandboxNet>, AgentError> {
        let id = entry.snapshot().id;
        let net = match (policy, &self.inner.net) {
            (Some(policy), Some(node)) => {
                let (node, id2) = (node.clone(), id.clone());
                let built = match self.acquire_address(&id).await {
                    Ok(ip) => {
                        entry.trace.mark("leased");
                        tokio::task::spawn_blocking(move || node.setup_with(&id2, ip, policy))
                            .await
                            .map_err(|e| AgentError::Config(format!("network setup panicked: {e}")))
                            .and_then(|r| r.map_err(AgentError::from))
                    }
                    Err(e) => Err(e),
                };
                match built {
                    Ok(n) => Some(n),
                    Err(e) => {
                        self.release_address(&id).await;
                        lock(&self.inner.sandboxes).remove(&id);
                        let _ = std::fs::remove_dir_all(&entry.dir);
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        if let Some(n) = &net {
            let token = new_id() + &new_id();
            // why: a restarted hearthd keeps only the networks its records
            // name; one the record does not name would be removed under a
            // running sandbox, so the start fails instead.
            if let Err(e) =
                entry.update(|r| r.network = Some(crate::network::network_to_api(n, token)))
            {
                self.drop_network(&id).await;
                lock(&self.inner.sandboxes).remove(&id);
                let _ = std::fs::remove_dir_all(&entry.dir);
                return Err(io_err(format!(
                    "save the network of sandbox {id} in its record {}",
                    entry.dir.display()
                ))(e));
            }
        }
        Ok(net)
    }

    /// Gives the sandbox that takes pool VM `id` the network prepared for
    /// that VM (same id): writes the request's policy into its maps (live,
    /// atomic), before the sandbox is registered. On failure the network is
    /// removed and its lease released (the caller undoes the launch).
    async fn adopt_pool_network(
        &self,
        id: &str,
        pre: hearth_net::SandboxNet,
        policy: hearth_net::Policy,
    ) -> Result<hearth_net::SandboxNet, AgentError> {
        let set = match self.inner.net.clone() {
            _ if pre.sandbox != id => Err(AgentError::Config(format!(
                "the network prepared for pool VM {} was given to sandbox {id}; it was removed, create the sandbox again",
                pre.sandbox
            ))),
            None => Err(AgentError::Config(format!(
                "pool VM {id} has a network but this node has no networking; create the sandbox again"
            ))),
            Some(node) => {
                let id2 = id.to_string();
                tokio::task::spawn_blocking(move || node.set_policy(&id2, policy, None))
                    .await
                    .map_err(|e| AgentError::Config(format!("network policy setup panicked: {e}")))
                    .and_then(|r| r.map_err(AgentError::from))
            }
        };
        if set.is_err() {
            self.release_pool_network(&pre.sandbox).await;
        }
        set
    }

    /// Records a new sandbox (status `creating`) with what is known of it
    /// already ([`Preset`]).
    pub(crate) fn register(
        &self,
        req: &CreateSandbox,
        image_digest: &str,
        argv: &[String],
        (cpus, memory_mib): (u32, u32),
        preset: Preset,
    ) -> Result<Arc<Entry>, AgentError> {
        let Preset { id, path, network } = preset;
        let mut map = lock(&self.inner.sandboxes);
        if let Some(n) = &req.name {
            if map.contains_key(n)
                || map
                    .values()
                    .any(|e| lock(&e.record).name.as_deref() == Some(n))
            {
                return Err(AgentError::Conflict(format!(
                    "a sandbox named '{n}' already exists; remove it with `hearth rm {n}` or choose another name"
                )));
            }
        }
        let id = match id {
            Some(id) => id,
            None => {
                let mut id = new_id();
                while map.contains_key(&id)
                    || self.sandbox_dir(&id).exists()
                    || map
                        .values()
                        .any(|e| lock(&e.record).name.as_deref() == Some(&id))
                {
                    id = new_id();
                }
                id
            }
        };
        let dir = self.sandbox_dir(&id);
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let rec = Sandbox {
            id: id.clone(),
            name: req.name.clone(),
            image: req.image.clone(),
            image_digest: image_digest.to_string(),
            status: SandboxStatus::Creating,
            exit: None,
            error: None,
            cpus,
            memory_mib,
            argv: argv.to_vec(),
            node: self.inner.cfg.node.clone(),
            accel: self.inner.accel.accel.to_string(),
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            boot_ms: None,
            network,
            start_path: path.as_ref().map(|p| p.0),
            start_note: path.as_ref().and_then(|p| p.2.clone()),
            started_from: path.map(|p| p.1),
            owner: req.owner.clone(),
        };
        if let Err(e) = persist(&dir, &rec) {
            // why: a sandbox dir without a record would be ignored, never cleaned up (disk full).
            let _ = std::fs::remove_dir_all(&dir);
            return Err(io_err(format!(
                "save the record of sandbox {id} in {}",
                dir.display()
            ))(e));
        }
        let entry = Arc::new(Entry::new(dir, rec));
        map.insert(id, entry.clone());
        Ok(entry)
    }

    pub(crate) fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.inner.cfg.data_dir.join("sandboxes").join(id)
    }

    /// The VM config of a sandbox (hostname: its name, else its id).
    pub(crate) fn vm_config(
        &self,
        id: &str,
        name: Option<&str>,
        rootfs: PathBuf,
        (cpus, memory_mib): (u32, u32),
        net: Option<&hearth_net::SandboxNet>,
        nic: Option<crate::restore::NicMode>,
    ) -> Result<VmConfig, AgentError> {
        // why: a tap as the device's direct backend gives the guest virtio-net
        // offloads (vnet_hdr; a hub turns them off, halving bulk throughput), but
        // the guest then keeps them across snapshots, so a restore needs the mode
        // its state was saved with (`nic`): cold boots with a network go direct,
        // restores follow their snapshot, and templates (restored into pools
        // before any tap exists) use hub 0.
        let device = nic_device(id, nic, net)?;
        Ok(VmConfig {
            id: id.to_string(),
            dir: self.sandbox_dir(id).join("vm"),
            kernel: self.inner.cfg.kernel.clone(),
            initrd: self.inner.cfg.initrd.clone(),
            rootfs,
            cpus,
            memory_mib,
            hostname: name.unwrap_or(id).replace('_', "-"),
            extra_cmdline: net.map(|n| n.kernel_params()).unwrap_or_default(),
            accel: self.inner.accel.accel,
            net: device,
            memory: GuestMemory::SharedFile,
            ram_kib: None,
        })
    }

    /// Starts the lifecycle task of a registered sandbox.
    pub(crate) fn spawn_lifecycle(
        &self,
        entry: Arc<Entry>,
        req: &CreateSandbox,
        rootfs: PathBuf,
        exec: GuestExec,
        launch: Launch,
        net: Option<&hearth_net::SandboxNet>,
    ) -> Sandbox {
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        *lock(&entry.control) = Some(ctl_tx);
        let rec = entry.snapshot();
        let vm_cfg = self.vm_config(
            &rec.id,
            req.name.as_deref(),
            rootfs,
            (rec.cpus, rec.memory_mib),
            net,
            launch.nic(),
        );
        let guest_net = net.map(crate::restore::guest_net);
        let agent = self.clone();
        let e2 = entry.clone();
        tokio::spawn(async move {
            agent
                .lifecycle(e2, vm_cfg, exec, ctl_rx, launch, guest_net)
                .await
        });
        entry.snapshot()
    }

    async fn lifecycle(
        &self,
        entry: Arc<Entry>,
        vm_cfg: Result<VmConfig, AgentError>,
        exec: GuestExec,
        mut ctl: mpsc::Receiver<Control>,
        launch: Launch,
        guest_net: Option<hearth_proto::GuestNet>,
    ) {
        let started = Instant::now();
        let vm_cfg = match vm_cfg {
            Ok(c) => c,
            Err(e) => {
                self.abandon(launch).await;
                self.finish_after_release(&entry, SandboxStatus::Failed, None, Some(e.to_string()))
                    .await;
                return;
            }
        };
        entry
            .nic
            .store(vm_cfg.net.is_some(), std::sync::atomic::Ordering::Relaxed);
        entry.nic_tap.store(
            vm_cfg.net.as_ref().is_some_and(|n| !n.hub),
            std::sync::atomic::Ordering::Relaxed,
        );
        entry.trace.mark("lifecycle");
        let launched = self.launch_vm(&entry, &vm_cfg, launch, guest_net).await;
        entry.trace.mark("vm-launched");
        let (vm, channel, release) = match launched {
            Ok(l) => l,
            Err((message, release)) => {
                self.release(release);
                self.finish_after_release(&entry, SandboxStatus::Failed, None, Some(message))
                    .await;
                return;
            }
        };
        let vm: Arc<dyn Vm> = Arc::from(vm);
        *lock(&entry.vm) = Some(vm.clone());
        let (outcome, polite) = self
            .drive(&entry, vm.as_ref(), exec, &mut ctl, started, channel)
            .await;
        self.teardown(&entry, vm.as_ref(), outcome, polite, release)
            .await;
    }

    /// The lifecycle of a sandbox that migrated here: its guest already runs
    /// `session` on `conn`; the output log continues where the source left it.
    pub(crate) async fn lifecycle_adopted(
        &self,
        entry: Arc<Entry>,
        vm: Arc<dyn Vm>,
        conn: Arc<GuestConn>,
        session: Session,
        mut ctl: mpsc::Receiver<Control>,
        release: Option<String>,
    ) {
        let mut polite = true;
        let log_path = entry.dir.join("output.log");
        let outcome = match OutputLog::open_append(
            &log_path,
            entry.written.clone(),
            self.inner.cfg.max_log_bytes,
        )
        .await
        {
            Ok(log) => {
                self.run_workload(
                    &entry,
                    vm.as_ref(),
                    conn,
                    session,
                    log,
                    &mut ctl,
                    &mut polite,
                    None,
                )
                .await
            }
            Err(e) => (
                SandboxStatus::Failed,
                None,
                Some(format!("cannot open {}: {e}", log_path.display())),
            ),
        };
        self.teardown(&entry, vm.as_ref(), outcome, polite, release)
            .await;
    }

    /// Tear down: ask the guest to power off (unless told to kill, or it is
    /// unresponsive), then make sure the VMM is gone, release what the launch
    /// held, and record the outcome.
    async fn teardown(
        &self,
        entry: &Arc<Entry>,
        vm: &dyn Vm,
        outcome: Outcome,
        polite: bool,
        release: Option<String>,
    ) {
        // why: saved before the VM is shut down: a hearthd that dies from here on
        // finds the outcome on restart instead of a VM that is gone (`lost`).
        let saved = SavedOutcome::new(outcome.0, outcome.1, outcome.2.clone());
        if let Err(e) = saved.store(&entry.dir) {
            tracing::warn!(sandbox = %vm.id(), "cannot save outcome.json, a hearthd restart during the teardown would report the sandbox lost: {e}");
        }
        *lock(&entry.vm) = None;
        let conn = lock(&entry.conn).take();
        let mut gone = false;
        if let (Some(conn), true) = (conn, polite) {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.shutdown()).await;
            gone = tokio::time::timeout(POWEROFF_GRACE, vm.wait())
                .await
                .is_ok();
        }
        if !gone {
            let _ = vm.kill().await;
            let _ = vm.wait().await;
        }
        lock(&entry.execs).clear();
        *lock(&entry.main_input) = None;
        *lock(&entry.control) = None;
        *lock(&entry.chan_fd) = None;
        self.release(release);
        let (status, exit, error) = outcome;
        if status == SandboxStatus::Failed {
            tracing::warn!(sandbox = %vm.id(), "failed: {}", error.as_deref().unwrap_or(""));
        }
        self.finish_after_release(entry, status, exit, error).await;
    }

    /// [`Agent::finish`], once the pool VM network a `--network none` start
    /// gives back (`Entry::releasing`) is gone: a client that saw the sandbox
    /// end finds nothing of it left.
    pub(crate) async fn finish_after_release(
        &self,
        entry: &Entry,
        status: SandboxStatus,
        exit: Option<ExitInfo>,
        error: Option<String>,
    ) {
        entry.released().await;
        self.finish(entry, status, exit, error);
    }

    pub(crate) fn finish(
        &self,
        entry: &Entry,
        status: SandboxStatus,
        exit: Option<ExitInfo>,
        error: Option<String>,
    ) {
        // why: an end is shown even when it cannot be saved (see `Entry::update`, which logs it).
        let _ = entry.update(|r| {
            r.status = status;
            r.exit = exit;
            r.error = error;
            r.finished_ms = Some(now_ms());
        });
        SavedOutcome::clear(&entry.dir);
        entry.finished.send_replace(true);
    }

    /// Boots the guest, runs the workload and returns how it ended, and
    /// whether the guest may be asked to power off (false: kill it).
    async fn drive(
        &self,
        entry: &Arc<Entry>,
        vm: &dyn Vm,
        exec: GuestExec,
        ctl: &mut mpsc::Receiver<Control>,
        started: Instant,
        channel: Option<RestoredChannel>,
    ) -> (Outcome, bool) {
        let mut polite = true;
        let outcome = self
            .drive_inner(entry, vm, exec, ctl, started, channel, &mut polite)
            .await;
        (outcome, polite)
    }

    #[allow(clippy::too_many_arguments)]
    async fn drive_inner(
        &self,
        entry: &Arc<Entry>,
        vm: &dyn Vm,
        exec: GuestExec,
        ctl: &mut mpsc::Receiver<Control>,
        started: Instant,
        channel: Option<RestoredChannel>,
        polite: &mut bool,
    ) -> Outcome {
        let failed = |m: String| (SandboxStatus::Failed, None, Some(m));
        let console = |vm: &dyn Vm| console_tail(&vm.console_log());
        let vm_exit = vm.wait();
        tokio::pin!(vm_exit);

        let boot = async {
            if let Some(ch) = channel {
                // why: a migration's switch-over reads the socket's queue.
                *lock(&entry.chan_fd) = match &ch.link {
                    GuestLink::Stream(stream) => stream_fd(stream),
                    GuestLink::Conn(_, fd) => fd.as_ref().and_then(|f| f.try_clone().ok()),
                };
                // why: for a guest that guards restores, a new workload is queued
                // right behind `Restored`, before the resume: the guest applies
                // `Restored` first (it reads nothing else before) and refuses the
                // exec if that failed, so the exec needs no extra round trip.
                // Other guests get it after the ack (`wake_restored` decides).
                let pipelined = ch.attach.is_none().then_some(&exec);
                // why: a workload queued behind `Restored` has its session id
                // now, so its takeover record is saved (two fsyncs) while the
                // guest applies `Restored`, not after; it only matters once the
                // record says running, which is saved after the ack.
                let save = |session: Option<u32>| async move {
                    let session = session?;
                    let rec = self.workload_record(entry, session, exec.stdin, 0);
                    let dir = entry.dir.clone();
                    Some(
                        tokio::task::spawn_blocking(move || rec.store(&dir))
                            .await
                            .map_err(std::io::Error::other)
                            .and_then(|r| r),
                    )
                };
                return self
                    .wake_restored(vm, ch, pipelined, &entry.trace, save)
                    .await;
            }
            let stream = vm.connect_agent().await.map_err(|e| e.to_string())?;
            *lock(&entry.chan_fd) = stream_fd(&stream);
            vm.start().await.map_err(|e| e.to_string())?;
            GuestConn::handshake(stream, HELLO_TIMEOUT)
                .await
                .map(|c| (c, None, 0, None))
                .map_err(|e| e.to_string())
        };
        let (conn, attached, base, saved) = tokio::select! {
            r = boot => match r {
                Ok(c) => c,
                Err(e) => return failed(format!("guest did not start: {e}{}", console(vm))),
            },
            x = &mut vm_exit => return failed(format!("VM exited during boot ({}){}", describe_exit(x), console(vm))),
            c = ctl.recv() => {
                let _ = vm.kill().await;
                return match c {
                    Some(Control::Migrate(job)) => {
                        entry.migrating_out.store(false, std::sync::atomic::Ordering::Relaxed);
                        job.refuse("the sandbox was still booting");
                        (SandboxStatus::Stopped, None, None)
                    }
                    Some(_) => (SandboxStatus::Stopped, None, None),
                    None => failed("agent shut down during boot".into()),
                };
            }
        };
        let boot_ms = started.elapsed().as_millis() as u64;
        entry.trace.mark("guest-ready");
        let session = match attached {
            Some(s) => s,
            None => match conn.exec(&exec).await {
                Ok(s) => s,
                Err(e) => return failed(format!("cannot start the workload: {e}")),
            },
        };
        entry.trace.mark("exec-sent");
        *lock(&entry.main_session) = Some(session.id());
        *lock(&entry.conn) = Some(conn.clone());
        entry
            .stdin_open
            .store(exec.stdin, std::sync::atomic::Ordering::Relaxed);
        *lock(&entry.main_input) = Some(session.input());
        let log_path = entry.dir.join("output.log");
        let log = match OutputLog::create(
            &log_path,
            entry.written.clone(),
            self.inner.cfg.max_log_bytes,
        )
        .await
        {
            Ok(l) => l,
            Err(e) => return failed(format!("cannot create {}: {e}", log_path.display())),
        };
        // why: written before the status says running, so a hearthd that dies
        // at any point after that can take the sandbox over (already saved
        // during the ack when the exec was queued behind `Restored`).
        let stored = match saved {
            Some(r) => r,
            None => self
                .workload_record(entry, session.id(), exec.stdin, base)
                .store(&entry.dir),
        };
        if let Err(e) = stored {
            return failed(format!(
                "cannot save {}: {e}; without it a hearthd restart could not take the sandbox over",
                entry.dir.join("workload.json").display()
            ));
        }
        entry.trace.mark("workload-saved");
        // why: saved (one fsync) while the workload's first output is relayed,
        // not before it. The status shows `running` only once saved, as every
        // status; the workload already runs in the guest either way (its exec
        // went with `Restored`), and a crash before the save finds the record
        // `creating` and stops the VM (`lost`), as it did before, only that its
        // first output may have been seen. `run_workload` waits for the save
        // before any later change of the record (stop, migrate, the end).
        let e2 = entry.clone();
        let saving = tokio::task::spawn_blocking(move || {
            running_save_hold();
            let started = now_ms();
            // why: a brief failure (a full disk being freed, an I/O hiccup)
            // must not end a workload that already runs: three tries, 200 ms
            // apart, before the start fails.
            let mut saved = Ok(());
            for attempt in 0..3 {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_millis(200));
                }
                saved = e2.update(|r| {
                    r.status = SandboxStatus::Running;
                    r.started_ms = Some(started);
                    r.boot_ms = Some(boot_ms);
                });
                if saved.is_ok() {
                    break;
                }
            }
            e2.trace.mark("running-saved");
            saved
        });
        tracing::info!(sandbox = %entry.snapshot().id, boot_ms, "workload started");
        self.run_workload(
            entry,
            vm,
            conn,
            session,
            log,
            ctl,
            polite,
            Some((started, saving)),
        )
        .await
    }

    /// The takeover record of `entry`'s main workload, session `session`.
    fn workload_record(
        &self,
        entry: &Entry,
        session: u32,
        stdin: bool,
        base: u64,
    ) -> WorkloadRecord {
        WorkloadRecord {
            nic: entry.nic.load(std::sync::atomic::Ordering::Relaxed),
            nic_mode: entry.nic_mode(),
            ..WorkloadRecord::new(session, stdin, base)
        }
    }

    /// Relays the main workload's output to its log until it ends, serving
    /// stop/kill/migrate requests and the guest watchdog. With `started` (a
    /// new start: when it began, and the save of its `running` record), logs
    /// the time to the first output, and serves control requests only once
    /// the record is saved.
    #[allow(clippy::too_many_arguments)]
    async fn run_workload(
        &self,
        entry: &Arc<Entry>,
        vm: &dyn Vm,
        conn: Arc<GuestConn>,
        mut session: Session,
        mut log: OutputLog,
        ctl: &mut mpsc::Receiver<Control>,
        polite: &mut bool,
        started: Option<(Instant, tokio::task::JoinHandle<std::io::Result<()>>)>,
    ) -> Outcome {
        let (started, mut saving) = match started {
            Some((t0, save)) => (Some(t0), Some(save)),
            None => (None, None),
        };
        let failed = |m: String| (SandboxStatus::Failed, None, Some(m));
        let console = |vm: &dyn Vm| console_tail(&vm.console_log());
        let log_path = entry.dir.join("output.log");
        let vm_exit = vm.wait();
        tokio::pin!(vm_exit);
        *lock(&entry.main_session) = Some(session.id());
        *lock(&entry.conn) = Some(conn.clone());
        *lock(&entry.main_input) = Some(session.input());
        let input = session.input();
        // why: an Exit the guest sends while no hearthd listens is replayed to the
        // next one; it is acknowledged only by powering the guest off.
        session.defer_exit_ack();
        let mut first_output = started.is_some();
        // The first output came before the `running` save ended: the start's
        // timeline is logged when it ends.
        let mut timeline_due = false;
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        let wd = self.inner.cfg.guest_watchdog;
        let watchdog = async {
            if wd.is_zero() {
                return std::future::pending::<String>().await;
            }
            loop {
                tokio::time::sleep(wd / 3).await;
                // why: a VM a migration paused does not answer and is not
                // hung: the source's after the switch-over, or a migrated-in
                // copy whose resume failed after the commit (killing it
                // would lose the only copy; a re-adoption resumes it).
                if entry
                    .migration_paused
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    continue;
                }
                match tokio::time::timeout(wd, conn.ping(wd)).await {
                    Ok(Ok(())) => continue,
                    // why: pings fail while the channel is frozen for a migration's switch-over.
                    Ok(Err(crate::GuestError::Frozen)) => continue,
                    _ => {
                        return format!(
                            "guest agent did not answer a ping within {}s; the guest is hung",
                            wd.as_secs_f32()
                        )
                    }
                }
            }
        };
        tokio::pin!(watchdog);
        // An event the migration took off the session and handed back.
        let mut pending: Option<Option<SessionEvent>> = None;
        let outcome = loop {
            let deadline = async {
                match stop_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let save_pending = saving.is_some();
            let saved = async {
                match saving.as_mut() {
                    Some(save) => match save.await {
                        Ok(r) => r,
                        Err(e) => Err(std::io::Error::other(format!("the save panicked: {e}"))),
                    },
                    None => std::future::pending().await,
                }
            };
            let ev = if let Some(ev) = pending.take() {
                Some(ev)
            } else {
                tokio::select! {
                    ev = session.next() => Some(ev),
                    r = saved => {
                        saving = None;
                        if std::mem::take(&mut timeline_due) {
                            entry.trace.log(&entry.snapshot().id);
                        }
                        // why: its status stays `creating` (`Entry::update` shows
                        // no record it could not save), and a restart would stop
                        // the VM as one still being created: the start fails now.
                        if let Err(e) = r {
                            *polite = false;
                            break failed(format!(
                                "cannot save the record of sandbox {} as running in {} ({e}); the workload was stopped; free space there and start it again",
                                entry.snapshot().id,
                                entry.dir.display()
                            ));
                        }
                        None
                    }
                    x = &mut vm_exit => break failed(format!("VM exited unexpectedly ({}){}", describe_exit(x), console(vm))),
                    c = ctl.recv(), if !save_pending => match c {
                        Some(Control::Stop { grace }) => {
                            let _ = tokio::time::timeout(Duration::from_secs(1), input.signal(libc::SIGTERM)).await;
                            stop_deadline = Some(tokio::time::Instant::now() + grace);
                            None
                        }
                        Some(Control::Migrate(job)) => {
                            match crate::migration::run_source(self, entry, vm, &conn, &mut session, &mut log, *job).await {
                                crate::migration::SourceEnd::StayedHere(ev) => {
                                    pending = ev;
                                    None
                                }
                                crate::migration::SourceEnd::Moved(node) => {
                                    *polite = false;
                                    break (SandboxStatus::Stopped, None, Some(format!("migrated to {node}")));
                                }
                            }
                        }
                        Some(Control::Kill) | None => {
                            *polite = false;
                            break (SandboxStatus::Stopped, None, None);
                        }
                    },
                    _ = deadline => break (SandboxStatus::Stopped, None, None),
                    msg = &mut watchdog => {
                        *polite = false;
                        let _ = vm.kill().await;
                        break failed(format!("{msg}{}", console(vm)));
                    }
                }
            };
            let Some(ev) = ev else { continue };
            let rec = match ev {
                Some(SessionEvent::Stdout(b)) => Record::Stdout(b),
                Some(SessionEvent::Stderr(b)) => Record::Stderr(b),
                Some(SessionEvent::Started(_)) => continue,
                Some(SessionEvent::Exit(st)) => {
                    let exit = ExitInfo {
                        code: st.shell_code(),
                        signal: st.signal,
                    };
                    let status = if stop_deadline.is_some() {
                        SandboxStatus::Stopped
                    } else {
                        SandboxStatus::Exited
                    };
                    break (status, Some(exit), None);
                }
                Some(SessionEvent::Failed(m)) => {
                    break exit_or(&mut vm_exit, format!("workload failed: {m}"), vm).await
                }
                None => break exit_or(&mut vm_exit, "guest channel closed".into(), vm).await,
            };
            if std::mem::take(&mut first_output) {
                if let Some(t0) = started {
                    entry.trace.mark("first-output");
                    // why: logged once the `running` record is saved too, so
                    // the timeline always has that step.
                    if saving.is_some() {
                        timeline_due = true;
                    } else {
                        entry.trace.log(&entry.snapshot().id);
                    }
                    tracing::info!(sandbox = %entry.snapshot().id, ms = t0.elapsed().as_millis() as u64, "first output");
                }
            }
            if let Err(e) = log.append(&rec).await {
                break failed(format!(
                    "cannot write output log {}: {e}",
                    log_path.display()
                ));
            }
        };
        if let Some(save) = saving.take() {
            // why: the workload ended anyway; the end's own save follows.
            let _ = save.await;
        }
        if timeline_due {
            entry.trace.log(&entry.snapshot().id);
        }
        let _ = log.flush().await;
        outcome
    }

    /// Streams the main workload's output log. With `follow`, waits for more
    /// until the sandbox ends.
    pub fn follow_output(&self, id_or_name: &str) -> Result<(Sandbox, LogFollower), AgentError> {
        let e = self.entry(id_or_name)?;
        let f = LogFollower::new(
            e.dir.join("output.log"),
            e.written.subscribe(),
            e.finished.subscribe(),
        );
        Ok((e.view(), f))
    }

    /// Waits until the sandbox reaches a terminal status.
    pub async fn wait(&self, id_or_name: &str) -> Result<Sandbox, AgentError> {
        let e = self.entry(id_or_name)?;
        let mut fin = e.finished.subscribe();
        let _ = fin.wait_for(|f| *f).await;
        Ok(e.snapshot())
    }

    /// Waits until the sandbox has left `creating` (running, or ended) and returns it.
    pub(crate) async fn wait_started(&self, id: &str) -> Result<Sandbox, AgentError> {
        let e = self.entry(id)?;
        e.left_creating().await;
        Ok(e.view())
    }

    /// Waits until the sandbox is running (or ended), then returns its stdin.
    pub async fn main_stdin(&self, id_or_name: &str) -> Result<SessionInput, AgentError> {
        let e = self.settled_entry(id_or_name).await?;
        e.left_creating().await;
        let rec = e.snapshot();
        let input = lock(&e.main_input)
            .clone()
            .filter(|_| e.stdin_open.load(std::sync::atomic::Ordering::Relaxed));
        input.ok_or_else(|| {
            AgentError::Conflict(if rec.status.is_terminal() {
                format!(
                    "sandbox '{}' is {:?}; its stdin is closed",
                    rec.id, rec.status
                )
            } else {
                format!(
                    "sandbox '{}' was created without stdin; create it with stdin (hearth run -i)",
                    rec.id
                )
            })
        })
    }

    /// Sends a signal to the main workload (its process group).
    pub async fn signal(&self, id_or_name: &str, signal: i32) -> Result<(), AgentError> {
        if !(1..=64).contains(&signal) {
            return Err(AgentError::InvalidArgument(format!(
                "signal {signal} is out of range: give 1..=64"
            )));
        }
        let e = self.running_entry(id_or_name).await?;
        let input = lock(&e.main_input).clone();
        let rec = e.snapshot();
        match input {
            Some(i) if rec.status == SandboxStatus::Running => {
                i.signal(signal).await.map_err(|err| AgentError::VmFailed {
                    id: rec.id.clone(),
                    message: format!("cannot deliver signal {signal}: {err}"),
                })
            }
            _ => Err(AgentError::Conflict(format!(
                "sandbox '{}' is {:?}, not running; nothing to signal",
                rec.id, rec.status
            ))),
        }
    }

    /// Stops a running sandbox: SIGTERM, then power off after `grace`.
    pub async fn stop(&self, id_or_name: &str, grace: Duration) -> Result<Sandbox, AgentError> {
        let e = self.settled_entry(id_or_name).await?;
        let ctl = lock(&e.control).clone();
        if let Some(ctl) = ctl {
            let msg = if grace.is_zero() {
                Control::Kill
            } else {
                Control::Stop { grace }
            };
            let _ = ctl.send(msg).await;
            let mut fin = e.finished.subscribe();
            let _ = fin.wait_for(|f| *f).await;
        }
        Ok(e.snapshot())
    }

    /// Removes a sandbox and everything it left on disk. A running one is
    /// refused unless `force`, which kills it first.
    pub async fn remove(&self, id_or_name: &str, force: bool) -> Result<(), AgentError> {
        let e = self.settled_entry(id_or_name).await?;
        let rec = e.snapshot();
        if !rec.status.is_terminal() {
            if !force {
                return Err(AgentError::Conflict(format!(
                    "sandbox '{}' is {:?}; stop it first (`hearth stop {}`) or force removal with `hearth rm -f`",
                    rec.id, rec.status, rec.id
                )));
            }
            self.stop(&rec.id, Duration::ZERO).await?;
        }
        // Never forget a VM that still runs: kill it, or refuse to remove.
        let vm_dir = e.dir.join("vm");
        if hearth_vmm::is_alive(&vm_dir) {
            hearth_vmm::kill_recorded(&vm_dir, Duration::from_secs(10)).map_err(|err| {
                AgentError::Conflict(format!(
                    "sandbox '{}': its VM is still running and could not be stopped ({err}); retry `hearth rm -f {}`",
                    rec.id, rec.id
                ))
            })?;
        }
        if let Err(err) = hearth_vmm::destroy(&vm_dir) {
            tracing::warn!(sandbox = %rec.id, "cleaning up the VM dir: {err}");
        }
        if let Some(net) = self.inner.net.clone() {
            // why: only a networked sandbox holds a lease; `--network none` costs no commit.
            let leased = net.leases().contains_key(&rec.id);
            let id = rec.id.clone();
            tokio::task::spawn_blocking(move || net.teardown(&id))
                .await
                .map_err(|e| AgentError::Config(format!("network teardown panicked: {e}")))??;
            if leased {
                self.release_lease(&e.dir, &rec.id).await;
            }
        }
        std::fs::remove_dir_all(&e.dir)
            .or_else(|err| {
                if err.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(err)
                }
            })
            .map_err(io_err(format!("remove {}", e.dir.display())))?;
        lock(&self.inner.sandboxes).remove(&rec.id);
        if let (Some(StartPath::Snapshot), Some(from)) = (rec.start_path, &rec.started_from) {
            self.remove_fork_snapshot_if_unused(from).await;
        }
        Ok(())
    }

    /// Starts another process in a running sandbox. Returns its exec id and
    /// session; stdin (when asked for) is reachable with [`Agent::exec_stdin`].
    pub async fn exec(
        &self,
        id_or_name: &str,
        req: hearth_api::ExecRequest,
    ) -> Result<(u32, Session), AgentError> {
        let e = self.running_entry(id_or_name).await?;
        let rec = e.snapshot();
        if rec.status != SandboxStatus::Running || lock(&e.conn).is_none() {
            return Err(AgentError::Conflict(format!(
                "sandbox '{}' is {:?}, not running; exec needs a running sandbox",
                rec.id, rec.status
            )));
        }
        if req.cmd.is_empty() {
            return Err(AgentError::InvalidArgument(
                "exec needs a command: hearth exec SANDBOX -- CMD [ARGS...]".into(),
            ));
        }
        let images = self.inner.images.clone();
        let digest = rec.image_digest.clone();
        let image = tokio::task::spawn_blocking(move || images.resolve(&digest))
            .await
            .map_err(|e| AgentError::Config(format!("image lookup panicked: {e}")))??;
        let guest = GuestExec {
            argv: req.cmd.clone(),
            env: merge_env(&image.config.env, &req.env),
            workdir: req
                .workdir
                .clone()
                .unwrap_or_else(|| default_workdir(&image.config.working_dir)),
            user: req
                .user
                .clone()
                .unwrap_or_else(|| image.config.user.clone()),
            stdin: req.stdin,
        };
        // why: a snapshot freezes the guest's processes and pauses the VM while
        // it saves (holding `exec_gate` until the thaw); an exec started in that
        // window would run unfrozen inside the snapshot, so it waits for the
        // thaw (bounded; not for the rest of the save, e.g. a RAM conversion),
        // and then sees the sandbox as it is after the snapshot.
        let Ok(saving) = tokio::time::timeout(EXEC_SNAPSHOT_WAIT, e.exec_gate.lock()).await else {
            return Err(AgentError::Conflict(format!(
                "sandbox '{}' is being snapshotted (waited {}s); retry the exec when the snapshot is done",
                rec.id,
                EXEC_SNAPSHOT_WAIT.as_secs()
            )));
        };
        let rec = e.snapshot();
        let conn = lock(&e.conn).clone();
        let Some(conn) = conn.filter(|_| rec.status == SandboxStatus::Running) else {
            return Err(AgentError::Conflict(format!(
                "sandbox '{}' is {:?} after the snapshot it waited for, not running; exec needs a running sandbox",
                rec.id, rec.status
            )));
        };
        let session = conn
            .exec(&guest)
            .await
            .map_err(|err| AgentError::VmFailed {
                id: rec.id.clone(),
                message: format!("exec failed: {err}"),
            })?;
        drop(saving);
        let exec_id = e
            .next_exec
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if req.stdin {
            lock(&e.execs).insert(exec_id, session.input());
        }
        Ok((exec_id, session))
    }

    /// The stdin of an exec session.
    pub fn exec_stdin(&self, id_or_name: &str, exec: u32) -> Result<SessionInput, AgentError> {
        let e = self.entry(id_or_name)?;
        let input = lock(&e.execs).get(&exec).cloned();
        input.ok_or_else(|| AgentError::ExecNotFound {
            sandbox: id_or_name.into(),
            exec,
        })
    }

    /// Forgets an exec session once its stream ended.
    pub fn exec_done(&self, id_or_name: &str, exec: u32) {
        if let Ok(e) = self.entry(id_or_name) {
            lock(&e.execs).remove(&exec);
        }
    }

    /// Imports an image from a path on this host.
    pub async fn import_image(&self, name: &str, path: &Path) -> Result<Image, AgentError> {
        let images = self.inner.images.clone();
        let (name, path) = (name.to_string(), path.to_path_buf());
        let rec = tokio::task::spawn_blocking(move || images.import(&name, &path, &|_| {}))
            .await
            .map_err(|e| AgentError::Config(format!("image import panicked: {e}")))??;
        Ok(to_api_image(rec))
    }

    pub async fn list_images(&self) -> Result<Vec<Image>, AgentError> {
        let images = self.inner.images.clone();
        let v = tokio::task::spawn_blocking(move || images.list())
            .await
            .map_err(|e| AgentError::Config(format!("image list panicked: {e}")))??;
        Ok(v.into_iter().map(to_api_image).collect())
    }

    pub async fn remove_image(&self, reference: &str) -> Result<(), AgentError> {
        let images = self.inner.images.clone();
        let r = reference.to_string();
        tokio::task::spawn_blocking(move || images.remove(&r))
            .await
            .map_err(|e| AgentError::Config(format!("image remove panicked: {e}")))??;
        Ok(())
    }

    /// Counts of sandboxes per status, for metrics.
    pub fn status_counts(&self) -> Vec<(SandboxStatus, usize)> {
        let mut m: HashMap<SandboxStatus, usize> = HashMap::new();
        for e in lock(&self.inner.sandboxes).values() {
            *m.entry(lock(&e.record).status).or_default() += 1;
        }
        m.into_iter().collect()
    }
}

pub(crate) fn to_api_image(r: ImageRecord) -> Image {
    Image {
        name: r.name,
        digest: r.digest,
        size_bytes: r.size_bytes,
        created_unix: r.created_unix,
        config: hearth_api::ImageConfig {
            entrypoint: r.config.entrypoint,
            cmd: r.config.cmd,
            env: r.config.env,
            working_dir: r.config.working_dir,
            user: r.config.user,
        },
    }
}

fn default_workdir(w: &str) -> String {
    if w.is_empty() {
        "/".into()
    } else {
        w.into()
    }
}

/// Image env, then request env; a later KEY replaces an earlier one in place.
fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let mut out: Vec<String> = base.to_vec();
    for kv in over {
        let key = kv.split('=').next().unwrap_or("");
        match out
            .iter_mut()
            .find(|e| e.split('=').next().unwrap_or("") == key)
        {
            Some(slot) => *slot = kv.clone(),
            None => out.push(kv.clone()),
        }
    }
    out
}

/// Docker's rules: an entrypoint given in the request drops the image's Cmd.
pub(crate) fn plan_exec(req: &CreateSandbox, image: &ImageRecord) -> Result<GuestExec, AgentError> {
    let entrypoint = req
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.config.entrypoint.clone());
    let cmd = match (&req.cmd, &req.entrypoint) {
        (Some(c), _) => c.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => image.config.cmd.clone(),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(AgentError::NoCommand(req.image.clone()));
    }
    Ok(GuestExec {
        argv,
        env: merge_env(&image.config.env, &req.env),
        workdir: req
            .workdir
            .clone()
            .unwrap_or_else(|| default_workdir(&image.config.working_dir)),
        user: req
            .user
            .clone()
            .unwrap_or_else(|| image.config.user.clone()),
        stdin: req.stdin,
    })
}

/// A duplicate of a stream's socket (for queue-length ioctls).
pub(crate) fn stream_fd(s: &tokio::net::UnixStream) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    s.as_fd().try_clone_to_owned().ok()
}

/// When the guest channel fails, the VM has usually just died: prefer saying so.
async fn exit_or<F, T, E>(
    vm_exit: &mut std::pin::Pin<&mut F>,
    otherwise: String,
    vm: &dyn Vm,
) -> Outcome
where
    F: std::future::Future<Output = Result<T, E>>,
    T: std::fmt::Debug,
    E: std::fmt::Display,
{
    let msg = match tokio::time::timeout(Duration::from_secs(2), vm_exit.as_mut()).await {
        Ok(x) => format!("VM exited unexpectedly ({})", describe_exit(x)),
        Err(_) => otherwise,
    };
    (
        SandboxStatus::Failed,
        None,
        Some(format!("{msg}{}", console_tail(&vm.console_log()))),
    )
}

fn describe_exit<E: std::fmt::Display, T: std::fmt::Debug>(x: Result<T, E>) -> String {
    match x {
        Ok(v) => format!("{v:?}"),
        Err(e) => e.to_string(),
    }
}

/// The last lines of the guest console, to explain a crash (reads only the
/// file's tail: the console is guest-controlled and may be huge).
pub(crate) fn console_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX: u64 = 8 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut data = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut data);
    let text = String::from_utf8_lossy(&data);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(15)..];
    format!("; guest console ({}):\n{}", path.display(), tail.join("\n"))
}

/// The network device of a VM from the mode its saved state needs (`nic`;
/// `None`: a cold boot) and the sandbox's network (see `Agent::vm_config`).
fn nic_device(
    id: &str,
    nic: Option<crate::restore::NicMode>,
    net: Option<&hearth_net::SandboxNet>,
) -> Result<Option<NetDevice>, AgentError> {
    use crate::restore::NicMode;
    Ok(match (nic, net) {
        (None, None) => None,
        (None | Some(NicMode::Tap), Some(n)) => Some(NetDevice {
            tap: Some(n.tap.clone()),
            mac: n.mac_string(),
            hub: false,
        }),
        // why: refused before this for snapshots (`create_from_snapshot_with`);
        // a device on a tap that does not exist cannot be built.
        (Some(NicMode::Tap), None) => {
            return Err(AgentError::InvalidArgument(format!(
                "sandbox '{id}': its saved state has its network device directly on a tap, but the sandbox has no network; start it with a network"
            )))
        }
        (Some(NicMode::Hub), net) => Some(NetDevice {
            tap: net.map(|n| n.tap.clone()),
            mac: net
                .map(|n| n.mac_string())
                .unwrap_or_else(|| crate::restore::TEMPLATE_MAC.to_string()),
            hub: true,
        }),
    })
}

/// A real agent for tests (no network, TCG forced, so nothing boots) on a
/// temp data dir (`dir/data`); the guest files only have to exist.
#[cfg(test)]
pub(crate) async fn agent_for_test(dir: &Path) -> Agent {
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initrd"));
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&initrd, b"i").unwrap();
    Agent::start(crate::AgentConfig {
        data_dir: dir.join("data"),
        kernel,
        initrd,
        qemu: "qemu-system-x86_64".into(),
        qemu_img: "qemu-img".into(),
        accel: hearth_vmm::AccelChoice::Tcg,
        node: "n2".into(),
        image_limits: Default::default(),
        insecure_registries: Vec::new(),
        registry_timeout: Duration::from_secs(5),
        guest_watchdog: Duration::ZERO,
        max_log_bytes: 1 << 20,
        net: None,
        leases: None,
    })
    .await
    .expect("agent starts")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creating_entry(dir: &Path) -> Entry {
        Entry::new(
            dir.to_path_buf(),
            Sandbox {
                id: "sb".into(),
                name: None,
                image: "busybox".into(),
                image_digest: "sha256:0".into(),
                status: SandboxStatus::Creating,
                exit: None,
                error: None,
                cpus: 1,
                memory_mib: 128,
                argv: vec!["true".into()],
                node: "n1".into(),
                accel: "tcg".into(),
                created_ms: 0,
                started_ms: None,
                finished_ms: None,
                boot_ms: None,
                network: None,
                start_path: None,
                start_note: None,
                started_from: None,
                owner: None,
            },
        )
    }

    #[tokio::test]
    async fn running_requests_wait_for_a_started_workloads_running_save() {
        let dir = tempfile::tempdir().unwrap();
        let e = creating_entry(dir.path());
        // Still booting (no workload session): no wait, the caller answers 409.
        tokio::time::timeout(
            Duration::from_secs(5),
            e.running_saved(Duration::from_secs(60)),
        )
        .await
        .expect("no wait while the workload has not started");
        // Started, `running` not saved yet: waits, and ends with the save.
        *lock(&e.main_session) = Some(1);
        let wait = e.running_saved(Duration::from_secs(60));
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut wait)
                .await
                .is_err(),
            "returned while the status was still creating"
        );
        e.update(|r| r.status = SandboxStatus::Running)
            .expect("save the record");
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("still waiting after the running record was saved");
        assert_eq!(e.snapshot().status, SandboxStatus::Running);
        // A save that never ends: the wait is bounded.
        let stuck = creating_entry(dir.path());
        *lock(&stuck.main_session) = Some(1);
        tokio::time::timeout(
            Duration::from_secs(5),
            stuck.running_saved(Duration::from_millis(50)),
        )
        .await
        .expect("the wait is bounded");
    }

    #[test]
    fn a_record_change_that_cannot_be_saved_is_not_shown_unless_it_is_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let sb = dir.path().join("sb");
        std::fs::create_dir(&sb).unwrap();
        let e = creating_entry(&sb);
        let status = e.status.subscribe();
        // The save fails (its directory is gone, as on a full or broken disk).
        std::fs::remove_dir(&sb).unwrap();
        let err = e.update(|r| {
            r.status = SandboxStatus::Running;
            r.started_ms = Some(1);
        });
        assert!(err.is_err(), "a save into a missing directory succeeded");
        let shown = e.snapshot();
        assert_eq!(
            shown.status,
            SandboxStatus::Creating,
            "shown unsaved: {shown:?}"
        );
        assert_eq!(shown.started_ms, None);
        assert_eq!(*status.borrow(), SandboxStatus::Creating);
        assert!(
            !status.has_changed().unwrap(),
            "status watchers were told an unsaved status"
        );
        // The end is shown all the same, saying that it was not saved.
        let err = e.update(|r| {
            r.status = SandboxStatus::Exited;
            r.error = Some("boom".into());
        });
        assert!(err.is_err());
        let shown = e.snapshot();
        assert_eq!(shown.status, SandboxStatus::Exited);
        let msg = shown.error.unwrap_or_default();
        assert!(
            msg.starts_with("boom; its record could not be saved in") && msg.contains("lost"),
            "{msg}"
        );
        assert_eq!(*status.borrow(), SandboxStatus::Exited);
        // Saved again once the directory is back; what is shown is what is on disk.
        std::fs::create_dir(&sb).unwrap();
        e.update(|r| r.error = None).expect("save the record");
        let on_disk: Sandbox =
            serde_json::from_slice(&std::fs::read(sb.join("sandbox.json")).unwrap()).unwrap();
        assert_eq!(on_disk.status, e.snapshot().status);
        assert_eq!(on_disk.error, None);
    }

    #[test]
    fn request_env_overrides_image_env_in_place() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let over = vec!["A=2".to_string(), "B=3".to_string()];
        assert_eq!(merge_env(&base, &over), vec!["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn names_are_restricted_to_dns_like_labels() {
        assert!(valid_name("web-1"));
        assert!(!valid_name("-web"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }

    #[test]
    fn nic_device_follows_the_mode_table() {
        use crate::restore::NicMode;
        let net = hearth_net::SandboxNet {
            version: 1,
            sandbox: "sb".into(),
            tap: "htsb".into(),
            ip: std::net::Ipv4Addr::new(10, 0, 0, 2),
            mac: [2, 0, 0, 0, 0, 2],
            gateway: std::net::Ipv4Addr::new(10, 0, 0, 1),
            dns: vec![],
            policy: Default::default(),
            policy_version: 0,
        };
        let direct = Some(NetDevice {
            tap: Some("htsb".into()),
            mac: "02:00:00:00:00:02".into(),
            hub: false,
        });
        // Cold boots: a device only with a network, on its tap directly.
        assert_eq!(nic_device("sb", None, None).unwrap(), None);
        assert_eq!(nic_device("sb", None, Some(&net)).unwrap(), direct);
        // Tap-mode restores: on the tap again; without a tap: refused.
        assert_eq!(
            nic_device("sb", Some(NicMode::Tap), Some(&net)).unwrap(),
            direct
        );
        let err = nic_device("sb", Some(NicMode::Tap), None).unwrap_err();
        assert!(err.to_string().contains("directly on a tap"), "{err}");
        // Hub restores (templates, pools, hub snapshots): the tap joins hub 0,
        // or the device waits on the hub with the template MAC and no tap.
        assert_eq!(
            nic_device("sb", Some(NicMode::Hub), Some(&net)).unwrap(),
            Some(NetDevice {
                hub: true,
                ..direct.clone().unwrap()
            })
        );
        assert_eq!(
            nic_device("sb", Some(NicMode::Hub), None).unwrap(),
            Some(NetDevice {
                tap: None,
                mac: crate::restore::TEMPLATE_MAC.into(),
                hub: true,
            })
        );
    }
}
