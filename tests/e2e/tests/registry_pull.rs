//! Pulling from a real registry: Debian's `docker-registry` on 127.0.0.1, images
//! built and pushed (skopeo) by the tests. Every bad input gets its own test, each
//! asserting a clear error and that nothing was written outside the image store,
//! nothing half-built is left there, and no image was registered.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use hearth_e2e::images;
use hearth_e2e::registry::{raw_tar, Compress, FakeRegistry, Layout, Raw, Registry};
use hearth_e2e::{show, stderr, stdout, Daemon, DaemonOptions};

/// A daemon without the busybox import (so its image store starts empty).
fn daemon(extra: &[&str]) -> Daemon {
    Daemon::start_with(DaemonOptions {
        busybox: false,
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..DaemonOptions::default()
    })
}

fn busybox_layer() -> Vec<u8> {
    images::layer_with_busybox(&[])
}

/// Pushes `layout` to `reg` as `name_tag`; returns the full reference.
fn push(reg: &Registry, layout: &Layout, name_tag: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    layout.write(dir.path());
    reg.push(dir.path(), name_tag, None);
    reg.reference(name_tag)
}

/// `sha256:` of the manifest the registry serves for `reference`.
fn remote_digest(reference: &str) -> String {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    hearth_e2e::registry::sha(&out.stdout)
}

/// Reads a file out of a pulled image's ext4 with debugfs (no VM needed).
fn read_in_image(d: &Daemon, digest: &str, path: &str) -> Option<String> {
    let ext4 = d.data_dir().join(format!(
        "images/blobs/sha256/{}.ext4",
        digest.trim_start_matches("sha256:")
    ));
    assert!(ext4.is_file(), "no rootfs {}", ext4.display());
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(&ext4)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    (!err.contains("File not found")).then(|| stdout(&out))
}

fn pull_ok(d: &Daemon, reference: &str) -> (String, String) {
    let out = d.hearth(&["image", "pull", reference]);
    assert!(out.status.success(), "pull {reference}: {}", show(&out));
    let line = stdout(&out);
    let mut it = line.split_whitespace();
    let name = it.next().unwrap().to_string();
    let digest = it.next().unwrap().to_string();
    (name, digest)
}

fn files_under(dir: &Path, skip: &Path) -> BTreeSet<PathBuf> {
    let mut set = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.starts_with(skip) {
                continue;
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p.clone());
            }
            set.insert(p);
        }
    }
    set
}

/// A directory under /tmp that hostile layers aim at; removed on drop.
struct Target(PathBuf);

