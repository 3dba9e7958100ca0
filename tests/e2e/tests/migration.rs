//! Live migration between two real `hearthd dev` daemons (two "nodes" on
//! loopback, each with its own data dir and token), driven through the CLI.
//! A counter in the guest keeps counting across the move; failures leave
//! exactly one running copy.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_e2e::{images, show, stderr, stdout, vmm_pids_under, wait_until, Daemon, DaemonOptions};

const COUNTER: &str =
    "echo before > /kept; sync; i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done";

/// Two daemons with the same busybox image (same digest: one import source).
fn two_nodes() -> (Daemon, Daemon) {
    two_nodes_with(&[])
}

/// [`two_nodes`], the first (the source) with extra environment.
fn two_nodes_with(source_env: &[(&str, &str)]) -> (Daemon, Daemon) {
    let a = Daemon::start_with(DaemonOptions {
        busybox: false,
        env: source_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    });
    let b = Daemon::start_with(DaemonOptions {
        busybox: false,
        ..Default::default()
    });
    import_busybox(a, b)
}

/// [`two_nodes`], the second (the target) started with `target`.
fn two_nodes_with_target(target: DaemonOptions) -> (Daemon, Daemon) {
    let a = Daemon::start_with(DaemonOptions {
        busybox: false,
        ..Default::default()
    });
    import_busybox(a, Daemon::start_with(target))
}

/// Imports one busybox rootfs (one digest) as `busybox` on both daemons.
fn import_busybox(a: Daemon, b: Daemon) -> (Daemon, Daemon) {
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
    (a, b)
}

/// Starts `hearth migrate ARGS…` on `a` in the background, output piped.
fn spawn_migrate(a: &Daemon, args: &[&str]) -> std::process::Child {
    let mut argv = vec!["migrate"];
    argv.extend_from_slice(args);
    a.cmd(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `a`'s migration of `sandbox` is in pre-copy and has sent
/// bytes (a spawned CLI's request may not have reached the source yet: no
/// migration is recorded until it has).
fn wait_precopy(a: &Daemon, sandbox: &str) {
    wait_until("pre-copy to start", Duration::from_secs(60), || {
        let out = a.hearth(&["migrate", "--status", "--json", sandbox]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["phase"] == "precopy" && s["bytes_sent"].as_u64().unwrap_or(0) > 0)
    });
}

fn token_file(d: &Daemon) -> String {
    d.data_dir().join("api-token").display().to_string()
}

fn run_counter(d: &Daemon, name: &str) -> String {
    run_counter_with(d, name, COUNTER)
}

/// Starts `script` (which ends in [`COUNTER`]) as sandbox `name` and waits
/// for its first 5 counter lines.
fn run_counter_with(d: &Daemon, name: &str, script: &str) -> String {
    let out = d.hearth(&[
        "run",
        "--detach",
        "--network",
        "none",
        "--memory",
        "128",
        "--name",
        name,
        "busybox",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let id = stdout(&out).trim().to_string();
    wait_until(
        "the counter to print 5 lines",
        Duration::from_secs(120),
        || counted(d, name).len() >= 5,
    );
    id
}

/// The counter values in the sandbox's output log.
fn counted(d: &Daemon, sandbox: &str) -> Vec<u64> {
    let out = d.hearth(&["logs", sandbox]);
    stdout(&out)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn assert_contiguous_from_zero(v: &[u64]) {
    for (i, x) in v.iter().enumerate() {
        assert_eq!(*x, i as u64, "counter reset or gap at line {i}: {v:?}");
    }
}

/// The counter values absent from `0..=max`, and the values that did not
/// follow a smaller one (logged twice or out of order).
fn missing_and_repeated(v: &[u64]) -> (Vec<u64>, Vec<u64>) {
    let seen: std::collections::BTreeSet<u64> = v.iter().copied().collect();
    let last = seen.last().copied().unwrap_or(0);
    let missing = (0..=last).filter(|x| !seen.contains(x)).collect();
    let repeated = v
        .windows(2)
        .filter(|w| w[1] <= w[0])
        .map(|w| w[1])
        .collect();
    (missing, repeated)
}

/// `hearth logs -f` in the background, recording when each line arrives.
struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, u64)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    fn start(d: &Daemon, sandbox: &str) -> Follower {
        let mut child = d
            .cmd(&["logs", "-f", sandbox])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("hearth logs -f");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = line.trim().parse() {
                    l2.lock().unwrap().push((Instant::now(), v));
                }
            }
        });
        Follower {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn finish(mut self) -> Vec<(Instant, u64)> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let v = self.lines.lock().unwrap().clone();
        v
    }
}

fn status_of(d: &Daemon, sandbox: &str) -> serde_json::Value {
    let out = d.hearth(&["migrate", "--status", "--json", sandbox]);
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).expect("status json")
}

#[test]
fn migrated_sandbox_keeps_counting_and_keeps_its_files() {
    let (a, b) = two_nodes();
    let id = run_counter(&a, "counter");
    let before = Follower::start(&a, "counter");
    wait_until(
        "the follower to see output",
        Duration::from_secs(30),
        || !before.lines.lock().unwrap().is_empty(),
    );

    let t0 = Instant::now();
    let out = a.hearth(&[
        "migrate",
        "counter",
        "--to",
        &b.api,
        "--to-token-file",
        &token_file(&b),
        "--json",
    ]);
    let total = t0.elapsed();
    assert!(out.status.success(), "{}\n{}", show(&out), a.log_text());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["phase"], "completed", "{st}");
    // The target knew the source's stream by the address and port its offer
    // named (its ticket check was the last a flood could evict).
    assert!(
        b.log_text()
            .contains("the stream came from the source the offer named"),
        "{}",
        b.log_text()
    );
    let after = Follower::start(&b, "counter");

    // The source forgot it and released its VM; the target runs it, same id and name.
    let ps = stdout(&a.hearth(&["ps"]));
    assert!(!ps.contains(&id), "still listed on the source: {ps}");
    assert!(
        vmm_pids_under(a.data.path()).is_empty(),
        "source VM still runs"
    );
    let moved = b.inspect("counter");
    assert_eq!(moved["id"], id.as_str());
    assert_eq!(moved["status"], "running");
    // The source's status survives the move.
    assert_eq!(status_of(&a, "counter")["phase"], "completed");

    // It keeps counting on the target: the log continues, no reset, no gap.
    let n_at_move = before
        .lines
        .lock()
        .unwrap()
        .last()
        .map(|l| l.1)
        .unwrap_or(0);
    wait_until(
        "the counter to go on on the target",
        Duration::from_secs(60),
        || counted(&b, "counter").len() as u64 > n_at_move + 10,
    );
    let all = counted(&b, "counter");
    assert_contiguous_from_zero(&all);

    // The host-observed stall: last line relayed by the source to the first
    // new line relayed by the target.
    let src_lines = before.finish();
    let dst_lines = after.finish();
    let (last_t, last_v) = *src_lines.last().expect("source lines");
    let first_new = dst_lines
        .iter()
        .find(|(_, v)| *v > last_v)
        .expect("new lines on the target");
    let stall = first_new.0.duration_since(last_t);
    println!(
        "migration: total {total:?}, VMM downtime {} ms, handover {} ms, output stall {stall:?}, {} iterations, {} bytes",
        st["downtime_ms"], st["handover_ms"], st["iterations"], st["bytes_sent"]
    );
    // The status reports what the issue asks `--status` to show.
    assert!(st["bytes_sent"].as_u64().unwrap_or(0) > 0, "{st}");
    assert!(st["iterations"].as_u64().unwrap_or(0) >= 1, "{st}");
    assert!(st["downtime_ms"].is_u64(), "no downtime in {st}");
    assert!(st["dirty_pages_rate"].is_u64(), "no dirty rate in {st}");
    // The guest's pause: source STOP to target RESUME (same host), reported
    // with its steps, each after the steps it waits for, and never after the
    // commit's answer. The source's work at the stop (`gate_ms`: it saw the
    // STOP; the writer frozen; the log flushed) and the log's tail run beside
    // QEMU's last pass (either may end first; issue 7); the `committing`
    // record waits for both.
    let paused = st["paused_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no paused_ms: {st}"));
    let steps = &st["pause_steps"];
    let step = |k: &str| {
        steps[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no pause step {k}: {st}"))
    };
    let after = [
        ("gate_ms", "channel_frozen_ms"),
        ("channel_frozen_ms", "output_drained_ms"),
        ("output_drained_ms", "log_sent_ms"),
        ("qemu_completed_ms", "committing_saved_ms"),
        ("log_sent_ms", "committing_saved_ms"),
        ("committing_saved_ms", "target_resumed_ms"),
        ("target_resumed_ms", "commit_answered_ms"),
    ];
    for (first, then) in after {
        assert!(
            step(first) <= step(then),
            "pause step {then} before {first}: {steps}"
        );
    }
    assert_eq!(steps["target_resumed_ms"].as_u64(), Some(paused), "{st}");
    assert!(
        paused <= st["handover_ms"].as_u64().unwrap_or(0) + step("gate_ms") + 1,
        "the pause ({paused} ms) outlasts the commit's answer: {st}"
    );
    println!("migration: guest paused {paused} ms, steps {steps}");
    let handover = Duration::from_millis(st["handover_ms"].as_u64().unwrap_or(0));
    // why: the counter prints every 100 ms, and TCG on a shared 2-core box adds jitter.
    assert!(
        stall < handover + Duration::from_millis(1500),
        "output stalled {stall:?} (handover {handover:?})"
    );

    // A file written before the move is there after it, read from disk.
    let out = b.hearth(&[
        "exec",
        "counter",
        "--",
        "sh",
        "-c",
        "sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; cat /kept",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out).trim(), "before");
    // And new execs work on the target.
    let out = b.hearth(&[
        "exec",
        "counter",
        "--",
        "sh",
        "-c",
        "echo hi > /new; cat /new",
    ]);
    assert_eq!(stdout(&out).trim(), "hi", "{}", show(&out));
}

