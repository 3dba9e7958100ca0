//! What a VM snapshot is on disk, independent of the backend, and the checks
//! made before one is loaded.
//!
//! A snapshot directory holds the backend's state stream (`state`), the guest
//! RAM (`ram`, unless the RAM is inside the state stream), the writable disk
//! layer (`disk.qcow2`, a small copy-on-write layer over the image's read-only
//! base) and `manifest.json`: format version, the VMM and guest kernel it was
//! made with, and the size and SHA-256 of every file. A snapshot is never
//! written after its manifest is: restores map its RAM privately.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Accel;
use crate::error::VmmError;

/// Format of [`SnapshotManifest`] and the files it lists; bumped on incompatible change.
pub const SNAPSHOT_FORMAT: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
/// The VMM's device (and vCPU) state; with [`RamStorage::InState`] also the RAM.
pub const STATE_FILE: &str = "state";
/// Guest RAM, one byte per guest-physical byte (sparse).
pub const RAM_FILE: &str = "ram";
/// The writable root filesystem layer.
pub const DISK_FILE: &str = "disk.qcow2";

/// Where a snapshot's RAM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RamStorage {
    /// In [`RAM_FILE`]: restores map it copy-on-write and fault pages in lazily.
    File,
    /// Inside the state stream: restores read it up front.
    InState,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// `manifest.json` of a snapshot directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub format_version: u32,
    /// Backend that wrote it (`qemu`); only that backend can load it.
    pub backend: String,
    pub vmm_version: String,
    /// SHA-256 of the guest kernel the VM booted: the RAM holds that kernel.
    pub kernel_sha256: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
    /// KiB of RAM the VM had beyond `memory_mib` (QEMU's TCG RAM pad, see
    /// `qemu::argv::TCG_RAM_PAD_KIB`); 0 in snapshots made before the pad.
    #[serde(default)]
    pub ram_pad_kib: u64,
    pub ram: RamStorage,
    /// The read-only base the disk layer's backing chain ends in.
    pub base_rootfs: PathBuf,
    pub files: Vec<SnapshotFile>,
    pub created_unix_ms: u64,
}

/// What the host that loads a snapshot runs; a snapshot made elsewhere is refused.
#[derive(Debug, Clone)]
pub struct HostIdentity {
    pub backend: String,
    pub vmm_version: String,
    pub kernel_sha256: String,
    pub accel: Accel,
}

/// How thoroughly [`SnapshotManifest::check`] reads the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Versions, sizes, and the hashes of every file but the RAM file (state
    /// stream and disk layer): cheap enough for every restore.
    Quick,
    /// Every file's hash (reads the whole RAM file).
    Full,
}

