//! Import sources, blob verification, limits, and the store's names and reuse.

mod support;

use std::cell::RefCell;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};

use hearth_image::{ImageError, Limits, Progress};
use support::*;

#[test]
fn directory_import_has_path_but_no_cmd() {
    let world = World::new();
    let src = world.path("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), "box\n").unwrap();
    symlink(world.path("sentinel"), src.join("escape")).unwrap();
    symlink("/etc/passwd", src.join("etc/pw")).unwrap();
    let rec = world.store().import("rootdir", &src, &no_progress).unwrap();
    assert_eq!(rec.name, "rootdir:latest");
    assert!(rec.config.entrypoint.is_empty() && rec.config.cmd.is_empty());
    assert_eq!(
        rec.config.env,
        ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    );
    assert_eq!(cat(&rec.rootfs, "/etc/hostname"), "box\n");
    assert_eq!(
        stat(&rec.rootfs, "/etc/pw").link_target.as_deref(),
        Some("/etc/passwd"),
        "symlinks are stored, not followed"
    );
    assert_eq!(stat(&rec.rootfs, "/escape").kind, "symlink");
    assert!(!exists(&rec.rootfs, "/escape/secret"));
    assert_eq!(stat(&rec.rootfs, "/").uid, 0);
}

#[test]
fn oci_layout_import_applies_config_and_layers_in_order() {
    let world = World::new();
    let oci = world.path("oci");
    let l1 = Layer::new()
        .file("etc/version", "1")
        .file("bin/app", "app")
        .tar();
    let l2 = Layer::new().file("etc/version", "2").tar();
    let l3 = Layer::new().file("etc/extra", "zstd").tar();
    let digest = oci_layout(
        &oci,
        &[(l1, TAR), (gzip(&l2), TAR_GZ), (zstd(&l3), TAR_ZST)],
    );
    let seen = RefCell::new(Vec::new());
    let rec = world
        .store()
        .import("app:v1", &oci, &|p| seen.borrow_mut().push(p))
        .unwrap();
    assert_eq!(rec.digest, digest, "the image digest is the manifest's");
    assert_eq!(
        rec.rootfs,
        world
            .path("store/blobs/sha256")
            .join(format!("{}.ext4", &digest[7..]))
    );
    assert_eq!(cat(&rec.rootfs, "/etc/version"), "2");
    assert_eq!(cat(&rec.rootfs, "/etc/extra"), "zstd");
    assert_eq!(rec.config.entrypoint, ["/bin/app"]);
    assert_eq!(rec.config.cmd, ["--serve"]);
    assert_eq!(rec.config.env, ["PATH=/bin", "A=1"]);
    assert_eq!(rec.config.working_dir, "/srv");
    assert_eq!(rec.config.user, "1000:1000");
    let seen = seen.into_inner();
    assert!(
        matches!(seen[0], Progress::Layer { index: 1, total: 3, bytes } if bytes > 0),
        "{seen:?}"
    );
    assert!(matches!(
        seen[2],
        Progress::Layer {
            index: 3,
            total: 3,
            ..
        }
    ));
    assert_eq!(seen[3..], [Progress::BuildingFs, Progress::Done]);
}

#[test]
fn index_with_several_platforms_picks_linux_amd64() {
    let world = World::new();
    let oci = world.path("oci");
    let arm = write_image(
        &oci,
        &[(Layer::new().file("arch", "arm64").tar(), TAR)],
        &default_config(),
    );
    let amd = write_image(
        &oci,
        &[(Layer::new().file("arch", "amd64").tar(), TAR)],
        &default_config(),
    );
    let with = |mut d: serde_json::Value, arch: &str| {
        d["platform"] = serde_json::json!({ "os": "linux", "architecture": arch });
        d
    };
    // index.json → image index blob → per-platform manifests, as registries ship them.
    let nested = serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [with(arm, "arm64"), with(amd.clone(), "amd64")] })).unwrap();
    fs::write(oci.join("blobs/sha256").join(&sha(&nested)[7..]), &nested).unwrap();
    write_index(
        &oci,
        vec![descriptor(
            "application/vnd.oci.image.index.v1+json",
            &nested,
        )],
    );
    let rec = world.store().import("multi", &oci, &no_progress).unwrap();
    assert_eq!(cat(&rec.rootfs, "/arch"), "amd64");
    assert_eq!(rec.digest, amd["digest"].as_str().unwrap());
}

