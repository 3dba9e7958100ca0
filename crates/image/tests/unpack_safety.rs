//! Layer unpacking: whiteouts, replacement, and confinement of hostile entries.

mod support;

use hearth_image::ImageError;
use support::*;

fn import_layers(
    world: &World,
    layers: &[(Vec<u8>, &str)],
) -> Result<hearth_image::ImageRecord, ImageError> {
    let oci = world.path("oci");
    oci_layout(&oci, layers);
    world.store().import("test", &oci, &no_progress)
}

#[test]
fn whiteout_deletes_file_from_lower_layer() {
    let world = World::new();
    let lower = Layer::new()
        .dir("etc/")
        .file("etc/keep", "k")
        .file("etc/gone", "g")
        .dir("var/cache/")
        .file("var/cache/x", "x")
        .tar();
    let upper = Layer::new()
        .file("etc/.wh.gone", "")
        .file("var/.wh.cache", "")
        .tar();
    let rec = import_layers(&world, &[(lower, TAR), (upper, TAR)]).unwrap();
    assert_eq!(cat(&rec.rootfs, "/etc/keep"), "k");
    assert!(!exists(&rec.rootfs, "/etc/gone"));
    assert!(
        !exists(&rec.rootfs, "/var/cache"),
        "a whiteout of a directory removes the whole tree"
    );
    assert!(
        !exists(&rec.rootfs, "/etc/.wh.gone"),
        "whiteout markers are never materialized"
    );
}

#[test]
fn opaque_dir_hides_lower_contents() {
    let world = World::new();
    let lower = Layer::new()
        .dir("app/")
        .file("app/old", "o")
        .dir("app/sub/")
        .file("app/sub/old", "o")
        .file("other", "stays")
        .tar();
    let upper = Layer::new()
        .dir("app/")
        .file("app/new", "n")
        .dir("app/sub/")
        .file("app/sub/new", "n")
        .file("app/.wh..wh..opq", "")
        .tar();
    let rec = import_layers(&world, &[(lower, TAR), (upper, TAR)]).unwrap();
    assert!(!exists(&rec.rootfs, "/app/old"));
    assert!(
        !exists(&rec.rootfs, "/app/sub/old"),
        "a re-created subdirectory does not keep lower contents either"
    );
    assert_eq!(cat(&rec.rootfs, "/app/new"), "n");
    assert_eq!(cat(&rec.rootfs, "/app/sub/new"), "n");
    assert_eq!(cat(&rec.rootfs, "/other"), "stays");
    assert!(!exists(&rec.rootfs, "/app/.wh..wh..opq"));
}

#[test]
fn upper_layer_entry_replaces_lower_entry_of_another_type() {
    let world = World::new();
    let lower = Layer::new()
        .file("bin/sh", "old shell")
        .dir("data/")
        .file("data/f", "x")
        .tar();
    let upper = Layer::new()
        .symlink("bin/sh", "busybox")
        .file("data", "now a file")
        .tar();
    let rec = import_layers(&world, &[(lower, TAR), (upper, TAR)]).unwrap();
    let sh = stat(&rec.rootfs, "/bin/sh");
    assert_eq!(sh.kind, "symlink");
    assert_eq!(sh.link_target.as_deref(), Some("busybox"));
    assert_eq!(cat(&rec.rootfs, "/data"), "now a file");
}

