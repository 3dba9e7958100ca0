//! The sandbox's writable layer: a qcow2 overlay over the read-only base ext4.

use std::path::Path;

use tokio::process::Command;

use crate::error::VmmError;

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
    let out = Command::new(qemu_img)
        .args(["create", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(overlay)
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
            overlay: overlay.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
