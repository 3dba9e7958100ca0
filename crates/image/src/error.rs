//! The one error type of this crate. Every variant names the object that failed
//! (image reference, blob digest, layer entry, path) and, where it helps, what to do.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image store directory itself could not be read or written.
    #[error("image store {path}: {source}; check that the data directory exists and is writable")]
    Store {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The store's index file is not valid JSON of the expected shape.
    #[error("image index {path} is corrupt: {source}; move it aside and re-import the images")]
    CorruptIndex {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// An image name given to `import` is not usable.
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// No image matches the reference.
    #[error("image {reference} not found; run `hearth image ls` to see the images present, or `hearth image import` to add it")]
    NotFound { reference: String },

    /// A digest prefix matches more than one image.
    #[error("image reference {reference} is ambiguous: it matches {matches:?}; give more digest characters")]
    Ambiguous {
        reference: String,
        matches: Vec<String>,
    },

    /// The import source is none of the supported kinds.
    #[error("{path} is not a root filesystem directory, an OCI image layout (oci-layout + index.json) or a docker-archive tarball (`docker save` output)")]
    UnknownSource { path: PathBuf },

    /// A file of the import source could not be read.
    #[error("cannot read {path} of image source {source_path}: {source}")]
    SourceRead {
        source_path: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A digest string is not `sha256:` followed by 64 lowercase hex digits.
    #[error("invalid digest {digest:?} in {context}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest { digest: String, context: String },

    /// A blob named by a descriptor is absent from the source.
    #[error("blob {digest} is missing from the image source: {source}; the image layout or archive is incomplete")]
    BlobMissing {
        digest: String,
        #[source]
        source: io::Error,
    },

    /// A blob's content does not hash to its descriptor's digest.
    #[error("blob {digest} is corrupt: its content hashes to {actual}; re-export the image")]
    BlobDigestMismatch { digest: String, actual: String },

    /// A blob's size differs from its descriptor's size.
    #[error(
        "blob {digest} is {actual} bytes but its descriptor says {expected}; re-export the image"
    )]
    BlobSizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },

    /// A JSON document (index, manifest, config, manifest.json) could not be parsed.
    #[error("{object} is not valid: {source}")]
    BadJson {
        object: String,
        #[source]
        source: serde_json::Error,
    },

    /// The image source is structurally wrong (e.g. a manifest without layers, a docker archive without manifest.json).
    #[error("{object}: {reason}")]
    BadSource { object: String, reason: String },

    /// No manifest for linux/amd64 is present.
    #[error(
        "image has no linux/amd64 variant (platforms present: {present}); export the amd64 image"
    )]
    NoMatchingPlatform { present: String },

    /// A layer uses a media type this crate cannot unpack.
    #[error("layer {digest} has unsupported media type {media_type}; supported: tar, tar+gzip, tar+zstd")]
    UnsupportedMediaType { digest: String, media_type: String },

    /// A layer's stream is not a valid (compressed) tar: truncated, corrupt or unreadable.
    #[error("layer {blob} is unreadable or corrupt (truncated gzip/zstd or bad tar): {source}")]
    LayerRead {
        blob: String,
        #[source]
        source: io::Error,
    },

    /// An entry's path would land outside the root filesystem, or is otherwise unusable.
    #[error("layer {blob}: entry {entry:?} is rejected: {reason}")]
    UnsafeEntry {
        blob: String,
        entry: String,
        reason: String,
    },

    /// Writing an entry into the staging root failed.
    #[error("layer {blob}: cannot {op} entry {entry:?}: {source}")]
    Unpack {
        blob: String,
        entry: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// A configured limit was exceeded.
    #[error(
        "{object} exceeds the limit {limit} = {max}; raise Limits::{limit} if the image is trusted"
    )]
    LimitExceeded {
        object: String,
        limit: &'static str,
        max: u64,
    },

    /// A registry reference cannot be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// A pull failed; `source` says how. Every pull error names the reference.
    #[error("pulling {reference}: {source}")]
    Pull {
        reference: String,
        #[source]
        source: Box<ImageError>,
    },

    /// The registry answered 401/403: no or wrong credentials.
    #[error("registry {registry} refused access ({status}); log in with `hearth login {registry}` (or `docker login`) and check the repository name")]
    RegistryUnauthorized { registry: String, status: u16 },

    /// The registry has no such repository, tag or digest.
    #[error("the registry {registry} has no such image (manifest unknown)")]
    RegistryNotFound { registry: String },

    /// The registry failed (5xx, an unexpected answer, a broken connection, TLS).
    #[error("registry {registry} failed while fetching {what}: {reason}")]
    Registry {
        registry: String,
        what: String,
        reason: String,
    },

    /// The registry sent nothing for longer than the timeout.
    #[error("registry {registry} stalled: no answer for {secs}s while fetching {what}; raise hearthd --registry-timeout if it is just slow")]
    RegistryTimeout {
        registry: String,
        what: String,
        secs: u64,
    },

    /// The credentials file cannot be read or written.
    #[error("registry credentials {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },

    /// A concurrent pull of the same image, which this one joined, failed.
    #[error(transparent)]
    Shared(Arc<ImageError>),

    /// `mkfs.ext4` could not be started (is e2fsprogs installed?).
    #[error("cannot run mkfs.ext4: {source}; install e2fsprogs (1.43 or newer, for -d)")]
    MkfsSpawn {
        #[source]
        source: io::Error,
    },

    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 failed building {path} ({status}): {stderr}")]
    Mkfs {
        path: PathBuf,
        status: String,
        stderr: String,
    },
}

impl ImageError {
    pub(crate) fn store(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Store { path, source }
    }
}

impl ImageError {
    /// True when the reference names no image.
    pub fn is_not_found(&self) -> bool {
        match self {
            ImageError::Pull { source, .. } => source.is_not_found(),
            ImageError::Shared(e) => e.is_not_found(),
            e => matches!(
                e,
                ImageError::NotFound { .. } | ImageError::RegistryNotFound { .. }
            ),
        }
    }

    /// True when the caller's input (a name, a reference or the image source)
    /// is at fault rather than this host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ImageError::Pull { source, .. } => return source.is_bad_input(),
            ImageError::Shared(e) => return e.is_bad_input(),
            _ => {}
        }
        !matches!(
            self,
            ImageError::Store { .. }
                | ImageError::CorruptIndex { .. }
                | ImageError::MkfsSpawn { .. }
                | ImageError::Mkfs { .. }
                | ImageError::NotFound { .. }
                | ImageError::Registry { .. }
                | ImageError::RegistryTimeout { .. }
                | ImageError::Credentials { .. }
        )
    }
}
