//! Pulling images from OCI / Docker registries (Distribution API v2, spoken by
//! `oci-client`).
//!
//! One pull: resolve the reference to an image manifest (an image index or
//! manifest list picks linux/amd64), check each document against its digest,
//! fetch the config and layers into the content-addressed blob cache
//! (`blob_cache.rs`: a blob already there is not fetched again, so images share
//! layers), then hand the layers to the same verify + unpack + mkfs path as a
//! local import. Concurrent pulls of one reference in this process join a
//! single pull (`Puller::pull`). Plain HTTP is used only for registries marked
//! insecure and for loopback ones; every wait on a registry is bounded.

mod blob_cache;
mod credentials;
mod remote;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use oci_client::Reference;
use tokio::sync::broadcast;

pub use credentials::Credentials;

use crate::compression::Compression;
use crate::config::OciConfig;
use crate::source::{LayerBlob, Prepared, MAX_JSON_BYTES};
use crate::{reference, ImageError, ImageRecord, ImageStore, Progress};
use blob_cache::BlobCache;
use remote::Remote;

/// How this host talks to registries.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Registries (`HOST[:PORT]`) reached over plain HTTP. Loopback registries always are.
    pub insecure: Vec<String>,
    /// Longest wait for a registry's answer, or for the next bytes of a blob.
    pub timeout: Duration,
    pub credentials: Credentials,
}

type PullResult = Result<ImageRecord, Arc<ImageError>>;

struct InFlight {
    result: Shared<BoxFuture<'static, PullResult>>,
    progress: broadcast::Sender<Progress>,
}

