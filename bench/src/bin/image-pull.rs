//! Time to a ready root filesystem for a ~200 MB multi-layer image pulled from a
//! local registry (Debian's docker-registry on 127.0.0.1), beside the same work
//! done with `skopeo copy` + `umoci raw unpack` + `mkfs.ext4 -d`, in the same run.
//!
//! Rows: cold (nothing local), rebuild (blobs local, root filesystem built again)
//! and, for Hearth, cached (root filesystem already built: a manifest check).
//!
//! Usage: image-pull [RUNS]   (default 3; needs docker-registry, skopeo, umoci, mkfs.ext4)

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_bench::{header, ms, row};
use hearth_e2e::registry::{Compress, Layout, Registry};
use hearth_e2e::{images, show, Daemon, DaemonOptions};

/// xorshift64*, for reproducible content.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A layer of `files` files totalling about `bytes`: half incompressible (like
/// binaries), half text-like (like sources and configs).
fn content_layer(rng: &mut Rng, dir: &str, files: usize, bytes: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the", "image", "layer", "root", "file", "system", "config", "path", "lib", "share", "usr",
        "python", "module", "import", "return", "value",
    ];
    let per = bytes / files;
    let mut owned: Vec<(String, Vec<u8>)> = Vec::with_capacity(files);
    for i in 0..files {
        let mut data = Vec::with_capacity(per);
        if i % 2 == 0 {
            while data.len() < per {
                data.extend_from_slice(&rng.next().to_le_bytes());
            }
        } else {
            while data.len() < per {
                data.extend_from_slice(WORDS[(rng.next() % 16) as usize].as_bytes());
                data.push(if rng.next().is_multiple_of(12) {
                    b'\n'
                } else {
                    b' '
                });
            }
        }
        data.truncate(per);
        owned.push((format!("{dir}/f{i:05}"), data));
    }
    let refs: Vec<(&str, &[u8], u32)> = owned
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice(), 0o644))
        .collect();
    images::layer(&refs)
}

fn timed(what: &str, cmd: &mut Command) -> Duration {
    let t0 = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = t0.elapsed();
    assert!(out.status.success(), "{what}: {}", show(&out));
    took
}

fn du_bytes(dir: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-sb"])
        .arg(dir)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// skopeo copy (unless `oci` already holds the image) + umoci raw unpack + mkfs.ext4 -d.
fn baseline(reference: &str, work: &Path, copy: bool) -> (Duration, Duration, Duration) {
    let oci = work.join("oci");
    let copy_t = if copy {
        timed(
            "skopeo copy",
            Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--src-tls-verify=false", "-q"])
                .arg(format!("docker://{reference}"))
                .arg(format!("oci:{}:bench", oci.display())),
        )
    } else {
        Duration::ZERO
    };
    let rootfs = work.join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    let unpack_t = timed(
        "umoci raw unpack",
        Command::new("umoci")
            .args(["raw", "unpack", "--image"])
            .arg(format!("{}:bench", oci.display()))
            .arg(&rootfs),
    );
    let size = du_bytes(&rootfs);
    let img = work.join("rootfs.ext4");
    let _ = std::fs::remove_file(&img);
    let kib = (size + size / 5 + (64 << 20)) / 1024;
    let mkfs_t = timed(
        "mkfs.ext4 -d",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-m", "0", "-d"])
            .arg(&rootfs)
            .arg(&img)
            .arg(format!("{kib}k")),
    );
    (copy_t, unpack_t, mkfs_t)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    eprintln!("building the image (busybox + 3 content layers) ...");
    let mut layout = Layout::new(&["true"]).layer(&images::layer_with_busybox(&[]), Compress::Gzip);
    let mut raw_bytes = 0usize;
    for (i, (files, bytes)) in [(2000, 40 << 20), (400, 80 << 20), (60, 80 << 20)]
        .into_iter()
        .enumerate()
    {
        let tar = content_layer(&mut rng, &format!("data/l{i}"), files, bytes);
        raw_bytes += tar.len();
        layout = layout.layer(&tar, Compress::Gzip);
    }
    let reg = Registry::start();
    let dir = tempfile::tempdir().expect("tempdir");
    layout.write(dir.path());
    let compressed: u64 = std::fs::read_dir(dir.path().join("blobs/sha256"))
        .expect("blobs")
        .map(|e| e.expect("e").metadata().expect("meta").len())
        .sum();
    reg.push(dir.path(), "bench/big:1", None);
    let reference = reg.reference("bench/big:1");
    eprintln!(
        "image {reference}: 4 layers, {:.0} MB uncompressed tar, {:.0} MB compressed",
        raw_bytes as f64 / 1e6,
        compressed as f64 / 1e6
    );

    let (mut cold, mut cached, mut rebuild) = (Vec::new(), Vec::new(), Vec::new());
    let (mut b_cold, mut b_copy, mut b_unpack, mut b_mkfs, mut b_rebuild) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        eprintln!("run {}/{runs}", run + 1);
        let d = Daemon::start_with(DaemonOptions {
            busybox: false,
            ..DaemonOptions::default()
        });
        let pull = |d: &Daemon| {
            timed(
                "hearth image pull",
                &mut d.cmd(&["image", "pull", &reference]),
            )
        };
        cold.push(pull(&d));
        cached.push(pull(&d));
        timed("hearth image rm", &mut d.cmd(&["image", "rm", &reference]));
        rebuild.push(pull(&d));
        drop(d);

        let work = tempfile::tempdir().expect("tempdir");
        let (c, u, m) = baseline(&reference, work.path(), true);
        b_copy.push(c);
        b_unpack.push(u);
        b_mkfs.push(m);
        b_cold.push(c + u + m);
        let (_, u, m) = baseline(&reference, work.path(), false);
        b_rebuild.push(u + m);
    }

    println!();
    header();
    row("hearth pull, cold", &cold);
    row("hearth pull, rootfs cached", &cached);
    row("hearth pull, blobs cached, rootfs rebuilt", &rebuild);
    row("skopeo copy+umoci unpack+mkfs.ext4 -d, cold", &b_cold);
    row("  of which skopeo copy", &b_copy);
    row("  of which umoci raw unpack", &b_unpack);
    row("  of which mkfs.ext4 -d", &b_mkfs);
    row("umoci unpack+mkfs.ext4 -d (blobs local)", &b_rebuild);
    let p50 = |v: &[Duration]| hearth_bench::percentile(v, 50.0).as_secs_f64();
    println!();
    println!(
        "ratio cold hearth / baseline (p50): {:.2}; rebuilt {:.2}; cached hearth: {} ms",
        p50(&cold) / p50(&b_cold),
        p50(&rebuild) / p50(&b_rebuild),
        ms(hearth_bench::percentile(&cached, 50.0))
    );
}
