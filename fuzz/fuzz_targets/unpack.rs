//! Fuzzes the layer unpacker: arbitrary (optionally compressed, optionally
//! two-layer) tar streams must never write outside the root. The same check runs
//! on stable over the corpus in `crates/image/tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hearth_image::fuzzing::unpack_layer_confined(data);
});
