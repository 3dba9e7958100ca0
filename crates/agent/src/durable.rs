//! Durable file writes: the one way the agent saves a record to disk.
//!
//! A file is written whole to a temporary name beside it, fsynced, and
//! renamed over its name, so a crash leaves the old file or the new one. The
//! rename itself is durable only once the directory is fsynced: [`DirSync`]
//! says whether [`write`] does that or the caller does (once, after several
//! files).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The mode of an ordinary record (`0666` less the umask, as `File::create`).
pub(crate) const MODE_DEFAULT: u32 = 0o666;
/// The mode of a file holding a secret (a token).
pub(crate) const MODE_PRIVATE: u32 = 0o600;

/// Who makes a [`write`]'s rename durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirSync {
    /// [`write`] fsyncs the directory after the rename.
    Now,
    /// The caller fsyncs the directory ([`sync_dir`]), e.g. once after
    /// several files; until then a crash may lose the new name.
    ByCaller,
}

/// Replaces `path` with `data` (created with `mode`, less the umask) through
/// `.NAME.tmp` beside it: write, fsync, rename; then the directory's fsync
/// when `dir` is [`DirSync::Now`]. Writers of one path must be serialised
/// (they share the temporary name).
pub(crate) fn write(path: &Path, data: &[u8], mode: u32, dir: DirSync) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // why: always a file of our own, made now: a temporary left by a crash
    // (or put there) would keep its mode and owner, and an open without
    // O_EXCL would follow a symlink at that name (review12 F2). Writers of
    // one path are serialised, so nobody else's temporary is removed.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    match dir {
        DirSync::Now => sync_dir(parent(path)),
        DirSync::ByCaller => Ok(()),
    }
}

/// fsync of a directory: makes renames, new entries and removals in it durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The directory `path` is in.
pub(crate) fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_write_replaces_the_file_whole_with_its_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.json");
        std::fs::write(&path, b"old and longer").unwrap();
        write(&path, b"new", MODE_PRIVATE, DirSync::Now).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write(&path, b"again", MODE_DEFAULT, DirSync::ByCaller).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"again");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["rec.json"]);
    }

    #[test]
    fn a_left_over_temporary_does_not_lend_the_file_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("migration.token");
        let tmp = dir.path().join(".migration.token.tmp");
        std::fs::write(&tmp, b"stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, b"secret", MODE_PRIVATE, DirSync::Now).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the token took the left-over temporary's mode");
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }

    #[test]
    fn a_symlink_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".migration.token.tmp")).unwrap();
        let path = dir.path().join("migration.token");
        write(&path, b"secret", MODE_PRIVATE, DirSync::Now).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }
}
