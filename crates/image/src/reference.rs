//! Image names (`NAME[:TAG]`) and references (a name, or a `sha256:` digest prefix).

use crate::ImageError;

pub(crate) const DEFAULT_TAG: &str = "latest";

/// Normalizes `NAME` or `NAME:TAG` to `NAME:TAG`.
pub(crate) fn normalize_name(name: &str) -> Result<String, ImageError> {
    let invalid = |reason| ImageError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > 255 {
        return Err(invalid("it is longer than 255 bytes"));
    }
    if name.starts_with("sha256:") {
        return Err(invalid("a name cannot look like a digest"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
    {
        return Err(invalid(
            "only ASCII letters, digits and . _ - / : @ are allowed",
        ));
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    let full = if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:{DEFAULT_TAG}")
    };
    if full.ends_with(':') || full.starts_with(':') || full.starts_with('/') {
        return Err(invalid("empty name or tag"));
    }
    Ok(full)
}

/// What a reference points at.
pub(crate) enum Reference {
    /// `sha256:` followed by a (possibly partial) hex digest.
    DigestPrefix(String),
    /// A normalized `NAME:TAG`.
    Name(String),
}

pub(crate) fn parse(reference: &str) -> Result<Reference, ImageError> {
    if let Some(hex) = reference.strip_prefix("sha256:") {
        if hex.is_empty() || hex.len() > 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImageError::NotFound {
                reference: reference.to_string(),
            });
        }
        return Ok(Reference::DigestPrefix(format!(
            "sha256:{}",
            hex.to_ascii_lowercase()
        )));
    }
    normalize_name(reference)
        .map(Reference::Name)
        .map_err(|_| ImageError::NotFound {
            reference: reference.to_string(),
        })
}
