//! OCI image layout directories: `index.json` → (image index →) manifest → config + layers.
//! Every blob read is checked against its descriptor's sha256 and size.

use std::path::{Path, PathBuf};

use super::{read_small, Descriptor, Index, LayerBlob, Manifest, Prepared, INDEX_TYPES};
use crate::compression::Compression;
use crate::config::OciConfig;
use crate::confined::Confined;
use crate::{digest, ImageError};

pub(crate) fn prepare(dir: &Path) -> Result<Prepared, ImageError> {
    let root = Confined::open(dir).map_err(|source| ImageError::SourceRead {
        source_path: dir.to_path_buf(),
        path: dir.to_path_buf(),
        source,
    })?;
    let index_bytes = read_small(&root, Path::new("index.json"))?;
    let index: Index = parse(&format!("{}/index.json", dir.display()), &index_bytes)?;
    let manifest_desc = choose(&root, &index.manifests, "index.json", 0)?;
    let manifest_bytes = read_blob(&root, &manifest_desc)?;
    let manifest: Manifest = parse(
        &format!("manifest {}", manifest_desc.digest),
        &manifest_bytes,
    )?;

    let config_bytes = read_blob(&root, &manifest.config)?;
    let config = OciConfig::parse(&format!("config {}", manifest.config.digest), &config_bytes)?;
    config.check_platform()?;

    let mut layers = Vec::with_capacity(manifest.layers.len());
    for desc in &manifest.layers {
        let compression = Compression::from_media_type(&desc.digest, &desc.media_type)?;
        let file = root
            .open_file(&blob_path(&desc.digest, "layer")?)
            .map_err(|source| ImageError::BlobMissing {
                digest: desc.digest.clone(),
                source,
            })?;
        layers.push(LayerBlob {
            digest: desc.digest.clone(),
            size: Some(desc.size),
            compression,
            file,
            verified: false,
        });
    }
    Ok(Prepared {
        digest: manifest_desc.digest,
        config: config.image_config(),
        layers,
        blobs: Vec::new(),
    })
}

/// Picks the linux/amd64 image manifest among `list`, descending into image indexes.
fn choose(
    root: &Confined,
    list: &[Descriptor],
    object: &str,
    depth: u32,
) -> Result<Descriptor, ImageError> {
    if depth > 4 {
        return Err(ImageError::BadSource {
            object: object.to_string(),
            reason: "image indexes nest more than 4 deep".into(),
        });
    }
    let chosen = super::pick_linux_amd64(list, object)?;
    if INDEX_TYPES.contains(&chosen.media_type.as_str()) {
        let bytes = read_blob(root, chosen)?;
        let index: Index = parse(&format!("image index {}", chosen.digest), &bytes)?;
        return choose(
            root,
            &index.manifests,
            &format!("image index {}", chosen.digest),
            depth + 1,
        );
    }
    Ok(chosen.clone())
}

fn blob_path(digest: &str, what: &str) -> Result<PathBuf, ImageError> {
    let hex = digest::hex_of(digest, what)?;
    Ok(PathBuf::from("blobs/sha256").join(hex))
}

/// Reads a JSON blob and checks it against its descriptor.
fn read_blob(root: &Confined, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let path = blob_path(&desc.digest, "descriptor")?;
    let bytes = read_small(root, &path).map_err(|e| match e {
        ImageError::SourceRead { source, .. } => ImageError::BlobMissing {
            digest: desc.digest.clone(),
            source,
        },
        other => other,
    })?;
    digest::verify(
        &desc.digest,
        Some(desc.size),
        &digest::of_bytes(&bytes),
        bytes.len() as u64,
    )?;
    Ok(bytes)
}

fn parse<T: serde::de::DeserializeOwned>(object: &str, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::BadJson {
        object: object.to_string(),
        source,
    })
}
