//! The content-addressed cache of registry blobs: `<root>/blob-cache/sha256/<hex>`.
//!
//! A blob enters only whole and verified: it is written to a temporary file under
//! `<root>/tmp/`, hashed as it is written, and renamed into place only when its
//! digest and size match the descriptor. A failed or interrupted fetch leaves
//! nothing (the temporary file is removed when dropped).

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::{digest, ImageError};

pub(super) struct BlobCache {
    dir: PathBuf,
    tmp: PathBuf,
}

/// A blob being written; dropped unfinished, it vanishes.
pub(super) struct Writer {
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    len: u64,
    digest: String,
    dest: PathBuf,
}

impl BlobCache {
    pub(super) fn new(dir: PathBuf, tmp: PathBuf) -> BlobCache {
        BlobCache { dir, tmp }
    }

    pub(super) fn path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.dir.join(digest::hex_of(digest, "blob descriptor")?))
    }

    /// The cached blob, if present.
    pub(super) fn open(&self, digest: &str) -> Result<Option<File>, ImageError> {
        let path = self.path(digest)?;
        match File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::Store { path, source: e }),
        }
    }

    pub(super) fn writer(&self, digest: &str) -> Result<Writer, ImageError> {
        let dest = self.path(digest)?;
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&self.tmp)
            .map_err(ImageError::store(&self.tmp))?;
        Ok(Writer {
            file,
            hasher: Sha256::new(),
            len: 0,
            digest: digest.to_string(),
            dest,
        })
    }
}

impl Writer {
    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(ImageError::store(self.file.path()))
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Verifies digest and size, then moves the blob into the cache; returns it open at its start.
    pub(super) fn finish(self, size: Option<u64>) -> Result<File, ImageError> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        digest::verify(&self.digest, size, &actual, self.len)?;
        let path = self.file.path().to_path_buf();
        self.file
            .as_file()
            .sync_all()
            .map_err(ImageError::store(&path))?;
        let mut file = self
            .file
            .persist(&self.dest)
            .map_err(|e| ImageError::Store {
                path: self.dest.clone(),
                source: e.error,
            })?;
        sync_parent(&self.dest)?;
        file.seek(SeekFrom::Start(0))
            .map_err(ImageError::store(&self.dest))?;
        Ok(file)
    }
}

fn sync_parent(path: &Path) -> Result<(), ImageError> {
    match path.parent() {
        Some(dir) => crate::index::sync_dir(dir),
        None => Ok(()),
    }
}