#[test]
fn bad_migrations_are_refused_and_the_sandbox_runs_on() {
    let (a, b) = two_nodes();
    // Not running.
    let out = a.hearth(&[
        "run",
        "--network",
        "none",
        "--name",
        "done",
        "busybox",
        "--",
        "true",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let out = a.hearth(&[
        "migrate",
        "done",
        "--to",
        &b.api,
        "--to-token-file",
        &token_file(&b),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not running"), "{}", show(&out));

    // With a network device, between two nodes sharing one network namespace:
    // the target would have to take the running source's tap over.
    let out = a.hearth(&[
        "run", "--detach", "--memory", "128", "--name", "netted", "busybox", "--", "sleep", "600",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    hearth_e2e::wait_until("netted to run", Duration::from_secs(120), || {
        a.inspect("netted")["status"] == "running"
    });
    let out = a.hearth(&[
        "migrate",
        "netted",
        "--to",
        &b.api,
        "--to-token-file",
        &token_file(&b),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already exists on this host"),
        "{}",
        show(&out)
    );
    let netted = a.inspect("netted");
    assert_eq!(
        netted["status"], "running",
        "the refusal left the source running"
    );
    let tap = netted["network"]["tap"].as_str().expect("tap");
    assert!(
        std::path::Path::new("/sys/class/net").join(tap).exists(),
        "the refused target took the source's tap {tap} away"
    );
    let out = a.hearth(&["rm", "-f", "netted"]);
    assert!(out.status.success(), "{}", show(&out));

    run_counter(&a, "c");
    // To the same node.
    let out = a.hearth(&[
        "migrate",
        "c",
        "--to",
        &a.api,
        "--to-token-file",
        &token_file(&a),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already runs on"), "{}", show(&out));
    // With a wrong target token.
    let bad = a.data.path().join("bad-token");
    std::fs::write(&bad, "x".repeat(32)).unwrap();
    let out = a.hearth(&[
        "migrate",
        "c",
        "--to",
        &b.api,
        "--to-token-file",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("token"), "{}", show(&out));
    // To a node without the image.
    let c = Daemon::start_with(DaemonOptions {
        busybox: false,
        ..Default::default()
    });
    let out = a.hearth(&[
        "migrate",
        "c",
        "--to",
        &c.api,
        "--to-token-file",
        &token_file(&c),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not on node") && stderr(&out).contains("image import"),
        "{}",
        show(&out)
    );
    // A guest that cannot converge in time: gives up, the source keeps running.
    let out = a.hearth(&[
        "migrate",
        "c",
        "--to",
        &b.api,
        "--to-token-file",
        &token_file(&b),
        "--bandwidth-mib",
        "1",
        "--give-up-secs",
        "2",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("keeps running here"),
        "{}",
        show(&out)
    );
    assert_eq!(status_of(&a, "c")["phase"], "aborted");
    assert!(
        vmm_pids_under(b.data.path()).is_empty(),
        "target VM left behind"
    );

    // Each refusal left the sandbox running here, still counting.
    assert_eq!(a.inspect("c")["status"], "running");
    let n = counted(&a, "c").len();
    wait_until("the counter to go on", Duration::from_secs(30), || {
        counted(&a, "c").len() > n + 3
    });
    assert_contiguous_from_zero(&counted(&a, "c"));
    assert!(
        stdout(&b.hearth(&["ps"])).lines().count() <= 1,
        "nothing on b"
    );
}

#[test]
fn killed_target_and_concurrent_migration_leave_one_running_copy() {
    let (a, mut b) = two_nodes();
    run_counter(&a, "c");
    // A slow migration (2 MiB/s for 128 MiB) to kill the target in the middle of.
    let api = b.api.clone();
    let tf = token_file(&b);
    let first = spawn_migrate(
        &a,
        &[
            "c",
            "--to",
            &api,
            "--to-token-file",
            &tf,
            "--bandwidth-mib",
            "8",
        ],
    );
    wait_precopy(&a, "c");
    // A second migration of the same sandbox is refused while the first runs.
    let out = a.hearth(&["migrate", "c", "--to", &api, "--to-token-file", &tf]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already migrating"), "{}", show(&out));

    // Kill the target node and its incoming VM mid-transfer.
    b.kill9();
    for pid in vmm_pids_under(b.data.path()) {
        // SAFETY: kill(2) on a QEMU pid of the target's data dir.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let first_out = first.wait_with_output().unwrap();
    assert!(!first_out.status.success(), "{}", show(&first_out));
    assert!(
        stderr(&first_out).contains("keeps running here"),
        "{}",
        show(&first_out)
    );
    assert_eq!(a.inspect("c")["status"], "running");
    let n = counted(&a, "c").len();
    wait_until(
        "the counter to go on on the source",
        Duration::from_secs(30),
        || counted(&a, "c").len() > n + 3,
    );
    assert_contiguous_from_zero(&counted(&a, "c"));
}

/// Unmounts the target's small sandbox file system (lazily) on drop, also
/// when the test fails.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_target_out_of_memory_mid_transfer_leaves_the_source_running() {
    // SAFETY: geteuid has no preconditions.
    if !hearth_e2e::require(
        unsafe { libc::geteuid() } == 0,
        "root (it mounts a small tmpfs for the target's VMs)",
    ) {
        return;
    }
    // The target's guest memory lives in a file under its sandboxes dir (a
    // shared memory-backend-file). On a 32 MiB tmpfs the incoming RAM runs out
    // of pages mid-transfer, as guest memory backed by tmpfs or huge pages does
    // on a host out of memory: the kernel cannot back the next page QEMU
    // writes, and QEMU dies of SIGBUS. (A limit on QEMU's address space was
    // not deterministic: the incoming stream writes into RAM that is mapped
    // already, so QEMU needed no new memory in some runs.)
    let (a, b) = two_nodes_with_target(DaemonOptions {
        busybox: false,
        before_start: Some(|dir: &Path| {
            let vms = dir.join("sandboxes");
            std::fs::create_dir_all(&vms).unwrap();
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=32m", "hearth-e2e-oom"])
                .arg(&vms)
                .status()
                .unwrap();
            assert!(st.success(), "mount tmpfs");
        }),
        ..Default::default()
    });
    let vms = b.data_dir().join("sandboxes");
    let _unmount = Unmount(vms.clone());
    // why: declared after the guard, so the daemon (and its VMs) goes first
    // when the test ends or fails, and the unmount finds nothing in use.
    let b = b;
    // 48 MiB of random bytes in a tmpfs in the guest: more guest memory that
    // is not zero than the target can back, whatever QEMU does with zero pages.
    let id = run_counter_with(
        &a,
        "c",
        &format!(
            "mkdir -p /m && mount -t tmpfs -o size=64m t /m && \
             dd if=/dev/urandom of=/m/x bs=1048576 count=48 2>/dev/null; {COUNTER}"
        ),
    );
    let api = b.api.clone();
    let tf = token_file(&b);
    // Review 7: prepare checks the free space of the sandboxes dir's own file
    // system (the 32 MiB tmpfs), not the data dir's, and refuses with the
    // node, the file system and the bytes named; the source runs on.
    let out = a.hearth(&["migrate", "c", "--to", &api, "--to-token-file", &tf]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("node ")
            && err.contains(&format!(
                "bytes free on the file system of {}",
                vms.display()
            ))
            && err.contains("needs"),
        "prepare did not refuse for lack of room in the sandboxes fs: {}",
        show(&out)
    );
    assert_eq!(a.inspect("c")["status"], "running");
    let need: u64 = err
        .split("needs ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {err}"));
    // Now room enough for prepare's check; once the target claimed the
    // incoming dir (after the check), a filler takes all but 16 MiB, so the
    // transfer runs out of pages midway as before.
    let size = need + (64 << 20);
    let st = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size={size}")])
        .arg(&vms)
        .status()
        .unwrap();
    assert!(st.success(), "remount the tmpfs");
    // why: capped so the filler below is in place long before the stream
    // could fill the room it leaves (48 MiB of random pages at 8 MiB/s).
    let child = spawn_migrate(
        &a,
        &[
            "c",
            "--to",
            &api,
            "--to-token-file",
            &tf,
            "--bandwidth-mib",
            "8",
        ],
    );
    let incoming = vms.join(&id);
    wait_until(
        "the target to claim the incoming dir",
        Duration::from_secs(60),
        || incoming.exists(),
    );
    // why: the stream may write between `df` and `fallocate`; a filler that
    // no longer fits is tried again from a fresh `df`.
    let mut filled = false;
    for _ in 0..5 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&vms)
            .output()
            .unwrap();
        let free = String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .expect("df avail");
        assert!(
            free > 16 << 20,
            "the stream used the room before the filler was in place ({free} bytes free)"
        );
        let filler = free - (16 << 20);
        let _ = std::fs::remove_file(vms.join("filler"));
        let st = std::process::Command::new("fallocate")
            .args(["-l", &filler.to_string()])
            .arg(vms.join("filler"))
            .status()
            .unwrap();
        if st.success() {
            filled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(filled, "fallocate the filler");
    let out = child.wait_with_output().unwrap();
    eprintln!("hearth migrate: {}", show(&out));
    assert!(!out.status.success(), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("keeps running here"), "{}", show(&out));
    assert!(
        err.contains("incoming VM (QEMU) on node")
            && err.contains("had ended by itself during the transfer")
            && err.contains("SIGBUS: the host could not back its guest memory")
            && !err.contains("Completed"),
        "the error does not say the target's VM ran out of memory: {}",
        show(&out)
    );
    // Nothing of the sandbox is left on the target.
    wait_until(
        "the target's QEMU to be gone",
        Duration::from_secs(30),
        || vmm_pids_under(b.data.path()).is_empty(),
    );
    let on_b = b.hearth(&["ps", "--json"]);
    assert!(on_b.status.success(), "{}", show(&on_b));
    let listed: serde_json::Value = serde_json::from_slice(&on_b.stdout).expect("ps json");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    // Exactly one running copy: the source's, counting on without a gap.
    assert_eq!(a.inspect("c")["status"], "running");
    assert_eq!(vmm_pids_under(a.data.path()).len(), 1);
    assert_eq!(status_of(&a, "c")["phase"], "aborted");
    let n = counted(&a, "c").len();
    wait_until(
        "the counter to go on on the source",
        Duration::from_secs(30),
        || counted(&a, "c").len() > n + 3,
    );
    assert_contiguous_from_zero(&counted(&a, "c"));
}

/// Ids of the sandboxes `d` lists.
fn listed(d: &Daemon) -> Vec<String> {
    let out = d.hearth(&["ps", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ps json");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Review R1: the target's prepare holds the room an incoming migration still
/// needs until it ends. Two migrations to a target whose sandboxes dir (a
/// tmpfs) has room for one: the second, prepared while the first is in
/// flight, is refused with what is free, held and needed; the first
/// completes; each sandbox runs exactly once. Once the first is committed its
/// hold is gone: the second then fits (after the first is removed there).
#[test]
fn two_concurrent_incoming_migrations_to_room_for_one_refuse_the_second_at_prepare() {
    if !hearth_e2e::require(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "root (it mounts a small tmpfs for the target's VMs)",
    ) {
        return;
    }
    let (a, b) = two_nodes_with_target(DaemonOptions {
        busybox: false,
        before_start: Some(|dir: &Path| {
            let vms = dir.join("sandboxes");
            std::fs::create_dir_all(&vms).unwrap();
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=8m", "hearth-e2e-room"])
                .arg(&vms)
                .status()
                .unwrap();
            assert!(st.success(), "mount tmpfs");
        }),
        ..Default::default()
    });
    let vms = b.data_dir().join("sandboxes");
    let _unmount = Unmount(vms.clone());
    // why: after the guard, so the daemon and its VMs go first.
    let b = b;
    // c1 has 24 MiB of random bytes in guest memory: at 4 MiB/s its
    // pre-copy lasts seconds, long enough for c2's prepare to meet it.
    run_counter_with(
        &a,
        "c1",
        &format!(
            "mkdir -p /m && mount -t tmpfs -o size=32m t /m && \
             dd if=/dev/urandom of=/m/x bs=1048576 count=24 2>/dev/null; {COUNTER}"
        ),
    );
    run_counter(&a, "c2");
    let api = b.api.clone();
    let tf = token_file(&b);
    // What one migration needs there (both are alike), off the refusal of
    // the 8 MiB file system.
    let out = a.hearth(&["migrate", "c2", "--to", &api, "--to-token-file", &tf]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = stderr(&out);
    let need: u64 = err
        .split("needs ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {err}"));
    let size = need + need / 2;
    let st = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size={size}")])
        .arg(&vms)
        .status()
        .unwrap();
    assert!(st.success(), "remount the tmpfs");

    let first = spawn_migrate(
        &a,
        &[
            "c1",
            "--to",
            &api,
            "--to-token-file",
            &tf,
            "--bandwidth-mib",
            "8",
            // why: at 8 MiB/s a 100 ms budget fits less than one dirty 1 MiB
            // disk chunk (the counter writes its file), so the pre-copy may
            // not converge in 60 passes; this test is about the room, not the
            // pause.
            "--downtime-ms",
            "1000",
        ],
    );
    wait_precopy(&a, "c1");
    let t0 = Instant::now();
    let out = a.hearth(&["migrate", "c2", "--to", &api, "--to-token-file", &tf]);
    let c1_phase = status_of(&a, "c1")["phase"]
        .as_str()
        .unwrap_or("")
        .to_string();
    eprintln!(
        "second migrate refused in {:?}; the first was then in phase {c1_phase}",
        t0.elapsed()
    );
    assert_eq!(
        c1_phase, "precopy",
        "the first migration was no longer in flight when the second was refused: the test proves nothing"
    );
    assert!(!out.status.success(), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "bytes free on the file system of {}",
            vms.display()
        )) && err.contains("bytes of it held for 1 other incoming migration(s) still in flight")
            && err.contains(&format!("needs {need} bytes"))
            && err.contains("migrate it to another node"),
        "the second prepare was not refused for the room the first holds: {}",
        show(&out)
    );
    // What c1 still held: some of its need, not yet written there.
    let held: u64 = err
        .split(" bytes of it held for")
        .next()
        .and_then(|pre| pre.rsplit('(').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no held byte count in {err}"));
    assert!(held > 0 && held <= need, "held {held} of {need}");
    assert_eq!(a.inspect("c2")["status"], "running");

    let first_out = first.wait_with_output().unwrap();
    assert!(first_out.status.success(), "{}", show(&first_out));
    // Exactly one running copy of each: c1 on the target, c2 on the source.
    assert_eq!(listed(&a), vec!["c2".to_string()]);
    assert_eq!(listed(&b), vec!["c1".to_string()]);
    assert_eq!(b.inspect("c1")["status"], "running");
    assert_eq!(vmm_pids_under(a.data.path()).len(), 1);
    assert_eq!(vmm_pids_under(b.data.path()).len(), 1);
    let n = counted(&b, "c1").len();
    wait_until(
        "c1 to count on on the target",
        Duration::from_secs(30),
        || counted(&b, "c1").len() > n + 3,
    );
    let n = counted(&a, "c2").len();
    wait_until(
        "c2 to count on on the source",
        Duration::from_secs(30),
        || counted(&a, "c2").len() > n + 3,
    );
    assert_contiguous_from_zero(&counted(&a, "c2"));

    // The commit released c1's hold: with c1 gone there, c2 fits.
    let out = b.hearth(&["rm", "-f", "c1"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("c1's VM to be gone", Duration::from_secs(30), || {
        vmm_pids_under(b.data.path()).is_empty()
    });
    let out = a.hearth(&["migrate", "c2", "--to", &api, "--to-token-file", &tf]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(listed(&a), Vec::<String>::new());
    assert_eq!(listed(&b), vec!["c2".to_string()]);
    assert_eq!(b.inspect("c2")["status"], "running");
}

/// Two network namespaces ("hosts"), each linked to the root namespace for the
/// test's API calls, and linked to each other by a veth pair `x0` that carries
/// the migration. Removed (with their links) on drop.
struct TwoHosts {
    ns: [String; 2],
    /// Addresses the root namespace reaches each host at.
    api_ip: [String; 2],
    /// Addresses on the host-to-host link.
    link_ip: [String; 2],
}

fn sh(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl TwoHosts {
    fn create() -> Option<TwoHosts> {
        let p = std::process::id();
        let n = 20 + p % 200;
        let ns = [format!("hma{p}"), format!("hmb{p}")];
        let h = TwoHosts {
            ns: ns.clone(),
            api_ip: [format!("10.88.{n}.2"), format!("10.88.{n}.6")],
            link_ip: [format!("10.88.{n}.9"), format!("10.88.{n}.10")],
        };
        let (a, b) = (&ns[0], &ns[1]);
        let script = format!(
            "set -e
             ip netns add {a}; ip netns add {b}
             ip -n {a} link set lo up; ip -n {b} link set lo up
             ip link add {a} type veth peer name up0 netns {a}
             ip addr add 10.88.{n}.1/30 dev {a}; ip link set {a} up
             ip -n {a} addr add 10.88.{n}.2/30 dev up0; ip -n {a} link set up0 up
             ip link add {b} type veth peer name up0 netns {b}
             ip addr add 10.88.{n}.5/30 dev {b}; ip link set {b} up
             ip -n {b} addr add 10.88.{n}.6/30 dev up0; ip -n {b} link set up0 up
             ip -n {a} link add x0 type veth peer name x0 netns {b}
             ip -n {a} addr add 10.88.{n}.9/30 dev x0; ip -n {a} link set x0 up
             ip -n {b} addr add 10.88.{n}.10/30 dev x0; ip -n {b} link set x0 up"
        );
        if sh(&script) {
            Some(h)
        } else {
            drop(h);
            None
        }
    }

    fn daemon(&self, i: usize) -> Daemon {
        Daemon::start_with(DaemonOptions {
            busybox: false,
            netns: Some(self.ns[i].clone()),
            listen_ip: Some("0.0.0.0".into()),
            reach_ip: Some(self.api_ip[i].clone()),
            ..Default::default()
        })
    }

    /// Bytes sent on host `i`'s end of the host-to-host link.
    fn link_tx_bytes(&self, i: usize) -> u64 {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.ns[i], "-s", "-j", "link", "show", "x0"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v[0]["stats64"]["tx"]["bytes"].as_u64().unwrap_or(0)
    }

    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        assert!(sh(&format!("ip -n {} link set x0 {state}", self.ns[0])));
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = sh(&format!(
                "ip netns del {ns} 2>/dev/null; ip link del {ns} 2>/dev/null"
            ));
        }
    }
}

#[test]
fn migration_crosses_a_veth_between_namespaces_and_survives_cutting_it() {
    let hosts = TwoHosts::create();
    if !hearth_e2e::require(
        hosts.is_some(),
        "root and iproute2 (network namespaces and veths)",
    ) {
        return;
    }
    let hosts = hosts.expect("checked");
    let (a, b) = (hosts.daemon(0), hosts.daemon(1));
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
    let target = format!("http://{}:{}", hosts.link_ip[1], b.port);
    let tf = token_file(&b);

    // Across the link: the stream goes over x0.
    let id = run_counter(&a, "counter");
    let tx0 = hosts.link_tx_bytes(0);
    let out = a.hearth(&[
        "migrate",
        "counter",
        "--to",
        &target,
        "--to-token-file",
        &tf,
        "--json",
    ]);
    assert!(out.status.success(), "{}\n{}", show(&out), a.log_text());
    let moved = hosts.link_tx_bytes(0) - tx0;
    assert!(moved > 20 << 20, "only {moved} bytes crossed the veth");
    assert_eq!(b.inspect("counter")["id"], id.as_str());
    let n = counted(&b, "counter").len();
    wait_until("counting on the target", Duration::from_secs(60), || {
        counted(&b, "counter").len() > n + 5
    });
    assert_contiguous_from_zero(&counted(&b, "counter"));

    // Cut the link during pre-copy: the source gives up and keeps running.
    run_counter(&a, "c2");
    let mut child = spawn_migrate(
        &a,
        &[
            "c2",
            "--to",
            &target,
            "--to-token-file",
            &tf,
            "--bandwidth-mib",
            "4",
            "--give-up-secs",
            "8",
        ],
    );
    wait_precopy(&a, "c2");
    hosts.set_link(false);
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "migration did not give up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    println!("gave up {:?} after the cut", t0.elapsed());
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        stderr(&out).contains("keeps running here"),
        "{}",
        show(&out)
    );
    hosts.set_link(true);
    assert_eq!(a.inspect("c2")["status"], "running");
    let n = counted(&a, "c2").len();
    wait_until("c2 counting on the source", Duration::from_secs(30), || {
        counted(&a, "c2").len() > n + 3
    });
    assert_contiguous_from_zero(&counted(&a, "c2"));
    // The target's half-received VM goes away once the link is back.
    wait_until(
        "the target's incoming VM to be removed",
        Duration::from_secs(30),
        || vmm_pids_under(b.data.path()).len() == 1,
    );
    drop((a, b));
}

/// The counter, a loop that keeps rewriting 16 MiB of guest memory (tmpfs)
/// with fresh random data, and a checker: it writes 1 MiB of random data,
/// remembers its checksum, and re-reads it 20 times before rewriting it; a
/// write the migration lost shows up as a changed checksum ("CORRUPT").
const DIRTYING: &str = "echo before > /kept; sync; \
    (while true; do dd if=/dev/urandom of=/dev/shm/d bs=64k count=256 2>/dev/null; done) & \
    (while true; do dd if=/dev/urandom of=/dev/shm/v bs=64k count=16 2>/dev/null; \
      s=$(md5sum < /dev/shm/v); for k in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do \
        [ \"$(md5sum < /dev/shm/v)\" = \"$s\" ] || echo CORRUPT; sleep 0.05; done; done) & \
    i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done";

/// Lines of the sandbox's output log that report a checksum mismatch.
fn corrupt(d: &Daemon, sandbox: &str) -> usize {
    let out = d.hearth(&["logs", sandbox]);
    stdout(&out)
        .lines()
        .filter(|l| l.contains("CORRUPT"))
        .count()
}

/// Regression for the intermittent guest hang after a migration (issue 7): a
/// guest that keeps writing memory is moved back and forth many times; after
/// every move the target must run it (the commit pings the guest) and it must
/// keep counting. Before the fix this failed about one move in N (see
/// docs/migration.md); `HEARTH_MIGRATION_ROUNDS` sets the number of moves.
#[test]
fn repeated_migrations_under_memory_load_keep_the_guest_alive() {
    let rounds: usize = std::env::var("HEARTH_MIGRATION_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let (a, b) = two_nodes();
    let out = a.hearth(&[
        "run",
        "--detach",
        "--network",
        "none",
        "--memory",
        "128",
        "--name",
        "busy",
        "busybox",
        "--",
        "sh",
        "-c",
        DIRTYING,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until(
        "the counter to print 20 lines",
        Duration::from_secs(120),
        || counted(&a, "busy").len() >= 20,
    );
    let nodes = [&a, &b];
    let mut here = 0;
    let mut failures = Vec::new();
    let t0 = Instant::now();
    for round in 0..rounds {
        let (from, to) = (nodes[here], nodes[1 - here]);
        let out = from.hearth(&[
            "migrate",
            "busy",
            "--to",
            &to.api,
            "--to-token-file",
            &token_file(to),
            "--json",
        ]);
        if !out.status.success() {
            println!("round {round}: migration failed: {}", stderr(&out));
            failures.push(format!("round {round}: {}", stderr(&out)));
            // The source resumed it (the safety net); go on from there.
            assert_eq!(from.inspect("busy")["status"], "running");
            continue;
        }
        here = 1 - here;
        let n = counted(to, "busy").len();
        let alive = (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            counted(to, "busy").len() > n + 3
        });
        if !alive {
            println!("round {round}: the guest stopped counting on the target");
            failures.push(format!("round {round}: stopped counting after the move"));
            break;
        }
        let bad = corrupt(to, "busy");
        if bad > 0 {
            println!(
                "round {round}: the guest's memory changed under it ({bad} checksum mismatches)"
            );
            failures.push(format!(
                "round {round}: {bad} checksum mismatches in guest memory"
            ));
            break;
        }
        println!("round {round}: ok ({:?} so far)", t0.elapsed());
    }
    assert!(
        failures.is_empty(),
        "{} of {rounds} migrations failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The counter never restarted and no line was lost or logged twice at
    // any hand-over of the output channel (issue 7).
    let all = counted(nodes[here], "busy");
    assert!(all.len() > 20, "{all:?}");
    let (missing, repeated) = missing_and_repeated(&all);
    println!(
        "{rounds} moves in {:?}; {} counter lines, missing {missing:?}, repeated or out of order {repeated:?}",
        t0.elapsed(),
        all.len()
    );
    assert!(
        missing.is_empty() && repeated.is_empty() && all[0] == 0,
        "counter lines lost {missing:?} or logged twice/out of order {repeated:?} across {rounds} moves"
    );
}

/// A counter that prints a line every 2 ms, far faster than the 100 ms one
/// above, so output is in flight at every switch-over.
const FAST_COUNTER: &str = "i=0; while true; do echo $i; i=$((i+1)); usleep 2000; done";

/// Regression for output lost at the hand-over of the guest channel (issue 7):
/// a line the guest printed right after the target resumed it was dropped
/// when it reached the target agent before the main session was adopted.
/// Every line must be in the log exactly once, in order, after every move.
#[test]
fn fast_output_is_neither_lost_nor_repeated_across_moves() {
    let rounds: usize = std::env::var("HEARTH_MIGRATION_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let (a, b) = two_nodes();
    let out = a.hearth(&[
        "run",
        "--detach",
        "--network",
        "none",
        "--memory",
        "128",
        "--name",
        "fast",
        "busybox",
        "--",
        "sh",
        "-c",
        FAST_COUNTER,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until(
        "the counter to print 100 lines",
        Duration::from_secs(120),
        || counted(&a, "fast").len() >= 100,
    );
    let nodes = [&a, &b];
    let mut here = 0;
    let t0 = Instant::now();
    let mut refused = 0;
    for round in 0..rounds {
        let (from, to) = (nodes[here], nodes[1 - here]);
        let out = migrate_cli(from, "fast", to);
        if !out.status.success() {
            // why: a refused switch-over (the paused guest could not take in the
            // credit already sent to it, docs/migration.md "Not done yet") is the
            // safety net working: the source runs on, and must lose nothing either.
            let err = stderr(&out);
            assert!(
                err.contains("switch-over refused"),
                "round {round}: {}",
                show(&out)
            );
            println!(
                "round {round}: refused, stays on the source: {}",
                err.trim()
            );
            refused += 1;
        } else {
            here = 1 - here;
        }
        let on = nodes[here];
        let n = counted(on, "fast").len();
        wait_until(
            "the counter to go on after the move",
            Duration::from_secs(60),
            || counted(on, "fast").len() > n + 50,
        );
        let all = counted(on, "fast");
        let (missing, repeated) = missing_and_repeated(&all);
        assert!(
            missing.is_empty() && repeated.is_empty() && all[0] == 0,
            "round {round}: counter lines lost {missing:?} or logged twice/out of order {repeated:?}"
        );
        println!(
            "round {round}: ok, {} lines, all there once ({:?} so far)",
            all.len(),
            t0.elapsed()
        );
    }
    println!(
        "{} of {rounds} moves done, {refused} refused",
        rounds - refused
    );
    assert!(
        refused * 2 <= rounds,
        "{refused} of {rounds} switch-overs refused"
    );
}

/// Waits until the source's migration status shows `phase`.
fn wait_phase(d: &Daemon, sandbox: &str, phase: &str) {
    wait_until(
        &format!("migration phase {phase}"),
        Duration::from_secs(180),
        || {
            let out = d.hearth(&["migrate", "--status", "--json", sandbox]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .is_ok_and(|s| s["phase"] == phase)
        },
    );
}

#[test]
fn a_source_killed_at_the_commit_or_after_it_leaves_one_running_copy() {
    const HOLD: &str = "HEARTH_MIGRATION_HOLD";
    let (mut a, b) = two_nodes_with(&[(HOLD, "commit:60000")]);
    run_counter(&a, "c");
    let (api, tf) = (b.api.clone(), token_file(&b));
    let migrate = |a: &Daemon| {
        a.cmd(&["migrate", "c", "--to", &api, "--to-token-file", &tf])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // 1. Killed with the record at `committing`, before the commit is sent:
    // the target never runs it, the restarted source asks, the target removes
    // its uncommitted VM, and the source's paused VM runs on.
    let first = migrate(&a);
    wait_phase(&a, "c", "committing");
    a.kill9();
    let out = first.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert_eq!(
        vmm_pids_under(a.data.path()).len(),
        1,
        "the paused VM outlives hearthd"
    );
    a.set_env(HOLD, Some("release:60000"));
    a.spawn();
    a.wait_recovered();
    assert_eq!(a.inspect("c")["status"], "running", "{}", a.inspect("c"));
    let before = counted(&a, "c").len();
    wait_until(
        "the counter to go on at the source",
        Duration::from_secs(60),
        || counted(&a, "c").len() > before + 10,
    );
    assert_contiguous_from_zero(&counted(&a, "c"));
    wait_until(
        "the target's incoming VM to be removed",
        Duration::from_secs(60),
        || vmm_pids_under(b.data.path()).is_empty(),
    );
    let ps = b.hearth(&["ps", "--json"]);
    assert_eq!(
        stdout(&ps).trim(),
        "[]",
        "the target runs nothing: {}",
        show(&ps)
    );

    // 2. Killed after the target committed, before the paused VM here is
    // released: the restarted source learns the sandbox moved and releases it.
    let second = migrate(&a);
    wait_phase(&a, "c", "completed");
    a.kill9();
    let _ = second.wait_with_output();
    a.set_env(HOLD, None);
    a.spawn();
    a.wait_recovered();
    let s = a.inspect("c");
    assert_eq!(s["status"], "stopped", "{s}");
    assert!(
        s["error"].as_str().unwrap_or("").contains("migrated to"),
        "{s}"
    );
    wait_until(
        "the source's VM to be released",
        Duration::from_secs(30),
        || vmm_pids_under(a.data.path()).is_empty(),
    );
    assert_eq!(b.inspect("c")["status"], "running");
    let before = counted(&b, "c").len();
    wait_until(
        "the counter to go on at the target",
        Duration::from_secs(60),
        || counted(&b, "c").len() > before + 10,
    );
    assert_contiguous_from_zero(&counted(&b, "c"));
}

/// Issue 7, review of c7504fa: once the target resumed the guest, its copy
/// is the sandbox. The target's hearthd is killed (-9, its QEMU outlives it)
/// right after `cont`, before the guest was pinged and the commit answered.
/// Restarted, it re-adopts the running VM from the records its commit saved
/// (fsynced) before the resume, and answers the source's abort with 409
/// `migration_committed`: the source never resumes its (older) copy and ends
/// released; the counter goes on at the target with no gap; one copy runs.
/// (Before, the restarted target reaped the resumed VM and its directory, and
/// every later abort heard "knows no incoming migration".)
#[test]
fn a_target_killed_right_after_resuming_the_guest_readopts_it_and_the_source_never_resumes() {
    const HOLD: &str = "HEARTH_MIGRATION_HOLD";
    let a = Daemon::start_with(DaemonOptions {
        busybox: false,
        ..Default::default()
    });
    let b = Daemon::start_with(DaemonOptions {
        busybox: false,
        env: vec![(HOLD.into(), "target-resumed:120000".into())],
        ..Default::default()
    });
    let (mut a, mut b) = import_busybox(a, b);
    let id = run_counter(&a, "c");
    let (api, tf) = (b.api.clone(), token_file(&b));
    let child = spawn_migrate(&a, &["c", "--to", &api, "--to-token-file", &tf]);
    wait_until(
        "the target to hold right after resuming the guest",
        Duration::from_secs(180),
        || b.log_text().contains("HEARTH_MIGRATION_HOLD"),
    );
    // The source is paused since the switch-over: its log is complete.
    let at_source = counted(&a, "c").len();
    b.kill9();
    assert_eq!(
        vmm_pids_under(b.data.path()).len(),
        1,
        "the resumed QEMU outlives the target's hearthd"
    );
    b.set_env(HOLD, None);
    b.spawn();
    b.wait_recovered();
    let s = b.inspect("c");
    assert_eq!(
        s["status"],
        "running",
        "the restarted target did not re-adopt the resumed VM: {s}; target log: {}",
        b.log_text()
    );
    let out = child.wait_with_output().unwrap();
    eprintln!("hearth migrate: {}", show(&out));
    let st = status_of(&a, "c");
    if st["phase"] == "completed" {
        // Its abort heard 409 `migration_committed` from the restarted
        // target: the sandbox is gone from the source.
        assert!(out.status.success(), "{}", show(&out));
        let gone = a.hearth(&["inspect", "c"]);
        assert!(!gone.status.success(), "{}", show(&gone));
    } else {
        // It asked while the target was down: paused, unresolved (never
        // resumed). A restart of the source asks again and hears committed.
        assert_eq!(st["phase"], "unresolved", "{st}; {}", show(&out));
        assert_eq!(
            counted(&a, "c").len(),
            at_source,
            "the source's copy ran again"
        );
        a.kill9();
        a.spawn();
        a.wait_recovered();
        let s = a.inspect("c");
        assert_eq!(s["status"], "stopped", "{s}");
        assert!(
            s["error"].as_str().unwrap_or("").contains("migrated to"),
            "{s}"
        );
    }
    wait_until(
        "the source's VM to be released",
        Duration::from_secs(60),
        || vmm_pids_under(a.data.path()).is_empty(),
    );
    let before = counted(&b, "c").len();
    wait_until(
        "the counter to go on at the target",
        Duration::from_secs(60),
        || counted(&b, "c").len() > before + 10,
    );
    assert_contiguous_from_zero(&counted(&b, "c"));
    assert_eq!(vmm_pids_under(b.data.path()).len(), 1, "one running copy");
    // The removed-uncommitted record does not name it.
    let removed =
        std::fs::read_to_string(b.data_dir().join("migrations-removed.json")).unwrap_or_default();
    assert!(!removed.contains(&format!("\"{id}\"")), "{removed}");
}

/// The other side of the commit point: a save of the records that fails
/// (here a directory where the commit's `workload.json` goes, so neither the
/// rename of the one staged at prepare nor the fallback's write can put it
/// there, as ENOSPC or EIO would fail it) is before the resume, so the target removes its VM
/// uncommitted and the source, told so, runs on with no gap.
#[test]
fn a_commit_whose_records_cannot_be_saved_never_resumes_the_target_and_the_source_runs_on() {
    let (a, b) = two_nodes();
    let id = run_counter(&a, "c");
    let (api, tf) = (b.api.clone(), token_file(&b));
    let child = spawn_migrate(&a, &["c", "--to", &api, "--to-token-file", &tf]);
    let incoming = b.data_dir().join("sandboxes").join(&id);
    wait_until(
        "the target to claim the incoming dir",
        Duration::from_secs(60),
        || incoming.exists(),
    );
    std::fs::create_dir(incoming.join("workload.json")).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("keeps running here") && err.contains("before its VM here was resumed"),
        "{}",
        show(&out)
    );
    assert_eq!(status_of(&a, "c")["phase"], "aborted");
    assert_eq!(a.inspect("c")["status"], "running");
    wait_until(
        "the target's VM to be removed",
        Duration::from_secs(30),
        || vmm_pids_under(b.data.path()).is_empty(),
    );
    assert!(!incoming.exists(), "the incoming dir is left on the target");
    let n = counted(&a, "c").len();
    wait_until(
        "the counter to go on at the source",
        Duration::from_secs(60),
        || counted(&a, "c").len() > n + 5,
    );
    assert_contiguous_from_zero(&counted(&a, "c"));
}

/// A log that reached its size limit on the source stays closed on the
/// target: the limit's notice is the last thing in it, however long the
/// workload goes on printing (the target's own limit is far larger).
#[test]
fn a_log_that_reached_its_limit_stays_closed_after_a_migration() {
    let (a, b) = two_nodes_with(&[("HEARTH_MAX_LOG_MIB", "1")]);
    let out = a.hearth(&[
        "run",
        "--detach",
        "--network",
        "none",
        "--memory",
        "128",
        "--name",
        "chatty",
        "busybox",
        "--",
        "sh",
        "-c",
        "head -c 1200000 /dev/zero | tr '\\0' x; echo; i=0; while true; do echo $i > /n; echo line-$i; i=$((i+1)); sleep 0.1; done",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let notice = "output log limit of 1048576 bytes reached";
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = a.hearth(&["logs", "chatty"]);
        if String::from_utf8_lossy(&out.stderr).contains(notice) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no limit notice after 120 s: {} bytes of stdout, stderr {:?}; {}",
            out.stdout.len(),
            String::from_utf8_lossy(&out.stderr),
            show(&a.hearth(&["inspect", "chatty"]))
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = a.hearth(&[
        "migrate",
        "chatty",
        "--to",
        &b.api,
        "--to-token-file",
        &token_file(&b),
    ]);
    assert!(out.status.success(), "{}\n{}", show(&out), a.log_text());
    // The workload goes on printing on the target (its counter file grows) …
    let n = |d: &Daemon| -> u64 {
        let out = d.hearth(&["exec", "chatty", "--", "cat", "/n"]);
        stdout(&out).trim().parse().unwrap_or(0)
    };
    let at_move = n(&b);
    wait_until("the workload to go on", Duration::from_secs(60), || {
        n(&b) > at_move + 10
    });
    // … and none of it reaches the log: every `line-` comes after the 1.2 MB
    // that reached the limit, so any of them in the log is output past it.
    let out = b.hearth(&["logs", "chatty"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(notice),
        "{}",
        show(&out)
    );
    let logged = String::from_utf8_lossy(&out.stdout);
    assert!(
        !logged.contains("line-"),
        "output after the limit reached the target's log: {:?}",
        logged[logged.find("line-").unwrap_or(0)..]
            .chars()
            .take(60)
            .collect::<String>()
    );
}

/// Waits until `sandbox` on `d` printed `more` counter lines beyond `after`,
/// and checks every line follows the one before it (a log that starts
/// mid-stream, as a restored counter's does, is fine; a reset or gap is not).
fn keeps_counting(d: &Daemon, sandbox: &str, after: usize, more: usize) -> Vec<u64> {
    wait_until(
        &format!("{sandbox} to go on counting"),
        Duration::from_secs(60),
        || counted(d, sandbox).len() > after + more,
    );
    let v = counted(d, sandbox);
    for w in v.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{sandbox}: a reset, gap or repeat: {v:?}");
    }
    v
}

/// `hearth migrate SANDBOX --to TO --json` on `from`, as the CLI answers it.
fn migrate_cli(from: &Daemon, sandbox: &str, to: &Daemon) -> std::process::Output {
    from.hearth(&[
        "migrate",
        sandbox,
        "--to",
        &to.api,
        "--to-token-file",
        &token_file(to),
        "--json",
    ])
}

fn migrate_to(from: &Daemon, sandbox: &str, to: &Daemon) -> serde_json::Value {
    let out = migrate_cli(from, sandbox, to);
    assert!(
        out.status.success(),
        "migrate {sandbox}: {}\n{}",
        show(&out),
        from.log_text()
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["phase"], "completed", "{st}");
    st
}

fn counter_from(d: &Daemon, args: &[&str]) {
    let mut a = vec!["run", "--detach"];
    a.extend_from_slice(args);
    let out = d.hearth(&a);
    assert!(out.status.success(), "{}", show(&out));
}

/// Warm starts (issue 5) migrate too (issue 7): a counter from the warm pool,
/// one restored from a template (both with the template's network device on
/// QEMU's hub and no network behind it) and one restored from a snapshot (no
/// device) move to the other node and back, counting on and keeping their
/// files; the source drops its template and snapshot references when they
/// leave (both can then be removed there), the target takes none and needs
/// neither (the move back finds them gone); a moved one can be forked there;
/// a move whose target is killed mid-transfer leaves the one copy running.
#[test]
fn warm_started_sandboxes_migrate_and_back_and_leave_their_template_and_snapshot_behind() {
    let (a, mut b) = two_nodes();
    let out = a.hearth(&[
        "template", "create", "busybox", "--name", "bb", "--memory", "128", "--pool", "1",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("the warm pool to fill", Duration::from_secs(180), || {
        let out = a.hearth(&["template", "ls", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v[0]["pool_ready"] == 1)
    });
    let counter = ["busybox", "--", "sh", "-c", COUNTER];
    let none = ["--network", "none", "--memory", "128"];
    let mut args = vec!["--name", "pooled"];
    args.extend(none.iter().chain(&counter));
    counter_from(&a, &args);
    let out = a.hearth(&["template", "pool", "bb", "--size", "0"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("the warm pool to empty", Duration::from_secs(60), || {
        let out = a.hearth(&["template", "ls", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v[0]["pool_ready"] == 0)
    });
    let mut args = vec!["--name", "tpl"];
    args.extend(none.iter().chain(&counter));
    counter_from(&a, &args);
    let mut args = vec!["--cold", "--name", "orig"];
    args.extend(none.iter().chain(&counter));
    counter_from(&a, &args);
    wait_until("orig to count", Duration::from_secs(120), || {
        counted(&a, "orig").len() >= 3
    });
    let out = a.hearth(&["snapshot", "orig", "--name", "s"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = a.hearth(&["rm", "-f", "orig"]);
    assert!(out.status.success(), "{}", show(&out));
    counter_from(&a, &["--name", "snap", "--from-snapshot", "s"]);

    let all = ["pooled", "tpl", "snap"];
    for (name, path) in all.iter().zip(["pool", "template", "snapshot"]) {
        wait_until(
            &format!("{name} to count"),
            Duration::from_secs(120),
            || counted(&a, name).len() >= 5,
        );
        let s = a.inspect(name);
        assert_eq!(s["start_path"], path, "{s}");
        assert!(s["network"].is_null(), "{s}");
    }
    // In use here: neither can be removed.
    for (cmd, name) in [("template", "bb"), ("snapshot", "s")] {
        let out = a.hearth(&[cmd, "rm", name]);
        assert!(!out.status.success(), "{}", show(&out));
        assert!(stderr(&out).contains("is in use"), "{}", show(&out));
    }

    // There: each keeps counting, its file, and its start path; the template
    // or snapshot stays the source's.
    for name in all {
        let before = counted(&a, name).len();
        let st = migrate_to(&a, name, &b);
        println!(
            "warm migration of {name}: VMM downtime {} ms, handover {} ms, {} bytes",
            st["downtime_ms"], st["handover_ms"], st["bytes_sent"]
        );
        keeps_counting(&b, name, before, 10);
        let s = b.inspect(name);
        assert_eq!(s["status"], "running", "{s}");
        assert!(s["started_from"].is_null(), "{s}");
        assert!(
            s["start_note"]
                .as_str()
                .unwrap_or("")
                .contains("then migrated"),
            "{s}"
        );
        let out = b.hearth(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; cat /kept",
        ]);
        assert_eq!(stdout(&out).trim(), "before", "{name}: {}", show(&out));
    }
    wait_until(
        "the source to release every moved VM",
        Duration::from_secs(30),
        || vmm_pids_under(a.data.path()).is_empty(),
    );

    // The source released its references: both can go now.
    for (cmd, name) in [("template", "bb"), ("snapshot", "s")] {
        let out = a.hearth(&[cmd, "rm", name]);
        assert!(out.status.success(), "{cmd} rm {name}: {}", show(&out));
    }

    // A moved sandbox is snapshotted and forked on the target.
    let out = b.hearth(&["fork", "tpl", "-n", "1"]);
    assert!(out.status.success(), "{}", show(&out));
    let fork = stdout(&out).trim().to_string();
    wait_until("the fork to count", Duration::from_secs(120), || {
        let s = b.inspect(&fork);
        assert_ne!(s["status"], "failed", "{s}");
        s["status"] == "running" && counted(&b, &fork).len() >= 3
    });
    let out = b.hearth(&["rm", "-f", &fork]);
    assert!(out.status.success(), "{}", show(&out));

    // And back, where their template and snapshot are gone.
    for name in all {
        let before = counted(&b, name).len();
        migrate_to(&b, name, &a);
        keeps_counting(&a, name, before, 10);
        let out = a.hearth(&["exec", name, "--", "cat", "/kept"]);
        assert_eq!(stdout(&out).trim(), "before", "{name}: {}", show(&out));
    }
    assert!(
        vmm_pids_under(b.data.path()).is_empty(),
        "a VM was left on the target"
    );

    // The target killed mid-transfer: the warm-started sandbox runs on here.
    let mig = spawn_migrate(
        &a,
        &[
            "tpl",
            "--to",
            &b.api,
            "--to-token-file",
            &token_file(&b),
            "--bandwidth-mib",
            "2",
        ],
    );
    wait_precopy(&a, "tpl");
    b.kill9();
    for pid in vmm_pids_under(b.data.path()) {
        // SAFETY: kill(2) on a QEMU pid of the target's data dir.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let out = mig.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        stderr(&out).contains("keeps running here"),
        "{}",
        show(&out)
    );
    assert_eq!(a.inspect("tpl")["status"], "running");
    let n = counted(&a, "tpl").len();
    keeps_counting(&a, "tpl", n, 3);
    assert_eq!(vmm_pids_under(a.data.path()).len(), 3, "one VM per sandbox");
}

/// Issue 7, finding 4: the target restarts while the source holds its commit
/// (the record says committing, the commit is not sent). The restarted target
/// removes the uncommitted incoming VM at start and keeps that on disk, so
/// the source's commit fails and its abort hears "removed uncommitted": the
/// paused VM runs on at the source. Before, the restarted target answered
/// "knows no incoming migration" and the source stayed paused (unresolved).
#[test]
fn a_target_restarted_before_the_commit_still_answers_and_the_source_runs_on() {
    const HOLD: &str = "HEARTH_MIGRATION_HOLD";
    let (a, mut b) = two_nodes_with(&[(HOLD, "commit:30000")]);
    let id = run_counter(&a, "c");
    let (api, tf) = (b.api.clone(), token_file(&b));
    let child = a
        .cmd(&["migrate", "c", "--to", &api, "--to-token-file", &tf])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_phase(&a, "c", "committing");
    b.kill9();
    b.spawn();
    b.wait_recovered();
    assert!(
        vmm_pids_under(b.data.path()).is_empty(),
        "the restarted target kept the uncommitted incoming VM"
    );
    let removed =
        std::fs::read_to_string(b.data_dir().join("migrations-removed.json")).unwrap_or_default();
    assert!(
        removed.contains(&format!("\"{id}\"")),
        "{id} not recorded: {removed:?}; target log: {}",
        b.log_text()
    );
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        !stderr(&out).contains("unresolved"),
        "the source did not get a clear answer: {}",
        show(&out)
    );
    let st = status_of(&a, "c");
    assert_eq!(st["phase"], "aborted", "{st}");
    assert_eq!(a.inspect("c")["status"], "running", "{}", a.inspect("c"));
    let before = counted(&a, "c").len();
    wait_until(
        "the counter to go on at the source",
        Duration::from_secs(60),
        || counted(&a, "c").len() > before + 10,
    );
    assert_contiguous_from_zero(&counted(&a, "c"));
    let ps = b.hearth(&["ps", "--json"]);
    assert_eq!(
        stdout(&ps).trim(),
        "[]",
        "the target runs nothing: {}",
        show(&ps)
    );
}

/// Issue 7 review M4: a sandbox started from a snapshot has a log that starts
/// at a non-zero offset of the guest's output count. The target keeps that
/// offset, so after its hearthd restarts and takes the moved sandbox over the
/// guest is told the right offsets: the counter goes on with no line logged
/// twice (before, the target stored 0 and the output was replayed).
#[test]
fn a_snapshot_started_sandbox_moved_then_readopted_logs_no_line_twice() {
    let (a, mut b) = two_nodes();
    let counter = [
        "--network",
        "none",
        "--memory",
        "128",
        "busybox",
        "--",
        "sh",
        "-c",
        COUNTER,
    ];
    let mut args = vec!["--cold", "--name", "orig"];
    args.extend(counter);
    counter_from(&a, &args);
    wait_until("orig to count", Duration::from_secs(120), || {
        counted(&a, "orig").len() >= 3
    });
    let out = a.hearth(&["snapshot", "orig", "--name", "s"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = a.hearth(&["rm", "-f", "orig"]);
    assert!(out.status.success(), "{}", show(&out));
    counter_from(&a, &["--name", "snap", "--from-snapshot", "s"]);
    wait_until("snap to count", Duration::from_secs(120), || {
        counted(&a, "snap").len() >= 3
    });
    let before = counted(&a, "snap");
    assert_ne!(
        before[0], 0,
        "its log starts after the snapshot: {before:?}"
    );
    migrate_to(&a, "snap", &b);
    let n = keeps_counting(&b, "snap", before.len(), 3).len();

    b.kill9();
    b.spawn();
    b.wait_recovered();
    assert_eq!(b.inspect("snap")["status"], "running");
    let v = keeps_counting(&b, "snap", n, 5);
    assert_eq!(v[0], before[0], "the log still starts where it did: {v:?}");
}

/// migsafe 1: the control plane gives a migration attempt up at its deadline
/// by cancelling it at the source (`POST /v1/sandboxes/{id}/migration/cancel`).
/// A cancel in pre-copy ends the migration before any commit: the answer is
/// `aborted`, the guest keeps counting on the source with no reset, gap or
/// repeat, the target keeps nothing, and the attempt cannot start again. An
/// attempt cancelled before it reached the source is answered `aborted` and
/// refused when it arrives.
#[test]
fn a_cancelled_migration_attempt_ends_before_its_commit_and_the_source_runs_on() {
    let (a, b) = two_nodes();
    run_counter(&a, "c");
    let migrate = |attempt: &str| {
        serde_json::json!({
            "target": b.api,
            "target_token": b.token(),
            "attempt": attempt,
            "max_bandwidth_mib": 2,
        })
        .to_string()
    };
    let cancel = |attempt: &str| {
        let body = serde_json::json!({ "attempt": attempt }).to_string();
        let (code, body) = a
            .http("POST", "/v1/sandboxes/c/migration/cancel", Some(&body))
            .unwrap();
        let st: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        (code, st, body)
    };
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            a.http("POST", "/v1/sandboxes/c/migrate", Some(&migrate("att-1")))
                .unwrap()
        });
        wait_precopy(&a, "c");
        let (code, st, body) = cancel("att-1");
        assert_eq!(code, 200, "{body}");
        assert_eq!(st["phase"], "aborted", "{body}");
        assert_eq!(st["attempt"], "att-1", "{body}");
        let (code, body) = first.join().unwrap();
        assert!(code >= 400, "the cancelled migration succeeded: {body}");
        assert!(body.contains("cancelled"), "{body}");
    });
    assert_eq!(a.inspect("c")["status"], "running");
    let n = counted(&a, "c").len();
    keeps_counting(&a, "c", n, 3);
    assert_contiguous_from_zero(&counted(&a, "c"));
    let (code, body) = b.http("GET", "/v1/sandboxes", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let on_b: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        on_b.as_array().map(Vec::len),
        Some(0),
        "target kept: {on_b}"
    );
    // The cancelled attempt cannot start again.
    let (code, body) = a
        .http("POST", "/v1/sandboxes/c/migrate", Some(&migrate("att-1")))
        .unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("cancelled"), "{body}");
    // An attempt cancelled before it reached the source: aborted, and refused.
    let (code, st, body) = cancel("att-2");
    assert_eq!(code, 200, "{body}");
    assert_eq!(st["phase"], "aborted", "{body}");
    let (code, body) = a
        .http("POST", "/v1/sandboxes/c/migrate", Some(&migrate("att-2")))
        .unwrap();
    assert_eq!(code, 409, "{body}");
    assert_eq!(a.inspect("c")["status"], "running");
}

/// Issue 7 (pause): a cancel that comes while the source sends the log's
/// tail (held there 5 s; the record says switchover, the commit is not sent)
/// still ends the migration before any commit: `aborted`, the guest counts on
/// at the source with no gap or repeat, the target keeps nothing.
#[test]
fn a_cancel_while_the_log_tail_is_sent_still_ends_before_the_commit() {
    const HOLD: &str = "HEARTH_MIGRATION_HOLD";
    let (a, b) = two_nodes_with(&[(HOLD, "log-tail:5000")]);
    let id = run_counter(&a, "c");
    let body = serde_json::json!({
        "target": b.api,
        "target_token": b.token(),
        "attempt": "att-tail",
    })
    .to_string();
    let record = a
        .data_dir()
        .join("sandboxes")
        .join(&id)
        .join("migration.json");
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            a.http("POST", "/v1/sandboxes/c/migrate", Some(&body))
                .unwrap()
        });
        // why: the status says `switchover` from the stop until the tail
        // reached the target (held here 5 s; the record on disk stays
        // `precopy`, which recovers the same way); `committing` only after it.
        wait_until(
            "the source's status to say switchover",
            Duration::from_secs(180),
            || {
                let out = a.hearth(&["migrate", "--status", "--json", "c"]);
                out.status.success()
                    && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                        .is_ok_and(|s| s["phase"] == "switchover")
            },
        );
        let on_disk = std::fs::read_to_string(&record);
        assert!(
            on_disk.as_ref().is_ok_and(|r| r.contains("\"precopy\"")),
            "the record on disk is not precopy before the commit: {on_disk:?}"
        );
        let cancel = serde_json::json!({ "attempt": "att-tail" }).to_string();
        let (code, body) = a
            .http("POST", "/v1/sandboxes/c/migration/cancel", Some(&cancel))
            .unwrap();
        assert_eq!(code, 200, "{body}");
        let st: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(st["phase"], "aborted", "{body}");
        let (code, body) = first.join().unwrap();
        assert!(code >= 400, "the cancelled migration succeeded: {body}");
        assert!(body.contains("cancelled"), "{body}");
    });
    assert_eq!(a.inspect("c")["status"], "running");
    let n = counted(&a, "c").len();
    keeps_counting(&a, "c", n, 3);
    assert_contiguous_from_zero(&counted(&a, "c"));
    wait_until(
        "the target's VM to be removed",
        Duration::from_secs(30),
        || vmm_pids_under(b.data.path()).is_empty(),
    );
    let (code, body) = b.http("GET", "/v1/sandboxes", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let on_b: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        on_b.as_array().map(Vec::len),
        Some(0),
        "target kept: {on_b}"
    );
}

/// A guest that dirties memory faster than the link carries it (16 MiB
/// rewritten with fresh random data in a loop, a 4 MiB/s cap): QEMU's
/// auto-converge throttles its vCPU (seen in `--status` while the migration
/// runs), and then either the migration converges under the throttle or it
/// gives up after its bound — both are what the issue allows; in both the
/// sandbox runs exactly once, counting without a gap and with its memory
/// intact.
#[test]
fn a_guest_dirtying_faster_than_the_link_is_throttled_and_ends_on_exactly_one_node() {
    let (a, b) = two_nodes();
    let out = a.hearth(&[
        "run",
        "--detach",
        "--network",
        "none",
        "--memory",
        "64",
        "--name",
        "busy",
        "busybox",
        "--",
        "sh",
        "-c",
        DIRTYING,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until(
        "the counter to print 10 lines",
        Duration::from_secs(120),
        || counted(&a, "busy").len() >= 10,
    );
    let child = spawn_migrate(
        &a,
        &[
            "busy",
            "--to",
            &b.api,
            "--to-token-file",
            &token_file(&b),
            "--bandwidth-mib",
            "4",
            "--give-up-secs",
            "90",
            "--json",
        ],
    );
    wait_precopy(&a, "busy");
    // why: the throttle is visible only while the migration runs.
    let mut throttle = 0;
    let (mut polls, t0) = (0u32, Instant::now());
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(150);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the migration neither converged nor gave up"
        );
        let st = status_of(&a, "busy");
        throttle = throttle.max(st["cpu_throttle_percent"].as_u64().unwrap_or(0));
        polls += 1;
        if polls % 10 == 0 {
            println!(
                "{:?}: phase {} pass {} sent {} remaining {} dirty {}/s throttle {}%",
                t0.elapsed(),
                st["phase"],
                st["iterations"],
                st["bytes_sent"],
                st["ram_remaining"],
                st["dirty_pages_rate"],
                st["cpu_throttle_percent"]
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    println!(
        "dirtying guest at 4 MiB/s: max throttle {throttle}%, migrate said: {} {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        throttle > 0,
        "auto-converge never throttled the guest: {}",
        show(&out)
    );
    let (here, other) = if out.status.success() {
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(st["phase"], "completed", "{st}");
        (&b, &a)
    } else {
        assert!(
            stderr(&out).contains("keeps running here"),
            "{}",
            show(&out)
        );
        assert_eq!(status_of(&a, "busy")["phase"], "aborted");
        (&a, &b)
    };
    assert_eq!(here.inspect("busy")["status"], "running");
    let n = counted(here, "busy").len();
    wait_until("the counter to go on", Duration::from_secs(60), || {
        counted(here, "busy").len() > n + 3
    });
    assert_contiguous_from_zero(&counted(here, "busy"));
    assert_eq!(
        corrupt(here, "busy"),
        0,
        "the guest's memory changed under it"
    );
    wait_until(
        "no VM left on the other node",
        Duration::from_secs(30),
        || vmm_pids_under(other.data.path()).is_empty(),
    );
    assert!(
        !stdout(&other.hearth(&["ps"])).contains("busy"),
        "a second copy is listed"
    );
}

/// review13 F1: a guest whose output agent writes full frames (a pipe it
/// cannot keep up with) while it is moved back and forth. A frame over
/// 32 KiB was several write()s in the guest (virtio_console's cap); a vCPU
/// stop between them left its head on the source and its tail for the
/// target, whose reader (`reattach`) then started mid-frame ("frame of
/// 808857866 bytes exceeds the limit"). Frames are now one write each
/// (`hearth_proto::MAX_GUEST_WRITE`), and a frame whose head reached the
/// source at the stop is skipped on the target (before the guest's answer to
/// its `Resume`) and replayed whole. After every move (or refused move) the
/// sandbox must keep logging where it runs (`HEARTH_MIGRATION_ROUNDS`, 4),
/// its log must count on without a line lost, repeated or cut (review15 F4:
/// the guest's lines are `seq 0 FRAMES_WRAP` over and over), and most moves
/// must go through (issue 7: no drain, no wait for a cut frame).
#[test]
fn full_frames_keep_flowing_after_each_move() {
    let rounds: usize = std::env::var("HEARTH_MIGRATION_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let opts = || DaemonOptions {
        busybox: false,
        // why: the largest log hearthd allows (what a target takes with a move).
        env: vec![("HEARTH_MAX_LOG_MIB".into(), "512".into())],
        ..Default::default()
    };
    let (a, b) = import_busybox(Daemon::start_with(opts()), Daemon::start_with(opts()));
    let out = a.hearth(&[
        "run",
        "--detach",
        "--network",
        "none",
        "--memory",
        "256",
        "--name",
        "frames",
        "busybox",
        "--",
        "sh",
        "-c",
        &format!("seq 0 {FRAMES_WRAP} > /tmp/n; while true; do cat /tmp/n; done"),
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let size = |d: &Daemon| {
        let out = d.hearth(&["logs", "frames"]);
        out.stdout.len()
    };
    wait_until("the stream to start", Duration::from_secs(120), || {
        size(&a) > 4 << 20
    });
    let nodes = [&a, &b];
    let mut here = 0;
    let mut moved = 0;
    for round in 0..rounds {
        let (from, to) = (nodes[here], nodes[1 - here]);
        let out = migrate_cli(from, "frames", to);
        if out.status.success() {
            here = 1 - here;
            moved += 1;
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let steps = &st["pause_steps"];
            // why: the log's tail (review20 R20-2): what the guest wrote
            // since the last round of the pre-copy, sent from the drain on.
            let tail = steps["log_sent_ms"]
                .as_u64()
                .zip(steps["output_drained_ms"].as_u64())
                .map(|(sent, drained)| sent as i64 - drained as i64);
            println!(
                "round {round}: moved, paused {} ms, tail step {tail:?} ms, steps {steps}",
                st["paused_ms"]
            );
        } else {
            println!("round {round}: not moved: {}", stderr(&out).trim());
        }
        let on = nodes[here];
        let n = size(on);
        let t = Instant::now();
        while size(on) <= n + (1 << 20) && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
        }
        if size(on) <= n + (1 << 20) {
            for (name, d) in [("source a", &a), ("target b", &b)] {
                let log = d.log_text();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| {
                        l.contains("frame")
                            || l.contains("guest channel")
                            || l.contains("WARN")
                            || l.contains("ERROR")
                    })
                    .collect();
                println!("--- {name} ({} matching lines), last 15:", lines.len());
                for l in lines.iter().rev().take(15).rev() {
                    println!("{l}");
                }
            }
            println!("inspect: {}", on.inspect("frames"));
            panic!("round {round}: the log stopped growing on the node running the sandbox ({} -> {} bytes)", n, size(on));
        }
        assert_eq!(on.inspect("frames")["status"], "running", "round {round}");
        let lines = assert_counts_on(&on.hearth(&["logs", "frames"]).stdout);
        println!("round {round}: {lines} lines, every one once and in order");
    }
    println!("moved {moved} of {rounds}");
    // why: a move may still be refused (a Credit written between the VM's
    // stop and the source seeing it), but only rarely: 39 of 40 moved in ten
    // runs with the gate, 16 of 16 since (docs/migration.md "The switch-over
    // without a gate"). One that never moves would not test
    // the target's reader at all (review14 F3). Half, not all but one: the
    // refusal rate under a loaded CI host is not measured (review17 F6).
    assert!(
        moved * 2 >= rounds && moved > 0,
        "only {moved} of {rounds} rounds moved the sandbox"
    );
}

/// The last line `full_frames_keep_flowing_after_each_move`'s guest counts to
/// before it starts again at 0.
const FRAMES_WRAP: u64 = 400_000;

/// Checks that `log` is `seq 0 FRAMES_WRAP` over and over from its start:
/// every line is the one before plus one, 0 after `FRAMES_WRAP`, so a frame
/// lost, written twice or cut (its bytes run into the next line) breaks the
/// count. A last line without its newline is still being written and is
/// skipped. Answers how many lines were checked.
fn assert_counts_on(log: &[u8]) -> usize {
    let Some(last_newline) = log.iter().rposition(|&b| b == b'\n') else {
        return 0;
    };
    let mut expected = 0u64;
    let mut at = 0usize;
    for (i, line) in log[..last_newline].split(|&b| b == b'\n').enumerate() {
        let got = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.parse::<u64>().ok());
        if got != Some(expected) {
            let around = &log[at.saturating_sub(40)..(at + line.len() + 40).min(log.len())];
            panic!(
                "line {i} of the log is {:?}, expected {expected} (a frame lost, repeated or cut); around it: {:?}",
                String::from_utf8_lossy(line),
                String::from_utf8_lossy(around)
            );
        }
        expected = if expected == FRAMES_WRAP {
            0
        } else {
            expected + 1
        };
        at += line.len() + 1;
    }
    log[..last_newline].split(|&b| b == b'\n').count()
}

/// `hearth exec SANDBOX -- CMD…` in the background, counting the bytes of
/// its output as they arrive.
struct ExecStream {
    child: Child,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    /// Milliseconds slept after each read.
    pace: Arc<std::sync::atomic::AtomicU64>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ExecStream {
    /// Reads at most 8 KiB every 10 ms (0.8 MB/s) until [`ExecStream::fast`]:
    /// slower than `yes` in the guest, which then sits at a full window.
    fn start(d: &Daemon, sandbox: &str, cmd: &[&str]) -> ExecStream {
        use std::io::Read;
        let mut argv = vec!["exec", sandbox, "--"];
        argv.extend_from_slice(cmd);
        let mut child = d
            .cmd(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("hearth exec");
        let mut out = child.stdout.take().expect("stdout");
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let b2 = bytes.clone();
        let pace = Arc::new(std::sync::atomic::AtomicU64::new(10));
        let p2 = pace.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 8 << 10];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                b2.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                let ms = p2.load(std::sync::atomic::Ordering::Relaxed);
                if ms > 0 {
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }
        });
        ExecStream {
            child,
            bytes,
            pace,
            reader: Some(reader),
        }
    }

    /// Reads as fast as the output comes from now on.
    fn fast(&self) {
        self.pace.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `more` bytes arrive within `within`.
    fn grows(&self, more: u64, within: Duration) -> bool {
        let from = self.bytes();
        let t = Instant::now();
        while t.elapsed() < within {
            if self.bytes() >= from + more {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn finish(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Review17 F3 / review19: a chatty `hearth exec` (`yes`, read slower than
/// it writes, so the guest sits at a full window) running through moves no
/// longer leaves Credits on the stopped VM's channel: the source holds every
/// session's credit from the VM's stop. The source `a` holds each move 5 s
/// right after it saw its VM stop (`HEARTH_MIGRATION_HOLD=gate:…`; there is
/// no QEMU gate any more, so QEMU's last pass ends meanwhile), the channel
/// not frozen yet, while the exec's client takes its backlog (before, every
/// Credit it returned then stayed on the socket and refused the move). Most
/// moves go through (each
/// refused one lets the exec run on: its output must keep flowing), the
/// main workload counts on without a gap, a new exec streams on the node
/// that runs the sandbox after each move; and after a move aborted with the
/// VM stopped (cancelled during that hold), the exec that ran through it
/// streams on: the hold's release returned the credit its consumer, waiting
/// in `next` with the guest at a full window, owed.
#[test]
fn a_chatty_exec_neither_refuses_moves_nor_stalls_after_an_aborted_one() {
    const HOLD: &str = "HEARTH_MIGRATION_HOLD";
    let rounds: usize = std::env::var("HEARTH_MIGRATION_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let (a, b) = two_nodes_with(&[(HOLD, "gate:5000")]);
    run_counter(&a, "c");
    let nodes = [&a, &b];
    let mut here = 0;
    let (mut moved, mut queued_refusals) = (0, 0);
    for round in 0..rounds {
        let (from, to) = (nodes[here], nodes[1 - here]);
        let exec = ExecStream::start(from, "c", &["yes"]);
        assert!(
            exec.grows(1 << 20, Duration::from_secs(60)),
            "round {round}: a new exec's output does not flow ({} bytes)",
            exec.bytes()
        );
        let (n, t) = (exec.bytes(), Instant::now());
        std::thread::sleep(Duration::from_secs(1));
        println!(
            "round {round}: the exec streams {} KiB/s",
            (exec.bytes() - n) * 1000 / (t.elapsed().as_millis() as u64).max(1) / 1024
        );
        let out = migrate_cli(from, "c", to);
        if out.status.success() {
            here = 1 - here;
            moved += 1;
            println!("round {round}: moved");
        } else {
            println!("round {round}: not moved: {}", stderr(&out).trim());
            if stderr(&out).contains("still queued") {
                queued_refusals += 1;
            }
            assert!(
                exec.grows(1 << 20, Duration::from_secs(30)),
                "round {round}: the exec's output stopped after a refused move ({} bytes)",
                exec.bytes()
            );
        }
        exec.finish();
        let on = nodes[here];
        assert_eq!(on.inspect("c")["status"], "running", "round {round}");
        let n = counted(on, "c").len();
        keeps_counting(on, "c", n, 3);
    }
    println!("moved {moved} of {rounds}");
    // why: a Credit written between the VM's stop and the source seeing its
    // STOP event still refuses a move; half, as in
    // `full_frames_keep_flowing_after_each_move` (review17 F6).
    assert!(
        moved * 2 >= rounds && moved > 0,
        "only {moved} of {rounds} rounds moved the sandbox"
    );
    // why: what the hold is for: an exec's Credit left on the stopped VM's
    // socket refused every move from the held node before it (2 of 4 with a
    // 2 s hold at the gate, 0 of 4 with 5 s); one such refusal is the STOP's
    // delivery window (review22 F4).
    assert!(
        queued_refusals <= 1,
        "{queued_refusals} moves were refused for bytes still queued for the stopped guest"
    );
    // A move from `a` aborted with the VM stopped: cancelled during the hold
    // after the stop (the source then refuses before its commit).
    if here == 1 {
        migrate_to(&b, "c", &a);
    }
    let exec = ExecStream::start(&a, "c", &["yes"]);
    assert!(
        exec.grows(1 << 20, Duration::from_secs(60)),
        "the exec's output does not flow ({} bytes)",
        exec.bytes()
    );
    let body = serde_json::json!({
        "target": b.api,
        "target_token": b.token(),
        "attempt": "att-exec",
    })
    .to_string();
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            a.http("POST", "/v1/sandboxes/c/migrate", Some(&body))
                .unwrap()
        });
        wait_until(
            "the source's status to say switchover",
            Duration::from_secs(180),
            || {
                let out = a.hearth(&["migrate", "--status", "--json", "c"]);
                out.status.success()
                    && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                        .is_ok_and(|s| s["phase"] == "switchover")
            },
        );
        // why: the client takes everything the host holds while the VM is
        // stopped, so the exec's consumer waits in `next` when the hold ends,
        // its guest at a full window.
        exec.fast();
        let cancel = serde_json::json!({ "attempt": "att-exec" }).to_string();
        let (code, body) = a
            .http("POST", "/v1/sandboxes/c/migration/cancel", Some(&cancel))
            .unwrap();
        assert_eq!(code, 200, "{body}");
        let (code, body) = first.join().unwrap();
        assert!(code >= 400, "the cancelled migration succeeded: {body}");
    });
    assert_eq!(a.inspect("c")["status"], "running");
    assert!(
        exec.grows(1 << 20, Duration::from_secs(30)),
        "the exec's output stopped after the aborted move ({} bytes)",
        exec.bytes()
    );
    exec.finish();
    let n = counted(&a, "c").len();
    keeps_counting(&a, "c", n, 3);
}
