//! Cold start: API request to first byte of workload output, beside a bare QEMU
//! boot of the same kernel + initramfs (to the guest init's first console line),
//! measured in the same run. The difference is Hearth's orchestration overhead
//! (image overlay, QMP, guest agent handshake, exec, output path).
//!
//! Usage: cold-start [RUNS]   (default 20; needs scripts/setup artifacts)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_bench::{header, ms, row};
use hearth_e2e::{vmm_pids_under, Daemon};

fn cache_current(file: &str) -> std::path::PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    std::path::PathBuf::from(home)
        .join(".cache/hearth/current")
        .join(file)
}

/// POST a sandbox, then time until the first output byte arrives.
fn hearth_cold_start(d: &Daemon) -> Duration {
    let t0 = Instant::now();
    let (status, body) = d
        .http(
            "POST",
            "/v1/sandboxes",
            Some(r#"{"image":"busybox","cmd":["echo","ready"]}"#),
        )
        .expect("create");
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let id = v["id"].as_str().expect("id").to_string();
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).expect("connect");
    write!(
        s,
        "GET /v1/sandboxes/{id}/output?follow=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        d.token()
    )
    .expect("write");
    let mut r = BufReader::new(s);
    // Skip the headers; the first chunk of the body is the first output record.
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("headers");
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut byte = [0u8; 1];
    r.read_exact(&mut byte).expect("first byte");
    let first = t0.elapsed();
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    let (st, _) = d
        .http("DELETE", &format!("/v1/sandboxes/{id}?force=true"), None)
        .expect("delete");
    assert_eq!(st, 204);
    first
}

/// Boots the kernel + initramfs in bare QEMU until the guest init prints its
/// probe marker on the serial console.
fn bare_qemu_boot(accel: &str) -> Duration {
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=off",
            "-accel",
            accel,
        ])
        .args(["-cpu", if accel == "kvm" { "host" } else { "max" }])
        .args([
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-serial", "stdio", "-kernel"])
        .arg(cache_current("vmlinux"))
        .arg("-initrd")
        .arg(cache_current("initramfs.cpio.gz"))
        .args([
            "-append",
            "console=ttyS0 quiet reboot=t panic=-1 hearth.probe=1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let took = loop {
        line.clear();
        if out.read_line(&mut line).expect("read console") == 0 {
            panic!("QEMU exited before the probe marker");
        }
        if line.contains("HEARTH-PROBE-OK") {
            break t0.elapsed();
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    took
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let d = Daemon::start();
    let info = d.inspect_info();
    let accel = info["accel"].as_str().unwrap_or("tcg").to_string();
    eprintln!("warming up ...");
    hearth_cold_start(&d);
    bare_qemu_boot(&accel);

    let mut hearth = Vec::new();
    let mut bare = Vec::new();
    for i in 0..runs {
        eprint!("\rrun {}/{runs}", i + 1);
        hearth.push(hearth_cold_start(&d));
        bare.push(bare_qemu_boot(&accel));
    }
    eprintln!();

    // VMM RSS of an idle sandbox (256 MiB guest).
    let out = d.hearth(&["run", "-d", "busybox", "--", "sleep", "1000000"]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    hearth_e2e::wait_until("running", Duration::from_secs(120), || {
        d.inspect(&id)["status"] == "running"
    });
    let pids = vmm_pids_under(&d.data_dir().join("sandboxes").join(&id));
    let rss = pids.first().map(|p| rss_kib(*p)).unwrap_or(0);
    let _ = d.hearth(&["rm", "-f", &id]);

    println!("\nCold start, {runs} runs, accelerator {accel}, 1 vCPU / 256 MiB, busybox image\n");
    header();
    row("hearth: API request -> first output byte", &hearth);
    row("bare QEMU: process start -> guest init output", &bare);
    let p50 = |v: &[Duration]| hearth_bench::percentile(v, 50.0);
    println!(
        "\norchestration overhead at p50: {} ms ({:.2}x bare boot)",
        ms(p50(&hearth).saturating_sub(p50(&bare))),
        p50(&hearth).as_secs_f64() / p50(&bare).as_secs_f64()
    );
    println!(
        "VMM (QEMU) RSS of an idle 256 MiB sandbox: {} MiB",
        rss / 1024
    );
}
