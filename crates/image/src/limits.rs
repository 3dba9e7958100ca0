//! Bounds on what one import may consume; image content is hostile.

use std::cell::Cell;
use std::io::{self, Read};

/// Limits applied to every import.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest uncompressed size of one layer (its tar stream, and the file data it writes).
    pub max_layer_bytes: u64,
    /// Most tar entries across all layers of one image.
    pub max_entries: u64,
    /// Largest uncompressed size of all layers of one image together.
    pub max_image_bytes: u64,
    /// Free space left in the ext4 for the sandbox's writes (the file is sparse).
    pub rootfs_free_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_layer_bytes: 8 << 30,
            max_entries: 1_000_000,
            max_image_bytes: 16 << 30,
            rootfs_free_bytes: 1 << 30,
        }
    }
}

/// A reader that counts the bytes it yields into `count` and fails once they exceed `max`.
pub(crate) struct CountingReader<'c, R> {
    pub(crate) inner: R,
    pub(crate) count: &'c Cell<u64>,
    pub(crate) max: u64,
}

/// Marker error message for an exceeded [`CountingReader`]; callers check the count itself.
pub(crate) const LIMIT_HIT: &str = "size limit exceeded";

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        if self.count.get() > self.max {
            return Err(io::Error::other(LIMIT_HIT));
        }
        Ok(n)
    }
}
