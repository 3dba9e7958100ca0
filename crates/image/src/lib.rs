//! hearth-image: turns an image source into a content-addressed, read-only ext4 root
//! filesystem plus the config the guest needs to run it.
//!
//! Flow of one [`ImageStore::import`]: the source (a directory, an OCI image layout
//! or a `docker save` archive) is *prepared* into a digest, a config and ordered
//! layer blobs (`source/`); if no rootfs exists for that digest yet, the layers are
//! verified and unpacked with whiteouts into a staging directory (`unpack.rs`, the
//! security boundary: image content is hostile), `mkfs.ext4 -d` turns the staging
//! tree into `<root>/blobs/sha256/<hex>.ext4` (`ext4.rs`), and the name is recorded
//! in `<root>/index.json` (`index.rs`). Any failure removes the staging tree and the
//! partial ext4; nothing half-built is ever listed.
//!
//! Synchronous and blocking: the agent calls it from `spawn_blocking`. Preserving
//! file owners requires running as root (otherwise a warning is logged and every
//! file belongs to the current user); `mkfs.ext4` (e2fsprogs ≥ 1.43) must be on PATH
//! and the kernel must have `openat2(2)` (Linux ≥ 5.6).

mod compression;
mod config;
mod confined;
mod digest;
mod error;
mod ext4;
#[doc(hidden)]
pub mod fuzzing;
mod index;
mod limits;
mod reference;
#[cfg(feature = "registry")]
mod registry;
mod source;
mod unpack;
mod whiteout;

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use config::ImageConfig;
pub use error::ImageError;
pub use limits::Limits;
#[cfg(feature = "registry")]
pub use registry::{Credentials, Puller, RegistryOptions};

use confined::Confined;
use reference::Reference;
use source::Prepared;
use unpack::{Unpacker, IMAGE_LAYER};

/// A directory of images: `<root>/index.json`, `<root>/blobs/sha256/<hex>.ext4`,
/// `<root>/blob-cache/sha256/<hex>` (registry blobs as pulled, shared by every
/// image that lists them) and `<root>/tmp/` for imports and pulls in progress.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    limits: Limits,
}

/// One named image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    /// `NAME:TAG`.
    pub name: String,
    /// `sha256:<hex>` of the manifest (synthesized canonically for directory and docker-archive imports).
    pub digest: String,
    /// The read-only ext4 root filesystem (sparse). Shared by every name with this digest.
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// Bytes of file data inside the root filesystem.
    pub size_bytes: u64,
    pub created_unix: u64,
}

/// What [`ImageStore::prune`] deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub rootfs_removed: u64,
    pub blobs_removed: u64,
    /// Apparent bytes of the deleted files (root filesystems are sparse).
    pub bytes_freed: u64,
}

