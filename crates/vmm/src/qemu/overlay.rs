//! The sandbox's writable layer: a qcow2 overlay over the read-only base ext4.

use std::path::Path;

use tokio::process::Command;

use crate::error::VmmError;

/// `qemu-img create -f qcow2 <disk> <bytes>`: a standalone empty disk.
pub async fn create_blank(
    qemu_img: &Path,
    id: &str,
    bytes: u64,
    disk: &Path,
) -> Result<(), VmmError> {
    qcow2_create(
        qemu_img,
        id,
        disk,
        &[disk.as_os_str(), bytes.to_string().as_ref()],
    )
    .await
}

/// Runs `qemu-img create -f qcow2 <args>` for the disk `disk` of VM `id`.
async fn qcow2_create(
    qemu_img: &Path,
    id: &str,
    disk: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<(), VmmError> {
    let out = Command::new(qemu_img)
        .args(["create", "-f", "qcow2"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                VmmError::QemuImgNotFound {
                    binary: qemu_img.to_path_buf(),
                }
            } else {
                VmmError::Spawn {
                    id: id.to_string(),
                    binary: qemu_img.to_path_buf(),
                    source,
                }
            }
        })?;
    if !out.status.success() {
        return Err(VmmError::Overlay {
            id: id.to_string(),
            overlay: disk.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Virtual size in bytes of the qcow2 image `path`, off its header (big-endian
/// `size` at offset 24, after the magic `QFI\xfb`).
pub fn virtual_size(path: &Path) -> Result<u64, VmmError> {
    use std::io::Read;
    let io = |source| VmmError::Io {
        op: "read the qcow2 header of",
        path: path.to_path_buf(),
        source,
    };
    let mut header = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(io)?;
    if header[..4] != *b"QFI\xfb" {
        return Err(io(std::io::Error::other("not a qcow2 image")));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&header[24..32]);
    Ok(u64::from_be_bytes(size))
}

/// `qemu-img create -f qcow2 -F raw -b <abs base> <overlay>`.
pub async fn create_overlay(
    qemu_img: &Path,
    id: &str,
    base: &Path,
    overlay: &Path,
) -> Result<(), VmmError> {
    // why: qcow2 resolves a relative backing path against the overlay's directory, not our cwd.
    let base = std::fs::canonicalize(base).map_err(|source| VmmError::Io {
        op: "resolve root filesystem",
        path: base.to_path_buf(),
        source,
    })?;
    qcow2_create(
        qemu_img,
        id,
        overlay,
        &[
            "-F".as_ref(),
            "raw".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            overlay.as_os_str(),
        ],
    )
    .await
}
