//! Wire types of the public HTTP API (`/v1/...`).
//!
//! Everything the CLI does goes through these types, so any HTTP client can do the
//! same. Request types reject unknown fields: a typo in a field name is a 400, not
//! a silently ignored option. The OpenAPI document is generated from these types.

pub mod cluster;
pub mod migration;
pub mod network;
pub mod stream;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Smallest guest memory the guest kernel and agent boot with.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Default vCPUs.
pub const DEFAULT_CPUS: u32 = 1;

/// `POST /v1/sandboxes`: create and start a sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Image reference (name[:tag] or sha256:digest) of an imported or pulled image
    /// (`hearth run` pulls a REGISTRY/… reference first when it is missing).
    pub image: String,
    /// Replaces the image's Cmd; the image's Entrypoint, if any, is kept in front.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Replaces the image's Entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` entries added to (and overriding) the image's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory; default the image's WorkingDir, else `/`.
    #[serde(default)]
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`; default the image's User, else root.
    #[serde(default)]
    pub user: Option<String>,
    /// vCPUs (default 1).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Guest memory in MiB (default 256).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// A unique, human-friendly name.
    #[serde(default)]
    pub name: Option<String>,
    /// Keep the workload's stdin open for `POST /v1/sandboxes/{id}/stdin`;
    /// otherwise it reads from /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// The sandbox's network and egress policy (default: networked, allow all).
    #[serde(default)]
    pub network: network::NetworkSpec,
    /// Boot the image even when a template for it exists.
    #[serde(default)]
    pub cold: bool,
    /// Start from this snapshot instead of an image (`image` may be empty); without
    /// `cmd`, the snapshot's main process continues as this sandbox's workload.
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Set by the control plane: the record this sandbox runs for
    /// (`ID@GENERATION`). The node agent stops a copy whose record is gone,
    /// moved or superseded (fencing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// How a sandbox's VM came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartPath {
    /// Booted the kernel.
    Cold,
    /// Restored from a template's snapshot on the request path.
    Template,
    /// Taken restored-and-paused from a template's warm pool.
    Pool,
    /// Restored from a user snapshot (`--from-snapshot`, fork).
    Snapshot,
}

/// Lifecycle of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    /// The VM is booting.
    Creating,
    /// The workload runs.
    Running,
    /// The workload ended; `exit` says how.
    Exited,
    /// Stopped on request before the workload ended.
    Stopped,
    /// The sandbox could not start or its VM died; `error` says why.
    Failed,
    /// The daemon lost track of it (e.g. it restarted while the sandbox ran).
    Lost,
    /// hearthd restarted and is taking the sandbox's running VM over (or
    /// settling it); `running`, or `lost`/`exited` with the reason, follows.
    /// Never stored: a sandbox is only in this state in a daemon's memory.
    Recovering,
}

impl SandboxStatus {
    /// True once nothing will change any more.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            SandboxStatus::Creating | SandboxStatus::Running | SandboxStatus::Recovering
        )
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal when killed by a signal (as a shell reports it).
    pub code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
}

/// A sandbox as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub name: Option<String>,
    /// The reference the sandbox was created with.
    pub image: String,
    /// The image digest it runs.
    pub image_digest: String,
    pub status: SandboxStatus,
    /// Set once the workload has ended.
    pub exit: Option<ExitInfo>,
    /// Why it failed or was lost.
    pub error: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// The command line run as the main workload.
    pub argv: Vec<String>,
    /// Node that runs it.
    pub node: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Milliseconds from the request to the guest agent being ready.
    pub boot_ms: Option<u64>,
    /// Its network; absent with `--network none`.
    #[serde(default)]
    pub network: Option<network::SandboxNetwork>,
    /// Cold boot, template restore, warm pool or snapshot.
    #[serde(default)]
    pub start_path: Option<StartPath>,
    /// Why this path: e.g. the pool was empty, or a restore failed and it booted.
    #[serde(default)]
    pub start_note: Option<String>,
    /// The template or snapshot it started from.
    #[serde(default)]
    pub started_from: Option<String>,
    /// The control-plane record it runs for (`ID@GENERATION`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// `POST /v1/templates`: boot an image once to a ready guest and snapshot it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub image: String,
    /// Default: the image name with '/', ':' and '@' turned into '-'.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Restored-and-paused VMs to keep ready (default 0).
    #[serde(default)]
    pub pool_size: Option<u32>,
}

/// A template: an image booted once and snapshotted, plus its warm pool.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Template {
    pub name: String,
    pub image: String,
    pub image_digest: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Warm pool target size.
    pub pool_size: u32,
    /// VMs in the pool ready now.
    pub pool_ready: u32,
    /// Running sandboxes started from it.
    pub in_use: u32,
    pub size_bytes: u64,
    pub created_ms: u64,
}

/// `POST /v1/templates/{name}/pool`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPool {
    pub size: u32,
}

/// `POST /v1/sandboxes/{id}/snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub name: String,
}