/// Import and pull progress, reported as it happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A pull resolved its manifest: the image digest, its layer count and their compressed bytes.
    Resolved {
        digest: String,
        layers: usize,
        bytes: u64,
    },
    /// `done` of `size` bytes of layer `index` (1-based, of `total`) have arrived.
    Fetching {
        index: usize,
        total: usize,
        digest: String,
        done: u64,
        size: u64,
    },
    /// Layer `index` is in the blob cache; `cached` when it already was (nothing fetched).
    Fetched {
        index: usize,
        total: usize,
        digest: String,
        size: u64,
        cached: bool,
    },
    /// Layer `index` (1-based) of `total` was unpacked; `bytes` uncompressed.
    Layer {
        index: usize,
        total: usize,
        bytes: u64,
    },
    /// mkfs.ext4 is building the root filesystem.
    BuildingFs,
    /// A root filesystem for this digest already existed and is reused.
    Reused,
    Done,
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>, limits: Limits) -> Result<ImageStore, ImageError> {
        let root = root.into();
        for dir in [
            root.join("blobs/sha256"),
            root.join("blob-cache/sha256"),
            root.join("tmp"),
        ] {
            fs::create_dir_all(&dir).map_err(ImageError::store(&dir))?;
        }
        Ok(ImageStore { root, limits })
    }

    /// Imports `source` under `name` (`NAME` or `NAME:TAG`; the tag defaults to `latest`).
    /// The source kind is detected: a directory holding a root filesystem, an OCI image
    /// layout directory (`oci-layout` + `index.json`), or a `docker save` tarball.
    /// Importing a name again points it at the new image.
    pub fn import(
        &self,
        name: &str,
        source: &Path,
        progress: &dyn Fn(Progress),
    ) -> Result<ImageRecord, ImageError> {
        let name = reference::normalize_name(name)?;
        // Dropped (removed, with everything in it) on every path out of this function.
        let work = self.work_dir("import-")?;
        let mut prepared = source::prepare(source, work.path(), &self.limits)?;
        self.install(name, &mut prepared, work.path(), progress)
    }

    /// A fresh directory under `<root>/tmp/`, removed when dropped.
    pub(crate) fn work_dir(&self, prefix: &str) -> Result<tempfile::TempDir, ImageError> {
        let tmp = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&tmp)
            .map_err(ImageError::store(&tmp))
    }

    /// True when a root filesystem for `digest` is built and registered.
    #[cfg_attr(not(feature = "registry"), allow(dead_code))]
    pub(crate) fn has_rootfs(&self, digest: &str) -> Result<bool, ImageError> {
        Ok(index::lock(&self.root)?.index.rootfs.contains_key(digest)
            && self.rootfs_path(digest).is_file())
    }

    /// Builds the root filesystem of `prepared` unless one exists for its digest,
    /// then points `name` at it.
    pub(crate) fn install(
        &self,
        name: String,
        prepared: &mut Prepared,
        work: &Path,
        progress: &dyn Fn(Progress),
    ) -> Result<ImageRecord, ImageError> {
        let rootfs = self.rootfs_path(&prepared.digest);
        let existing = index::lock(&self.root)?
            .index
            .rootfs
            .get(&prepared.digest)
            .cloned()
            .filter(|_| rootfs.is_file());
        let built = match existing {
            Some(_) => {
                progress(Progress::Reused);
                None
            }
            None if prepared.layers.is_empty() && prepared.blobs.len() > 1 => {
                // A pull skipped fetching layers because the rootfs existed; it is gone now.
                return Err(ImageError::Store {
                    path: rootfs,
                    source: std::io::Error::other(
                        "root filesystem was removed during the pull; pull again",
                    ),
                });
            }
            None => Some(self.build(prepared, work, progress)?),
        };
        let mut locked = index::lock(&self.root)?;
        let size_bytes = match (
            built,
            locked
                .index
                .rootfs
                .get(&prepared.digest)
                .cloned()
                .filter(|_| rootfs.is_file()),
        ) {
            // Someone else registered the same digest meanwhile: theirs wins, ours is dropped.
            (_, Some(present)) => present.size_bytes,
            (Some((file, size_bytes)), None) => {
                file.persist(&rootfs).map_err(|e| ImageError::Store {
                    path: rootfs.clone(),
                    source: e.error,
                })?;
                index::sync_dir(rootfs.parent().unwrap_or(&self.root))?;
                locked
                    .index
                    .rootfs
                    .insert(prepared.digest.clone(), index::Rootfs { size_bytes });
                size_bytes
            }
            (None, None) => {
                return Err(ImageError::Store {
                    path: rootfs,
                    source: std::io::Error::other("root filesystem vanished during import; retry"),
                })
            }
        };
        let entry = index::Entry {
            digest: prepared.digest.clone(),
            config: prepared.config.clone(),
            created_unix: now(),
            blobs: prepared.blobs.clone(),
        };
        let previous = locked.index.images.insert(name.clone(), entry.clone());
        let orphan = previous.map(|p| p.digest).filter(|d| {
            *d != prepared.digest && !locked.index.images.values().any(|e| e.digest == *d)
        });
        if let Some(d) = &orphan {
            locked.index.rootfs.remove(d);
        }
        locked.save()?;
        if let Some(d) = orphan {
            self.delete_rootfs(&d);
        }
        drop(locked);
        progress(Progress::Done);
        Ok(self.record(name, &entry, size_bytes))
    }

    /// Finds an image by `NAME[:TAG]` or by `sha256:` digest (a unique prefix is enough).
    pub fn resolve(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        let locked = index::lock(&self.root)?;
        let not_found = || ImageError::NotFound {
            reference: reference.to_string(),
        };
        let (name, entry) = match reference::parse(reference)? {
            Reference::Name(name) => {
                let entry = locked.index.images.get(&name).ok_or_else(not_found)?;
                (name, entry)
            }
            Reference::DigestPrefix(prefix) => {
                let mut digests: Vec<&String> = locked
                    .index
                    .images
                    .values()
                    .map(|e| &e.digest)
                    .filter(|d| d.starts_with(&prefix))
                    .collect();
                digests.sort();
                digests.dedup();
                match digests.as_slice() {
                    [] => return Err(not_found()),
                    [one] => {
                        let (name, entry) = locked
                            .index
                            .images
                            .iter()
                            .find(|(_, e)| e.digest == **one)
                            .ok_or_else(not_found)?;
                        (name.clone(), entry)
                    }
                    many => {
                        return Err(ImageError::Ambiguous {
                            reference: reference.to_string(),
                            matches: many.iter().map(|d| d.to_string()).collect(),
                        })
                    }
                }
            }
        };
        let size = locked
            .index
            .rootfs
            .get(&entry.digest)
            .map_or(0, |r| r.size_bytes);
        Ok(self.record(name, entry, size))
    }

    /// Every named image, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let locked = index::lock(&self.root)?;
        Ok(locked
            .index
            .images
            .iter()
            .map(|(name, e)| {
                self.record(
                    name.clone(),
                    e,
                    locked
                        .index
                        .rootfs
                        .get(&e.digest)
                        .map_or(0, |r| r.size_bytes),
                )
            })
            .collect())
    }

    /// Removes a name, or every name of a digest. A root filesystem no name refers to
    /// any more is deleted: the caller must not remove an image a sandbox still uses.
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        let record = self.resolve(reference)?;
        let mut locked = index::lock(&self.root)?;
        match reference::parse(reference)? {
            Reference::Name(name) => {
                locked.index.images.remove(&name);
            }
            Reference::DigestPrefix(_) => {
                locked.index.images.retain(|_, e| e.digest != record.digest)
            }
        }
        let orphan = !locked
            .index
            .images
            .values()
            .any(|e| e.digest == record.digest);
        if orphan {
            locked.index.rootfs.remove(&record.digest);
        }
        locked.save()?;
        if orphan {
            self.delete_rootfs(&record.digest);
        }
        Ok(())
    }

    /// Deletes every root filesystem and cached registry blob that no image name uses.
    /// The caller must not prune while a sandbox runs on an image it removed by name.
    pub fn prune(&self) -> Result<PruneReport, ImageError> {
        let mut locked = index::lock(&self.root)?;
        let used_rootfs: std::collections::HashSet<String> = locked
            .index
            .images
            .values()
            .map(|e| e.digest.clone())
            .collect();
        let used_blobs: std::collections::HashSet<String> = locked
            .index
            .images
            .values()
            .flat_map(|e| {
                e.blobs
                    .iter()
                    .map(|d| d.trim_start_matches("sha256:").to_string())
            })
            .collect();
        locked.index.rootfs.retain(|d, _| used_rootfs.contains(d));
        locked.save()?;
        let keep_rootfs: std::collections::HashSet<String> = locked
            .index
            .rootfs
            .keys()
            .map(|d| format!("{}.ext4", d.trim_start_matches("sha256:")))
            .collect();
        let mut report = PruneReport::default();
        // why: names starting with '.' are builds in progress (`.building-*`); they are not ours to delete.
        let sweep = |dir: PathBuf,
                     keep: &dyn Fn(&str) -> bool,
                     removed: &mut u64,
                     report_bytes: &mut u64|
         -> Result<(), ImageError> {
            for entry in fs::read_dir(&dir).map_err(ImageError::store(&dir))? {
                let entry = entry.map_err(ImageError::store(&dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || keep(&name) {
                    continue;
                }
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                match fs::remove_file(entry.path()) {
                    Ok(()) => {
                        *removed += 1;
                        *report_bytes += size;
                    }
                    Err(e) => {
                        tracing::warn!(path = %entry.path().display(), error = %e, "prune: cannot delete")
                    }
                }
            }
            Ok(())
        };
        let (mut rootfs, mut blobs, mut bytes) = (0, 0, 0);
        sweep(
            self.root.join("blobs/sha256"),
            &|n| keep_rootfs.contains(n),
            &mut rootfs,
            &mut bytes,
        )?;
        sweep(
            self.root.join("blob-cache/sha256"),
            &|n| used_blobs.contains(n),
            &mut blobs,
            &mut bytes,
        )?;
        drop(locked);
        report.rootfs_removed = rootfs;
        report.blobs_removed = blobs;
        report.bytes_freed = bytes;
        Ok(report)
    }

    /// Verifies and unpacks the layers, then builds the ext4 under a temporary name.
    fn build(
        &self,
        prepared: &mut Prepared,
        work: &Path,
        progress: &dyn Fn(Progress),
    ) -> Result<(tempfile::NamedTempFile, u64), ImageError> {
        let staging = work.join("rootfs");
        fs::create_dir(&staging).map_err(ImageError::store(&staging))?;
        let root = Confined::open(&staging).map_err(ImageError::store(&staging))?;
        let mut unpacker = Unpacker::new(&root, &self.limits, IMAGE_LAYER);
        let total = prepared.layers.len();
        for (i, layer) in prepared.layers.iter_mut().enumerate() {
            let compression = layer.compression;
            let digest = layer.digest.clone();
            let file = layer.open_verified()?;
            let stream = compression
                .decoder(BufReader::new(file))
                .map_err(|source| ImageError::LayerRead {
                    blob: digest.clone(),
                    source,
                })?;
            let bytes = unpacker.apply_layer(&digest, stream)?;
            progress(Progress::Layer {
                index: i + 1,
                total,
                bytes,
            });
        }

        progress(Progress::BuildingFs);
        let usage = ext4::measure(&staging).map_err(ImageError::store(&staging))?;
        let blobs = self.root.join("blobs/sha256");
        let file = tempfile::Builder::new()
            .prefix(".building-")
            .suffix(".ext4")
            .tempfile_in(&blobs)
            .map_err(ImageError::store(&blobs))?;
        let hex = prepared.digest.trim_start_matches("sha256:");
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        );
        ext4::build(
            &staging,
            file.path(),
            &usage,
            self.limits.rootfs_free_bytes,
            &uuid,
        )?;
        // why: the base image is never written again; read-only for everyone (e.g. a QEMU
        // running as another user opens it as a qcow2 backing file).
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(fs::Permissions::from_mode(0o444))
            .map_err(ImageError::store(file.path()))?;
        file.as_file()
            .sync_all()
            .map_err(ImageError::store(file.path()))?;
        Ok((file, usage.data_bytes))
    }

    fn rootfs_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs/sha256")
            .join(format!("{}.ext4", digest.trim_start_matches("sha256:")))
    }

    fn delete_rootfs(&self, digest: &str) {
        let path = self.rootfs_path(digest);
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete unreferenced root filesystem");
        }
    }

    fn record(&self, name: String, entry: &index::Entry, size_bytes: u64) -> ImageRecord {
        ImageRecord {
            name,
            digest: entry.digest.clone(),
            rootfs: self.rootfs_path(&entry.digest),
            config: entry.config.clone(),
            size_bytes,
            created_unix: entry.created_unix,
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
