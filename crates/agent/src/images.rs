//! The agent's registry side: pulls (progress reported as API events), registry
//! logins and pruning of the image store. Imports and lookups live with the
//! sandbox lifecycle in `sandbox.rs`.

use hearth_api::{Image, PullEvent};
use hearth_image::Progress;

use crate::sandbox::to_api_image;
use crate::{Agent, AgentError};

fn event(p: Progress) -> PullEvent {
    match p {
        Progress::Resolved {
            digest,
            layers,
            bytes,
        } => PullEvent::Resolved {
            digest,
            layers,
            bytes,
        },
        Progress::Fetching {
            index,
            total,
            digest,
            done,
            size,
        } => PullEvent::Fetching {
            layer: index,
            layers: total,
            digest,
            done,
            size,
        },
        Progress::Fetched {
            index,
            total,
            digest,
            size,
            cached,
        } => PullEvent::Fetched {
            layer: index,
            layers: total,
            digest,
            size,
            cached,
        },
        Progress::Layer {
            index,
            total,
            bytes,
        } => PullEvent::Unpacked {
            layer: index,
            layers: total,
            bytes,
        },
        Progress::BuildingFs => PullEvent::BuildingFs,
        Progress::Reused | Progress::Done => PullEvent::Reused,
    }
}

impl Agent {
    /// Pulls `reference` from its registry; `progress` sees each step. Concurrent
    /// pulls of one reference share the work.
    pub async fn pull_image(
        &self,
        reference: &str,
        progress: impl Fn(PullEvent) + Send + Sync,
    ) -> Result<Image, AgentError> {
        let rec = self
            .inner
            .puller
            .pull(reference, |p| {
                if p != Progress::Done {
                    progress(event(p))
                }
            })
            .await?;
        Ok(to_api_image(rec))
    }

    /// Stores credentials for `registry` (used by every later pull from it).
    pub async fn registry_login(
        &self,
        registry: &str,
        username: &str,
        password: &str,
    ) -> Result<(), AgentError> {
        let creds = self.inner.puller.credentials().clone();
        let (r, u, p) = (
            registry.to_string(),
            username.to_string(),
            password.to_string(),
        );
        tokio::task::spawn_blocking(move || creds.store(&r, &u, &p))
            .await
            .map_err(|e| AgentError::Config(format!("registry login panicked: {e}")))??;
        Ok(())
    }

    /// Deletes root filesystems and cached blobs that no image uses.
    pub async fn prune_images(&self) -> Result<hearth_api::PruneReport, AgentError> {
        let store = self.inner.images.clone();
        let r = tokio::task::spawn_blocking(move || store.prune())
            .await
            .map_err(|e| AgentError::Config(format!("image prune panicked: {e}")))??;
        Ok(hearth_api::PruneReport {
            rootfs_removed: r.rootfs_removed,
            blobs_removed: r.blobs_removed,
            bytes_freed: r.bytes_freed,
        })
    }
}