#[test]
fn index_without_linux_amd64_names_platforms() {
    let world = World::new();
    let oci = world.path("oci");
    let layer = || vec![(Layer::new().file("f", "x").tar(), TAR)];
    let mut arm64 = write_image(&oci, &layer(), &default_config());
    arm64["platform"] = serde_json::json!({ "os": "linux", "architecture": "arm64" });
    let mut armv7 = write_image(
        &oci,
        &layer(),
        &serde_json::json!({ "architecture": "arm", "os": "linux" }),
    );
    armv7["platform"] =
        serde_json::json!({ "os": "linux", "architecture": "arm", "variant": "v7" });
    write_index(&oci, vec![arm64, armv7]);
    let err = world.store().import("arm", &oci, &no_progress).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ImageError::NoMatchingPlatform { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("linux/arm64") && msg.contains("linux/arm/v7"),
        "{msg}"
    );
    world.assert_no_image_left(&world.store());
}

#[test]
fn single_manifest_for_another_architecture_is_rejected() {
    let world = World::new();
    let oci = world.path("oci");
    let desc = write_image(
        &oci,
        &[(Layer::new().file("f", "x").tar(), TAR)],
        &serde_json::json!({ "architecture": "arm64", "os": "linux" }),
    );
    write_index(&oci, vec![desc]);
    let err = world.store().import("arm", &oci, &no_progress).unwrap_err();
    assert!(err.to_string().contains("linux/arm64"), "{err}");
}

