//! Finds the program of an exec request inside the root filesystem, the way a
//! shell's `execvp` would after `chroot`, so "not found" (127) and "not
//! executable" (126) are told apart before anything is spawned.
//!
//! Paths are resolved with `openat2(RESOLVE_IN_ROOT)`, so absolute symlinks in the
//! image (`/usr/bin/python3 -> /usr/bin/python3.12`) resolve inside the image.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

/// `PATH` when the request's environment has none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a program cannot be run; `exit_code` is what a shell would return.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    /// No `PATH` entry holds the command.
    #[error("{0}: command not found")]
    NotFound(String),
    /// An explicit path that does not exist.
    #[error("{0}: No such file or directory")]
    NoSuchFile(String),
    /// It exists but is a directory.
    #[error("{0}: Is a directory")]
    IsDirectory(String),
    /// It exists but is not an executable regular file.
    #[error("{0}: Permission denied")]
    NotExecutable(String),
    /// The root filesystem itself could not be opened.
    #[error("cannot open root filesystem {root}: {reason}")]
    Root { root: String, reason: String },
}

impl LookupError {
    /// The exit status a shell reports for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            LookupError::NotFound(_) | LookupError::NoSuchFile(_) => 127,
            _ => 126,
        }
    }
}

enum Probe {
    Missing,
    Directory,
    NotExecutable,
    Executable,
}

fn probe(root: &File, path: &str) -> Probe {
    let fd = match rustix::fs::openat2(
        root.as_fd(),
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT,
    ) {
        Ok(fd) => fd,
        Err(_) => return Probe::Missing,
    };
    let Ok(st) = rustix::fs::fstat(&fd) else {
        return Probe::Missing;
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Probe::Directory,
        FileType::RegularFile if st.st_mode & 0o111 != 0 => Probe::Executable,
        _ => Probe::NotExecutable,
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() || dir == "." {
        return name.to_string();
    }
    format!("{}/{}", dir.trim_end_matches('/'), name)
}

/// Returns the path (inside `root`) to exec for `argv0`. `path_env` is the
/// request's `PATH`; relative names resolve against `workdir`.
pub fn find_program(
    root: &Path,
    argv0: &str,
    path_env: Option<&str>,
    workdir: &str,
) -> Result<String, LookupError> {
    let root_dir = File::open(root).map_err(|e: io::Error| LookupError::Root {
        root: root.display().to_string(),
        reason: e.to_string(),
    })?;
    let workdir = if workdir.is_empty() { "/" } else { workdir };
    let in_workdir = |p: &str| {
        if p.starts_with('/') {
            p.to_string()
        } else {
            join(workdir, p)
        }
    };

    if argv0.is_empty() {
        return Err(LookupError::NotFound(String::new()));
    }
    if argv0.contains('/') {
        let path = in_workdir(argv0);
        return match probe(&root_dir, &path) {
            Probe::Executable => Ok(path),
            Probe::Missing => Err(LookupError::NoSuchFile(argv0.to_string())),
            Probe::Directory => Err(LookupError::IsDirectory(argv0.to_string())),
            Probe::NotExecutable => Err(LookupError::NotExecutable(argv0.to_string())),
        };
    }

    let mut denied = false;
    for dir in path_env.unwrap_or(DEFAULT_PATH).split(':') {
        let path = in_workdir(&join(dir, argv0));
        match probe(&root_dir, &path) {
            Probe::Executable => return Ok(path),
            // why: like execvp, a non-executable match only matters if nothing later runs.
            Probe::NotExecutable => denied = true,
            Probe::Missing | Probe::Directory => {}
        }
    }
    if denied {
        Err(LookupError::NotExecutable(argv0.to_string()))
    } else {
        Err(LookupError::NotFound(argv0.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::PathBuf;

    use super::*;

    fn image(name: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("hearth-lookup-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["bin", "usr/bin", "opt/app", "data"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let exe = |p: &str, mode: u32| {
            fs::write(root.join(p), b"#!/bin/sh\n").unwrap();
            fs::set_permissions(root.join(p), fs::Permissions::from_mode(mode)).unwrap();
        };
        exe("bin/busybox", 0o755);
        exe("opt/app/run", 0o755);
        exe("usr/bin/readme", 0o644);
        exe("data/notes", 0o644);
        symlink("busybox", root.join("bin/sh")).unwrap();
        // An absolute symlink must resolve inside the image, not on the host.
        symlink("/bin/busybox", root.join("usr/bin/env")).unwrap();
        symlink("/nowhere", root.join("usr/bin/dangling")).unwrap();
        root
    }

    #[test]
    fn path_search_finds_programs_through_symlinks_inside_the_root() {
        let root = image("path");
        assert_eq!(
            find_program(&root, "sh", Some("/usr/bin:/bin"), "/"),
            Ok("/bin/sh".into())
        );
        assert_eq!(
            find_program(&root, "env", None, "/"),
            Ok("/usr/bin/env".into())
        );
    }

    #[test]
    fn missing_commands_exit_127() {
        let root = image("missing");
        let err = find_program(&root, "nope", None, "/").unwrap_err();
        assert_eq!(err, LookupError::NotFound("nope".into()));
        assert_eq!(err.exit_code(), 127);
        assert_eq!(err.to_string(), "nope: command not found");
        assert_eq!(
            find_program(&root, "dangling", None, "/")
                .unwrap_err()
                .exit_code(),
            127
        );
        assert_eq!(
            find_program(&root, "/bin/nope", None, "/")
                .unwrap_err()
                .exit_code(),
            127
        );
    }

    #[test]
    fn non_executables_exit_126() {
        let root = image("noexec");
        assert_eq!(
            find_program(&root, "readme", None, "/"),
            Err(LookupError::NotExecutable("readme".into()))
        );
        assert_eq!(
            find_program(&root, "/data/notes", None, "/")
                .unwrap_err()
                .exit_code(),
            126
        );
        assert_eq!(
            find_program(&root, "/opt/app", None, "/"),
            Err(LookupError::IsDirectory("/opt/app".into()))
        );
    }

    #[test]
    fn relative_paths_resolve_against_workdir() {
        let root = image("relative");
        assert_eq!(
            find_program(&root, "./run", None, "/opt/app"),
            Ok("/opt/app/./run".into())
        );
        assert_eq!(
            find_program(&root, "app/run", None, "/opt"),
            Ok("/opt/app/run".into())
        );
    }
}
