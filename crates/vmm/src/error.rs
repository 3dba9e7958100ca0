//! The one error type of this crate. Every variant names the VM (id or
//! directory) or the path involved, and where there is one, what to do.

use std::path::PathBuf;
use std::time::Duration;

/// Failures of creating, driving, adopting and destroying VMs.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The QEMU system emulator is not installed or not where configured.
    #[error(
        "QEMU binary `{binary}` not found: run scripts/setup or `apt-get install qemu-system-x86`"
    )]
    QemuNotFound { binary: PathBuf },

    /// `qemu-img` (for the copy-on-write overlay) is not installed.
    #[error("`{binary}` not found: run scripts/setup or `apt-get install qemu-utils`")]
    QemuImgNotFound { binary: PathBuf },

    /// A boot artifact or the root filesystem does not exist.
    #[error(
        "VM {id}: {what} `{path}` does not exist (build the guest artifacts with scripts/setup)"
    )]
    MissingArtifact {
        id: String,
        what: &'static str,
        path: PathBuf,
    },

    /// The vCPU count is outside what this host allows.
    #[error("VM {id}: {cpus} vCPUs is outside the allowed range 1..={max} (4 per host CPU)")]
    InvalidCpus { id: String, cpus: u32, max: u32 },

    /// The memory size is outside what this host allows.
    #[error("VM {id}: {mib} MiB of memory is outside the allowed range {min}..={max} MiB (the host's MemTotal)")]
    InvalidMemory {
        id: String,
        mib: u32,
        min: u32,
        max: u64,
    },

    /// An exact RAM size that is not the memory size plus the pad this accelerator allows.
    #[error("VM {id}: {kib} KiB of RAM does not fit {mib} MiB (it must be {mib} MiB plus the TCG RAM pad of 8 KiB; under KVM also {mib} MiB flat): a VM restored from a template or snapshot made before the TCG RAM pad cannot migrate under TCG, recreate it")]
    InvalidRamSize { id: String, kib: u64, mib: u32 },

    /// The hostname cannot go on the kernel command line.
    #[error("VM {id}: hostname `{hostname}` is invalid: use 1-253 characters of a-z, A-Z, 0-9, '-' and '.'")]
    InvalidHostname { id: String, hostname: String },

    /// A network device directly on a tap (`hub: false`) without a tap.
    #[error("VM {id}: a network device directly on a tap needs a tap; give `tap` or put the device on the hub (`hub: true`)")]
    NetDeviceWithoutTap { id: String },

    /// The VM id is empty or would not be a safe file or log token.
    #[error("VM id `{id}` is invalid: use 1-64 characters of a-z, A-Z, 0-9, '-', '_' and '.'")]
    InvalidId { id: String },

    /// A path cannot be used in QEMU's option syntax or as a unix socket.
    #[error("VM {id}: path `{path}` cannot be used: {reason}")]
    InvalidPath {
        id: String,
        path: PathBuf,
        reason: &'static str,
    },

    /// The directory already holds a VM record; destroy it first.
    #[error("VM {id}: directory `{dir}` already holds a VM (vm.json exists); destroy it first")]
    DirInUse { id: String, dir: PathBuf },

    /// `qemu-img create` failed.
    #[error("VM {id}: creating the overlay `{overlay}` with qemu-img failed ({status}): {stderr}")]
    Overlay {
        id: String,
        overlay: PathBuf,
        status: String,
        stderr: String,
    },

    /// A process could not be started.
    #[error("VM {id}: could not start `{binary}`: {source}")]
    Spawn {
        id: String,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file operation on the VM's directory failed.
    #[error("{op} `{path}`: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// QEMU exited while we were waiting for it.
    #[error("VM {id}: QEMU exited ({exit}) while waiting for {awaited}; qemu.log ends with:\n{log_tail}")]
    QemuExited {
        id: String,
        exit: String,
        awaited: String,
        log_tail: String,
    },

    /// A bounded wait ran out.
    #[error("VM {id}: timed out after {after:?} waiting for {awaited}{}", log_suffix(.log_tail))]
    Timeout {
        id: String,
        awaited: String,
        after: Duration,
        log_tail: String,
    },

    /// QMP answered a command with an error.
    #[error("VM {id}: QMP `{command}` failed: {class}: {desc}")]
    Qmp {
        id: String,
        command: String,
        class: String,
        desc: String,
    },

    /// QMP said something this client cannot understand.
    #[error("VM {id}: QMP protocol error on `{socket}`: {detail}")]
    QmpProtocol {
        id: String,
        socket: PathBuf,
        detail: String,
    },

    /// The QMP connection closed (QEMU exited or dropped us).
    #[error(
        "VM {id}: QMP connection closed while waiting for {awaited} (did QEMU exit? see qemu.log)"
    )]
    QmpClosed { id: String, awaited: String },

    /// The recorded process no longer exists or is not ours any more.
    #[error("VM in `{dir}`: process {pid} is gone ({reason}); destroy the directory")]
    VmGone {
        dir: PathBuf,
        pid: u32,
        reason: String,
    },

    /// `vm.json` is missing or unreadable.
    #[error("VM record `{path}` is unreadable: {detail}")]
    BadRecord { path: PathBuf, detail: String },

    /// The record belongs to another backend.
    #[error("VM in `{dir}` was created by backend `{backend}`, not `{expected}`")]
    WrongBackend {
        dir: PathBuf,
        backend: String,
        expected: &'static str,
    },

    /// destroy was called while the VM's process still runs.
    #[error("VM {id} still runs as pid {pid}: kill or shut it down before destroy")]
    StillRunning { id: String, pid: u32 },

    /// destroy removed the VM's files but the directory holds others.
    #[error(
        "VM directory `{dir}` still holds files the VMM did not create: {leftover:?}; remove them"
    )]
    DirNotEmpty {
        dir: PathBuf,
        leftover: Vec<PathBuf>,
    },

    /// Sending a signal to the VMM process failed.
    #[error("VM {id}: signalling pid {pid} failed: {source}")]
    Signal {
        id: String,
        pid: u32,
        #[source]
        source: std::io::Error,
    },

    /// KVM was forced by configuration but cannot be used.
    #[error("accelerator kvm was forced but is unavailable: {reason}; use `auto` or `tcg`")]
    KvmUnavailable { reason: String },

    /// A live migration failed or was given up; the source VM runs on.
    #[error("VM {id}: migration failed, the VM keeps running here: {reason}")]
    MigrationFailed { id: String, reason: String },

    /// The backend cannot do this (yet).
    #[error("VM {id}: this backend does not support {what}")]
    Unsupported { id: String, what: &'static str },
    /// A snapshot's files are missing, truncated or corrupted.
    #[error("snapshot `{dir}` is unusable: {reason}")]
    SnapshotInvalid { dir: PathBuf, reason: String },

    /// A snapshot was made by another VMM, kernel or format than this host runs.
    #[error("snapshot `{dir}` was made with {what} {snapshot}, this host has {host}; recreate the snapshot")]
    SnapshotMismatch {
        dir: PathBuf,
        what: &'static str,
        snapshot: String,
        host: String,
    },

    /// Saving or loading VM state failed in the VMM.
    #[error("VM {id}: {op} failed: {detail}{}", log_suffix(.log_tail))]
    SnapshotFailed {
        id: String,
        op: &'static str,
        detail: String,
        log_tail: String,
    },

    /// An accelerator setting that is none of auto, kvm, tcg.
    #[error("unknown accelerator `{0}`: use auto, kvm or tcg")]
    UnknownAccel(String),
}

fn log_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; qemu.log ends with:\n{tail}")
    }
}