/// A snapshot of a running sandbox: memory, devices and writable layer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub name: String,
    /// The sandbox it was taken from.
    pub sandbox: String,
    pub image: String,
    pub image_digest: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Running sandboxes started from it; it cannot be removed while > 0.
    pub in_use: u32,
    pub size_bytes: u64,
    pub created_ms: u64,
}

/// `POST /v1/sandboxes/{id}/fork`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkSandbox {
    pub count: u32,
}

/// `POST /v1/sandboxes/{id}/exec`: run another process in a running sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Keep stdin open for `POST /v1/sandboxes/{id}/execs/{exec_id}/stdin`.
    #[serde(default)]
    pub stdin: bool,
}

/// `POST /v1/images/import`: import an image from a path on the daemon's host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    /// Name (and optional `:tag`) to give the image.
    pub name: String,
    /// A root-filesystem directory, an OCI image-layout directory or a docker-archive tarball.
    pub path: String,
}

/// `POST /v1/images/pull`: pull an image from a registry (answered with an NDJSON stream of [`PullEvent`]s).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// `REGISTRY/REPOSITORY[:TAG]` or `REGISTRY/REPOSITORY@sha256:…`
    /// (no registry means docker.io).
    pub reference: String,
}

/// Content type of the `POST /v1/images/pull` response: one JSON [`PullEvent`] per line.
pub const NDJSON: &str = "application/x-ndjson";

/// One line of the `POST /v1/images/pull` stream. The last line is `done` or `error`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullEvent {
    /// The manifest is resolved: image digest, layer count, compressed bytes.
    Resolved {
        digest: String,
        layers: usize,
        bytes: u64,
    },
    /// `done` of `size` bytes of layer `layer` (1-based, of `layers`) have arrived.
    Fetching {
        layer: usize,
        layers: usize,
        digest: String,
        done: u64,
        size: u64,
    },
    /// A layer is in the blob cache; `cached` when it already was (nothing fetched).
    Fetched {
        layer: usize,
        layers: usize,
        digest: String,
        size: u64,
        cached: bool,
    },
    /// A layer was unpacked; `bytes` uncompressed.
    Unpacked {
        layer: usize,
        layers: usize,
        bytes: u64,
    },
    /// The root filesystem (ext4) is being built.
    BuildingFs,
    /// The image's root filesystem was already built and is reused.
    Reused,
    /// The image is ready.
    Done { image: Image },
    /// The pull failed.
    Error { error: ApiError },
}

/// `POST /v1/registries/login`: store credentials for a registry on the daemon's host.
/// Its `Debug` output hides the password.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryLogin {
    /// `HOST[:PORT]`, e.g. `registry.example:5000` or `docker.io`.
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryLogin")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `POST /v1/images/prune`: what was deleted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct PruneReport {
    /// Root filesystems no image name used.
    pub rootfs_removed: u64,
    /// Cached registry blobs no image used.
    pub blobs_removed: u64,
    pub bytes_freed: u64,
}

/// True when `reference` names its registry explicitly (`HOST.DOMAIN/…`,
/// `HOST:PORT/…`, `localhost/…`). Clients pull such references implicitly when
/// they are not in the store; short names (`busybox`) are never pulled implicitly.
pub fn names_registry(reference: &str) -> bool {
    match reference.split_once('/') {
        Some((host, rest)) => {
            !rest.is_empty() && (host.contains('.') || host.contains(':') || host == "localhost")
        }
        None => false,
    }
}

