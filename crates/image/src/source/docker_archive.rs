//! `docker save` tarballs: `manifest.json` names the config and the layer tars.
//! The archive is first unpacked (with the same confined unpacker as layers, but
//! without whiteouts or ownership) into the import's work directory.

use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{read_small, synthesized_digest, LayerBlob, Prepared};
use crate::compression::Compression;
use crate::config::OciConfig;
use crate::confined::Confined;
use crate::unpack::{Unpacker, PLAIN_ARCHIVE};
use crate::{digest, ImageError, Limits};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

pub(crate) fn prepare(
    tarball: &Path,
    work: &Path,
    limits: &Limits,
) -> Result<Prepared, ImageError> {
    let object = format!("docker archive {}", tarball.display());
    let extracted = work.join("archive");
    fs::create_dir(&extracted).map_err(ImageError::store(&extracted))?;
    let root = Confined::open(&extracted).map_err(ImageError::store(&extracted))?;
    extract(tarball, &root, &object, limits)?;

    if !extracted.join("manifest.json").is_file() {
        if extracted.join("oci-layout").is_file() && extracted.join("index.json").is_file() {
            return super::oci_layout::prepare(&extracted);
        }
        return Err(ImageError::BadSource {
            object,
            reason: "has no manifest.json; is it `docker save` output?".into(),
        });
    }
    let manifest_bytes = read_small(&root, Path::new("manifest.json"))?;
    let entries: Vec<Entry> =
        serde_json::from_slice(&manifest_bytes).map_err(|source| ImageError::BadJson {
            object: format!("{object}: manifest.json"),
            source,
        })?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => {
            return Err(ImageError::BadSource {
                object,
                reason: "manifest.json lists no image".into(),
            })
        }
        many => {
            let tags: Vec<String> = many
                .iter()
                .map(|e| e.repo_tags.clone().unwrap_or_default().join(","))
                .collect();
            return Err(ImageError::BadSource {
                object,
                reason: format!(
                    "holds {} images ({}); save one image per archive",
                    many.len(),
                    tags.join("; ")
                ),
            });
        }
    };

    let config_bytes = read_small(&root, Path::new(&entry.config))?;
    let config_digest = digest::of_bytes(&config_bytes);
    if let Some(named) = digest_in_name(&entry.config) {
        digest::verify(
            &named,
            Some(config_bytes.len() as u64),
            &config_digest,
            config_bytes.len() as u64,
        )?;
    }
    let config = OciConfig::parse(&format!("{object}: config {}", entry.config), &config_bytes)?;
    config.check_platform()?;

    let mut layers = Vec::with_capacity(entry.layers.len());
    let mut descriptors = Vec::with_capacity(entry.layers.len());
    for path in &entry.layers {
        let mut file =
            root.open_file(Path::new(path))
                .map_err(|source| ImageError::BlobMissing {
                    digest: format!("{object}: {path}"),
                    source,
                })?;
        let read_err = |source| ImageError::LayerRead {
            blob: format!("{object}: {path}"),
            source,
        };
        let (layer_digest, size) = digest::of_reader(&mut file).map_err(read_err)?;
        if let Some(named) = digest_in_name(path) {
            digest::verify(&named, None, &layer_digest, size)?;
        }
        let mut head = [0u8; 4];
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        let n = file.read(&mut head).map_err(read_err)?;
        let compression = Compression::sniff(&head[..n]);
        descriptors.push((layer_digest.clone(), size, compression));
        layers.push(LayerBlob {
            digest: layer_digest,
            size: Some(size),
            compression,
            file,
            verified: true,
        });
    }
    Ok(Prepared {
        digest: synthesized_digest(&config_bytes, &descriptors),
        config: config.image_config(),
        layers,
        blobs: Vec::new(),
    })
}

/// Unpacks the (possibly gzip'd) archive into `root`, confined and limited like a layer.
fn extract(
    tarball: &Path,
    root: &Confined,
    object: &str,
    limits: &Limits,
) -> Result<(), ImageError> {
    let read_err = |source| ImageError::SourceRead {
        source_path: tarball.to_path_buf(),
        path: tarball.to_path_buf(),
        source,
    };
    let mut file = File::open(tarball).map_err(read_err)?;
    let mut head = [0u8; 4];
    let n = file.read(&mut head).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let stream = Compression::sniff(&head[..n])
        .decoder(BufReader::new(file))
        .map_err(|source| ImageError::LayerRead {
            blob: object.to_string(),
            source,
        })?;
    // The archive holds every layer (compressed), so it is bounded by the image limits.
    let archive_limits = Limits {
        max_layer_bytes: limits.max_image_bytes,
        ..limits.clone()
    };
    Unpacker::new(root, &archive_limits, PLAIN_ARCHIVE).apply_layer(object, stream)?;
    Ok(())
}

/// `blobs/sha256/<hex>` or `<hex>.json` / `<hex>/layer.tar` name their content's digest.
fn digest_in_name(path: &str) -> Option<String> {
    let p = PathBuf::from(path);
    let file = p.file_name()?.to_str()?;
    let stem = file.strip_suffix(".json").unwrap_or(file);
    if digest::is_hex64(stem) && (file.ends_with(".json") || path.contains("blobs/sha256/")) {
        return Some(format!("sha256:{stem}"));
    }
    None
}
