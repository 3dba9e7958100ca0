//! Compiles the BPF C programs in `bpf/` with clang (`-target bpf -O2 -g`, BTF
//! kept) into OUT_DIR; the loader embeds the object.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src = "bpf/policy.c";
    println!("cargo:rerun-if-changed={src}");
    let clang = std::env::var("HEARTH_CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=HEARTH_CLANG");
    let obj = out.join("policy.bpf.o");
    let status = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .args(["-I/usr/include/x86_64-linux-gnu", "-c", src, "-o"])
        .arg(&obj)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile {src} ({s})"),
        Err(e) => panic!(
            "cannot run {clang} to compile {src}: {e}; install clang and libbpf-dev (scripts/setup does)"
        ),
    }
}
