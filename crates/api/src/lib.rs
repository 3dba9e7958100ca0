//! Wire types of the public HTTP API (`/v1/...`).
//!
//! Everything the CLI does goes through these types, so any HTTP client can do the
//! same. Request types reject unknown fields: a typo in a field name is a 400, not
//! a silently ignored option. The OpenAPI document is generated from these types.

pub mod migration;
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
    /// Image reference (name[:tag] or sha256:digest) of an imported image.
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
}

impl SandboxStatus {
    /// True once nothing will change any more.
    pub fn is_terminal(self) -> bool {
        !matches!(self, SandboxStatus::Creating | SandboxStatus::Running)
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
}

/// Stable, machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body or parameters are malformed.
    BadRequest,
    /// The request carries no valid API token.
    Unauthorized,
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
    /// Anything else; a bug or a host problem.
    Internal,
}

impl ErrorCode {
    /// The HTTP status this code maps to.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidArgument | ErrorCode::NoCommand => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound | ErrorCode::ImageNotFound => 404,
            ErrorCode::Conflict => 409,
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
