//! OCI whiteouts: `.wh.NAME` deletes NAME from lower layers; `.wh..wh..opq` makes
//! its directory opaque (hides everything lower layers put there). Whiteouts only
//! affect lower layers, so entries created earlier in the same layer survive.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, Mode, OFlags};

use crate::confined::{list_dir, remove_all_at, Confined};

const PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// What a whiteout entry asks for.
pub(crate) enum Whiteout {
    /// Hide the lower contents of the directory holding the marker.
    Opaque,
    /// Delete this sibling name.
    Remove(OsString),
}

/// `None` if `name` is an ordinary entry; `Err` if it is a malformed whiteout.
pub(crate) fn classify(name: &OsStr) -> Option<Result<Whiteout, &'static str>> {
    let bytes = name.as_bytes();
    if bytes == OPAQUE {
        return Some(Ok(Whiteout::Opaque));
    }
    let target = bytes.strip_prefix(PREFIX)?;
    if target.is_empty() || target == b"." || target == b".." || target.starts_with(PREFIX) {
        return Some(Err("malformed whiteout name"));
    }
    Some(Ok(Whiteout::Remove(
        OsStr::from_bytes(target).to_os_string(),
    )))
}

/// Applies `whiteout` found in directory `parent`; `this_layer` holds the paths the
/// current layer created, which are kept.
pub(crate) fn apply(
    root: &Confined,
    parent: &[OsString],
    whiteout: Whiteout,
    this_layer: &HashSet<Vec<OsString>>,
) -> io::Result<()> {
    match whiteout {
        Whiteout::Remove(name) => {
            let mut path = parent.to_vec();
            path.push(name.clone());
            if this_layer.contains(&path) {
                return Ok(());
            }
            let dir = match root.open_dir(parent) {
                Ok(dir) => dir,
                // Nothing below to delete.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            remove_all_at(dir.as_fd(), &name)
        }
        Whiteout::Opaque => {
            let dir = root.ensure_dir(parent)?;
            clear_lower(dir.as_fd(), &mut parent.to_vec(), this_layer)
        }
    }
}

/// Removes everything under `dir` that the current layer did not create. A directory
/// the current layer re-created is kept but cleared the same way, since a directory
/// entry merges onto the lower one.
fn clear_lower(
    dir: BorrowedFd<'_>,
    path: &mut Vec<OsString>,
    this_layer: &HashSet<Vec<OsString>>,
) -> io::Result<()> {
    for name in list_dir(dir)? {
        path.push(name.clone());
        if !this_layer.contains(path) {
            remove_all_at(dir, &name)?;
        } else if let Ok(sub) = rfs::openat(
            dir,
            &name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            clear_lower(sub.as_fd(), path, this_layer)?;
        }
        path.pop();
    }
    Ok(())
}
