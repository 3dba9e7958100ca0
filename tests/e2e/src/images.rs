//! Test images, made from scratch: a busybox root filesystem directory, and OCI
//! image layouts / docker archives written by hand (layers are tars built here).

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

/// A busybox root filesystem directory (scripts/mk-busybox-rootfs).
pub fn busybox_rootfs(dir: &Path) {
    let st = Command::new(crate::repo_root().join("scripts/mk-busybox-rootfs"))
        .arg(dir)
        .status()
        .expect("run mk-busybox-rootfs");
    assert!(st.success(), "mk-busybox-rootfs failed");
}

/// A tar layer: the busybox rootfs plus extra files `(path, contents, mode)`.
pub fn layer_with_busybox(extra: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("rootfs");
    busybox_rootfs(&root);
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", &root).expect("tar rootfs");
    append_files(&mut b, extra);
    b.into_inner().expect("tar")
}

/// A tar layer with just these files.
pub fn layer(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    append_files(&mut b, files);
    b.into_inner().expect("tar")
}

fn append_files(b: &mut tar::Builder<Vec<u8>>, files: &[(&str, &[u8], u32)]) {
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).expect("tar file");
    }
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Image config fields.
#[derive(Default, Clone)]
pub struct Config {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

fn config_json(cfg: &Config, layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    let mut c = serde_json::json!({"Env": cfg.env});
    if !cfg.entrypoint.is_empty() {
        c["Entrypoint"] = serde_json::json!(cfg.entrypoint);
    }
    if !cfg.cmd.is_empty() {
        c["Cmd"] = serde_json::json!(cfg.cmd);
    }
    if !cfg.working_dir.is_empty() {
        c["WorkingDir"] = serde_json::json!(cfg.working_dir);
    }
    if !cfg.user.is_empty() {
        c["User"] = serde_json::json!(cfg.user);
    }
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": c,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("json")
}

/// Writes an OCI image layout with uncompressed tar layers at `dir`.
pub fn oci_layout(dir: &Path, cfg: &Config, layers: &[Vec<u8>]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |data: &[u8]| -> (String, usize) {
        let d = sha(data);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data).expect("blob");
        (d, data.len())
    };
    let (cfg_digest, cfg_size) = put(&config_json(cfg, layers));
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let (d, s) = put(l);
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s})
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
        "layers": layer_descs,
    }))
    .expect("json");
    let (m_digest, m_size) = put(&manifest);
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m_digest, "size": m_size,
                            "platform": {"architecture": "amd64", "os": "linux"}}],
        }))
        .expect("json"),
    )
    .expect("index");
}

/// Writes a docker-archive tarball (`docker save` format) at `path`.
pub fn docker_archive(path: &Path, cfg: &Config, layers: &[Vec<u8>]) {
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).expect("tar");
    };
    let config = config_json(cfg, layers);
    let cfg_name = format!("{}.json", sha(&config).trim_start_matches("sha256:"));
    add(&mut b, &cfg_name, &config);
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let n = format!("layer{i}/layer.tar");
        add(&mut b, &n, l);
        names.push(n);
    }
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": cfg_name, "RepoTags": ["test:latest"], "Layers": names}
    ]))
    .expect("json");
    add(&mut b, "manifest.json", &manifest);
    std::fs::write(path, b.into_inner().expect("tar")).expect("write archive");
}
