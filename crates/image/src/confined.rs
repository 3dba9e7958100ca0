//! Directory handles whose path lookups can never leave the directory.
//!
//! Every lookup below a [`Confined`] root goes through `openat2(2)` with
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: absolute symlinks and `..` are
//! resolved as if the root were `/`, so a layer's `lib -> /usr/lib` works while
//! `evil -> /etc` lands on the root's own `etc`. The final component of every
//! write is then handled with `*at` syscalls on the parent's fd, never following it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// An open directory that path lookups are confined to.
pub(crate) struct Confined {
    fd: OwnedFd,
    path: PathBuf,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

impl Confined {
    pub(crate) fn open(path: &Path) -> io::Result<Confined> {
        let fd = rfs::open(path, DIR_FLAGS, Mode::empty())?;
        Ok(Confined {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `components` as a directory, resolving symlinks inside the root.
    pub(crate) fn open_dir(&self, components: &[OsString]) -> io::Result<OwnedFd> {
        self.open_in_root(&join(components), DIR_FLAGS)
    }

    /// Opens a file for reading, resolving symlinks inside the root.
    pub(crate) fn open_file(&self, rel: &Path) -> io::Result<File> {
        let fd = self.open_in_root(rel, OFlags::RDONLY | OFlags::CLOEXEC)?;
        Ok(File::from(fd))
    }

    /// Opens `components` as a directory, creating missing directories (mode 0755)
    /// on the way. An existing non-directory component fails with `ENOTDIR`.
    pub(crate) fn ensure_dir(&self, components: &[OsString]) -> io::Result<OwnedFd> {
        match self.open_dir(components) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            Err(_) => {}
        }
        let mut dir = self.open_in_root(Path::new("."), DIR_FLAGS)?;
        for i in 0..components.len() {
            match self.open_dir(&components[..=i]) {
                Ok(fd) => dir = fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // why: `dir` was itself opened inside the root, and mkdirat never
                    // follows its final component, so the new directory is inside too.
                    match rfs::mkdirat(&dir, components[i].as_os_str(), Mode::from_raw_mode(0o755))
                    {
                        Ok(()) => {}
                        // A dangling symlink in the way: refuse rather than guess.
                        Err(e) if e == rustix::io::Errno::EXIST => {
                            return Err(io::Error::from(rustix::io::Errno::NOTDIR))
                        }
                        Err(e) => return Err(e.into()),
                    }
                    dir = self.open_dir(&components[..=i])?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(dir)
    }

    fn open_in_root(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        // why: openat2 returns EAGAIN when a concurrent rename races the lookup.
        let mut tries = 0;
        loop {
            match rfs::openat2(&self.fd, rel, flags, Mode::empty(), resolve) {
                Err(e)
                    if (e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR)
                        && tries < 32 =>
                {
                    tries += 1
                }
                Err(e) if e == rustix::io::Errno::NOSYS => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "openat2(2) is not available: Linux 5.6 or newer is required",
                    ))
                }
                other => return other.map_err(Into::into),
            }
        }
    }
}

/// Opens `components` below `root` as a directory without following any symlink
/// (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`); used to read a source tree.
pub(crate) fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    open_beneath(root, rel, DIR_FLAGS | OFlags::NOFOLLOW)
}

/// Opens a regular file below `root` without following any symlink.
pub(crate) fn open_file_beneath(root: BorrowedFd<'_>, rel: &Path) -> io::Result<File> {
    Ok(File::from(open_beneath(
        root,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
    )?))
}

fn open_beneath(root: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    let rel: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    Ok(rfs::openat2(root, rel, flags, Mode::empty(), resolve)?)
}

pub(crate) fn join(components: &[OsString]) -> PathBuf {
    components.iter().collect()
}

/// Removes `name` in `dir`, recursively if it is a directory, never following symlinks.
/// A missing entry is not an error.
pub(crate) fn remove_all_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let stat = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => s,
        Err(e) if e == rustix::io::Errno::NOENT => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
        let sub = rfs::openat(dir, name, DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty())?;
        for child in list_dir(sub.as_fd())? {
            remove_all_at(sub.as_fd(), &child)?;
        }
        rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rfs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

/// Names in a directory, without `.` and `..`.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut names = Vec::new();
    let mut iter = rfs::Dir::read_from(dir)?;
    while let Some(entry) = iter.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}
