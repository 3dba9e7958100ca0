//! Building the read-only root filesystem: `mkfs.ext4 -d STAGING` into a sparse file.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::ImageError;

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

/// Content size of a staging tree: file data bytes, and the inode/block estimate mkfs needs.
pub(crate) struct Usage {
    pub(crate) data_bytes: u64,
    pub(crate) blocks_bytes: u64,
    pub(crate) inodes: u64,
}

/// Measures `root` without following symlinks; hardlinked files count once.
pub(crate) fn measure(root: &Path) -> io::Result<Usage> {
    let mut usage = Usage {
        data_bytes: 0,
        blocks_bytes: 0,
        inodes: 1,
    };
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        usage.blocks_bytes += BLOCK;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?; // lstat: DirEntry::metadata never follows symlinks
            if meta.is_dir() {
                usage.inodes += 1;
                stack.push(entry.path());
            } else if seen.insert((meta.dev(), meta.ino())) {
                usage.inodes += 1;
                usage.data_bytes += meta.len();
                usage.blocks_bytes += meta.len().div_ceil(BLOCK) * BLOCK
                    + if meta.len() > 12 * BLOCK { BLOCK } else { 0 };
            }
        }
    }
    Ok(usage)
}

/// Runs mkfs.ext4 to fill `file` (created sparse here) from `staging`.
/// `uuid` (derived from the image digest) lets a guest or an operator tell which image a disk holds.
pub(crate) fn build(
    staging: &Path,
    file: &Path,
    usage: &Usage,
    free_bytes: u64,
    uuid: &str,
) -> Result<(), ImageError> {
    // Content + 10% + inode tables + journal/metadata headroom + the free space asked for.
    let inodes = (usage.inodes + usage.inodes / 5 + free_bytes / 16384).max(4096);
    let content = usage.blocks_bytes + usage.blocks_bytes / 10 + inodes * 256;
    let size = (content + 64 * MIB + content / 32 + free_bytes).div_ceil(4 * MIB) * 4 * MIB;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(file)
        .map_err(ImageError::store(file))?;
    f.set_len(size).map_err(ImageError::store(file))?;
    drop(f);

    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-m",
            "0",
            "-L",
            "hearth-root",
            "-U",
            uuid,
            "-E",
            "root_owner=0:0",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(staging)
        .arg(file)
        .arg(format!("{}k", size / 1024))
        .output()
        .map_err(|source| ImageError::MkfsSpawn { source })?;
    if !out.status.success() {
        return Err(ImageError::Mkfs {
            path: file.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
