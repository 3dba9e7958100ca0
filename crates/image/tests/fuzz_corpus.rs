//! The unpack fuzz target (`fuzz/fuzz_targets/unpack.rs`) run on stable Rust:
//! every input of the corpus `fuzz/corpus/unpack/` (hostile tars: `..`, absolute
//! paths, symlink and hardlink escapes, whiteouts outside, devices, type changes,
//! compressed variants, a two-layer symlink plant), then a bounded number of
//! deterministic mutations of them. `hearth_image::fuzzing` panics if any write
//! lands outside the root. HEARTH_FUZZ_ITERS raises the mutation count.

use std::path::PathBuf;

use hearth_image::fuzzing::unpack_layer_confined;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut dirs = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/unpack")];
    // Crashes that `cargo fuzz` found are kept here once fixed, as regressions.
    dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/unpack"));
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn every_corpus_input_stays_inside_the_root() {
    let inputs = corpus();
    assert!(
        inputs.len() >= 20,
        "the corpus is missing: {}",
        inputs.len()
    );
    let mut ok = 0;
    for (name, data) in &inputs {
        let r = std::panic::catch_unwind(|| unpack_layer_confined(data));
        match r {
            Ok(true) => ok += 1,
            Ok(false) => {}
            Err(_) => panic!("corpus input {name} escaped the root"),
        }
    }
    assert!(ok >= 4, "the benign inputs unpack ({ok} did)");
}

/// xorshift64*: deterministic, so a failure names a reproducible input.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn mutated_corpus_inputs_stay_inside_the_root() {
    let inputs = corpus();
    let iters: usize = std::env::var("HEARTH_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..iters {
        let (name, seed) = &inputs[rng.next() as usize % inputs.len()];
        let mut data = seed.clone();
        for _ in 0..1 + rng.next() % 8 {
            if data.len() < 2 {
                break;
            }
            let at = 1 + rng.next() as usize % (data.len() - 1);
            match rng.next() % 4 {
                0 => data[at] = rng.next() as u8,
                1 => data[at] ^= 1 << (rng.next() % 8),
                2 => data.truncate(at),
                _ => {
                    // Splice a byte range from elsewhere (e.g. a name over another).
                    let from = 1 + rng.next() as usize % (data.len() - 1);
                    let n = (rng.next() as usize % 100).min(data.len() - at.max(from));
                    let chunk: Vec<u8> = data[from..from + n].to_vec();
                    data[at..at + n].copy_from_slice(&chunk);
                }
            }
        }
        let r = std::panic::catch_unwind(|| unpack_layer_confined(&data));
        if r.is_err() {
            let path = std::env::temp_dir().join(format!("hearth-fuzz-escape-{i}"));
            std::fs::write(&path, &data).unwrap();
            panic!(
                "mutation {i} of {name} escaped the root; input saved to {}",
                path.display()
            );
        }
    }
}