impl Target {
    fn new(tag: &str) -> Target {
        let p = PathBuf::from(format!("/tmp/hearth-escape-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Target(p)
    }
    /// The target as a path relative to any directory: enough `..` to reach `/`.
    fn dotdot(&self, leaf: &str) -> String {
        format!(
            "{}{}/{leaf}",
            "../".repeat(12),
            self.0.display().to_string().trim_start_matches('/')
        )
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a pull that must fail; checks the error and that nothing leaked.
struct BadPull<'a> {
    d: &'a Daemon,
    before: BTreeSet<PathBuf>,
}

impl<'a> BadPull<'a> {
    fn new(d: &'a Daemon) -> BadPull<'a> {
        BadPull {
            d,
            before: files_under(d.data.path(), &d.data_dir().join("images")),
        }
    }

    fn fails(&self, reference: &str, needles: &[&str]) -> String {
        let out = self.d.hearth(&["image", "pull", reference]);
        assert_eq!(out.status.code(), Some(125), "{}", show(&out));
        let err = stderr(&out);
        for n in needles.iter().chain(std::iter::once(&reference)) {
            assert!(
                err.contains(n),
                "error should mention {n:?}: {}",
                show(&out)
            );
        }
        self.nothing_left();
        err
    }

    fn nothing_left(&self) {
        let images = self.d.data_dir().join("images");
        let leftovers = |dir: &str| -> Vec<String> {
            std::fs::read_dir(images.join(dir))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            leftovers("tmp"),
            Vec::<String>::new(),
            "work files left in images/tmp"
        );
        assert_eq!(
            leftovers("blobs/sha256"),
            Vec::<String>::new(),
            "a root filesystem was left"
        );
        let out = self.d.hearth(&["image", "ls", "--json"]);
        assert_eq!(stdout(&out).trim(), "[]", "no image may be registered");
        let after = files_under(self.d.data.path(), &images);
        let new: Vec<_> = after.difference(&self.before).collect();
        assert!(
            new.is_empty(),
            "files written outside the image store: {new:?}"
        );
    }
}

#[test]
fn run_pulls_from_the_registry_and_runs_again_after_the_registry_stops() {
    let mut reg = Registry::start();
    let image = Layout::new(&["sh", "-c", "echo default"])
        .layer(&busybox_layer(), Compress::Gzip)
        .layer(
            &images::layer(&[("etc/marker", b"pulled marker\n", 0o644)]),
            Compress::Zstd,
        );
    let reference = push(&reg, &image, "x:tag");
    let d = daemon(&[]);

    let out = d.hearth(&["run", &reference, "--", "cat", "/etc/marker"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "pulled marker\n");
    assert!(
        stderr(&out).contains("resolved sha256:"),
        "pull progress is shown: {}",
        show(&out)
    );

    reg.stop();
    let out = d.hearth(&["run", &reference, "--", "cat", "/etc/marker"]);
    assert!(
        out.status.success(),
        "second run needs no registry: {}",
        show(&out)
    );
    assert_eq!(stdout(&out), "pulled marker\n");
    assert!(
        !stderr(&out).contains("resolved"),
        "no second pull: {}",
        show(&out)
    );

    let out = d.hearth(&["image", "ls"]);
    assert!(
        stdout(&out).contains(&format!("{}/x:tag", reg.addr)),
        "{}",
        show(&out)
    );
}

#[test]
fn whiteouts_delete_files_across_layers() {
    let reg = Registry::start();
    let lower = images::layer(&[
        ("etc/gone", b"deleted above\n", 0o644),
        ("etc/kept", b"kept\n", 0o644),
        ("data/dir/a", b"a\n", 0o644),
        ("data/dir/b", b"b\n", 0o644),
    ]);
    let upper = raw_tar(&[
        Raw::File("etc/.wh.gone", b""),
        Raw::Dir("data/dir/"),
        Raw::File("data/dir/.wh..wh..opq", b""),
        Raw::File("data/dir/c", b"c\n"),
    ]);
    let image = Layout::new(&["true"])
        .layer(&busybox_layer(), Compress::Gzip)
        .layer(&lower, Compress::Gzip)
        .layer(&upper, Compress::Gzip);
    let reference = push(&reg, &image, "wh:1");
    let d = daemon(&[]);
    let out = d.hearth(&[
        "run",
        &reference,
        "--",
        "sh",
        "-c",
        "ls /data/dir; cat /etc/kept; test -e /etc/gone && echo gone-still-there; true",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "c\nkept\n");
}

#[test]
fn docker_schema2_zstd_and_digest_references_are_pulled() {
    let reg = Registry::start();
    let marker = images::layer(&[("etc/marker", b"v2s2\n", 0o644)]);
    let image = Layout::new(&["true"])
        .layer(&busybox_layer(), Compress::Gzip)
        .layer(&marker, Compress::Gzip);
    let dir = tempfile::tempdir().unwrap();
    image.write(dir.path());
    reg.push(dir.path(), "docker:v2s2", Some("v2s2"));
    let reference = reg.reference("docker:v2s2");
    let served: serde_json::Value = {
        let out = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(
        served["mediaType"], "application/vnd.docker.distribution.manifest.v2+json",
        "the registry serves a docker schema-2 manifest"
    );
    let d = daemon(&[]);
    let (name, digest) = pull_ok(&d, &reference);
    assert_eq!(name, reference);
    assert_eq!(digest, remote_digest(&reference));
    assert_eq!(
        read_in_image(&d, &digest, "/etc/marker").as_deref(),
        Some("v2s2\n")
    );

    // zstd layers, pulled by digest.
    let zimage = Layout::new(&["true"]).layer(
        &images::layer(&[("etc/marker", b"zstd\n", 0o644)]),
        Compress::Zstd,
    );
    let tagged = push(&reg, &zimage, "z:1");
    let by_digest = reg.reference(&format!("z@{}", remote_digest(&tagged)));
    let (name, digest) = pull_ok(&d, &by_digest);
    assert_eq!(name, by_digest);
    assert_eq!(
        read_in_image(&d, &digest, "/etc/marker").as_deref(),
        Some("zstd\n")
    );
}

#[test]
fn an_image_index_resolves_to_its_linux_amd64_manifest() {
    let reg = Registry::start();
    let image = Layout::new(&["true"]).layer(
        &images::layer(&[("etc/marker", b"multi\n", 0o644)]),
        Compress::Gzip,
    );
    let dir = tempfile::tempdir().unwrap();
    let digests = image.write_platforms(
        dir.path(),
        &[("linux", "arm64"), ("linux", "amd64"), ("linux", "s390x")],
    );
    reg.push(dir.path(), "multi:1", None);
    let d = daemon(&[]);
    let (_, digest) = pull_ok(&d, &reg.reference("multi:1"));
    assert_eq!(digest, digests[1], "the amd64 manifest was chosen");
    assert_eq!(
        read_in_image(&d, &digest, "/etc/marker").as_deref(),
        Some("multi\n")
    );
}

#[test]
fn a_layer_shared_by_two_images_is_fetched_and_stored_once() {
    let reg = Registry::start();
    let base = busybox_layer();
    let one = Layout::new(&["true"]).layer(&base, Compress::Gzip).layer(
        &images::layer(&[("etc/marker", b"one\n", 0o644)]),
        Compress::Gzip,
    );
    let two = Layout::new(&["true"]).layer(&base, Compress::Gzip).layer(
        &images::layer(&[("etc/marker", b"two\n", 0o644)]),
        Compress::Gzip,
    );
    let base_digest = one.layer_digests()[0].clone();
    let r1 = push(&reg, &one, "one:1");
    let r2 = push(&reg, &two, "two:1");
    let d = daemon(&[]);
    let (_, d1) = pull_ok(&d, &r1);
    let out = d.hearth(&["image", "pull", &r2]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(stderr(&out).contains("already cached"), "{}", show(&out));
    let d2 = stdout(&out).split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(
        reg.blob_gets(&base_digest),
        1,
        "the shared layer was fetched once"
    );
    let cache = d.data_dir().join("images/blob-cache/sha256");
    let cached = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(cached, 5, "1 shared + 2 own layers + 2 configs");
    assert_eq!(
        read_in_image(&d, &d1, "/etc/marker").as_deref(),
        Some("one\n")
    );
    assert_eq!(
        read_in_image(&d, &d2, "/etc/marker").as_deref(),
        Some("two\n")
    );
}

#[test]
fn concurrent_pulls_of_one_image_share_one_download() {
    let reg = Registry::start();
    let image = Layout::new(&["true"]).layer(&busybox_layer(), Compress::Gzip);
    let layer = image.layer_digests()[0].clone();
    let reference = push(&reg, &image, "conc:1");
    let d = daemon(&[]);
    let children: Vec<_> = (0..3)
        .map(|_| {
            d.cmd(&["image", "pull", &reference])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut digests = BTreeSet::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", show(&out));
        digests.insert(stdout(&out));
    }
    assert_eq!(digests.len(), 1, "all report the same image: {digests:?}");
    assert_eq!(reg.blob_gets(&layer), 1, "one download for three pulls");
    let ext4s = std::fs::read_dir(d.data_dir().join("images/blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(ext4s, 1, "one root filesystem");
}

#[test]
fn basic_auth_registry_needs_hearth_login() {
    let reg = Registry::start_with_basic_auth("alice", "s3cret");
    let image = Layout::new(&["true"]).layer(
        &images::layer(&[("etc/marker", b"private\n", 0o644)]),
        Compress::Gzip,
    );
    let reference = push(&reg, &image, "private:1");
    let d = daemon(&[]);
    let bad = BadPull::new(&d);
    bad.fails(&reference, &["refused access", "hearth login"]);

    let out = d.hearth_stdin(&["login", &reg.addr, "-u", "alice"], b"wrong\n");
    assert!(out.status.success(), "{}", show(&out));
    // The login file is now expected outside the image store.
    BadPull::new(&d).fails(&reference, &["refused access"]);

    let out = d.hearth_stdin(&["login", &reg.addr, "-u", "alice"], b"s3cret\n");
    assert!(out.status.success(), "{}", show(&out));
    let creds = d.data_dir().join("registry-auth.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&creds).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "credentials are private");
    let (_, digest) = pull_ok(&d, &reference);
    assert_eq!(
        read_in_image(&d, &digest, "/etc/marker").as_deref(),
        Some("private\n")
    );
    assert!(
        !d.log_text().contains("s3cret"),
        "the password is never logged"
    );
}

#[test]
fn bearer_token_registry_works_after_hearth_login() {
    let reg = Registry::start_with_token_auth("bob", "t0ken-pw");
    let image = Layout::new(&["true"]).layer(
        &images::layer(&[("etc/marker", b"token\n", 0o644)]),
        Compress::Gzip,
    );
    let reference = push(&reg, &image, "team/tok:1");
    let d = daemon(&[]);
    // Anonymous: the token service grants nothing, the registry says 401.
    BadPull::new(&d).fails(&reference, &["refused access", "hearth login"]);
    let out = d.hearth(&["login", &reg.addr, "-u", "bob", "-p", "wrong"]);
    assert!(out.status.success(), "{}", show(&out));
    BadPull::new(&d).fails(&reference, &["refused"]);
    let out = d.hearth(&["login", &reg.addr, "-u", "bob", "-p", "t0ken-pw"]);
    assert!(out.status.success(), "{}", show(&out));
    let (_, digest) = pull_ok(&d, &reference);
    assert_eq!(
        read_in_image(&d, &digest, "/etc/marker").as_deref(),
        Some("token\n")
    );
}

#[test]
fn prune_removes_what_no_image_uses() {
    let reg = Registry::start();
    let image = Layout::new(&["true"]).layer(
        &images::layer(&[("etc/marker", b"p\n", 0o644)]),
        Compress::Gzip,
    );
    let reference = push(&reg, &image, "prune:1");
    let d = daemon(&[]);
    pull_ok(&d, &reference);
    let count = |dir: &str| std::fs::read_dir(d.data_dir().join(dir)).unwrap().count();
    assert_eq!(count("images/blob-cache/sha256"), 2);
    let out = d.hearth(&["image", "prune"]);
    assert!(
        stdout(&out).contains("removed 0 root filesystems and 0 cached blobs"),
        "{}",
        show(&out)
    );
    let out = d.hearth(&["image", "rm", &reference]);
    assert!(out.status.success(), "{}", show(&out));
    let out = d.hearth(&["image", "prune"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains("and 2 cached blobs"),
        "{}",
        show(&out)
    );
    assert_eq!(count("images/blob-cache/sha256"), 0);
    assert_eq!(count("images/blobs/sha256"), 0);
}

#[test]
fn openapi_documents_the_registry_routes() {
    let d = daemon(&[]);
    let (status, body) = d.http("GET", "/openapi.json", None).unwrap();
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    for p in [
        "/v1/images/pull",
        "/v1/images/prune",
        "/v1/registries/login",
    ] {
        assert!(doc["paths"][p]["post"].is_object(), "openapi lacks {p}");
    }
    for s in ["PullImage", "PullEvent", "RegistryLogin", "PruneReport"] {
        assert!(
            doc["components"]["schemas"][s].is_object(),
            "openapi lacks {s}"
        );
    }
    // A malformed pull request is a 400 JSON error, not a stream.
    let (status, body) = d
        .http("POST", "/v1/images/pull", Some("{\"ref\": 1}"))
        .unwrap();
    assert_eq!(status, 400, "{body}");
}

// ---- bad input: each one its own test -------------------------------------------

fn push_hostile(reg: &Registry, tar: &[u8], name: &str) -> String {
    push(
        reg,
        &Layout::new(&["true"]).layer(tar, Compress::Gzip),
        name,
    )
}

#[test]
fn layer_with_dotdot_path_is_rejected() {
    let reg = Registry::start();
    let t = Target::new("dotdot");
    let reference = push_hostile(
        &reg,
        &raw_tar(&[Raw::File(&t.dotdot("escaped"), b"x")]),
        "dotdot:1",
    );
    let d = daemon(&[]);
    BadPull::new(&d).fails(&reference, &["rejected"]);
    assert!(!t.0.exists(), "nothing written at {}", t.0.display());
}

#[test]
fn layer_with_absolute_path_stays_inside_the_image() {
    let reg = Registry::start();
    let t = Target::new("abs");
    let abs = format!("{}/abs", t.0.display());
    let tar = raw_tar(&[Raw::File(&abs, b"inside\n")]);
    let reference = push_hostile(&reg, &tar, "abs:1");
    let d = daemon(&[]);
    let (_, digest) = pull_ok(&d, &reference);
    assert!(!t.0.exists(), "nothing written at {}", t.0.display());
    assert_eq!(
        read_in_image(&d, &digest, &abs).as_deref(),
        Some("inside\n"),
        "the absolute path was re-rooted in the image"
    );
}

#[test]
fn write_through_a_symlink_pointing_outside_is_confined_or_rejected() {
    let reg = Registry::start();
    let t = Target::new("symlink");
    std::fs::create_dir_all(&t.0).unwrap();
    let tar = raw_tar(&[
        Raw::Symlink("link", &t.0.display().to_string()),
        Raw::File("link/through", b"x"),
        Raw::Symlink("rel", &t.dotdot("")),
        Raw::File("rel/through-rel", b"x"),
    ]);
    let reference = push_hostile(&reg, &tar, "symlink:1");
    let d = daemon(&[]);
    let out = d.hearth(&["image", "pull", &reference]);
    assert_eq!(
        std::fs::read_dir(&t.0).unwrap().count(),
        0,
        "nothing written through the symlinks: {}",
        show(&out)
    );
    if !out.status.success() {
        BadPull::new(&d).nothing_left();
    }
}

#[test]
fn hardlink_to_a_target_outside_the_root_is_rejected() {
    let reg = Registry::start();
    let t = Target::new("hardlink");
    std::fs::create_dir_all(&t.0).unwrap();
    std::fs::write(t.0.join("secret"), b"host secret").unwrap();
    let tar = raw_tar(&[Raw::Hardlink("stolen", &t.dotdot("secret"))]);
    let reference = push_hostile(&reg, &tar, "hardlink:1");
    let d = daemon(&[]);
    BadPull::new(&d).fails(&reference, &["stolen"]);
    assert_eq!(std::fs::read(t.0.join("secret")).unwrap(), b"host secret");
}

#[test]
fn whiteout_naming_a_path_outside_is_rejected() {
    let reg = Registry::start();
    let t = Target::new("whiteout");
    std::fs::create_dir_all(&t.0).unwrap();
    std::fs::write(t.0.join("victim"), b"keep me").unwrap();
    let tar = raw_tar(&[Raw::File(&t.dotdot(".wh.victim"), b"")]);
    let reference = push_hostile(&reg, &tar, "whiteout:1");
    let d = daemon(&[]);
    BadPull::new(&d).fails(&reference, &["rejected"]);
    assert_eq!(std::fs::read(t.0.join("victim")).unwrap(), b"keep me");
}

#[test]
fn layer_larger_than_the_limit_is_rejected() {
    let reg = Registry::start();
    let bomb = images::layer(&[("bomb", &vec![0u8; 8 << 20], 0o644)]);
    let reference = push_hostile(&reg, &bomb, "bomb:1");
    let d = daemon(&["--max-layer-bytes", "1048576"]);
    BadPull::new(&d).fails(&reference, &["max_layer_bytes"]);
}

#[test]
fn layer_with_more_entries_than_the_limit_is_rejected() {
    let reg = Registry::start();
    let names: Vec<String> = (0..200).map(|i| format!("f{i}")).collect();
    let files: Vec<(&str, &[u8], u32)> = names
        .iter()
        .map(|n| (n.as_str(), &b"x"[..], 0o644))
        .collect();
    let reference = push_hostile(&reg, &images::layer(&files), "entries:1");
    let d = daemon(&["--max-image-entries", "50"]);
    BadPull::new(&d).fails(&reference, &["max_entries"]);
}

#[test]
fn truncated_gzip_layer_is_rejected() {
    let reg = Registry::start();
    let whole = hearth_e2e::registry::gzip(&images::layer(&[("big", &vec![7u8; 200_000], 0o644)]));
    let cut = whole[..whole.len() / 2].to_vec();
    let reference = push(
        &reg,
        &Layout::new(&["true"]).raw_gzip_layer(cut),
        "truncated:1",
    );
    let d = daemon(&[]);
    BadPull::new(&d).fails(&reference, &["corrupt"]);
}

#[test]
fn blob_whose_content_does_not_match_its_digest_is_rejected() {
    let reg = Registry::start();
    let image = Layout::new(&["true"]).layer(
        &images::layer(&[("etc/marker", b"genuine\n", 0o644)]),
        Compress::Gzip,
    );
    let layer = image.layer_digests()[0].clone();
    let reference = push(&reg, &image, "tampered:1");
    let data = reg.blob_data(&layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let d = daemon(&[]);
    BadPull::new(&d).fails(&reference, &[&layer, "hashes to"]);
    assert_eq!(
        std::fs::read_dir(d.data_dir().join("images/blob-cache/sha256"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy()
                == layer.trim_start_matches("sha256:"))
            .count(),
        0,
        "the corrupt blob is not cached"
    );
}

#[test]
fn index_without_linux_amd64_is_refused_naming_the_platforms() {
    let reg = Registry::start();
    let image = Layout::new(&["true"]).layer(
        &images::layer(&[("etc/marker", b"arm\n", 0o644)]),
        Compress::Gzip,
    );
    let dir = tempfile::tempdir().unwrap();
    image.write_platforms(dir.path(), &[("linux", "arm64"), ("linux", "s390x")]);
    reg.push(dir.path(), "arm:1", None);
    let d = daemon(&[]);
    BadPull::new(&d).fails(
        &reg.reference("arm:1"),
        &["linux/amd64", "linux/arm64", "linux/s390x"],
    );
}

#[test]
fn unknown_image_is_a_clear_404() {
    let reg = Registry::start();
    let d = daemon(&[]);
    BadPull::new(&d).fails(&reg.reference("nothing:here"), &["no such image"]);
    let out = d.hearth(&["run", &reg.reference("nothing:here"), "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", show(&out));
    assert!(stderr(&out).contains("no such image"), "{}", show(&out));
}

#[test]
fn registry_answering_500_is_a_clear_error() {
    let fake = FakeRegistry::failing_500();
    let d = daemon(&[]);
    BadPull::new(&d).fails(
        &format!("{}/x:1", fake.addr),
        &["HTTP 500", "internal trouble"],
    );
}

#[test]
fn stalling_registry_times_out_naming_what_it_waited_for() {
    let fake = FakeRegistry::stalling();
    let d = daemon(&["--registry-timeout", "2"]);
    let start = std::time::Instant::now();
    BadPull::new(&d).fails(
        &format!("{}/x:1", fake.addr),
        &["stalled", "2s", "manifest"],
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "bounded: {:?}",
        start.elapsed()
    );
}

#[test]
fn disk_full_while_unpacking_removes_the_partial_image() {
    if !hearth_e2e::require(
        rustix_is_root(),
        "root (it mounts a small tmpfs as the data dir)",
    ) {
        return;
    }
    let reg = Registry::start();
    // 64 MiB of zeros: a few KiB compressed, more than the 24 MiB data dir holds.
    let big = images::layer(&[("zeros", &vec![0u8; 64 << 20], 0o644)]);
    let reference = push_hostile(&reg, &big, "full:1");
    let mut d = Daemon::start_with(DaemonOptions {
        busybox: false,
        before_start: Some(|dir: &Path| {
            std::fs::create_dir_all(dir).unwrap();
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=24m", "hearth-e2e-full"])
                .arg(dir)
                .status()
                .unwrap();
            assert!(st.success(), "mount tmpfs");
        }),
        ..DaemonOptions::default()
    });
    let data = d.data_dir();
    BadPull::new(&d).fails(&reference, &["No space left on device"]);
    d.kill9();
    let _ = Command::new("umount").arg("-l").arg(&data).status();
}

fn rustix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
