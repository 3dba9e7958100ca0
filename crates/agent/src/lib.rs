//! The node agent: owns the sandboxes of one host.
//!
//! A sandbox is made of an image (read-only ext4 from `hearth-image`), a VM
//! (`hearth-vmm`, with a copy-on-write layer over that image), a guest agent
//! connection (`guest_conn`), an output log on disk (`output_log`) and, unless
//! disabled, a network from `hearth-net` (`network`). Each
//! sandbox has one lifecycle task that boots the VM, runs the workload, records
//! how it ended and tears the VM down; everything else talks to that task.
//!
//! A VM comes from a cold boot or a restore (`restore`): from a template
//! (`template`, an image booted once and snapshotted), from its warm pool
//! (`warm_pool`, restored-and-paused VMs) or from a snapshot of a running
//! sandbox (`snapshot`, also fork).
//!
//! After a restart the agent re-adopts the VMs that still run (`readopt`): the
//! guest replays the output the log lacks, so nothing is lost or doubled.
//!
//! Disk layout under the data dir: `sandboxes/<id>/{sandbox.json, workload.json, output.log, vm/}`,
//! `templates/<name>/`, `snapshots/<name>/`, `images/` (the image store) and
//! `registry-auth.json` (registry logins, 0600).

pub mod control_link;
mod durable;
pub mod guest_conn;
mod images;
pub mod leases;
pub mod migration;
mod network;
pub mod output_log;
mod readopt;
mod restore;
mod sandbox;
mod snapshot;
mod start_trace;
mod template;
mod warm_pool;

pub use guest_conn::{GuestError, Session, SessionEvent, SessionInput};
pub use network::canonical_policy;
pub use output_log::LogFollower;
pub use sandbox::{ensure_data_dir_free, Agent, AgentConfig, AgentError};
