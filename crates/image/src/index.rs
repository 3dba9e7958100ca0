//! The store's persistent name index: `<root>/index.json`, rewritten atomically
//! (temp file + fsync + rename + directory fsync) under an exclusive `flock` on
//! `<root>/lock`, so concurrent imports in one or several processes serialize.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::{ImageConfig, ImageError};

const VERSION: u32 = 1;

/// Everything the store knows, as saved.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct Index {
    pub(crate) version: u32,
    /// `NAME:TAG` → image.
    pub(crate) images: BTreeMap<String, Entry>,
    /// Image digest → its built root filesystem.
    pub(crate) rootfs: BTreeMap<String, Rootfs>,
}

#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct Entry {
    pub(crate) digest: String,
    pub(crate) config: ImageConfig,
    pub(crate) created_unix: u64,
    /// Blobs of `<root>/blob-cache/` this image was pulled from (config and layers);
    /// empty for local imports. `prune` keeps exactly the blobs some image lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) blobs: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct Rootfs {
    /// Bytes of file data in the filesystem.
    pub(crate) size_bytes: u64,
}

/// Holds the store lock while alive.
pub(crate) struct Locked {
    _lock: File,
    path: PathBuf,
    pub(crate) index: Index,
}

pub(crate) fn lock(root: &Path) -> Result<Locked, ImageError> {
    let lock_path = root.join("lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(ImageError::store(&lock_path))?;
    rustix::fs::flock(&lock, FlockOperation::LockExclusive).map_err(|e| ImageError::Store {
        path: lock_path,
        source: e.into(),
    })?;
    let path = root.join("index.json");
    let index = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ImageError::CorruptIndex {
            path: path.clone(),
            source,
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Index {
            version: VERSION,
            ..Index::default()
        },
        Err(e) => return Err(ImageError::Store { path, source: e }),
    };
    Ok(Locked {
        _lock: lock,
        path,
        index,
    })
}

impl Locked {
    pub(crate) fn save(&self) -> Result<(), ImageError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let bytes = serde_json::to_vec_pretty(&self.index).map_err(|e| ImageError::Store {
            path: self.path.clone(),
            source: e.into(),
        })?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".index-")
            .tempfile_in(dir)
            .map_err(ImageError::store(dir))?;
        tmp.write_all(&bytes)
            .map_err(ImageError::store(tmp.path()))?;
        tmp.as_file()
            .sync_all()
            .map_err(ImageError::store(tmp.path()))?;
        tmp.persist(&self.path).map_err(|e| ImageError::Store {
            path: self.path.clone(),
            source: e.error,
        })?;
        sync_dir(dir)
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ImageError::store(dir))
}
