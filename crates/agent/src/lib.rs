//! The node agent: owns the sandboxes of one host.
//!
//! A sandbox is made of an image (read-only ext4 from `hearth-image`), a VM
//! (`hearth-vmm`, with a copy-on-write layer over that image), a guest agent
//! connection (`guest_conn`) and an output log on disk (`output_log`). Each
//! sandbox has one lifecycle task that boots the VM, runs the workload, records
//! how it ended and tears the VM down; everything else talks to that task.
//!
//! Disk layout under the data dir: `sandboxes/<id>/{sandbox.json, output.log, vm/}`.

pub mod guest_conn;
pub mod migration;
pub mod output_log;
mod sandbox;

pub use guest_conn::{GuestError, Session, SessionEvent, SessionInput};
pub use output_log::LogFollower;
pub use sandbox::{Agent, AgentConfig, AgentError};
