//! Templates: an image booted once to a ready guest agent and snapshotted, so
//! sandboxes of that image start by restore instead of boot.
//!
//! On disk: `templates/<name>/` = a snapshot directory (see `hearth_vmm::snapshot`)
//! plus `template.json` ([`TemplateMeta`]). It is built in `templates/.build-<random>/`
//! and renamed into place, so a half-made template is never used.

use std::path::PathBuf;

use hearth_api::{CreateTemplate, Template, DEFAULT_CPUS};
use hearth_vmm::{AfterSave, SaveOptions, Vmm};
use serde::{Deserialize, Serialize};

use crate::durable::{self, DirSync};
use crate::guest_conn::GuestConn;
use crate::restore::WarmSource;
use crate::sandbox::{io_err, new_id, now_ms, valid_name, Agent, AgentError, HELLO_TIMEOUT};
use crate::warm_pool::run_warm_up;

/// Format of `template.json`.
const TEMPLATE_META_VERSION: u32 = 1;
/// Memory of a template's VMs unless asked otherwise: small, so many fit.
pub const DEFAULT_TEMPLATE_MEMORY_MIB: u32 = 128;
/// First guest session id free in a template's guest (1 was its warm-up process).
pub(crate) const TEMPLATE_NEXT_SESSION: u32 = 2;
/// Largest warm pool per template.
pub const MAX_POOL: u32 = 64;

/// `template.json`: what the agent knows about a template beside its snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TemplateMeta {
    pub version: u32,
    pub name: String,
    pub image: String,
    pub image_digest: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub pool_size: u32,
    pub created_ms: u64,
    /// Saved with a network device (always on hub 0: its pool's VMs are restored
    /// before their sandbox's tap exists), so it serves networked sandboxes too;
    /// false for templates of older hearthd and of nodes without networking.
    #[serde(default)]
    pub nic: bool,
    /// The template's guest guards restores (its Hello said so; see
    /// `hearth_proto::RESTORE_GUARD`); false for templates of older builds.
    #[serde(default)]
    pub restore_guard: bool,
}

/// `docker.io/library/busybox:1.36` → `docker.io-library-busybox-1.36`.
fn default_name(image: &str) -> String {
    let n: String = image
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    n.trim_matches('-').chars().take(63).collect()
}

impl Agent {
    pub(crate) fn templates_root(&self) -> PathBuf {
        self.inner.cfg.data_dir.join("templates")
    }

    pub(crate) fn template_dir(&self, name: &str) -> PathBuf {
        self.templates_root().join(name)
    }

    pub(crate) fn template_meta(&self, name: &str) -> Option<TemplateMeta> {
        // why: names come from API paths; only plain names may reach the filesystem.
        if !valid_name(name) {
            return None;
        }
        let bytes = std::fs::read(self.template_dir(name).join("template.json")).ok()?;
        serde_json::from_slice::<TemplateMeta>(&bytes)
            .ok()
            .filter(|m| m.version == TEMPLATE_META_VERSION)
    }