/// The parts of an image's config that shape how its workload runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// An image in the local store.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub name: String,
    pub digest: String,
    pub size_bytes: u64,
    pub created_unix: u64,
    pub config: ImageConfig,
}

/// `GET /v1/info`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Info {
    pub version: String,
    /// VMM backend, e.g. `qemu-microvm`.
    pub backend: String,
    pub backend_version: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Why that accelerator was chosen.
    pub accel_reason: String,
    /// True only with a hardware accelerator.
    pub hardware_isolation: bool,
    pub kernel: String,
    pub initrd: String,
    pub data_dir: String,
    pub node: String,
    pub host_cpus: u32,
    pub host_memory_mib: u64,
    /// Unique id of this node's data dir (a migration to the same node is refused).
    #[serde(default)]
    pub node_id: String,
    /// The ingress this server runs (`--ingress-listen`), if any: a node
    /// agent's for `hearthd dev`, the member's own cluster ingress for a
    /// control-plane member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<network::IngressInfo>,
    /// This node takes a migrated guest's channel over with `Resume` (the
    /// switch-over without QEMU's gate; see docs/migration.md): a source
    /// that switches over so migrates only to a node that says so. False
    /// (absent) from nodes built before it.
    #[serde(default)]
    pub migration_output_resumed: bool,
}

/// Stable, machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body or parameters are malformed.
    BadRequest,
    /// The request carries no valid API token.
    Unauthorized,
    /// The credential is valid but does not allow this request (a migration
    /// credential for another sandbox or target node).
    Forbidden,
    /// A field has a value outside what is allowed.
    InvalidArgument,
    /// The sandbox, exec session or image does not exist.
    NotFound,
    /// The image reference is unknown.
    ImageNotFound,
    /// The image has no Entrypoint or Cmd and the request gave none.
    NoCommand,
    /// The request conflicts with the object's state (e.g. name taken, still running).
    Conflict,
    /// The VM failed to boot or run.
    VmFailed,
    /// A limited resource (e.g. the node's address pool) is used up.
    Exhausted,
    /// Anything else; a bug or a host problem.
    Internal,
    /// No node can take the sandbox; the message gives each node's reason.
    Unschedulable,
    /// The control plane has no leader (no quorum) or a node is unreachable.
    Unavailable,
    /// Another agent instance holds this node id.
    NodeIdentityConflict,
    /// A migration target's answer to an abort: the sandbox was committed
    /// there and runs there (the source must not resume it).
    MigrationCommitted,
    /// A migration's outcome is unknown: the source keeps its copy paused and
    /// the target may run the sandbox; resolved when the target answers.
    MigrationUnresolved,
    /// The sandbox already enforces a newer policy than the one sent (a
    /// later `policy set` got there first); nothing was changed.
    PolicySuperseded,
}

impl ErrorCode {
    /// The HTTP status this code maps to.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidArgument | ErrorCode::NoCommand => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound | ErrorCode::ImageNotFound => 404,
            ErrorCode::Conflict
            | ErrorCode::Unschedulable
            | ErrorCode::NodeIdentityConflict
            | ErrorCode::MigrationCommitted
            | ErrorCode::PolicySuperseded => 409,
            ErrorCode::Unavailable | ErrorCode::Exhausted | ErrorCode::MigrationUnresolved => 503,
            ErrorCode::VmFailed | ErrorCode::Internal => 500,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, thiserror::Error)]
#[error("{message} ({code:?})")]
pub struct ApiError {
    pub code: ErrorCode,
    /// What failed, on which object, and what to do.
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod registry_reference_tests {
    use super::names_registry;

    #[test]
    fn only_references_with_a_registry_host_are_pulled_implicitly() {
        assert!(names_registry("127.0.0.1:5000/x:tag"));
        assert!(names_registry("localhost/team/app"));
        assert!(names_registry("docker.io/library/alpine:3.20"));
        assert!(names_registry("reg.example/app@sha256:00"));
        assert!(!names_registry("busybox"));
        assert!(!names_registry("team/app:1"));
        assert!(!names_registry("sha256:abcd"));
    }
}
