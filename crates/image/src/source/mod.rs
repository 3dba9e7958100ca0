//! Image sources: each kind is turned into the same [`Prepared`] form — an image
//! digest, a config and an ordered list of layer blobs — before anything is unpacked.

pub(crate) mod directory;
pub(crate) mod docker_archive;
pub(crate) mod oci_layout;

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::compression::Compression;
use crate::confined::Confined;
use crate::{digest, ImageConfig, ImageError, Limits};

/// Largest JSON document (index, manifest, config) read from a source.
pub(crate) const MAX_JSON_BYTES: u64 = 4 << 20;

/// An image ready to unpack.
pub(crate) struct Prepared {
    /// `sha256:` of the manifest (or of the canonical manifest for synthesized ones).
    pub(crate) digest: String,
    pub(crate) config: ImageConfig,
    pub(crate) layers: Vec<LayerBlob>,
    /// Digests of the cached registry blobs (config, then layers) the image is made of;
    /// empty for local sources.
    pub(crate) blobs: Vec<String>,
}

/// One layer blob, open, with what its descriptor promises about it.
pub(crate) struct LayerBlob {
    pub(crate) digest: String,
    pub(crate) size: Option<u64>,
    pub(crate) compression: Compression,
    pub(crate) file: File,
    /// Whether the file's content was already hashed against `digest`.
    pub(crate) verified: bool,
}

impl LayerBlob {
    /// Verifies the blob (unless already done) and returns it positioned at its start.
    pub(crate) fn open_verified(&mut self) -> Result<&mut File, ImageError> {
        let io_err = |digest: &str| {
            let digest = digest.to_string();
            move |source| ImageError::LayerRead {
                blob: digest,
                source,
            }
        };
        if !self.verified {
            self.file
                .seek(SeekFrom::Start(0))
                .map_err(io_err(&self.digest))?;
            let (actual, size) = digest::of_reader(&mut self.file).map_err(io_err(&self.digest))?;
            digest::verify(&self.digest, self.size, &actual, size)?;
            self.verified = true;
        }
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io_err(&self.digest))?;
        Ok(&mut self.file)
    }
}

pub(crate) fn prepare(source: &Path, work: &Path, limits: &Limits) -> Result<Prepared, ImageError> {
    let read_err = |source_err| ImageError::SourceRead {
        source_path: source.to_path_buf(),
        path: source.to_path_buf(),
        source: source_err,
    };
    let meta = fs::metadata(source).map_err(read_err)?;
    if meta.is_dir() {
        if source.join("oci-layout").is_file() && source.join("index.json").is_file() {
            oci_layout::prepare(source)
        } else {
            directory::prepare(source, work, limits)
        }
    } else if meta.is_file() {
        docker_archive::prepare(source, work, limits)
    } else {
        Err(ImageError::UnknownSource {
            path: source.to_path_buf(),
        })
    }
}

/// Reads a small file inside a confined source root (a JSON document).
pub(crate) fn read_small(root: &Confined, rel: &Path) -> Result<Vec<u8>, ImageError> {
    let err = |source| ImageError::SourceRead {
        source_path: root.path().to_path_buf(),
        path: rel.to_path_buf(),
        source,
    };
    let file = root.open_file(rel).map_err(err)?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_JSON_BYTES {
        return Err(ImageError::LimitExceeded {
            object: format!("{} in {}", rel.display(), root.path().display()),
            limit: "MAX_JSON_BYTES",
            max: MAX_JSON_BYTES,
        });
    }
    Ok(bytes)
}

/// An OCI content descriptor.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) platform: Option<Platform>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Platform {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) variant: Option<String>,
}

/// Media types of image indexes (OCI) and manifest lists (docker).
pub(crate) const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// An image index or manifest list.
#[derive(Deserialize)]
pub(crate) struct Index {
    #[serde(default)]
    pub(crate) manifests: Vec<Descriptor>,
}

/// Picks the linux/amd64 entry of an index (else the one without a platform);
/// the error names the platforms that are present.
pub(crate) fn pick_linux_amd64<'l>(
    list: &'l [Descriptor],
    object: &str,
) -> Result<&'l Descriptor, ImageError> {
    let is_amd64 = |d: &Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    };
    list.iter()
        .find(|d| is_amd64(d))
        .or_else(|| list.iter().find(|d| d.platform.is_none()))
        .ok_or_else(|| {
            if list.is_empty() {
                return ImageError::BadSource {
                    object: object.to_string(),
                    reason: "lists no manifests".into(),
                };
            }
            let present: Vec<String> = list
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            ImageError::NoMatchingPlatform {
                present: present.join(", "),
            }
        })
}

/// An image manifest (OCI or docker v2 schema 2).
#[derive(Serialize, Deserialize)]
pub(crate) struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub(crate) schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: String,
    pub(crate) config: Descriptor,
    pub(crate) layers: Vec<Descriptor>,
}

/// The digest of a manifest synthesized for a source that has none (a directory or a
/// docker archive): canonical JSON of the config and layer descriptors.
pub(crate) fn synthesized_digest(
    config_bytes: &[u8],
    layers: &[(String, u64, Compression)],
) -> String {
    let manifest = Manifest {
        schema_version: 2,
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        config: Descriptor {
            media_type: "application/vnd.oci.image.config.v1+json".into(),
            digest: digest::of_bytes(config_bytes),
            size: config_bytes.len() as u64,
            platform: None,
        },
        layers: layers
            .iter()
            .map(|(d, size, c)| Descriptor {
                media_type: c.media_type().into(),
                digest: d.clone(),
                size: *size,
                platform: None,
            })
            .collect(),
    };
    // Serializing plain structs and strings cannot fail.
    digest::of_bytes(&serde_json::to_vec(&manifest).unwrap_or_default())
}
