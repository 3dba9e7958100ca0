//! Live migration of a sandbox with a big output log: what the log's tail
//! costs inside the guest's pause (review15 F6). Two `hearthd dev` nodes; a
//! busybox sandbox writes MIB MiB of output, then counts; it is moved back
//! and forth MOVES times with `hearth migrate --json`. Each move sends the
//! log whole during the pre-copy and its tail (a few bytes here) from the
//! drain on, beside QEMU's last pass. Printed per move: the log's size on
//! the target, the guest's pause, the pause's steps (ms after the stop) and
//! the tail step (`log_sent_ms - output_drained_ms`); then p50 and max.
//! `HEARTH_BIN_DIR` selects the binaries, to compare two builds.
//!
//! Usage: migrate-log [MIB] [MOVES]   (default 64 MiB, 6 moves)

use std::time::{Duration, Instant};

use hearth_e2e::{images, show, stdout, wait_until, Daemon, DaemonOptions};

fn node() -> Daemon {
    Daemon::start_with(DaemonOptions {
        busybox: false,
        ..Default::default()
    })
}

fn p50(mut v: Vec<u64>) -> Option<u64> {
    v.sort();
    v.get(v.len().saturating_sub(1) / 2).copied()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let moves: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(6);
    // why: one rootfs imported into both, so the image has one digest on both
    // nodes (a migration needs the same image there; DaemonOptions' own import
    // builds a rootfs per daemon, whose digests differ).
    let (a, b) = (node(), node());
    let rootfs = a.data.path().join("busybox-rootfs");
    images::busybox_rootfs(&rootfs);
    for d in [&a, &b] {
        let out = d.hearth(&[
            "image",
            "import",
            "--name",
            "busybox",
            rootfs.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "import: {}", show(&out));
    }
    let script = format!(
        "head -c {} /dev/zero | tr '\\0' x; echo; echo done > /d; i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done",
        mib << 20
    );
    let out = a.hearth(&[
        "run",
        "--detach",
        "--network",
        "none",
        "--memory",
        "128",
        "--name",
        "big",
        "busybox",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let id = stdout(&out).trim().to_string();
    let t0 = Instant::now();
    wait_until("the big output", Duration::from_secs(900), || {
        stdout(&a.hearth(&["exec", "big", "--", "cat", "/d"])).contains("done")
    });
    println!(
        "binaries: {}; {mib} MiB of output written in {:.1} s",
        hearth_e2e::bin_dir().display(),
        t0.elapsed().as_secs_f64()
    );
    let token = |d: &Daemon| d.data_dir().join("api-token").display().to_string();
    println!("| move | log MiB | paused | qemu done | drained | log sent | committing saved | **tail step** |");
    println!("|---|---|---|---|---|---|---|---|");
    let (mut from, mut to) = (&a, &b);
    let (mut paused, mut tail) = (Vec::new(), Vec::new());
    for i in 0..moves {
        let out = from.hearth(&[
            "migrate",
            "big",
            "--to",
            &to.api,
            "--to-token-file",
            &token(to),
            "--json",
        ]);
        assert!(out.status.success(), "migrate: {}", show(&out));
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(st["phase"], "completed", "{st}");
        let step = |k: &str| st["pause_steps"][k].as_u64();
        let f = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        let t = step("log_sent_ms")
            .zip(step("output_drained_ms"))
            .map(|(s, d)| s.saturating_sub(d));
        let log = std::fs::metadata(to.data_dir().join("sandboxes").join(&id).join("output.log"))
            .map(|m| format!("{:.1}", m.len() as f64 / (1 << 20) as f64))
            .unwrap_or_else(|_| "-".into());
        println!(
            "| {i} | {log} | {} | {} | {} | {} | {} | {} |",
            f(st["paused_ms"].as_u64()),
            f(step("qemu_completed_ms")),
            f(step("output_drained_ms")),
            f(step("log_sent_ms")),
            f(step("committing_saved_ms")),
            f(t),
        );
        paused.extend(st["paused_ms"].as_u64());
        tail.extend(t);
        std::mem::swap(&mut from, &mut to);
    }
    let f = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "p50 / max: paused {} / {} ms, tail step {} / {} ms ({} and {} of {moves} moves reported them)",
        f(p50(paused.clone())),
        f(paused.iter().max().copied()),
        f(p50(tail.clone())),
        f(tail.iter().max().copied()),
        paused.len(),
        tail.len()
    );
}
