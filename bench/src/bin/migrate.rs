//! Live migration: total time and downtime of `hearth migrate` between two
//! `hearthd dev` nodes, beside a bare QEMU-to-QEMU migration of the same guest
//! (same kernel, initramfs, root filesystem, memory and workload, QEMU driven
//! directly over QMP, stream on a local unix socket), in the same run.
//!
//! Loads: `idle` (a counter printing every 20 ms) and `dirty` (the counter
//! plus a loop rewriting 16 MiB of guest memory continuously).
//! Columns: total = request to target running (Hearth) / `migrate` to
//! completed (bare); paused = the guest's pause, measured the same way on
//! both paths: the source QEMU's `STOP` event to the target QEMU's `RESUME`
//! event (QMP timestamps, host clock, one host); qdown = the `downtime`
//! the source QEMU reports (it ends when the source completes, before the
//! target resumes); handover = source paused to target confirmed (guest
//! channel re-attached, Hearth only); stall = gap in the guest's output as
//! the host relays it (last line from the source, first new line from the
//! target; Hearth only, not compared). A second table breaks Hearth's pause
//! down by step (p50, ms after the stop). A value missing from a run is
//! counted and reported, never read as 0.
//!
//! Usage: migrate [RUNS] [MEMORY_MIB,...]   (default 3 runs, 256 and 1024 MiB)
//!
//! Environment: `HEARTH_BIN_DIR` (the `hearthd`/`hearth` to measure),
//! `HEARTH_BENCH_BARE_ONLY` (no Hearth rows), `HEARTH_BENCH_TUNNEL` (bare's
//! stream through Hearth's TCP tunnel), `HEARTH_BENCH_BARE_GATE` (bare QEMU
//! stops at the switch-over gate, `pause-before-switchover`, and is let
//! through at once: the gate's own cost, without Hearth's work there),
//! `HEARTH_BENCH_BARE_STEPS` (each bare run's QMP events, ms after its stop).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_agent::guest_conn::GuestConn;
use hearth_agent::SessionEvent;
use hearth_e2e::{images, Daemon, DaemonOptions};
use hearth_vmm::{Accel, MigrationParams, MigrationProgress, QemuVmm, Vm, VmConfig};

const COUNTER: &str = "i=0; while true; do echo $i; i=$((i+1)); usleep 20000; done";
const DIRTY: &str = "(while true; do dd if=/dev/zero of=/dev/shm/d bs=1M count=16 conv=notrunc 2>/dev/null; done) & ";

fn cache_current(file: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/hearth/current").join(file)
}

fn workload(dirty: bool) -> String {
    if dirty {
        format!("{DIRTY}{COUNTER}")
    } else {
        COUNTER.to_string()
    }
}

#[derive(Default, Clone)]
struct Sample {
    total: Duration,
    /// Source `STOP` → target `RESUME`.
    paused_ms: Option<u64>,
    /// QEMU's own `downtime`.
    downtime_ms: Option<u64>,
    /// Hearth only: the pause's steps (ms after the stop), in [`STEPS`] order.
    steps: Vec<Option<u64>>,
    handover_ms: Option<u64>,
    stall: Option<Duration>,
    iterations: u64,
    throttle: u64,
    /// Bare only: the guest answered a Ping on the target within 20 s.
    alive: Option<bool>,
}

/// Output lines with the time the host relayed them.
type Lines = Arc<Mutex<Vec<(Instant, u64)>>>;

fn follow(d: &Daemon, sandbox: &str) -> (std::process::Child, Lines) {
    let mut child = d
        .cmd(&["logs", "-f", sandbox])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("logs -f");
    let out = child.stdout.take().expect("stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = line.trim().parse() {
                l2.lock().unwrap().push((Instant::now(), v));
            }
        }
    });
    (child, lines)
}

/// `s` without ANSI colour sequences (`ESC [ ... m`, as hearthd logs to a file).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Microseconds into the (UTC) day of a log line's RFC 3339 time, or of a
/// QMP event's `timestamp_us=Some(..)` (epoch µs) when it has one.
fn line_us(line: &str) -> Option<u64> {
    if let Some(t) = line.split("timestamp_us=Some(").nth(1) {
        let us: u64 = t.split(')').next()?.parse().ok()?;
        return Some(us % 86_400_000_000);
    }
    let t = line.split('T').nth(1)?;
    let (hms, frac) = t.split_once('.')?;
    let mut it = hms.split(':').map(|x| x.parse::<u64>().ok());
    let (h, m, sec) = (it.next()??, it.next()??, it.next()??);
    let frac: String = frac.chars().take_while(char::is_ascii_digit).collect();
    let us = format!("{frac:0<6}")[..6].parse::<u64>().ok()?;
    Some(((h * 60 + m) * 60 + sec) * 1_000_000 + us)
}