/// Pulls images into an [`ImageStore`]. Cheap to clone; clones share in-flight pulls.
#[derive(Clone)]
pub struct Puller {
    store: ImageStore,
    opts: Arc<RegistryOptions>,
    inflight: Arc<Mutex<HashMap<String, InFlight>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Puller {
    pub fn new(store: ImageStore, opts: RegistryOptions) -> Puller {
        Puller {
            store,
            opts: Arc::new(opts),
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn credentials(&self) -> &Credentials {
        &self.opts.credentials
    }

    /// The name a pull of `reference` is stored under (`REGISTRY/REPO:TAG` or `…@sha256:…`).
    pub fn canonical_name(reference: &str) -> Result<String, ImageError> {
        Ok(parse(reference)?.whole())
    }

    /// Pulls `reference` (unless its root filesystem is already built) and names it
    /// `REGISTRY/REPOSITORY:TAG` (or `…@DIGEST`). Joins a pull of the same reference
    /// already running in this process; `progress` sees that pull's events from now on.
    pub async fn pull(
        &self,
        reference: &str,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<ImageRecord, ImageError> {
        let parsed = parse(reference)?;
        let key = parsed.whole();
        let (result, mut events) = {
            let mut map = lock(&self.inflight);
            match map.get(&key) {
                Some(f) => (f.result.clone(), f.progress.subscribe()),
                None => {
                    let (tx, rx) = broadcast::channel(1024);
                    let this = self.clone();
                    let (task_key, task_tx) = (key.clone(), tx.clone());
                    // why: a task, so the pull finishes (and its result is shared)
                    // even when the client that started it goes away. The map lock
                    // is held until the entry is in, so the task's removal comes after.
                    let task = tokio::spawn(async move {
                        let r = this.pull_once(parsed, &task_tx).await.map_err(|e| {
                            Arc::new(ImageError::Pull {
                                reference: task_key.clone(),
                                source: Box::new(e),
                            })
                        });
                        lock(&this.inflight).remove(&task_key);
                        r
                    });
                    let result = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Arc::new(ImageError::Registry {
                                registry: String::new(),
                                what: "the pull".into(),
                                reason: format!("pull task failed: {e}"),
                            }))
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(
                        key,
                        InFlight {
                            result: result.clone(),
                            progress: tx,
                        },
                    );
                    (result, rx)
                }
            }
        };
        let mut result = std::pin::pin!(result);
        let outcome = loop {
            tokio::select! {
                r = &mut result => break r,
                ev = events.recv() => match ev {
                    Ok(p) => progress(p),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break (&mut result).await,
                },
            }
        };
        while let Ok(p) = events.try_recv() {
            progress(p);
        }
        outcome.map_err(|e| Arc::try_unwrap(e).unwrap_or_else(ImageError::Shared))
    }

    async fn pull_once(
        &self,
        reference: Reference,
        tx: &broadcast::Sender<Progress>,
    ) -> Result<ImageRecord, ImageError> {
        let send = |p: Progress| {
            let _ = tx.send(p);
        };
        let name = reference::normalize_name(&reference.whole())?;
        let remote = Remote::new(reference, &self.opts)?;
        let (digest, manifest) = remote.resolve_manifest().await?;
        let total = manifest.layers.len();
        send(Progress::Resolved {
            digest: digest.clone(),
            layers: total,
            bytes: manifest.layers.iter().map(|l| l.size).sum(),
        });
        let limits = &self.store.limits;
        if total as u64 > limits.max_entries {
            return Err(ImageError::LimitExceeded {
                object: format!("manifest {digest} ({total} layers)"),
                limit: "max_entries",
                max: limits.max_entries,
            });
        }
        let cache = BlobCache::new(
            self.store.root.join("blob-cache/sha256"),
            self.store.root.join("tmp"),
        );

        if manifest.config.size > MAX_JSON_BYTES {
            return Err(ImageError::LimitExceeded {
                object: format!("config {}", manifest.config.digest),
                limit: "MAX_JSON_BYTES",
                max: MAX_JSON_BYTES,
            });
        }
        let (mut config_file, _) = remote
            .fetch(&cache, &manifest.config, "config", |_| {})
            .await?;
        let mut config_bytes = Vec::new();
        std::io::Read::read_to_end(&mut config_file, &mut config_bytes)
            .map_err(ImageError::store(cache.path(&manifest.config.digest)?))?;
        let config =
            OciConfig::parse(&format!("config {}", manifest.config.digest), &config_bytes)?;
        config.check_platform()?;

        let mut blobs = vec![manifest.config.digest.clone()];
        blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        let mut layers = Vec::new();
        if !self.store.has_rootfs(&digest)? {
            for (i, desc) in manifest.layers.iter().enumerate() {
                let compression = Compression::from_media_type(&desc.digest, &desc.media_type)?;
                if desc.size > limits.max_image_bytes {
                    return Err(ImageError::LimitExceeded {
                        object: format!("layer {} ({} bytes compressed)", desc.digest, desc.size),
                        limit: "max_image_bytes",
                        max: limits.max_image_bytes,
                    });
                }
                let what = format!("layer {}/{total} {}", i + 1, desc.digest);
                let (file, cached) = remote
                    .fetch(&cache, desc, &what, |done| {
                        send(Progress::Fetching {
                            index: i + 1,
                            total,
                            digest: desc.digest.clone(),
                            done,
                            size: desc.size,
                        })
                    })
                    .await?;
                send(Progress::Fetched {
                    index: i + 1,
                    total,
                    digest: desc.digest.clone(),
                    size: desc.size,
                    cached,
                });
                layers.push(LayerBlob {
                    digest: desc.digest.clone(),
                    size: Some(desc.size),
                    compression,
                    file,
                    // why: a blob fetched now was hashed as it arrived; one found in
                    // the cache is hashed again before use (the disk is not trusted).
                    verified: !cached,
                });
            }
        }
        let mut prepared = Prepared {
            digest,
            config: config.image_config(),
            layers,
            blobs,
        };
        let store = self.store.clone();
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let work = store.work_dir("pull-")?;
            store.install(name, &mut prepared, work.path(), &|p| {
                let _ = tx.send(p);
            })
        })
        .await
        .map_err(|e| ImageError::Store {
            path: self.store.root.clone(),
            source: std::io::Error::other(format!("building the root filesystem panicked: {e}")),
        })?
    }
}

fn parse(reference: &str) -> Result<Reference, ImageError> {
    reference
        .parse::<Reference>()
        .map_err(|e| ImageError::InvalidReference {
            reference: reference.to_string(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_spell_out_registry_and_tag() {
        assert_eq!(
            Puller::canonical_name("127.0.0.1:5000/x").unwrap(),
            "127.0.0.1:5000/x:latest"
        );
        assert_eq!(
            Puller::canonical_name("docker.io/alpine:3.20").unwrap(),
            "docker.io/library/alpine:3.20"
        );
    }
}
