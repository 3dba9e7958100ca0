//! sha256 digests: parsing, hashing, and verifying blobs against their descriptors.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::ImageError;

/// Checks `digest` is `sha256:<64 lowercase hex>` and returns the hex part.
pub(crate) fn hex_of<'d>(digest: &'d str, context: &str) -> Result<&'d str, ImageError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(hex)
    } else {
        Err(ImageError::InvalidDigest {
            digest: digest.to_string(),
            context: context.to_string(),
        })
    }
}

pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) fn of_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Hashes a whole stream; returns the digest and the byte count.
pub(crate) fn of_reader(mut r: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), size))
}

/// Fails unless `actual`/`actual_size` match the descriptor's digest and size.
pub(crate) fn verify(
    expected: &str,
    expected_size: Option<u64>,
    actual: &str,
    actual_size: u64,
) -> Result<(), ImageError> {
    if let Some(size) = expected_size {
        if size != actual_size {
            return Err(ImageError::BlobSizeMismatch {
                digest: expected.to_string(),
                expected: size,
                actual: actual_size,
            });
        }
    }
    if expected != actual {
        return Err(ImageError::BlobDigestMismatch {
            digest: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}