/// With `HEARTH_BENCH_TIMELINE`: one pause's steps from both daemons' logs
/// (run them with `RUST_LOG=info,hearth_vmm=debug,hearth_agent::migration=debug`),
/// in ms after the source's last `STOP`.
fn timeline(src: &str, dst: &str) {
    let pick = |log: &str, side: &str| -> Vec<(u64, String)> {
        strip_ansi(log)
            .lines()
            .filter(|l| {
                l.contains("pause:")
                    || (l.contains("QMP event")
                        && ["STOP", "RESUME", "MIGRATION"].iter().any(|e| {
                            l.contains(&format!("event={e} "))
                                || l.contains(&format!("event=\"{e}\""))
                        }))
            })
            .filter_map(|l| {
                let what = l
                    .split("pause: ")
                    .nth(1)
                    .map(|w| w.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
                    .or_else(|| {
                        let ev = l
                            .split("event=")
                            .nth(1)?
                            .split_whitespace()
                            .next()?
                            .trim_matches('"');
                        let st = l
                            .split("\"status\":\"")
                            .nth(1)
                            .and_then(|x| x.split('"').next())
                            .unwrap_or("");
                        Some(format!("QEMU {ev} {st}"))
                    })?;
                Some((line_us(l)?, format!("{side} {what}")))
            })
            .collect()
    };
    let mut all = pick(src, "src");
    let Some(stop) = all
        .iter()
        .rev()
        .find(|(_, w)| w == "src QEMU STOP ")
        .map(|x| x.0)
    else {
        println!("  (timeline: no STOP in the source's log)");
        return;
    };
    all.extend(pick(dst, "dst"));
    all.sort();
    let steps: Vec<String> = all
        .iter()
        .filter(|(t, _)| *t + 2_000 >= stop)
        .map(|(t, w)| format!("{:.1} {w}", (*t as f64 - stop as f64) / 1000.0))
        .collect();
    println!("  timeline: {}", steps.join(" | "));
}

fn wait_lines(lines: &Lines, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while lines.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "workload output did not arrive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hearth_run(a: &Daemon, b: &Daemon, mib: u32, dirty: bool) -> Sample {
    let out = a.hearth(&[
        "run",
        "--detach",
        // why: both nodes share this host's network namespace; a networked
        // sandbox migrates only between hosts (bare QEMU has no NIC either).
        "--network",
        "none",
        "--memory",
        &mib.to_string(),
        "--name",
        "bench",
        "busybox",
        "--",
        "sh",
        "-c",
        &workload(dirty),
    ]);
    assert!(out.status.success(), "{}", hearth_e2e::show(&out));
    let (mut src_f, src_lines) = follow(a, "bench");
    // Let the load run for a while (2 s of output) before migrating.
    wait_lines(&src_lines, 100);
    let tf = b.data_dir().join("api-token");
    let marks = (a.log_text().len(), b.log_text().len());
    let t0 = Instant::now();
    let out = a.hearth(&[
        "migrate",
        "bench",
        "--to",
        &b.api,
        "--to-token-file",
        tf.to_str().unwrap(),
        "--json",
    ]);
    let total = t0.elapsed();
    assert!(out.status.success(), "{}", hearth_e2e::show(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status");
    // The target's commit, from its "took over a migrated sandbox" log line
    // (the last one is this run's): the stream complete (`stream_in_us`) and
    // the record save (fsyncs) before its `cont` (`save_us`), both durations,
    // and the stream's bytes that arrived after the commit (`tail_bytes`).
    let took_over = strip_ansi(&b.log_text())
        .lines()
        .rev()
        .find(|l| l.contains("took over a migrated sandbox"))
        .map(str::to_string)
        .unwrap_or_default();
    let field = |name: &str| {
        took_over
            .split(&format!("{name}="))
            .nth(1)?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<u64>()
            .ok()
    };
    if std::env::var_os("HEARTH_BENCH_TIMELINE").is_some() {
        timeline(&a.log_text()[marks.0..], &b.log_text()[marks.1..]);
    }
    let (mut dst_f, dst_lines) = follow(b, "bench");
    let last = *src_lines.lock().unwrap().last().expect("source lines");
    let deadline = Instant::now() + Duration::from_secs(60);
    let stall = loop {
        if let Some(first) = dst_lines.lock().unwrap().iter().find(|(_, v)| *v > last.1) {
            break Some(first.0.duration_since(last.0));
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = src_f.kill();
    let _ = dst_f.kill();
    let _ = src_f.wait();
    let _ = dst_f.wait();
    let out = b.hearth(&["rm", "-f", "bench"]);
    assert!(out.status.success(), "{}", hearth_e2e::show(&out));
    // why: the source keeps its ended record ("migrated to …") under the name.
    let out = a.hearth(&["rm", "-f", "bench"]);
    assert!(out.status.success(), "{}", hearth_e2e::show(&out));
    Sample {
        total,
        paused_ms: st["paused_ms"].as_u64(),
        downtime_ms: st["downtime_ms"].as_u64(),
        steps: STEPS
            .iter()
            .map(|k| st["pause_steps"][k].as_u64())
            .chain([
                field("stream_in_us").map(|us| us / 1000),
                field("save_us").map(|us| us / 1000),
                field("tail_bytes").map(|b| b >> 10),
            ])
            .collect(),
        handover_ms: st["handover_ms"].as_u64(),
        stall,
        iterations: st["iterations"].as_u64().expect("iterations in the status"),
        throttle: st["cpu_throttle_percent"].as_u64().unwrap_or(0),
        alive: None,
    }
}

async fn bare_run(rootfs: &std::path::Path, mib: u32, dirty: bool) -> Sample {
    let tmp = tempfile::Builder::new()
        .prefix("bm")
        .tempdir_in("/tmp")
        .unwrap();
    let cfg = |id: &str| VmConfig {
        id: id.into(),
        dir: tmp.path().join(id),
        kernel: cache_current("vmlinux"),
        initrd: cache_current("initramfs.cpio.gz"),
        rootfs: rootfs.to_path_buf(),
        cpus: 1,
        memory_mib: mib,
        hostname: "bench".into(),
        extra_cmdline: vec![],
        accel: Accel::Tcg,
        net: None,
        memory: hearth_vmm::GuestMemory::SharedFile,
        ram_kib: None,
    };
    let vmm = QemuVmm::new().expect("qemu");
    let src = vmm.create_qemu(&cfg("src")).await.expect("source VM");
    let stream = src.connect_agent().await.expect("agent socket");
    src.start().await.expect("start");
    let conn = GuestConn::handshake(stream, Duration::from_secs(120))
        .await
        .expect("hello");
    let mut session = conn
        .exec(&hearth_proto::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), workload(dirty)],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            workdir: "/".into(),
            user: String::new(),
            stdin: false,
        })
        .await
        .expect("exec");
    // Let the load run for 2 s of output, then keep draining in the background.
    let mut n = 0;
    while n < 100 {
        match session.next().await {
            Some(SessionEvent::Stdout(b)) => n += b.iter().filter(|c| **c == b'\n').count(),
            Some(SessionEvent::Started(_)) | Some(SessionEvent::Stderr(_)) => {}
            other => panic!("workload ended: {other:?}"),
        }
    }
    let drain = tokio::spawn(async move { while session.next().await.is_some() {} });
    let sock = tmp.path().join("in.sock");
    let dst = vmm
        .create_incoming_qemu(&cfg("dst"), &sock)
        .await
        .expect("target VM");
    // With HEARTH_BENCH_TUNNEL, the stream goes through Hearth's TCP tunnel.
    let out_sock = if std::env::var_os("HEARTH_BENCH_TUNNEL").is_some() {
        use hearth_agent::migration::tunnel;
        let tcp = tunnel::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = tcp.local_addr().unwrap();
        let ticket = tunnel::new_ticket();
        let (t2, s2) = (ticket.clone(), sock.clone());
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(async move { tunnel::serve_target(tcp, t2, None, &s2, received).await });
        let src_sock = tmp.path().join("out.sock");
        let l = tokio::net::UnixListener::bind(&src_sock).unwrap();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let out = tunnel::source_socket(addr).unwrap();
        tokio::spawn(tunnel::serve_source(l, out, addr, ticket, sent));
        src_sock
    } else {
        sock.clone()
    };
    let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
    // With HEARTH_BENCH_BARE_GATE, bare QEMU stops at the switch-over gate
    // (`pause-before-switchover`) and is let through at once: what the gate's
    // mechanism costs the pause, without any of Hearth's work there.
    let gate = std::env::var_os("HEARTH_BENCH_BARE_GATE").map(|_| {
        let (reached, reached_rx) = tokio::sync::oneshot::channel();
        let (proceed_tx, proceed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if reached_rx.await.is_ok() {
                let _ = proceed_tx.send(true);
            }
        });
        hearth_vmm::SwitchoverGate { reached, proceed }
    });
    // why: QEMU's own times of each step (QMP timestamps), to see where a
    // gate's cost goes (HEARTH_BENCH_BARE_STEPS prints them per run).
    let mut src_events = src.qmp().subscribe();
    let mut dst_events = dst.qmp().subscribe();
    let t0 = Instant::now();
    let p = src
        .migrate_out(&out_sock, &MigrationParams::default(), &tx, gate)
        .await
        .expect("bare migration");
    let total = t0.elapsed();
    dst.wait_incoming(Duration::from_secs(60))
        .await
        .expect("incoming");
    drain.abort();
    // Is the guest alive on the target? (Hearth checks this with a Ping before it commits.)
    let stream = dst.connect_agent().await.expect("target agent socket");
    dst.start().await.expect("start target");
    // The guest's pause: the source QEMU's STOP to the target QEMU's RESUME.
    let paused_ms = match (
        src.run_state_times().stopped_us,
        dst.run_state_times().resumed_us,
    ) {
        (Some(stop), Some(resume)) => resume.checked_sub(stop).map(|d| d / 1000),
        _ => None,
    };
    if std::env::var_os("HEARTH_BENCH_BARE_STEPS").is_some() {
        let stop = src.run_state_times().stopped_us.unwrap_or(0);
        let mut line = String::new();
        let mut take = |rx: &mut tokio::sync::broadcast::Receiver<hearth_vmm::qmp::QmpEvent>,
                        who: &str| {
            while let Ok(ev) = rx.try_recv() {
                let at = ev.timestamp_us.unwrap_or(0).saturating_sub(stop);
                let what = match ev.data["status"].as_str() {
                    Some(st) if ev.name == "MIGRATION" => st.to_string(),
                    _ if ev.name == "MIGRATION" => continue,
                    _ => ev.name.clone(),
                };
                if at < 10_000_000 && ev.timestamp_us.unwrap_or(0) >= stop {
                    line.push_str(&format!(" {who}:{what}@{:.2}", at as f64 / 1000.0));
                }
            }
        };
        take(&mut src_events, "src");
        take(&mut dst_events, "dst");
        eprintln!("bare steps (ms after the source's STOP):{line}");
    }
    let target = GuestConn::reattach(
        stream,
        conn.hello().cloned().expect("booted guest said hello"),
        1000,
    );
    let alive = target.ping(Duration::from_secs(20)).await.is_ok();
    // why: with a gate `migrate_out` answers from QEMU's `completed` event,
    // without the final statistics (Hearth reads them the same way).
    let downtime_ms = match p.downtime_ms {
        Some(d) => Some(d),
        None => src
            .migration_stats()
            .await
            .ok()
            .flatten()
            .and_then(|s| s.downtime_ms),
    };
    for vm in [&src as &dyn Vm, &dst] {
        let _ = vm.kill().await;
        let _ = vm.wait().await;
    }
    Sample {
        total,
        paused_ms,
        downtime_ms,
        iterations: p.iterations,
        throttle: p.cpu_throttle_percent,
        alive: Some(alive),
        ..Default::default()
    }
}

fn p50<T: Ord + Copy>(mut v: Vec<T>) -> Option<T> {
    v.sort();
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// The steps of Hearth's pause, as `pause_steps` names them.
const STEPS: [&str; 8] = [
    "gate_ms",
    "channel_frozen_ms",
    "qemu_completed_ms",
    "output_drained_ms",
    "log_sent_ms",
    "committing_saved_ms",
    "target_resumed_ms",
    "commit_answered_ms",
];

fn report(guest: u32, load: &str, path: &str, s: &[Sample]) {
    let ms = |d: Duration| d.as_millis() as u64;
    let total: Vec<u64> = s.iter().map(|x| ms(x.total)).collect();
    let paused: Vec<u64> = s.iter().filter_map(|x| x.paused_ms).collect();
    let down: Vec<u64> = s.iter().filter_map(|x| x.downtime_ms).collect();
    let hand: Vec<u64> = s.iter().filter_map(|x| x.handover_ms).collect();
    let stall: Vec<u64> = s.iter().filter_map(|x| x.stall.map(ms)).collect();
    let f = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    let max = |v: &[u64]| v.iter().max().copied();
    println!(
        "| {guest:>5} MiB | {load:<5} | {path:<6} | {:>2} | {:>6} | {:>6} | {:>6} | {:>6} | {:>5} | {:>5} | {:>6} | {:>6} | {:>4} | {:>4} |",
        s.len(),
        f(p50(total.clone())),
        f(max(&total)),
        f(p50(paused.clone())),
        f(max(&paused)),
        f(p50(down.clone())),
        f(max(&down)),
        f(p50(hand)),
        f(p50(stall)),
        f(p50(s.iter().map(|x| x.iterations).collect())),
        f(p50(s.iter().map(|x| x.throttle).collect())),
    );
    for (what, missing) in [
        (
            "the guest's pause (STOP/RESUME times)",
            s.len() - paused.len(),
        ),
        ("QEMU's downtime", s.len() - down.len()),
    ] {
        if missing > 0 {
            println!("  ({path} {guest} MiB {load}: {what} MISSING in {missing} of {} runs; not counted as 0)", s.len());
        }
    }
    let dead = s.iter().filter(|x| x.alive == Some(false)).count();
    if dead > 0 {
        println!("  ({path} {guest} MiB {load}: the guest did not answer a Ping on the target in {dead} of {} runs)", s.len());
    }
}

/// Hearth's pause by step: p50 over the runs of each step's end (ms after
/// the stop), then, inside the step to the target's resume, the commit's wait
/// for the stream's end and the target's record save (durations), and the
/// stream's KiB that reached the target after the commit came.
fn report_steps(guest: u32, load: &str, s: &[Sample]) {
    let f = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    let cols: Vec<String> = (0..STEPS.len() + 3)
        .map(|i| {
            f(p50(s
                .iter()
                .filter_map(|x| x.steps.get(i).copied().flatten())
                .collect()))
        })
        .collect();
    println!(
        "| {guest:>5} MiB | {load:<5} | {:>2} | {} |",
        s.len(),
        cols.iter()
            .map(|c| format!("{c:>6}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let sizes: Vec<u32> = args
        .next()
        .map(|a| a.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![256, 1024]);
    let opts = DaemonOptions {
        busybox: false,
        ..Default::default()
    };
    let a = Daemon::start_with(opts.clone());
    let b = Daemon::start_with(opts);
    let rootfs_dir = a.data.path().join("busybox-rootfs");
    images::busybox_rootfs(&rootfs_dir);
    for d in [&a, &b] {
        let out = d.hearth(&[
            "image",
            "import",
            "--name",
            "busybox",
            rootfs_dir.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", hearth_e2e::show(&out));
    }
    let ext4 = std::fs::read_dir(a.data_dir().join("images/blobs/sha256"))
        .expect("image blobs")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "ext4"))
        .expect("the busybox ext4");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!("live migration, {runs} runs each (TCG, 1 vCPU, loopback; times in ms)\n");
    println!("| guest     | load  | path   | n  | total  | max    | paused | max    | qdown | max   | handov | stall  | iter | thr% |");
    println!("|-----------|-------|--------|----|--------|--------|--------|--------|-------|-------|--------|--------|------|------|");
    let mut steps = Vec::new();
    for &mib in &sizes {
        for (load, dirty) in [("idle", false), ("dirty", true)] {
            let mut bare = Vec::new();
            let mut hearth = Vec::new();
            for _ in 0..runs {
                bare.push(rt.block_on(bare_run(&ext4, mib, dirty)));
                if std::env::var_os("HEARTH_BENCH_BARE_ONLY").is_none() {
                    hearth.push(hearth_run(&a, &b, mib, dirty));
                }
            }
            report(mib, load, "bare", &bare);
            report(mib, load, "hearth", &hearth);
            steps.push((mib, load, hearth));
        }
    }
    println!("\nHearth's pause by step (p50, ms after the source VM's stop; target_resumed by the target's RESUME):\n");
    println!("| guest     | load  | n  | gate   | frozen | qemu done | drained | log sent | committing | target resumed | commit answered | stream wait (dur.) | target save (dur.) | tail KiB |");
    println!("|-----------|-------|----|--------|--------|--------|--------|--------|--------|--------|--------|--------|--------|--------|");
    for (mib, load, s) in &steps {
        report_steps(*mib, load, s);
    }
}