    pub(crate) fn template_metas(&self) -> Vec<TemplateMeta> {
        let Ok(rd) = std::fs::read_dir(self.templates_root()) else {
            return Vec::new();
        };
        let mut v: Vec<TemplateMeta> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (!name.starts_with('.'))
                    .then(|| self.template_meta(&name))
                    .flatten()
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The template for an image digest whose shape fits the request.
    pub(crate) fn find_template(
        &self,
        image_digest: &str,
        cpus: Option<u32>,
        memory_mib: Option<u32>,
    ) -> Option<TemplateMeta> {
        self.template_metas().into_iter().find(|t| {
            t.image_digest == image_digest
                && cpus.is_none_or(|c| c == t.cpus)
                && memory_mib.is_none_or(|m| m == t.memory_mib)
        })
    }

    fn to_api_template(&self, t: &TemplateMeta) -> Template {
        let size_bytes = hearth_vmm::SnapshotManifest::load(&self.template_dir(&t.name))
            .map(|m| m.size_bytes())
            .unwrap_or(0);
        Template {
            name: t.name.clone(),
            image: t.image.clone(),
            image_digest: t.image_digest.clone(),
            cpus: t.cpus,
            memory_mib: t.memory_mib,
            pool_size: t.pool_size,
            pool_ready: self.pool_ready(&t.name),
            in_use: self.in_use(WarmSource::Template, &t.name),
            size_bytes,
            created_ms: t.created_ms,
        }
    }

    pub async fn list_templates(&self) -> Vec<Template> {
        self.template_metas()
            .iter()
            .map(|t| self.to_api_template(t))
            .collect()
    }

    /// Boots the image to a ready guest agent and snapshots it as a template.
    pub async fn create_template(&self, req: CreateTemplate) -> Result<Template, AgentError> {
        let name = req.name.clone().unwrap_or_else(|| default_name(&req.image));
        if !valid_name(&name) {
            return Err(AgentError::InvalidArgument(format!(
                "template name '{name}' is invalid: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )));
        }
        let pool_size = req.pool_size.unwrap_or(0);
        if pool_size > MAX_POOL {
            return Err(AgentError::InvalidArgument(format!(
                "pool size {pool_size} is out of range: give 0..={MAX_POOL}"
            )));
        }
        let probe = hearth_api::CreateSandbox {
            image: req.image.clone(),
            cpus: Some(req.cpus.unwrap_or(DEFAULT_CPUS)),
            memory_mib: Some(req.memory_mib.unwrap_or(DEFAULT_TEMPLATE_MEMORY_MIB)),
            ..Default::default()
        };
        let (cpus, memory_mib) = self.validate(&probe)?;
        let images = self.inner.images.clone();
        let reference = req.image.clone();
        let image = tokio::task::spawn_blocking(move || images.resolve(&reference))
            .await
            .map_err(|e| AgentError::Config(format!("image lookup panicked: {e}")))??;
        let dir = self.template_dir(&name);
        if dir.exists() {
            return Err(AgentError::Conflict(format!(
                "template '{name}' already exists; remove it with `hearth template rm {name}` first"
            )));
        }
        // why: not named after the template: a long name would overflow the VM's socket paths.
        let build = self.templates_root().join(format!(".build-{}", new_id()));
        std::fs::create_dir_all(&build).map_err(io_err(format!("create {}", build.display())))?;
        // why: on a node with networking the template carries a network device, so
        // both networked and `--network none` sandboxes start from it.
        let nic = self.net().is_some();
        let result = self
            .build_template(&name, &build, image.rootfs.clone(), cpus, memory_mib, nic)
            .await;
        let restore_guard = match result {
            Ok(g) => g,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&build);
                return Err(e);
            }
        };
        let meta = TemplateMeta {
            version: TEMPLATE_META_VERSION,
            name: name.clone(),
            image: req.image.clone(),
            image_digest: image.digest.clone(),
            cpus,
            memory_mib,
            pool_size,
            created_ms: now_ms(),
            nic,
            restore_guard,
        };
        let snap = build.join("snapshot");
        let write = serde_json::to_vec_pretty(&meta)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                durable::write(
                    &snap.join("template.json"),
                    &b,
                    durable::MODE_DEFAULT,
                    DirSync::Now,
                )
            });
        let installed = write
            .and_then(|_| std::fs::rename(&snap, &dir))
            .and_then(|_| durable::sync_dir(&self.templates_root()));
        if let Err(e) = installed {
            let _ = std::fs::remove_dir_all(&build);
            return Err(io_err(format!("install template {}", dir.display()))(e));
        }
        let _ = std::fs::remove_dir_all(&build);
        if let Ok(m) = hearth_vmm::SnapshotManifest::load(&dir) {
            self.inner.warm.mark_verified(&dir, &m);
        }
        self.ensure_pool(&meta);
        Ok(self.to_api_template(&meta))
    }

