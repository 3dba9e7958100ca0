//! Warm starts: API request to first byte of workload output for a cold boot,
//! a template restore and a warm-pool start, all in one run, beside a bare QEMU
//! restore of the same template snapshot driven by `bench/scripts/bare-restore.py`
//! (QEMU process start -> guest agent Pong): the floor on this stack; and beside
//! it the same bare restore running the guest work of a start (`Restored`, then
//! the exec of `echo ready` to its first output byte, with and without a
//! network), which separates what Hearth's host side adds from what the guest
//! itself costs (under TCG: translating its code for the first time).
//!
//! Usage: warm-start [RUNS] [--pool-only | --template-only]   (default 50;
//! needs scripts/setup artifacts). `--pool-only` measures only the two
//! warm-pool rows, `--template-only` only the two template-restore rows and
//! the bare restore floor (to compare builds back to back). With `WARM_START_LOG=FILE` the daemon's log is copied
//! there at the end (e.g. with `RUST_LOG=info,hearth_agent::start_trace=debug`
//! for every start's timeline).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_bench::{header_p99, ms, percentile, row_p99};
use hearth_e2e::{repo_root, wait_until, Daemon};

const MEMORY_MIB: u32 = 128;

/// POSTs a sandbox, times until the first output byte; returns it and the start path.
fn first_byte(d: &Daemon, cold: bool, no_net: bool) -> (Duration, String) {
    let net = if no_net {
        r#","network":{"mode":"none"}"#
    } else {
        ""
    };
    let body = format!(
        r#"{{"image":"busybox","cmd":["echo","ready"],"memory_mib":{MEMORY_MIB},"cold":{cold}{net}}}"#
    );
    let t0 = Instant::now();
    let (status, resp) = d
        .http("POST", "/v1/sandboxes", Some(&body))
        .expect("create");
    assert_eq!(status, 201, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).expect("json");
    let id = v["id"].as_str().expect("id").to_string();
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).expect("connect");
    // why: without the token the API answers 401 at once, and its body's first
    // byte would be timed as the workload's output.
    write!(
        s,
        "GET /v1/sandboxes/{id}/output?follow=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        d.token()
    )
    .expect("write");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    assert!(
        line.starts_with("HTTP/1.1 200"),
        "GET output of {id}: {line}"
    );
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
    // why: a failed start's final record is output too; only a run whose
    // workload printed `ready` and exited 0 counts.
    let body = [&byte[..], &rest].concat();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("ready"),
        "sandbox {id}: its output has no `ready`, the start failed: {body}"
    );
    wait_until("the workload to exit", Duration::from_secs(30), || {
        !d.inspect(&id)["exit"].is_null()
    });
    let rec = d.inspect(&id);
    assert_eq!(
        rec["exit"]["code"], 0,
        "sandbox {id}: the workload did not exit 0: {rec}"
    );
    let path = match rec["start_path"].as_str() {
        Some(p) => p.to_string(),
        None => format!("? ({rec})"),
    };
    let (st, _) = d
        .http("DELETE", &format!("/v1/sandboxes/{id}?force=true"), None)
        .expect("delete");
    assert_eq!(st, 204);
    (first, path)
}

fn template(d: &Daemon) -> serde_json::Value {
    let (_, body) = d.http("GET", "/v1/templates", None).expect("templates");
    serde_json::from_str::<serde_json::Value>(&body).expect("json")[0].clone()
}