impl SnapshotManifest {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Reads `dir/manifest.json`; a missing, unreadable or other-format manifest is
    /// [`VmmError::SnapshotInvalid`].
    pub fn load(dir: &Path) -> Result<SnapshotManifest, VmmError> {
        let invalid = |reason: String| VmmError::SnapshotInvalid {
            dir: dir.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(Self::path(dir))
            .map_err(|e| invalid(format!("cannot read {MANIFEST_FILE}: {e}")))?;
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let v: Version = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("{MANIFEST_FILE} is not a snapshot manifest: {e}")))?;
        if v.format_version != SNAPSHOT_FORMAT {
            return Err(VmmError::SnapshotMismatch {
                dir: dir.to_path_buf(),
                what: "snapshot format",
                snapshot: v.format_version.to_string(),
                host: SNAPSHOT_FORMAT.to_string(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{MANIFEST_FILE}: {e}")))
    }

    /// Writes `dir/manifest.json` atomically; the snapshot exists from then on.
    pub fn store(&self, dir: &Path) -> Result<(), VmmError> {
        let path = Self::path(dir);
        let tmp = dir.join(".manifest.json.tmp");
        let io = |source| VmmError::Io {
            op: "write snapshot manifest",
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| io(io::Error::other(e)))?;
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(())
    }

    /// Refuses a snapshot this host cannot load or whose files are not what the
    /// manifest says (truncated, corrupted, missing), before any VMM sees it.
    pub fn check(&self, dir: &Path, host: &HostIdentity, depth: Verify) -> Result<(), VmmError> {
        let mismatch = |what, snapshot: &str, here: &str| VmmError::SnapshotMismatch {
            dir: dir.to_path_buf(),
            what,
            snapshot: snapshot.to_string(),
            host: here.to_string(),
        };
        if self.backend != host.backend {
            return Err(mismatch("backend", &self.backend, &host.backend));
        }
        if self.vmm_version != host.vmm_version {
            return Err(mismatch(
                "VMM version",
                &self.vmm_version,
                &host.vmm_version,
            ));
        }
        if self.kernel_sha256 != host.kernel_sha256 {
            return Err(mismatch(
                "guest kernel (sha256)",
                &self.kernel_sha256,
                &host.kernel_sha256,
            ));
        }
        if self.accel != host.accel {
            return Err(mismatch(
                "accelerator",
                &self.accel.to_string(),
                &host.accel.to_string(),
            ));
        }
        for need in [STATE_FILE, DISK_FILE] {
            if !self.files.iter().any(|f| f.name == need) {
                return Err(VmmError::SnapshotInvalid {
                    dir: dir.to_path_buf(),
                    reason: format!("the manifest lists no {need}"),
                });
            }
        }
        if self.ram == RamStorage::File && !self.files.iter().any(|f| f.name == RAM_FILE) {
            return Err(VmmError::SnapshotInvalid {
                dir: dir.to_path_buf(),
                reason: format!("the manifest lists no {RAM_FILE}"),
            });
        }
        for f in &self.files {
            let path = dir.join(&f.name);
            let invalid = |reason: String| VmmError::SnapshotInvalid {
                dir: dir.to_path_buf(),
                reason,
            };
            if f.name.contains('/') || f.name.starts_with('.') {
                return Err(invalid(format!("file name {:?} is not allowed", f.name)));
            }
            let size = std::fs::metadata(&path)
                .map_err(|e| invalid(format!("{}: {e}", f.name)))?
                .len();
            if size != f.size {
                return Err(invalid(format!(
                    "{} is {size} bytes, the manifest says {} (truncated or replaced)",
                    f.name, f.size
                )));
            }
            if depth == Verify::Full || f.name != RAM_FILE {
                let got = file_sha256(&path).map_err(|e| invalid(format!("{}: {e}", f.name)))?;
                if got != f.sha256 {
                    return Err(invalid(format!(
                        "{} does not match its checksum (corrupted)",
                        f.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Total bytes of the snapshot's files (RAM counted at its apparent size).
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Makes the files `names` of `dir` and their directory entries durable
/// (fsync of each file, then of `dir`): done before the manifest that says
/// the snapshot exists is written, so a crash cannot leave a manifest over
/// data that never reached the disk.
pub fn sync_files(dir: &Path, names: &[&str]) -> Result<(), VmmError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmmError::Io {
            op: "flush snapshot file to disk",
            path,
            source,
        }
    };
    for name in names {
        let path = dir.join(name);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
    }
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Describes `names` in `dir` (size + SHA-256) for a manifest.
pub fn describe_files(dir: &Path, names: &[&str]) -> Result<Vec<SnapshotFile>, VmmError> {
    names
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let io = |source| VmmError::Io {
                op: "checksum snapshot file",
                path: path.clone(),
                source,
            };
            let size = std::fs::metadata(&path).map_err(io)?.len();
            let sha256 = file_sha256(&path).map_err(io)?;
            Ok(SnapshotFile {
                name: name.to_string(),
                size,
                sha256,
            })
        })
        .collect()
}

/// Hex SHA-256 of a file's contents.
pub fn file_sha256(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Copies the first `len` bytes of `src` into a new sparse file `dst`,
/// writing only the 4 KiB pages that are not all zero (the others stay holes).
/// Returns the bytes written.
pub fn copy_nonzero_pages(src: &File, dst: &Path, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let to = File::create(dst)?;
    to.set_len(len)?;
    let mut buf = vec![0u8; 2 << 20];
    let (mut pos, mut written) = (0u64, 0u64);
    while pos < len {
        let want = buf.len().min((len - pos) as usize);
        let chunk = &mut buf[..want];
        src.read_exact_at(chunk, pos)?;
        // why: runs of non-zero pages go out in one write.
        let mut run: Option<usize> = None;
        for (i, page) in chunk.chunks(PAGE).enumerate() {
            let zero = page.iter().all(|&b| b == 0);
            match (zero, run) {
                (false, None) => run = Some(i * PAGE),
                (true, Some(start)) => {
                    to.write_all_at(&chunk[start..i * PAGE], pos + start as u64)?;
                    written += (i * PAGE - start) as u64;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            to.write_all_at(&chunk[start..], pos + start as u64)?;
            written += (want - start) as u64;
        }
        pos += want as u64;
    }
    Ok(written)
}

/// Copies `src` to `dst`, keeping holes (guest RAM files are mostly holes).
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = File::open(src)?;
    let len = from.metadata()?.len();
    let to = File::create(dst)?;
    to.set_len(len)?;
    let (fi, fo) = (from.as_raw_fd(), to.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a file descriptor we own; no pointers.
        let data = unsafe { libc::lseek(fi, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fi, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: both offsets point to live i64s; the fds are ours and open.
            let n = unsafe { libc::copy_file_range(fi, &mut off_in, fo, &mut off_out, left, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
            left -= n as usize;
        }
        pos = hole;
    }
    to.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_of_ram_writes_only_its_non_zero_pages() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        // 8 MiB, all zero but for a run of pages, a lone page, one byte in the
        // last page and a page across the 2 MiB chunk boundary.
        let len = 8u64 << 20;
        let mut data = vec![0u8; len as usize];
        data[4096..3 * 4096].fill(0xab);
        data[(1 << 20) + 7] = 1;
        data[(2 << 20) - 4096..(2 << 20) + 4096].fill(0x5a);
        data[len as usize - 1] = 9;
        std::fs::write(&src, &data).unwrap();
        let written = copy_nonzero_pages(&File::open(&src).unwrap(), &dst, len).unwrap();
        assert_eq!(written, 6 * 4096);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        // The zero pages are holes: far fewer blocks than the file's length.
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(blocks < 64 * 4096, "{blocks} bytes allocated");
    }

    fn host() -> HostIdentity {
        HostIdentity {
            backend: "qemu".into(),
            vmm_version: "7.2.22".into(),
            kernel_sha256: "k".into(),
            accel: Accel::Tcg,
        }
    }

    fn snapshot(dir: &Path) -> SnapshotManifest {
        std::fs::write(dir.join(STATE_FILE), b"device state").unwrap();
        std::fs::write(dir.join(DISK_FILE), b"qcow2").unwrap();
        std::fs::write(dir.join(RAM_FILE), vec![7u8; 8192]).unwrap();
        let m = SnapshotManifest {
            format_version: SNAPSHOT_FORMAT,
            backend: "qemu".into(),
            vmm_version: "7.2.22".into(),
            kernel_sha256: "k".into(),
            accel: Accel::Tcg,
            cpus: 1,
            memory_mib: 128,
            ram_pad_kib: 8,
            ram: RamStorage::File,
            base_rootfs: "/base.ext4".into(),
            files: describe_files(dir, &[STATE_FILE, DISK_FILE, RAM_FILE]).unwrap(),
            created_unix_ms: 1,
        };
        m.store(dir).unwrap();
        m
    }

    #[test]
    fn manifest_from_before_the_ram_pad_reads_as_unpadded() {
        let d = tempfile::tempdir().unwrap();
        let m = snapshot(d.path());
        let mut j = serde_json::to_value(&m).unwrap();
        j.as_object_mut().unwrap().remove("ram_pad_kib");
        let old: SnapshotManifest = serde_json::from_value(j).unwrap();
        assert_eq!(old.ram_pad_kib, 0);
        assert_eq!(serde_json::to_value(&m).unwrap()["ram_pad_kib"], 8);
    }

    #[test]
    fn intact_snapshot_passes_both_checks() {
        let d = tempfile::tempdir().unwrap();
        let m = snapshot(d.path());
        assert_eq!(SnapshotManifest::load(d.path()).unwrap(), m);
        m.check(d.path(), &host(), Verify::Quick).unwrap();
        m.check(d.path(), &host(), Verify::Full).unwrap();
    }

    #[test]
    fn truncated_file_is_refused_by_size() {
        let d = tempfile::tempdir().unwrap();
        let m = snapshot(d.path());
        let f = File::options()
            .write(true)
            .open(d.path().join(RAM_FILE))
            .unwrap();
        f.set_len(4096).unwrap();
        let err = m.check(d.path(), &host(), Verify::Quick).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn flipped_byte_in_the_state_is_refused_by_checksum() {
        let d = tempfile::tempdir().unwrap();
        let m = snapshot(d.path());
        std::fs::write(d.path().join(STATE_FILE), b"device stat3").unwrap();
        let err = m.check(d.path(), &host(), Verify::Quick).unwrap_err();
        assert!(err.to_string().contains("corrupted"), "{err}");
    }

    #[test]
    fn snapshot_of_another_vmm_or_kernel_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let m = snapshot(d.path());
        let other_vmm = HostIdentity {
            vmm_version: "8.0.0".into(),
            ..host()
        };
        let err = m.check(d.path(), &other_vmm, Verify::Quick).unwrap_err();
        assert!(
            matches!(
                err,
                VmmError::SnapshotMismatch {
                    what: "VMM version",
                    ..
                }
            ),
            "{err}"
        );
        let other_kernel = HostIdentity {
            kernel_sha256: "x".into(),
            ..host()
        };
        let err = m.check(d.path(), &other_kernel, Verify::Quick).unwrap_err();
        assert!(err.to_string().contains("guest kernel"), "{err}");
    }

    #[test]
    fn unknown_format_version_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(MANIFEST_FILE), br#"{"format_version": 99}"#).unwrap();
        let err = SnapshotManifest::load(d.path()).unwrap_err();
        assert!(matches!(err, VmmError::SnapshotMismatch { .. }), "{err}");
    }

    #[test]
    fn sparse_copy_keeps_contents() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("a");
        let f = File::create(&src).unwrap();
        f.set_len(1 << 22).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"hello", 1 << 21).unwrap();
        copy_sparse(&src, &d.path().join("b")).unwrap();
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(d.path().join("b")).unwrap()
        );
    }
}
