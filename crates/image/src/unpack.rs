//! Applies tar layers, in order, to a staging root. The security boundary of the crate.
//!
//! Nothing is ever written outside the root: entry paths are normalized lexically
//! (a leading `/` is dropped, a `..` that climbs above the root is an error), parent
//! directories are opened with [`Confined`] (symlinks from earlier layers resolve
//! inside the root), and the final component is created with `*at` syscalls that
//! never follow it. Limits on entries and bytes are checked as the stream is read.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{
    self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags,
};
use tar::EntryType;

use crate::confined::{remove_all_at, Confined};
use crate::limits::{CountingReader, LIMIT_HIT};
use crate::whiteout;
use crate::{ImageError, Limits};

/// What an unpack honours besides file data.
#[derive(Clone, Copy)]
pub(crate) struct Flavor {
    /// Interpret `.wh.` entries (image layers) rather than writing them (plain archives).
    pub(crate) whiteouts: bool,
    /// Apply uid/gid, mode bits and xattrs from the tar headers.
    pub(crate) metadata: bool,
}

pub(crate) const IMAGE_LAYER: Flavor = Flavor {
    whiteouts: true,
    metadata: true,
};
pub(crate) const PLAIN_ARCHIVE: Flavor = Flavor {
    whiteouts: false,
    metadata: false,
};

/// Unpacks layers into one root, keeping the counts that image-wide limits need.
pub(crate) struct Unpacker<'a> {
    root: &'a Confined,
    limits: &'a Limits,
    mode: Flavor,
    chown: bool,
    entries: u64,
    image_bytes: u64,
}

/// Metadata an entry carries beyond its type and path.
struct Meta {
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl<'a> Unpacker<'a> {
    pub(crate) fn new(root: &'a Confined, limits: &'a Limits, mode: Flavor) -> Unpacker<'a> {
        let chown = mode.metadata && rustix::process::geteuid().is_root();
        if mode.metadata && !chown {
            tracing::warn!("not running as root: file owners in the image are not preserved (everything will belong to the current user)");
        }
        Unpacker {
            root,
            limits,
            mode,
            chown,
            entries: 0,
            image_bytes: 0,
        }
    }

    /// Applies one uncompressed tar stream named `blob`. Returns its uncompressed size.
    pub(crate) fn apply_layer(&mut self, blob: &str, stream: impl Read) -> Result<u64, ImageError> {
        let max = self
            .limits
            .max_layer_bytes
            .min(self.limits.max_image_bytes.saturating_sub(self.image_bytes));
        let read = Cell::new(0u64);
        let mut archive = tar::Archive::new(CountingReader {
            inner: stream,
            count: &read,
            max,
        });
        let mut layer = Layer {
            blob,
            this_layer: HashSet::new(),
            dir_times: Vec::new(),
            written: 0,
        };

        let result = (|| {
            let entries = archive
                .entries()
                .map_err(|e| self.read_error(blob, &read, max, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| self.read_error(blob, &read, max, e))?;
                self.entries += 1;
                if self.entries > self.limits.max_entries {
                    return Err(ImageError::LimitExceeded {
                        object: "image (entry count)".into(),
                        limit: "max_entries",
                        max: self.limits.max_entries,
                    });
                }
                self.apply_entry(&mut layer, entry, &read, max)?;
            }
            Ok(())
        })();
        result?;
        // why: read to the end so the decompressor checks its trailer (gzip CRC/length).
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| self.read_error(blob, &read, max, e))?;

