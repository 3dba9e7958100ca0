//! The byte stream to the host (`/dev/vport0p1`, virtio-serial). One thread reads
//! frames; every thread that sends goes through one [`Writer`], whose lock keeps
//! frames whole.

use std::fs::File;
use std::sync::{Mutex, MutexGuard};

use hearth_proto::{write_frame, Frame, ProtoError};

/// The name the host gives the port (`virtserialport,name=hearth.agent`).
pub const PORT_NAME: &str = "hearth.agent";
/// Where the kernel lists virtio-serial ports and their names.
const PORTS_DIR: &str = "/sys/class/virtio-ports";

/// The device node of the port named [`PORT_NAME`], if it exists yet.
///
/// why: the node is `/dev/vport<N>p<M>` with N the virtio device index, which
/// depends on how many virtio devices come before the serial device (with one
/// disk it is `vport1p1`). Without udev the name in sysfs is the stable handle.
pub fn find_port() -> Option<String> {
    let entries = std::fs::read_dir(PORTS_DIR).ok()?;
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            let dev = format!("/dev/{}", entry.file_name().to_string_lossy());
            if std::path::Path::new(&dev).exists() {
                return Some(dev);
            }
        }
    }
    None
}

/// The sending half of the channel, shared by all threads.
pub struct Writer {
    port: Mutex<File>,
}

impl Writer {
    pub fn new(port: File) -> Writer {
        Writer {
            port: Mutex::new(port),
        }
    }

    /// Sends one frame. Blocks while the host is not connected (virtio-serial
    /// holds writes until the host side opens), which is what we want.
    pub fn send(&self, frame: &Frame) -> Result<(), ProtoError> {
        write_frame(&mut *self.lock(), frame)
    }

    /// The port itself, for callers that must record a frame (replay buffer)
    /// and write it in one step, so a resume never sees them apart.
    pub fn lock(&self) -> MutexGuard<'_, File> {
        // why: a thread that panicked while holding the lock wrote whole frames or
        // nothing (write_frame is one write_all); the port is still usable.
        self.port
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends, logging instead of failing: used where nobody could act on the error.
    pub fn send_or_log(&self, frame: &Frame) {
        if let Err(e) = self.send(frame) {
            crate::log!("sending {:?} for session {}: {e}", frame.kind, frame.id);
        }
    }
}