    /// Boots a VM in `build/vm` to the guest's Hello and saves it to `build/snapshot`;
    /// returns whether its guest guards restores.
    async fn build_template(
        &self,
        name: &str,
        build: &std::path::Path,
        rootfs: PathBuf,
        cpus: u32,
        memory_mib: u32,
        nic: bool,
    ) -> Result<bool, AgentError> {
        let id = format!("template-{}", new_id());
        let mut cfg = self.vm_config(
            &id,
            Some(&id),
            rootfs.clone(),
            (cpus, memory_mib),
            None,
            nic.then_some(crate::restore::NicMode::Hub),
        )?;
        cfg.dir = build.join("vm");
        let failed = |m: String| AgentError::VmFailed {
            id: format!("template {name}"),
            message: m,
        };
        let vm = self
            .inner
            .vmm
            .create(&cfg)
            .await
            .map_err(|e| failed(format!("cannot start VM: {e}")))?;
        let saved = async {
            let stream = vm.connect_agent().await.map_err(|e| e.to_string())?;
            vm.start().await.map_err(|e| e.to_string())?;
            let conn = GuestConn::handshake(stream, HELLO_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            // why: one process before the save leaves the exec path (busybox or the
            // image's `echo`, libc, dentries) in the snapshot's page cache.
            run_warm_up(&conn).await?;
            let opts = SaveOptions {
                kernel_sha256: self.inner.warm.host.kernel_sha256.clone(),
                cpus,
                memory_mib,
                base_rootfs: rootfs.clone(),
                after: AfterSave::Quit,
            };
            // why: the channel stays open across the save, so restored guests find
            // their host connected and never wait for it.
            let m = vm
                .save_snapshot(&build.join("snapshot"), &opts)
                .await
                .map_err(|e| e.to_string());
            let guarded = conn.guards_restores();
            drop(conn);
            m.map(|_| guarded)
        }
        .await;
        if saved.is_err() {
            let _ = vm.kill().await;
        }
        let _ = vm.wait().await;
        let _ = hearth_vmm::destroy(&cfg.dir);
        saved.map_err(failed)
    }

    /// Removes a template and drains its pool; refused while sandboxes run from it.
    pub async fn remove_template(&self, name: &str) -> Result<(), AgentError> {
        if self.template_meta(name).is_none() {
            return Err(AgentError::NotFound(format!(
                "template '{name}' not found; list templates with `hearth template ls`"
            )));
        }
        let away = self.detach_unused(WarmSource::Template, name, &self.template_dir(name))?;
        // why: after the rename: a refused removal leaves the pool as it was.
        self.close_pool(name).await;
        std::fs::remove_dir_all(&away).map_err(io_err(format!("remove {}", away.display())))
    }

    /// Sets the warm pool size of a template (persisted; the pool follows in the background).
    pub async fn set_pool_size(&self, name: &str, size: u32) -> Result<Template, AgentError> {
        if size > MAX_POOL {
            return Err(AgentError::InvalidArgument(format!(
                "pool size {size} is out of range: give 0..={MAX_POOL}"
            )));
        }
        let mut meta = self.template_meta(name).ok_or_else(|| {
            AgentError::NotFound(format!(
                "template '{name}' not found; list templates with `hearth template ls`"
            ))
        })?;
        meta.pool_size = size;
        let path = self.template_dir(name).join("template.json");
        serde_json::to_vec_pretty(&meta)
            .map_err(std::io::Error::other)
            .and_then(|b| durable::write(&path, &b, durable::MODE_DEFAULT, DirSync::Now))
            .map_err(io_err(format!("save {}", path.display())))?;
        self.ensure_pool(&meta);
        Ok(self.to_api_template(&meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_name_is_the_image_reference_made_safe() {
        assert_eq!(default_name("busybox"), "busybox");
        assert_eq!(
            default_name("docker.io/library/python:3.12-slim"),
            "docker.io-library-python-3.12-slim"
        );
    }
}
