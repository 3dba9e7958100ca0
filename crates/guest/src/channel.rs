//! The byte stream to the host (`/dev/vport0p1`, virtio-serial). One thread reads
//! frames; every thread that sends goes through one [`Writer`], whose lock keeps
//! frames whole.

use std::fs::File;
use std::sync::Mutex;

use hearth_proto::{write_frame, Frame, ProtoError};

/// The virtio-serial port named `hearth.agent` by the host.
pub const PORT: &str = "/dev/vport0p1";

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
        // why: a thread that panicked while holding the lock wrote whole frames or
        // nothing (write_frame is one write_all); the port is still usable.
        let mut port = self
            .port
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        write_frame(&mut *port, frame)
    }

    /// Sends, logging instead of failing: used where nobody could act on the error.
    pub fn send_or_log(&self, frame: &Frame) {
        if let Err(e) = self.send(frame) {
            crate::log!("sending {:?} for session {}: {e}", frame.kind, frame.id);
        }
    }
}