        for (path, mtime) in layer.dir_times.iter().rev() {
            let Some((name, parent)) = path.split_last() else {
                let _ = set_times(self.root.fd(), None, *mtime);
                continue;
            };
            if let Ok(dir) = self.root.open_dir(parent) {
                let _ = set_times(dir.as_fd(), Some(name), *mtime);
            }
        }
        let size = read.get().max(layer.written);
        self.image_bytes += size;
        Ok(size)
    }

    fn read_error(&self, blob: &str, read: &Cell<u64>, max: u64, e: io::Error) -> ImageError {
        if read.get() > max || e.to_string() == LIMIT_HIT {
            self.limit_error(blob, max)
        } else {
            ImageError::LayerRead {
                blob: blob.to_string(),
                source: e,
            }
        }
    }

    fn limit_error(&self, blob: &str, max: u64) -> ImageError {
        if max == self.limits.max_layer_bytes {
            ImageError::LimitExceeded {
                object: format!("layer {blob} (uncompressed)"),
                limit: "max_layer_bytes",
                max,
            }
        } else {
            ImageError::LimitExceeded {
                object: format!("image (uncompressed, at layer {blob})"),
                limit: "max_image_bytes",
                max: self.limits.max_image_bytes,
            }
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        layer: &mut Layer<'_>,
        mut entry: tar::Entry<'_, R>,
        read: &Cell<u64>,
        max: u64,
    ) -> Result<(), ImageError> {
        let blob = layer.blob;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let unsafe_entry = |reason: &str| ImageError::UnsafeEntry {
            blob: blob.to_string(),
            entry: shown.clone(),
            reason: reason.to_string(),
        };
        let path = normalize(&raw).map_err(unsafe_entry)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let meta = read_meta(&mut entry).map_err(|e| self.read_error(blob, read, max, e))?;
        let fail = |op: &'static str| {
            let shown = shown.clone();
            move |source: io::Error| ImageError::Unpack {
                blob: blob.to_string(),
                entry: shown,
                op,
                source,
            }
        };

        let Some((name, parent)) = path.split_last() else {
            // The root itself ("./"): only its metadata can change.
            if kind == EntryType::Directory {
                self.set_file_meta(self.root.fd(), &meta, &shown);
                layer.dir_times.push((Vec::new(), meta.mtime));
            }
            return Ok(());
        };
        if self.mode.whiteouts {
            if let Some(whiteout) = whiteout::classify(name) {
                let whiteout = whiteout.map_err(unsafe_entry)?;
                return whiteout::apply(self.root, parent, whiteout, &layer.this_layer)
                    .map_err(fail("apply whiteout"));
            }
        }
        let parent_fd = self
            .root
            .ensure_dir(parent)
            .map_err(fail("create parent directory of"))?;
        let dir = parent_fd.as_fd();

        match kind {
            EntryType::Directory => {
                let existing = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .ok()
                    .map(|s| FileType::from_raw_mode(s.st_mode));
                match existing {
                    Some(FileType::Directory) => {}
                    Some(_) => {
                        rfs::unlinkat(dir, name, AtFlags::empty())
                            .map_err(|e| fail("replace")(e.into()))?;
                        mkdir(dir, name).map_err(fail("create directory"))?;
                    }
                    None => mkdir(dir, name).map_err(fail("create directory"))?,
                }
                let fd = rfs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| fail("open directory")(e.into()))?;
                self.set_file_meta(fd.as_fd(), &meta, &shown);
                layer.dir_times.push((path.clone(), meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_all_at(dir, name).map_err(fail("replace"))?;
                let fd = rfs::openat(
                    dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| fail("create file")(e.into()))?;
                let mut file = File::from(fd);
                let written =
                    copy_limited(&mut entry, &mut file, max.saturating_sub(layer.written));
                let written = match written {
                    Ok(n) => n,
                    Err(CopyError::Limit) => return Err(self.limit_error(blob, max)),
                    Err(CopyError::Read(e)) => return Err(self.read_error(blob, read, max, e)),
                    Err(CopyError::Write(e)) => return Err(fail("write file")(e)),
                };
                layer.written += written;
                self.set_file_meta(file.as_fd(), &meta, &shown);
                set_times(file.as_fd(), None, meta.mtime).map_err(fail("set times of"))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("symlink without a target"))?
                    .into_owned();
                if target.is_empty() {
                    return Err(unsafe_entry("symlink without a target"));
                }
                remove_all_at(dir, name).map_err(fail("replace"))?;
                // why: the target is stored verbatim; it is only ever resolved inside the
                // root (here, via Confined) or inside the guest.
                rfs::symlinkat(OsStr::from_bytes(&target), dir, name)
                    .map_err(|e| fail("create symlink")(e.into()))?;
                if self.chown {
                    rfs::chownat(
                        dir,
                        name,
                        Some(uid(meta.uid)),
                        Some(gid(meta.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| fail("set owner of")(e.into()))?;
                }
                set_times(dir, Some(name), meta.mtime).map_err(fail("set times of"))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("hardlink without a target"))?
                    .into_owned();
                let target_path = normalize(&target).map_err(|r| {
                    unsafe_entry(&format!(
                        "hardlink target {:?} {r}",
                        String::from_utf8_lossy(&target)
                    ))
                })?;
                let Some((target_name, target_parent)) = target_path.split_last() else {
                    return Err(unsafe_entry("hardlink to the root directory"));
                };
                if target_path == path {
                    return Ok(());
                }
                let target_dir = self
                    .root
                    .open_dir(target_parent)
                    .map_err(fail("find hardlink target of"))?;
                let target_stat = rfs::statat(&target_dir, target_name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| fail("find hardlink target of")(e.into()))?;
                if let Ok(existing) = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                    if existing.st_dev == target_stat.st_dev
                        && existing.st_ino == target_stat.st_ino
                    {
                        return Ok(());
                    }
                }
                remove_all_at(dir, name).map_err(fail("replace"))?;
                // why: flags 0 = never follow a symlink target; the link is made to the
                // entry itself, which was found inside the root.
                rfs::linkat(&target_dir, target_name, dir, name, AtFlags::empty())
                    .map_err(|e| fail("create hardlink")(e.into()))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                tracing::warn!(layer = blob, entry = %shown, "skipping device node or fifo: devices come from the guest's devtmpfs");
                return Ok(());
            }
            other => {
                tracing::warn!(layer = blob, entry = %shown, kind = ?other, "skipping tar entry of unsupported type");
                return Ok(());
            }
        }
        layer.this_layer.insert(path);
        Ok(())
    }

    /// Owner, then mode (chown clears set-id bits), then xattrs. Best effort for xattrs only.
    fn set_file_meta(&self, fd: BorrowedFd<'_>, meta: &Meta, entry: &str) {
        if !self.mode.metadata {
            return;
        }
        if self.chown {
            if let Err(e) = rfs::fchown(fd, Some(uid(meta.uid)), Some(gid(meta.gid))) {
                tracing::warn!(entry, error = %e, "cannot set owner");
            }
        }
        if let Err(e) = rfs::fchmod(fd, Mode::from_raw_mode(meta.mode & 0o7777)) {
            tracing::warn!(entry, error = %e, "cannot set mode");
        }
        for (name, value) in &meta.xattrs {
            // why: trusted.* is host-administrator state (overlayfs uses it), not image content.
            if name.starts_with("trusted.") {
                tracing::warn!(entry, xattr = %name, "skipping trusted.* xattr");
                continue;
            }
            if let Err(e) = rfs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty()) {
                tracing::warn!(entry, xattr = %name, error = %e, "cannot set xattr");
            }
        }
    }
}

