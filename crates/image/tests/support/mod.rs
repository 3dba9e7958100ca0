//! Test fixtures: tar layers with arbitrary (hostile) names, OCI layouts and docker
//! archives written by hand, and `debugfs` readers for the built ext4.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A tar layer built entry by entry; names and link targets are written verbatim.
pub struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn raw(
        &mut self,
        kind: EntryType,
        name: &str,
        link: Option<&str>,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> &mut Layer {
        let mut h = Header::new_old();
        assert!(name.len() < 100);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn file(&mut self, name: &str, data: &str) -> &mut Layer {
        self.raw(EntryType::Regular, name, None, data.as_bytes(), 0o644, 0, 0)
    }
    pub fn file_with(
        &mut self,
        name: &str,
        data: &str,
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> &mut Layer {
        self.raw(
            EntryType::Regular,
            name,
            None,
            data.as_bytes(),
            mode,
            uid,
            gid,
        )
    }
    pub fn dir(&mut self, name: &str) -> &mut Layer {
        self.raw(EntryType::Directory, name, None, b"", 0o755, 0, 0)
    }
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Layer {
        self.raw(EntryType::Symlink, name, Some(target), b"", 0o777, 0, 0)
    }
    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Layer {
        self.raw(EntryType::Link, name, Some(target), b"", 0o644, 0, 0)
    }
    pub fn fifo(&mut self, name: &str) -> &mut Layer {
        self.raw(EntryType::Fifo, name, None, b"", 0o644, 0, 0)
    }
    pub fn tar(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TAR_ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub fn default_config() -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "Env": ["PATH=/bin", "A=1"], "WorkingDir": "/srv", "User": "1000:1000" },
        "rootfs": { "type": "layers", "diff_ids": [] }
    })
}

fn write_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = sha(bytes);
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
    d
}

pub fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({ "mediaType": media_type, "digest": sha(bytes), "size": bytes.len() })
}

/// Writes an image manifest (+ config + layers) as blobs; returns its descriptor.
pub fn write_image(
    dir: &Path,
    layers: &[(Vec<u8>, &str)],
    config: &serde_json::Value,
) -> serde_json::Value {
    let config_bytes = serde_json::to_vec(config).unwrap();
    write_blob(dir, &config_bytes);
    let mut layer_descs = Vec::new();
    for (bytes, mt) in layers {
        write_blob(dir, bytes);
        layer_descs.push(descriptor(mt, bytes));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config_bytes),
        "layers": layer_descs,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    write_blob(dir, &manifest_bytes);
    descriptor(
        "application/vnd.oci.image.manifest.v1+json",
        &manifest_bytes,
    )
}

pub fn write_index(dir: &Path, manifests: Vec<serde_json::Value>) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// An OCI layout with one image; returns the manifest digest.
pub fn oci_layout(dir: &Path, layers: &[(Vec<u8>, &str)]) -> String {
    let desc = write_image(dir, layers, &default_config());
    write_index(dir, vec![desc.clone()]);
    desc["digest"].as_str().unwrap().to_string()
}

/// A `docker save` tarball: manifest.json, `<hex>.json` config, `<n>/layer.tar` layers.
pub fn docker_archive(path: &Path, layers: &[Vec<u8>], config: &serde_json::Value) {
    let config_bytes = serde_json::to_vec(config).unwrap();
    let config_name = format!("{}.json", sha(&config_bytes).trim_start_matches("sha256:"));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut layer_names = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        add(&name, layer);
        layer_names.push(name);
    }
    add(&config_name, &config_bytes);
    let manifest = serde_json::json!([{ "Config": config_name, "RepoTags": ["app:1"], "Layers": layer_names }]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

fn debugfs(image: &Path, request: &str) -> (String, String) {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) must be installed");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Contents of a file in the ext4 image.
pub fn cat(image: &Path, path: &str) -> String {
    assert!(
        exists(image, path),
        "{path} missing from {}",
        image.display()
    );
    debugfs(image, &format!("cat {path}")).0
}

pub fn exists(image: &Path, path: &str) -> bool {
    !debugfs(image, &format!("stat {path}"))
        .1
        .contains("not found")
}

/// (type, mode, uid, gid, links, fast symlink target) of a path in the ext4 image.
pub struct Stat {
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub links: u32,
    pub inode: u64,
    pub link_target: Option<String>,
}

pub fn stat(image: &Path, path: &str) -> Stat {
    let (out, err) = debugfs(image, &format!("stat {path}"));
    assert!(
        !err.contains("not found"),
        "{path} missing from {}",
        image.display()
    );
    let word_after = |key: &str| -> String {
        let i = out.find(key).unwrap_or_else(|| panic!("no {key} in {out}")) + key.len();
        out[i..].split_whitespace().next().unwrap().to_string()
    };
    Stat {
        kind: word_after("Type:"),
        mode: u32::from_str_radix(&word_after("Mode:"), 8).unwrap(),
        uid: word_after("User:").parse().unwrap(),
        gid: word_after("Group:").parse().unwrap(),
        links: word_after("Links:").parse().unwrap(),
        inode: word_after("Inode:").parse().unwrap(),
        link_target: out.find("Fast link dest: \"").map(|i| {
            let rest = &out[i + 17..];
            rest[..rest.find('"').unwrap()].to_string()
        }),
    }
}

/// A store plus a sentinel directory beside it that no import may touch.
pub struct World {
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sentinel")).unwrap();
        fs::write(dir.path().join("sentinel/secret"), "do not touch").unwrap();
        World { dir }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn store(&self) -> hearth_image::ImageStore {
        self.store_with(small_limits())
    }
    pub fn store_with(&self, limits: hearth_image::Limits) -> hearth_image::ImageStore {
        hearth_image::ImageStore::open(self.path("store"), limits).unwrap()
    }
    /// Everything in the test dir except the store: must stay exactly the fixture.
    pub fn assert_untouched_outside_store(&self) {
        let mut names: Vec<String> = fs::read_dir(self.path("sentinel"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["secret"],
            "something was written into the sentinel dir"
        );
        assert_eq!(
            fs::read_to_string(self.path("sentinel/secret")).unwrap(),
            "do not touch"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(self.path("sentinel/secret")).unwrap().nlink(),
            1,
            "the sentinel file gained a hardlink"
        );
        for e in fs::read_dir(self.dir.path()).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                ["sentinel", "store", "src", "oci", "archive.tar"].contains(&name.as_str()),
                "unexpected {name} next to the store"
            );
        }
    }
    /// No image is listed, no ext4 (partial or whole) exists, no staging dir is left.
    pub fn assert_no_image_left(&self, store: &hearth_image::ImageStore) {
        assert!(store.list().unwrap().is_empty());
        let blobs: Vec<_> = fs::read_dir(self.path("store/blobs/sha256"))
            .unwrap()
            .collect();
        assert!(blobs.is_empty(), "left in blobs: {blobs:?}");
        let tmp: Vec<_> = fs::read_dir(self.path("store/tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "left in tmp: {tmp:?}");
    }
}

pub fn small_limits() -> hearth_image::Limits {
    hearth_image::Limits {
        rootfs_free_bytes: 16 << 20,
        ..hearth_image::Limits::default()
    }
}

pub fn no_progress(_: hearth_image::Progress) {}
