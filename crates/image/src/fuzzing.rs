//! The layer unpacker as a fuzz target (`fuzz/`, `cargo +nightly fuzz run unpack`)
//! and as a plain test over a corpus (`tests/fuzz_corpus.rs`, stable Rust).
//!
//! Input: byte 0 chooses the compression (bits 0–1: none, gzip, zstd) and whether
//! the rest is split into two layers (bit 2, at the offset byte 1 scales to), so
//! whiteouts and links can refer across layers. The layers are applied to a fresh
//! root inside a sandbox directory that also holds a sentinel file and an empty
//! directory; any write outside the root panics. Errors are fine, escapes are not.

use std::fs;
use std::io::BufReader;

use crate::compression::Compression;
use crate::confined::Confined;
use crate::unpack::{Unpacker, IMAGE_LAYER};
use crate::Limits;

const SENTINEL: &[u8] = b"outside the root; must stay as it is";

/// Applies `data` as described in the module doc; panics if anything outside the root changed.
/// Returns whether the unpack succeeded.
pub fn unpack_layer_confined(data: &[u8]) -> bool {
    let sandbox = tempfile::tempdir().expect("tempdir");
    let root_path = sandbox.path().join("root");
    fs::create_dir(&root_path).expect("root");
    fs::write(sandbox.path().join("sentinel"), SENTINEL).expect("sentinel");
    fs::create_dir(sandbox.path().join("outside")).expect("outside");

    let (flags, body) = match data {
        [f, rest @ ..] => (*f, rest),
        [] => (0, data),
    };
    let compression = match flags & 3 {
        1 => Compression::Gzip,
        2 => Compression::Zstd,
        _ => Compression::None,
    };
    let layers: Vec<&[u8]> = match (flags & 4 != 0, body) {
        (true, [at, rest @ ..]) => {
            let cut = (*at as usize * rest.len()) / 256;
            vec![&rest[..cut], &rest[cut..]]
        }
        _ => vec![body],
    };
    let limits = Limits {
        max_layer_bytes: 1 << 20,
        max_entries: 2000,
        max_image_bytes: 2 << 20,
        rootfs_free_bytes: 0,
    };
    let root = Confined::open(&root_path).expect("open root");
    let mut unpacker = Unpacker::new(&root, &limits, IMAGE_LAYER);
    let mut ok = true;
    for (i, layer) in layers.iter().enumerate() {
        let blob = format!("fuzz-layer-{i}");
        let applied = compression
            .decoder(BufReader::new(*layer))
            .map_err(|_| ())
            .and_then(|stream| unpacker.apply_layer(&blob, stream).map_err(|_| ()));
        if applied.is_err() {
            ok = false;
            break;
        }
    }

    let mut names: Vec<String> = fs::read_dir(sandbox.path())
        .expect("list sandbox")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["outside", "root", "sentinel"],
        "an entry escaped the root"
    );
    assert_eq!(
        fs::read(sandbox.path().join("sentinel")).expect("sentinel"),
        SENTINEL,
        "the sentinel outside the root was changed"
    );
    assert_eq!(
        fs::read_dir(sandbox.path().join("outside"))
            .expect("outside")
            .count(),
        0,
        "something was written into a directory outside the root"
    );
    ok
}