#[test]
fn layer_with_dotdot_path_is_rejected_and_nothing_written_outside() {
    let world = World::new();
    let evil = Layer::new()
        .file("ok", "fine")
        .file("../../sentinel/pwned", "gotcha")
        .tar();
    let err = import_layers(&world, &[(evil, TAR)]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{msg}");
    assert!(
        msg.contains("../../sentinel/pwned"),
        "the error names the entry: {msg}"
    );
    world.assert_untouched_outside_store();
    world.assert_no_image_left(&world.store());
}

#[test]
fn dotdot_inside_the_root_is_normalized() {
    let world = World::new();
    let layer = Layer::new()
        .dir("a/")
        .file("a/../b", "b")
        .file("/abs/file", "abs")
        .tar();
    let rec = import_layers(&world, &[(layer, TAR)]).unwrap();
    assert_eq!(cat(&rec.rootfs, "/b"), "b");
    assert_eq!(
        cat(&rec.rootfs, "/abs/file"),
        "abs",
        "a leading / is taken relative to the root"
    );
    world.assert_untouched_outside_store();
}

#[test]
fn symlink_parent_escaping_root_is_confined() {
    let world = World::new();
    let sentinel = world.path("sentinel");
    let sentinel = sentinel.to_str().unwrap();
    // Layer 1 plants symlinks that point outside if resolved on the host, and makes
    // the image's own copy of the sentinel path so the absolute one resolves inside.
    let lower = Layer::new()
        .symlink("up", "../../../../../../../../..")
        .symlink("abs", sentinel)
        .dir(&format!("{}/", &sentinel[1..]))
        .dir("usr/lib/")
        .symlink("lib", "/usr/lib")
        .tar();
    let upper = Layer::new()
        .file("up/pwned-up", "1")
        .file("abs/pwned-abs", "2")
        .file("lib/libc.so", "libc")
        .tar();
    let rec = import_layers(&world, &[(lower, TAR), (upper, TAR)]).unwrap();
    assert_eq!(
        cat(&rec.rootfs, "/pwned-up"),
        "1",
        "`..` through a symlink stops at the image root"
    );
    assert_eq!(
        cat(&rec.rootfs, &format!("{sentinel}/pwned-abs")),
        "2",
        "an absolute symlink resolves inside the image"
    );
    assert_eq!(
        cat(&rec.rootfs, "/usr/lib/libc.so"),
        "libc",
        "legit lib -> /usr/lib works"
    );
    world.assert_untouched_outside_store();
}

#[test]
fn dangling_symlink_parent_is_rejected_and_nothing_written_outside() {
    let world = World::new();
    let sentinel = world.path("sentinel/newdir");
    let layer = Layer::new()
        .symlink("d", sentinel.to_str().unwrap())
        .file("d/x", "x")
        .tar();
    let err = import_layers(&world, &[(layer, TAR)]).unwrap_err();
    assert!(err.to_string().contains("d/x"), "{err}");
    world.assert_untouched_outside_store();
    world.assert_no_image_left(&world.store());
}

#[test]
fn hardlink_to_outside_root_is_rejected() {
    let world = World::new();
    let secret = world.path("sentinel/secret");
    for target in [
        "../../sentinel/secret".to_string(),
        secret.to_str().unwrap().to_string(),
    ] {
        let layer = Layer::new()
            .file("ok", "fine")
            .hardlink("stolen", &target)
            .tar();
        let err = import_layers(&world, &[(layer, TAR)]).unwrap_err();
        assert!(
            err.to_string().contains("stolen"),
            "the error names the entry: {err}"
        );
        world.assert_untouched_outside_store();
        world.assert_no_image_left(&world.store());
    }
    // Through a symlinked parent: resolved inside the root, where there is no such file.
    let layer = Layer::new()
        .symlink("evil", world.path("sentinel").to_str().unwrap())
        .hardlink("stolen", "evil/secret")
        .tar();
    assert!(import_layers(&world, &[(layer, TAR)]).is_err());
    world.assert_untouched_outside_store();
}

#[test]
fn hardlinks_symlinks_modes_and_owners_are_preserved() {
    let world = World::new();
    let layer = Layer::new()
        .dir("bin/")
        .file_with("bin/tool", "#!/bin/sh\n", 0o4755, 0, 0)
        .file_with("home/u/notes", "mine", 0o600, 1000, 1001)
        .hardlink("bin/tool2", "bin/tool")
        .symlink("bin/t", "tool")
        .fifo("dev/fifo")
        .tar();
    let rec = import_layers(&world, &[(layer, TAR)]).unwrap();
    let tool = stat(&rec.rootfs, "/bin/tool");
    assert_eq!(tool.mode, 0o4755, "setuid bit survives chown");
    let tool2 = stat(&rec.rootfs, "/bin/tool2");
    assert_eq!(
        (tool2.inode, tool2.links),
        (tool.inode, 2),
        "hardlink shares the inode"
    );
    let notes = stat(&rec.rootfs, "/home/u/notes");
    assert_eq!((notes.mode, notes.uid, notes.gid), (0o600, 1000, 1001));
    assert_eq!(
        stat(&rec.rootfs, "/bin/t").link_target.as_deref(),
        Some("tool")
    );
    assert!(
        !exists(&rec.rootfs, "/dev/fifo"),
        "fifos and devices are skipped"
    );
}