fn set_pool(d: &Daemon, size: u32) {
    let (st, body) = d
        .http(
            "POST",
            "/v1/templates/bb/pool",
            Some(&format!(r#"{{"size":{size}}}"#)),
        )
        .expect("pool");
    assert_eq!(st, 200, "{body}");
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let pool_only = std::env::args().any(|a| a == "--pool-only");
    let template_only = std::env::args().any(|a| a == "--template-only");
    let d = Daemon::start();
    let info = d.inspect_info();
    let accel = info["accel"].as_str().unwrap_or("tcg").to_string();
    let out = d.hearth(&[
        "template",
        "create",
        "busybox",
        "--name",
        "bb",
        "--memory",
        &MEMORY_MIB.to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");

    let measure = |name: &str, cold: bool, no_net: bool, want: &str, wait_pool: bool| {
        let mut v = Vec::new();
        for i in 0..=runs {
            if wait_pool {
                wait_until("the pool to refill", Duration::from_secs(120), || {
                    template(&d)["pool_ready"] == template(&d)["pool_size"]
                });
            }
            eprint!("\r{name} {i}/{runs}   ");
            let (t, path) = first_byte(&d, cold, no_net);
            assert_eq!(path, want, "{name} run {i} took the {path} path");
            if i > 0 {
                v.push(t); // run 0 warms caches
            }
        }
        eprintln!();
        v
    };
    let keep_log = || {
        if let Some(to) = std::env::var_os("WARM_START_LOG") {
            std::fs::copy(&d.log, &to).expect("copy the daemon log");
        }
    };
    if pool_only {
        set_pool(&d, 2);
        let pool = measure("pool", false, false, "pool", true);
        let pool_nonet = measure("pool --network none", false, true, "pool", true);
        set_pool(&d, 0);
        keep_log();
        println!("\nWarm pool, {runs} runs each, accelerator {accel}, 1 vCPU / {MEMORY_MIB} MiB, busybox `echo ready`\n");
        header_p99();
        row_p99("warm pool: API request -> first output byte", &pool);
        row_p99(
            "warm pool, --network none: API request -> first output byte",
            &pool_nonet,
        );
        return;
    }
    let cold = match template_only {
        true => Vec::new(),
        false => measure("cold", true, false, "cold", false),
    };
    let restore = measure("template", false, false, "template", false);
    // why: the bare restore below has no network either; this row compares like with like.
    let restore_nonet = measure("template --network none", false, true, "template", false);
    let (mut pool, mut pool_nonet) = (Vec::new(), Vec::new());
    if !template_only {
        set_pool(&d, 2);
        pool = measure("pool", false, false, "pool", true);
        // why: the pool row comparable to runs before sandboxes had networking on
        // warm starts, and to the target.
        pool_nonet = measure("pool --network none", false, true, "pool", true);
        set_pool(&d, 0);
    }
    keep_log();

    let snap = d.data_dir().join("templates/bb");
    let cur = |f: &str| {
        std::path::Path::new(&std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
            .join(".cache/hearth/current")
            .join(f)
    };
    let kernel = std::env::var("HEARTH_KERNEL")
        .map(Into::into)
        .unwrap_or_else(|_| cur("vmlinux"));
    let initrd = std::env::var("HEARTH_INITRD")
        .map(Into::into)
        .unwrap_or_else(|_| cur("initramfs.cpio.gz"));
    let bare_run = |mode: &str| -> Vec<Duration> {
        eprintln!("bare restore ({mode}) x{} ...", runs + 1);
        let out = Command::new(repo_root().join("bench/scripts/bare-restore.py"))
            .arg(&snap)
            .arg(&kernel)
            .arg(&initrd)
            .arg((runs + 1).to_string())
            .arg(mode)
            .output()
            .expect("run bare-restore.py");
        assert!(
            out.status.success(),
            "bare-restore.py {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<f64>>(&out.stdout)
            .expect("bare-restore output")
            .into_iter()
            .skip(1) // run 0 warms caches, as for the Hearth rows
            .map(|m| Duration::from_secs_f64(m / 1000.0))
            .collect()
    };
    let bare = bare_run("ping");
    // why: the Pong floor runs almost no guest code; these two run the guest
    // work of a start (its `Restored`, the first fork/exec) with no Hearth
    // code, so the ratio to them is what Hearth's host side adds.
    let bare_work = bare_run("workload");
    let bare_work_net = bare_run("workload-net");

    println!(
        "\nWarm starts, {runs} runs each, accelerator {accel}, 1 vCPU / {MEMORY_MIB} MiB, busybox `echo ready`\n"
    );
    header_p99();
    if !template_only {
        row_p99("cold boot: API request -> first output byte", &cold);
    }
    row_p99(
        "template restore: API request -> first output byte",
        &restore,
    );
    row_p99(
        "template restore, --network none: API request -> first output byte",
        &restore_nonet,
    );
    if !template_only {
        row_p99("warm pool: API request -> first output byte", &pool);
        row_p99(
            "warm pool, --network none: API request -> first output byte",
            &pool_nonet,
        );
    }
    row_p99("bare QEMU restore: process start -> agent Pong", &bare);
    row_p99(
        "bare QEMU restore + Restored (network) + exec: process start -> first output byte",
        &bare_work_net,
    );
    row_p99(
        "bare QEMU restore + Restored (no network) + exec: process start -> first output byte",
        &bare_work,
    );
    let p50 = |v: &[Duration]| percentile(v, 50.0).as_secs_f64();
    println!(
        "\nat p50: template restore {:.2}x the bare restore + same guest work ({:.2}x with --network none against its no-network row)",
        p50(&restore) / p50(&bare_work_net),
        p50(&restore_nonet) / p50(&bare_work),
    );
    if template_only {
        println!(
            "at p50: template restore {:.2}x the bare restore floor ({:.2}x with --network none)",
            p50(&restore) / p50(&bare),
            p50(&restore_nonet) / p50(&bare),
        );
        return;
    }
    println!(
        "at p50: template restore {:.2}x the bare restore floor ({:.2}x with --network none), {:.1}x faster than cold; warm pool {} ms ({:.1}x faster than cold), {} ms with --network none",
        p50(&restore) / p50(&bare),
        p50(&restore_nonet) / p50(&bare),
        p50(&cold) / p50(&restore),
        ms(percentile(&pool, 50.0)),
        p50(&cold) / p50(&pool),
        ms(percentile(&pool_nonet, 50.0)),
    );
}