struct Layer<'b> {
    blob: &'b str,
    /// Paths this layer created: whiteouts in the same layer leave them alone.
    this_layer: HashSet<Vec<OsString>>,
    /// Directory mtimes, applied after the layer since adding children changes them.
    dir_times: Vec<(Vec<OsString>, i64)>,
    /// File data bytes written (a sparse entry can expand beyond its stream size).
    written: u64,
}

/// Turns a tar path into components relative to the root. A leading `/` is dropped
/// (as docker does); `.` and empty components vanish; `..` pops, and one that would
/// climb above the root is an error.
pub(crate) fn normalize(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    let mut out: Vec<OsString> = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err("its path climbs out of the root with `..`");
                }
            }
            c => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(out)
}

fn mkdir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    Ok(rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700))?)
}

fn uid(raw: u64) -> Uid {
    // Values above u32 cannot be represented; map them to nobody like the kernel would.
    Uid::from_raw(u32::try_from(raw).unwrap_or(65534))
}

fn gid(raw: u64) -> Gid {
    Gid::from_raw(u32::try_from(raw).unwrap_or(65534))
}

fn set_times(dir: BorrowedFd<'_>, name: Option<&OsStr>, mtime: i64) -> io::Result<()> {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    match name {
        None => rfs::futimens(dir, &times)?,
        Some(name) => rfs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)?,
    }
    Ok(())
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
    let header = entry.header();
    let mut meta = Meta {
        uid: header.uid().unwrap_or(0),
        gid: header.gid().unwrap_or(0),
        mode: header.mode().unwrap_or(0o644),
        mtime: header.mtime().map(|m| m as i64).unwrap_or(0),
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.split('.').next()?.parse::<i64>().ok())
            };
            match key {
                "uid" => meta.uid = number().map(|n| n as u64).unwrap_or(meta.uid),
                "gid" => meta.gid = number().map(|n| n as u64).unwrap_or(meta.gid),
                "mtime" => meta.mtime = number().unwrap_or(meta.mtime),
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        meta.xattrs.push((name.to_string(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(meta)
}

enum CopyError {
    Limit,
    Read(io::Error),
    Write(io::Error),
}

fn copy_limited(from: &mut impl Read, to: &mut File, max: u64) -> Result<u64, CopyError> {
    use std::io::Write;
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        total += n as u64;
        if total > max {
            return Err(CopyError::Limit);
        }
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}