#[test]
fn blob_digest_mismatch_is_rejected() {
    let world = World::new();
    let oci = world.path("oci");
    let layer = Layer::new()
        .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        .tar();
    let layer_digest = sha(&layer);
    oci_layout(&oci, &[(layer.clone(), TAR)]);
    // Same size, different content: a tampered blob.
    let evil = Layer::new()
        .file("etc/passwd", "evil:x:0:0::/root:/bin/sh\n")
        .tar();
    assert_eq!(evil.len(), layer.len());
    fs::write(oci.join("blobs/sha256").join(&layer_digest[7..]), &evil).unwrap();
    let store = world.store();
    let err = store.import("tampered", &oci, &no_progress).unwrap_err();
    assert!(
        matches!(err, ImageError::BlobDigestMismatch { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&layer_digest),
        "the error names the blob: {err}"
    );
    world.assert_no_image_left(&store);
}

#[test]
fn manifest_digest_mismatch_is_rejected() {
    let world = World::new();
    let oci = world.path("oci");
    let digest = oci_layout(&oci, &[(Layer::new().file("f", "x").tar(), TAR)]);
    let path = oci.join("blobs/sha256").join(&digest[7..]);
    let mut bytes = fs::read(&path).unwrap();
    let i = bytes.windows(2).position(|w| w == b"v1").unwrap();
    bytes[i + 1] = b'2';
    fs::write(&path, bytes).unwrap();
    let err = world.store().import("t", &oci, &no_progress).unwrap_err();
    assert!(
        matches!(err, ImageError::BlobDigestMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&digest), "{err}");
}

#[test]
fn truncated_gzip_layer_fails_and_leaves_no_image() {
    let world = World::new();
    let oci = world.path("oci");
    let big: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let gz = gzip(&Layer::new().file("a", "a").file("big", &big).tar());
    let truncated = gz[..gz.len() * 2 / 3].to_vec();
    let digest = sha(&truncated);
    oci_layout(&oci, &[(truncated, TAR_GZ)]);
    let store = world.store();
    let err = store.import("broken", &oci, &no_progress).unwrap_err();
    assert!(matches!(err, ImageError::LayerRead { .. }), "{err}");
    assert!(
        err.to_string().contains(&digest),
        "the error names the blob: {err}"
    );
    world.assert_no_image_left(&store);
}

#[test]
fn entry_count_limit_is_enforced() {
    let world = World::new();
    let oci = world.path("oci");
    let mut layer = Layer::new();
    for i in 0..50 {
        layer.file(&format!("f{i}"), "x");
    }
    oci_layout(&oci, &[(layer.tar(), TAR)]);
    let store = world.store_with(Limits {
        max_entries: 20,
        ..small_limits()
    });
    let err = store.import("many", &oci, &no_progress).unwrap_err();
    assert!(err.to_string().contains("max_entries"), "{err}");
    world.assert_no_image_left(&store);
}

#[test]
fn uncompressed_layer_size_limit_is_enforced_on_compressed_bombs() {
    let world = World::new();
    let oci = world.path("oci");
    let zeros = "\0".repeat(8 << 20);
    let gz = gzip(&Layer::new().file("bomb", &zeros).tar());
    assert!(gz.len() < 100_000);
    oci_layout(&oci, &[(gz, TAR_GZ)]);
    let store = world.store_with(Limits {
        max_layer_bytes: 1 << 20,
        ..small_limits()
    });
    let err = store.import("bomb", &oci, &no_progress).unwrap_err();
    assert!(err.to_string().contains("max_layer_bytes"), "{err}");
    world.assert_no_image_left(&store);

    let store = world.store_with(Limits {
        max_image_bytes: 1 << 20,
        ..small_limits()
    });
    let err = store.import("bomb", &oci, &no_progress).unwrap_err();
    assert!(err.to_string().contains("max_image_bytes"), "{err}");
}

#[test]
fn docker_archive_import_reads_manifest_config_and_layers() {
    let world = World::new();
    let archive = world.path("archive.tar");
    let l1 = Layer::new()
        .file("etc/os-release", "ID=test\n")
        .file("etc/gone", "g")
        .tar();
    let l2 = Layer::new()
        .file("etc/.wh.gone", "")
        .file("usr/bin/app", "bin")
        .tar();
    docker_archive(&archive, &[l1, gzip(&l2)], &default_config());
    let rec = world
        .store()
        .import("docker-app:1", &archive, &no_progress)
        .unwrap();
    assert_eq!(rec.name, "docker-app:1");
    assert_eq!(cat(&rec.rootfs, "/etc/os-release"), "ID=test\n");
    assert_eq!(cat(&rec.rootfs, "/usr/bin/app"), "bin");
    assert!(!exists(&rec.rootfs, "/etc/gone"));
    assert_eq!(rec.config.cmd, ["--serve"]);
    assert!(rec.digest.starts_with("sha256:") && rec.digest.len() == 71);
    assert!(
        fs::read_dir(world.path("store/tmp"))
            .unwrap()
            .next()
            .is_none(),
        "the extracted archive is removed"
    );
}

#[test]
fn docker_archive_config_digest_mismatch_is_rejected() {
    let world = World::new();
    let archive = world.path("archive.tar");
    docker_archive(
        &archive,
        &[Layer::new().file("f", "x").tar()],
        &default_config(),
    );
    // Rewrite the archive with a config whose content no longer matches its name.
    let bytes = fs::read(&archive).unwrap();
    let from = br#""WorkingDir":"/srv""#;
    let to = br#""WorkingDir":"/etc""#;
    let i = bytes.windows(from.len()).position(|w| w == from).unwrap();
    let mut evil = bytes.clone();
    evil[i..i + from.len()].copy_from_slice(to);
    fs::write(&archive, evil).unwrap();
    let store = world.store();
    let err = store.import("t", &archive, &no_progress).unwrap_err();
    assert!(
        matches!(err, ImageError::BlobDigestMismatch { .. }),
        "{err}"
    );
    world.assert_no_image_left(&store);
}

#[test]
fn second_import_of_same_digest_reuses_rootfs() {
    let world = World::new();
    let oci = world.path("oci");
    oci_layout(&oci, &[(gzip(&Layer::new().file("f", "x").tar()), TAR_GZ)]);
    let store = world.store();
    let first = store.import("a", &oci, &no_progress).unwrap();
    let inode = fs::metadata(&first.rootfs).unwrap().ino();
    let seen = RefCell::new(Vec::new());
    let second = store
        .import("b:2", &oci, &|p| seen.borrow_mut().push(p))
        .unwrap();
    assert_eq!(second.rootfs, first.rootfs);
    assert_eq!(
        fs::metadata(&second.rootfs).unwrap().ino(),
        inode,
        "the ext4 is not rebuilt"
    );
    assert_eq!(seen.into_inner(), [Progress::Reused, Progress::Done]);
    assert_eq!(
        store
            .list()
            .unwrap()
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["a:latest", "b:2"]
    );
}

#[test]
fn same_directory_imported_twice_has_the_same_digest() {
    let world = World::new();
    let src = world.path("src");
    fs::create_dir_all(src.join("x/y")).unwrap();
    fs::write(src.join("x/y/z"), "z").unwrap();
    fs::hard_link(src.join("x/y/z"), src.join("x/z2")).unwrap();
    let store = world.store();
    let a = store.import("a", &src, &no_progress).unwrap();
    let b = store.import("b", &src, &no_progress).unwrap();
    assert_eq!(a.digest, b.digest);
    assert_eq!(
        stat(&a.rootfs, "/x/z2").inode,
        stat(&a.rootfs, "/x/y/z").inode
    );
}

#[test]
fn resolve_finds_names_tags_and_digest_prefixes() {
    let world = World::new();
    let oci = world.path("oci");
    let digest = oci_layout(&oci, &[(Layer::new().file("f", "x").tar(), TAR)]);
    let store = world.store();
    store.import("web", &oci, &no_progress).unwrap();
    assert_eq!(store.resolve("web").unwrap().name, "web:latest");
    assert_eq!(store.resolve("web:latest").unwrap().digest, digest);
    assert_eq!(store.resolve(&digest[..14]).unwrap().name, "web:latest");
    assert_eq!(store.resolve(&digest).unwrap().config.cmd, ["--serve"]);
    let err = store.resolve("web:other").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::NotFound { .. }));
    assert!(
        msg.contains("web:other")
            && msg.contains("hearth image import")
            && msg.contains("hearth image ls"),
        "{msg}"
    );
    // The index survives reopening the store.
    assert_eq!(world.store().list().unwrap().len(), 1);
}

#[test]
fn remove_deletes_the_rootfs_when_no_name_uses_it() {
    let world = World::new();
    let oci = world.path("oci");
    oci_layout(&oci, &[(Layer::new().file("f", "x").tar(), TAR)]);
    let store = world.store();
    let a = store.import("a", &oci, &no_progress).unwrap();
    store.import("b", &oci, &no_progress).unwrap();
    store.remove("a").unwrap();
    assert!(a.rootfs.exists(), "b still uses it");
    assert!(store.resolve("a").is_err());
    store.remove("b:latest").unwrap();
    assert!(!a.rootfs.exists());
    assert!(store.list().unwrap().is_empty());
    assert!(matches!(
        store.remove("b"),
        Err(ImageError::NotFound { .. })
    ));
}

#[test]
fn unknown_source_is_rejected_with_its_path() {
    let world = World::new();
    let err = world
        .store()
        .import("x", &world.path("nope"), &no_progress)
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}
