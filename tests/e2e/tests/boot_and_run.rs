//! Boot and run: `hearth run IMAGE -- CMD` runs the command in a real microVM.
//! Every test starts its own `hearthd dev` and drives it through the CLI or HTTP.

use std::time::Duration;

use hearth_e2e::images::{self, Config};
use hearth_e2e::{show, stderr, stdout, vmm_pids_under, wait_until, Daemon, DaemonOptions};

#[test]
fn run_streams_exact_stdout_and_stderr_separately() {
    let d = Daemon::start();
    let out = d.hearth(&[
        "run",
        "busybox",
        "--",
        "sh",
        "-c",
        "printf 'line one\\nno newline'; printf 'to stderr\\n' >&2; printf 'tail'",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "line one\nno newlinetail");
    assert_eq!(stderr(&out), "to stderr\n");
}

#[test]
fn exit_codes_are_the_workloads_own() {
    let d = Daemon::start();
    let code = |cmd: &str| {
        let out = d.hearth(&["run", "--rm", "busybox", "--", "sh", "-c", cmd]);
        (out.status.code(), out)
    };
    assert_eq!(code("exit 0").0, Some(0));
    assert_eq!(code("exit 3").0, Some(3));
    let (c, out) = code("kill -9 $$");
    assert_eq!(c, Some(137), "killed by SIGKILL is 128+9: {}", show(&out));
    // The agent ignores SIGPIPE; its workloads start with the default action.
    let (c, out) = code("kill -PIPE $$");
    assert_eq!(c, Some(141), "killed by SIGPIPE is 128+13: {}", show(&out));

    let out = d.hearth(&["run", "--rm", "busybox", "--", "no-such-command", "x"]);
    assert_eq!(out.status.code(), Some(127), "{}", show(&out));
    assert!(
        stderr(&out).contains("no-such-command") && stderr(&out).contains("not found"),
        "{}",
        show(&out)
    );
    // A failure in the process's own set-up (here its chdir) is reported as exec's.
    let out = d.hearth(&[
        "run",
        "--rm",
        "--workdir",
        "/no/such/dir",
        "busybox",
        "--",
        "pwd",
    ]);
    assert_eq!(out.status.code(), Some(127), "{}", show(&out));
    assert!(
        stderr(&out).contains("pwd: No such file or directory"),
        "{}",
        show(&out)
    );
}

#[test]
fn env_workdir_and_user_are_applied() {
    let d = Daemon::start();
    let out = d.hearth(&[
        "run",
        "--env",
        "GREETING=hi there",
        "--workdir",
        "/tmp",
        "--user",
        "nobody",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd; id -u; id -g",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "hi there\n/tmp\n65534\n65534\n");

    let out = d.hearth(&["run", "--user", "1000:1000", "busybox", "--", "id"]);
    assert!(stdout(&out).starts_with("uid=1000"), "{}", show(&out));
}

#[test]
fn image_config_supplies_entrypoint_cmd_env_workdir_and_user() {
    let d = Daemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config {
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        cmd: vec!["echo \"$MSG from $(pwd) as $(id -un)\"; cat /etc/marker".into()],
        env: vec!["PATH=/bin:/usr/bin".into(), "MSG=image-env".into()],
        working_dir: "/home/user".into(),
        user: "user".into(),
    };
    let layers = vec![
        images::layer_with_busybox(&[]),
        images::layer(&[("etc/marker", b"from the second layer\n", 0o644)]),
    ];
    let oci = tmp.path().join("oci");
    images::oci_layout(&oci, &cfg, &layers);
    let out = d.hearth(&[
        "image",
        "import",
        "--name",
        "configured:v1",
        oci.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", show(&out));

    let out = d.hearth(&["run", "configured:v1"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        "image-env from /home/user as user\nfrom the second layer\n"
    );
    // A command given on the CLI replaces Cmd and keeps the Entrypoint.
    let out = d.hearth(&[
        "run",
        "--env",
        "MSG=cli",
        "configured:v1",
        "--",
        "echo $MSG",
    ]);
    assert_eq!(stdout(&out), "cli\n", "{}", show(&out));

    // The same image as a docker archive.
    let archive = tmp.path().join("image.tar");
    images::docker_archive(&archive, &cfg, &layers);
    let out = d.hearth(&[
        "image",
        "import",
        "--name",
        "from-archive",
        archive.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let out = d.hearth(&["run", "from-archive", "--", "cat /etc/marker"]);
    assert_eq!(stdout(&out), "from the second layer\n", "{}", show(&out));
}

#[test]
fn uname_reports_the_guest_kernel_not_the_hosts() {
    let d = Daemon::start();
    let out = d.hearth(&["run", "busybox", "--", "uname", "-r"]);
    assert!(out.status.success(), "{}", show(&out));
    let guest = stdout(&out).trim().to_string();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(guest.starts_with("6.1."), "guest kernel release: {guest:?}");
    assert_ne!(guest, host.trim());
}

#[test]
fn stdin_is_forwarded_to_the_workload() {
    let d = Daemon::start();
    let out = d.hearth_stdin(
        &["run", "busybox", "--", "sh", "-c", "tr a-z A-Z; echo done"],
        b"hello\nworld\n",
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "HELLO\nWORLD\ndone\n");
}

#[test]
fn fifty_megabytes_of_output_arrive_complete_and_in_order() {
    let d = Daemon::start();
    // Distinct lines, so a lost, duplicated or reordered chunk changes the bytes.
    let out = d.hearth(&["run", "busybox", "--", "sh", "-c", "seq 1 6400000"]);
    assert!(out.status.success(), "{}", show(&out));
    let expected: String = (1..=6_400_000u64).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 50_000_000);
    assert_eq!(out.stdout.len(), expected.len(), "byte count");
    assert!(out.stdout == expected.as_bytes(), "bytes differ");
}

#[test]
fn four_sandboxes_run_at_once() {
    let d = Daemon::start();
    let mut ids = Vec::new();
    for i in 0..4 {
        let out = d.hearth(&[
            "run",
            "-d",
            "--name",
            &format!("par{i}"),
            "busybox",
            "--",
            "sh",
            "-c",
            &format!("echo sandbox {i}; sleep 10; echo bye {i}"),
        ]);
        assert!(out.status.success(), "{}", show(&out));
        ids.push(stdout(&out).trim().to_string());
    }
    // `logs -f` streams until the sandbox ends.
    let out = d.hearth(&["logs", "-f", "par0"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "sandbox 0\nbye 0\n");
    for (i, id) in ids.iter().enumerate() {
        let out = d.hearth(&["wait", id]);
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        let out = d.hearth(&["logs", &format!("par{i}")]);
        assert_eq!(stdout(&out), format!("sandbox {i}\nbye {i}\n"));
    }
    // All four ran at the same time: each started before any finished.
    let recs: Vec<serde_json::Value> = ids.iter().map(|id| d.inspect(id)).collect();
    let last_start = recs
        .iter()
        .map(|r| r["started_ms"].as_u64().unwrap())
        .max()
        .unwrap();
    let first_end = recs
        .iter()
        .map(|r| r["finished_ms"].as_u64().unwrap())
        .min()
        .unwrap();
    assert!(
        last_start < first_end,
        "sandboxes did not overlap: {recs:?}"
    );
}

#[test]
fn exec_runs_in_a_detached_sandbox() {
    let d = Daemon::start();
    let out = d.hearth(&[
        "run",
        "-d",
        "--name",
        "bg",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo started | tee /tmp/state; exec sleep 100000",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until(
        "the workload's first output",
        Duration::from_secs(120),
        || stdout(&d.hearth(&["logs", "bg"])) == "started\n",
    );

    let out = d.hearth(&["exec", "bg", "--", "cat", "/tmp/state"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out), "started\n");

    let out = d.hearth(&["exec", "bg", "--", "sh", "-c", "echo err >&2; exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{}", show(&out));
    assert_eq!(stderr(&out), "err\n");

    let out = d.hearth_stdin(&["exec", "bg", "--", "wc", "-c"], &vec![b'x'; 300_000]);
    assert_eq!(stdout(&out).trim(), "300000", "{}", show(&out));

    let out = d.hearth(&[
        "exec",
        "--user",
        "nobody",
        "--workdir",
        "/tmp",
        "bg",
        "--",
        "sh",
        "-c",
        "id -u; pwd",
    ]);
    assert_eq!(stdout(&out), "65534\n/tmp\n", "{}", show(&out));

    let out = d.hearth(&["exec", "bg", "--", "nope"]);
    assert_eq!(out.status.code(), Some(127), "{}", show(&out));

    let out = d.hearth(&["rm", "-f", "bg"]);
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn rm_force_ends_a_workload_that_never_exits_and_leaves_nothing_behind() {
    let d = Daemon::start();
    let out = d.hearth(&["run", "-d", "busybox", "--", "sleep", "1000000"]);
    assert!(out.status.success(), "{}", show(&out));
    let id = stdout(&out).trim().to_string();
    wait_until("sandbox running", Duration::from_secs(120), || {
        d.inspect(&id)["status"] == "running"
    });
    let sandbox_dir = d.data_dir().join("sandboxes").join(&id);
    assert!(sandbox_dir.is_dir());
    assert_eq!(
        vmm_pids_under(&sandbox_dir).len(),
        1,
        "one QEMU runs the sandbox"
    );

    let out = d.hearth(&["rm", "busybox-not-an-id"]);
    assert_eq!(out.status.code(), Some(125));
    let out = d.hearth(&["rm", &id]);
    assert_eq!(
        out.status.code(),
        Some(125),
        "rm of a running sandbox needs -f: {}",
        show(&out)
    );
    assert!(stderr(&out).contains("rm -f"), "{}", show(&out));

    let out = d.hearth(&["rm", "-f", &id]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(vmm_pids_under(&sandbox_dir).is_empty(), "QEMU is gone");
    assert!(!sandbox_dir.exists(), "sandbox dir removed");
    let out = d.hearth(&["ps", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]");
}

#[test]
fn stop_terminates_the_workload() {
    let d = Daemon::start();
    let out = d.hearth(&[
        "run", "-d", "--name", "s", "busybox", "--", "sleep", "1000000",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("sandbox running", Duration::from_secs(120), || {
        d.inspect("s")["status"] == "running"
    });
    let out = d.hearth(&["stop", "s"]);
    assert!(out.status.success(), "{}", show(&out));
    let s = d.inspect("s");
    assert_eq!(s["status"], "stopped", "{s}");
    assert_eq!(s["exit"]["code"], 143, "SIGTERM ends sleep: {s}");
    assert!(vmm_pids_under(&d.data_dir().join("sandboxes")).is_empty());
}

/// The counter lines of a sandbox's output log, as numbers.
fn counter_lines(d: &Daemon, sandbox: &str) -> Vec<u64> {
    let out = d.hearth(&["logs", sandbox]);
    stdout(&out)
        .lines()
        .map(|l| {
            l.parse::<u64>()
                .unwrap_or_else(|_| panic!("not a counter line: {l:?}"))
        })
        .collect()
}

/// Panics unless `lines` is exactly 0, 1, 2, ... (no gap, no duplicate).
fn assert_gapless(lines: &[u64]) {
    for (i, n) in lines.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64,
            "counter line {i} is {n}: a gap or a duplicate around {:?}",
            &lines[i.saturating_sub(3)..(i + 3).min(lines.len())]
        );
    }
}

const COUNTER: &str = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done";

#[test]
fn kill_9_of_hearthd_re_adopts_the_running_sandbox_without_losing_or_doubling_output() {
    let mut d = Daemon::start();
    let out = d.hearth(&[
        "run", "-d", "--name", "counter", "busybox", "--", "sh", "-c", COUNTER,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("the counter at 10", Duration::from_secs(120), || {
        counter_lines(&d, "counter").len() > 10
    });
    let sandboxes = d.data_dir().join("sandboxes");
    let qemu = vmm_pids_under(&sandboxes);
    assert_eq!(qemu.len(), 1);

    let before = counter_lines(&d, "counter").len();
    d.kill9();
    // why: the point is output produced while no hearthd reads the channel.
    std::thread::sleep(Duration::from_secs(3));
    d.spawn();
    d.wait_recovered();

    let s = d.inspect("counter");
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(vmm_pids_under(&sandboxes), qemu, "the same QEMU runs on");
    wait_until(
        "the counter to go on past the restart",
        Duration::from_secs(60),
        || counter_lines(&d, "counter").len() > before + 40,
    );
    let out = d.hearth(&["exec", "counter", "--", "sh", "-c", "echo exec-ok; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(stdout(&out), "exec-ok\n");

    let out = d.hearth(&["stop", "counter"]);
    assert!(out.status.success(), "{}", show(&out));
    let s = d.inspect("counter");
    assert_eq!(s["status"], "stopped", "{s}");
    assert_eq!(s["exit"]["code"], 143, "SIGTERM ends the shell: {s}");
    assert!(vmm_pids_under(&sandboxes).is_empty(), "QEMU is gone");
    let lines = counter_lines(&d, "counter");
    assert!(lines.len() > before + 40, "{} lines", lines.len());
    assert_gapless(&lines);
}

#[test]
fn workload_that_exits_while_hearthd_is_down_reports_its_code_after_restart() {
    let mut d = Daemon::start();
    let out = d.hearth(&[
        "run",
        "-d",
        "--name",
        "seven",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo start; sleep 3; seq 1 3000; echo bye >&2; exit 7",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until(
        "the workload's first line",
        Duration::from_secs(120),
        || stdout(&d.hearth(&["logs", "seven"])) == "start\n",
    );
    d.kill9();
    let vm_log = d.data_dir().join("sandboxes");
    // why: the workload must end while no hearthd runs (it sleeps 3s first).
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(vmm_pids_under(&vm_log).len(), 1, "the VM outlives hearthd");
    d.spawn();

    let out = d.hearth(&["wait", "seven"]);
    assert_eq!(out.status.code(), Some(7), "{}", show(&out));
    let s = d.inspect("seven");
    assert_eq!(s["status"], "exited", "{s}");
    assert_eq!(s["exit"]["code"], 7, "{s}");
    let out = d.hearth(&["logs", "seven"]);
    let want: String = std::iter::once("start".to_string())
        .chain((1..=3000).map(|i| i.to_string()))
        .map(|l| l + "\n")
        .collect();
    assert_eq!(stdout(&out), want, "complete output, once");
    assert_eq!(stderr(&out), "bye\n");
    assert!(vmm_pids_under(&vm_log).is_empty(), "QEMU is gone");
}

#[test]
fn vm_that_died_while_hearthd_was_down_is_reported_lost_and_leaves_nothing() {
    let mut d = Daemon::start();
    let out = d.hearth(&[
        "run", "-d", "--name", "victim", "busybox", "--", "sleep", "1000000",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("sandbox running", Duration::from_secs(120), || {
        d.inspect("victim")["status"] == "running"
    });
    let sandboxes = d.data_dir().join("sandboxes");
    let pids = vmm_pids_under(&sandboxes);
    assert_eq!(pids.len(), 1);

    d.kill9();
    // SAFETY: kill(2) on the QEMU this test's daemon started.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    wait_until("QEMU gone", Duration::from_secs(10), || {
        vmm_pids_under(&sandboxes).is_empty()
    });
    d.spawn();
    d.wait_recovered();
    let s = d.inspect("victim");
    assert_eq!(s["status"], "lost", "{s}");
    let err = s["error"].as_str().unwrap_or("");
    assert!(err.contains("ended while hearthd was down"), "{s}");
    assert!(vmm_pids_under(&sandboxes).is_empty(), "no QEMU orphaned");
    let out = d.hearth(&["wait", "victim"]);
    assert_eq!(out.status.code(), Some(125), "{}", show(&out));
    let out = d.hearth(&["rm", "victim"]);
    assert!(out.status.success(), "{}", show(&out));
}

/// The QEMU pid of the one VM under `dir`.
fn only_vm(dir: &std::path::Path) -> i32 {
    let pids = vmm_pids_under(dir);
    assert_eq!(pids.len(), 1, "{pids:?}");
    pids[0]
}

#[test]
fn exit_code_is_kept_when_hearthd_dies_while_shutting_the_vm_down() {
    let mut d = Daemon::start();
    let out = d.hearth(&[
        "run",
        "-d",
        "--name",
        "late",
        "busybox",
        "--",
        "sh",
        "-c",
        // why: a mount inside the root keeps the guest's power-off busy for its
        // 2 s unmount retries, so the teardown (outcome saved, power-off not
        // done) lasts long enough to be caught; a quick power-off would
        // otherwise finish between two polls.
        "mkdir -p /busy && mount -t tmpfs busy /busy && echo up; sleep 4; exit 7",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let id = stdout(&out).trim().to_string();
    wait_until(
        "the workload's first line",
        Duration::from_secs(120),
        || stdout(&d.hearth(&["logs", "late"])) == "up\n",
    );
    let dir = d.data_dir().join("sandboxes").join(&id);
    let qemu = only_vm(&dir);
    // The teardown saves the outcome before it asks the guest to power off;
    // freeze the VM right then so the teardown cannot finish, and kill hearthd
    // in the middle of it (it waits 5 s for the power-off).
    wait_until("the teardown to begin", Duration::from_secs(60), || {
        dir.join("outcome.json").exists()
    });
    // SAFETY: kill(2) on the QEMU this test's daemon started.
    unsafe { libc::kill(qemu, libc::SIGSTOP) };
    d.kill9();
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sandbox.json")).unwrap()).unwrap();
    assert_eq!(
        stored["status"], "running",
        "hearthd died before it recorded the end: {stored}"
    );
    // The VM goes away while no hearthd runs.
    // SAFETY: as above.
    unsafe { libc::kill(qemu, libc::SIGKILL) };
    wait_until("QEMU gone", Duration::from_secs(10), || {
        vmm_pids_under(&dir).is_empty()
    });
    d.spawn();
    let out = d.hearth(&["wait", "late"]);
    assert_eq!(out.status.code(), Some(7), "{}", show(&out));
    let s = d.inspect("late");
    assert_eq!(s["status"], "exited", "{s}");
    assert_eq!(s["exit"]["code"], 7, "{s}");
    assert_eq!(stdout(&d.hearth(&["logs", "late"])), "up\n");
    assert!(
        !dir.join("outcome.json").exists(),
        "the saved outcome is consumed"
    );
    let out = d.hearth(&["rm", "late"]);
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn the_api_serves_while_a_restarted_hearthd_recovers_a_sandbox() {
    let mut d = Daemon::start();
    let out = d.hearth(&[
        "run", "-d", "--name", "slow", "busybox", "--", "sh", "-c", COUNTER,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("the counter at 5", Duration::from_secs(120), || {
        counter_lines(&d, "slow").len() > 5
    });
    let sandboxes = d.data_dir().join("sandboxes");
    let qemu = only_vm(&sandboxes);
    d.kill9();
    // A frozen VM cannot answer the take-over, so recovering it takes as long
    // as it stays frozen.
    // SAFETY: kill(2) on the QEMU this test's daemon started.
    unsafe { libc::kill(qemu, libc::SIGSTOP) };
    d.spawn();
    let s = d.inspect("slow");
    assert_eq!(s["status"], "recovering", "{s}");
    let out = d.hearth(&["ps"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(stdout(&out).contains("recovering"), "{}", show(&out));
    // SAFETY: as above.
    unsafe { libc::kill(qemu, libc::SIGCONT) };
    // An exec waits for the recovery and then runs.
    let out = d.hearth(&["exec", "slow", "--", "echo", "after"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "after\n");
    assert_eq!(d.inspect("slow")["status"], "running");
    let before = counter_lines(&d, "slow").len();
    wait_until("the counter to go on", Duration::from_secs(60), || {
        counter_lines(&d, "slow").len() > before + 10
    });
    assert_gapless(&counter_lines(&d, "slow"));
    let out = d.hearth(&["rm", "-f", "slow"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(vmm_pids_under(&sandboxes).is_empty());
}

#[test]
fn vm_killed_from_outside_is_reported_and_the_cli_does_not_hang() {
    let d = Daemon::start();
    let child = d
        .cmd(&[
            "run",
            "busybox",
            "--",
            "sh",
            "-c",
            "echo up; exec sleep 1000000",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sandboxes = d.data_dir().join("sandboxes");
    wait_until("a running sandbox", Duration::from_secs(120), || {
        let out = d.hearth(&["ps", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|v| v[0]["status"] == "running")
            .unwrap_or(false)
    });
    let pids = vmm_pids_under(&sandboxes);
    assert_eq!(pids.len(), 1);
    // SAFETY: kill(2) on the QEMU pid found above.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", show(&out));
    assert!(stderr(&out).contains("VM exited"), "{}", show(&out));
    let out = d.hearth(&["ps", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["status"], "failed");
}

#[test]
fn bad_inputs_get_clear_errors_and_leave_nothing_behind() {
    let d = Daemon::start();
    let check = |args: &[&str], needle: &str| {
        let out = d.hearth(args);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {}", show(&out));
        assert!(
            stderr(&out).contains(needle),
            "{args:?} should mention {needle:?}: {}",
            show(&out)
        );
    };
    check(&["run", "no-such-image", "--", "true"], "no-such-image");
    // An imported directory has no Entrypoint or Cmd.
    check(&["run", "busybox"], "neither Entrypoint nor Cmd");
    check(
        &["run", "--memory", "16", "busybox", "--", "true"],
        "memory 16 MiB",
    );
    check(
        &["run", "--memory", "99999999", "busybox", "--", "true"],
        "out of range",
    );
    check(&["run", "--cpus", "0", "busybox", "--", "true"], "cpus 0");
    check(
        &["run", "--name", "bad/name", "busybox", "--", "true"],
        "name",
    );
    check(&["exec", "nothing-here", "--", "true"], "not found");
    let out = d.hearth(&["ps", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]", "no sandbox was created");
    assert!(vmm_pids_under(d.data.path()).is_empty());

    // The API answers malformed requests with 4xx JSON errors, never 5xx.
    for (method, path, body) in [
        ("POST", "/v1/sandboxes", "{not json"),
        (
            "POST",
            "/v1/sandboxes",
            r#"{"image":"busybox","cmd":["true"],"bogus":1}"#,
        ),
        (
            "POST",
            "/v1/sandboxes",
            r#"{"image":"busybox","cpus":"two"}"#,
        ),
        (
            "POST",
            "/v1/sandboxes",
            r#"{"image":"busybox","memory_mib":-5}"#,
        ),
        ("POST", "/v1/sandboxes", ""),
        ("GET", "/v1/sandboxes/nope", ""),
        ("DELETE", "/v1/sandboxes/nope?force=maybe", ""),
        ("POST", "/v1/sandboxes/x/execs/notanumber/stdin", ""),
        ("GET", "/v1/no-such-route", ""),
    ] {
        let (status, resp) = d.http(method, path, Some(body)).unwrap();
        assert!(
            (400..500).contains(&status),
            "{method} {path} {body} -> {status} {resp}"
        );
        let v: serde_json::Value = serde_json::from_str(&resp)
            .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {resp}"));
        assert!(v["code"].is_string() && v["message"].is_string(), "{resp}");
    }
}

#[test]
fn info_and_openapi_describe_the_node() {
    let d = Daemon::start_with(DaemonOptions {
        accel: "auto".into(),
        busybox: false,
        ..Default::default()
    });
    let out = d.hearth(&["info", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["backend"], "qemu");
    let accel = info["accel"].as_str().unwrap();
    assert!(accel == "kvm" || accel == "tcg", "{info}");
    assert_eq!(info["hardware_isolation"], accel == "kvm");
    assert!(!info["accel_reason"].as_str().unwrap().is_empty());
    assert!(
        info["backend_version"].as_str().unwrap().contains("QEMU")
            || info["backend_version"].as_str().unwrap().contains('.')
    );
    let out = d.hearth(&["info"]);
    assert!(stdout(&out).contains("accelerator:"), "{}", show(&out));

    // The API wants its token; the OpenAPI document is public.
    for token in [None, Some("not-the-token-at-all")] {
        let (status, body) = d.http_as(token, "GET", "/v1/sandboxes", None).unwrap();
        assert_eq!(status, 401, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], "unauthorized");
    }
    let out = d
        .cmd(&["ps"])
        .env("HEARTH_TOKEN", "wrong-token-wrong-token")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("API token"), "{}", show(&out));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.data_dir().join("api-token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "api-token is private");
    let (status, body) = d.http_as(None, "GET", "/openapi.json", None).unwrap();
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/v1/sandboxes",
        "/v1/sandboxes/{id}/exec",
        "/v1/images/import",
    ] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    assert!(doc["components"]["schemas"]["CreateSandbox"].is_object());
}

#[test]
fn ctrl_c_on_run_reaches_the_workload() {
    let d = Daemon::start();
    let child = d
        .cmd(&[
            "run",
            "busybox",
            "--",
            "sh",
            "-c",
            "trap 'echo got INT; exit 42' INT; echo waiting; while true; do sleep 1; done",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the workload to start", Duration::from_secs(120), || {
        let out = d.hearth(&["ps", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v[0]["id"]
            .as_str()
            .is_some_and(|id| stdout(&d.hearth(&["logs", id])) == "waiting\n")
    });
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(42), "{}", show(&out));
    assert_eq!(stdout(&out), "waiting\ngot INT\n");
}

#[test]
fn hung_guest_is_detected_and_reported() {
    let d = Daemon::start_with(DaemonOptions {
        extra_args: vec!["--guest-watchdog-secs".into(), "3".into()],
        ..Default::default()
    });
    let out = d.hearth(&[
        "run", "-d", "--name", "frozen", "busybox", "--", "sleep", "1000000",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("sandbox running", Duration::from_secs(120), || {
        d.inspect("frozen")["status"] == "running"
    });
    let pids = vmm_pids_under(&d.data_dir().join("sandboxes"));
    assert_eq!(pids.len(), 1);
    // Freeze the whole VM: to the host the guest is hung.
    // SAFETY: kill(2) on the QEMU pid found above.
    unsafe { libc::kill(pids[0], libc::SIGSTOP) };
    wait_until("the hang to be reported", Duration::from_secs(60), || {
        d.inspect("frozen")["status"] == "failed"
    });
    let s = d.inspect("frozen");
    assert!(s["error"].as_str().unwrap_or("").contains("hung"), "{s}");
    assert!(
        vmm_pids_under(&d.data_dir().join("sandboxes")).is_empty(),
        "the hung VM was killed"
    );
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused_and_harms_nothing() {
    let d = Daemon::start();
    let out = d.hearth(&[
        "run", "-d", "--name", "keep", "busybox", "--", "sleep", "1000000",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("sandbox running", Duration::from_secs(120), || {
        d.inspect("keep")["status"] == "running"
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(hearth_e2e::bin_dir().join("hearthd"))
        .args(["dev", "--accel", "tcg", "--data-dir"])
        .arg(d.data_dir())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in use by another hearthd"),
        "{}",
        show(&out)
    );
    assert_eq!(
        d.inspect("keep")["status"],
        "running",
        "the first daemon's sandbox is untouched"
    );
    let out = d.hearth(&["exec", "keep", "--", "true"]);
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn sigterm_stops_hearthd_promptly_even_with_attached_clients() {
    let mut d = Daemon::start();
    let client = d
        .cmd(&[
            "run",
            "--name",
            "chatty",
            "busybox",
            "--",
            "sh",
            "-c",
            "while true; do echo tick; sleep 1; done",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("output to flow", Duration::from_secs(120), || {
        stdout(&d.hearth(&["logs", "chatty"])).starts_with("tick")
    });
    let mut daemon = d.child.take().unwrap();
    // SAFETY: kill(2) on the hearthd child we started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = daemon.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "hearthd still running 5s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let out = client.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(125),
        "the CLI reports the lost connection: {}",
        show(&out)
    );
    // Restarted, it re-adopts the sandbox, whose VM ran on meanwhile.
    let qemu = vmm_pids_under(d.data.path());
    assert_eq!(qemu.len(), 1, "the VM outlives hearthd");
    d.spawn();
    d.wait_recovered();
    assert_eq!(d.inspect("chatty")["status"], "running");
    assert_eq!(vmm_pids_under(d.data.path()), qemu);
    let out = d.hearth(&["rm", "-f", "chatty"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(vmm_pids_under(d.data.path()).is_empty());
}

#[test]
fn a_name_cannot_shadow_another_sandboxes_id() {
    let d = Daemon::start();
    let out = d.hearth(&["run", "-d", "busybox", "--", "sleep", "1000000"]);
    let id = stdout(&out).trim().to_string();
    let out = d.hearth(&["run", "-d", "--name", &id, "busybox", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", show(&out));
    assert!(stderr(&out).contains("already exists"), "{}", show(&out));
    let out = d.hearth(&["rm", "-f", &id]);
    assert!(out.status.success(), "{}", show(&out));
}

/// `hearthd dev` is a one-node cluster: its sandboxes are records in its
/// embedded control plane, placed on its node before they start, kept up to
/// date by its agent's heartbeats, and removed with the sandbox.
#[test]
fn dev_sandboxes_are_records_of_the_embedded_control_plane() {
    let d = Daemon::start();
    let node = || {
        let (status, body) = d.http("GET", "/v1/nodes/local", None).expect("node");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("node json")
    };
    let out = d.hearth(&[
        "run", "-d", "--cpus", "2", "busybox", "--", "sleep", "1000000",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let id = stdout(&out).trim().to_string();
    let n = node();
    assert_eq!(
        n["sandboxes"], 1,
        "placed on the node before it starts: {n}"
    );
    assert_eq!(n["allocated"]["cpus"], 2, "{n}");

    // A create the node refuses leaves no record.
    let out = d.hearth(&["run", "-d", "no-such-image", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", show(&out));
    assert_eq!(node()["sandboxes"], 1);

    // What the agent observes reaches the record by its heartbeats: once the
    // workload ends, the record no longer holds the node's room.
    let out = d.hearth(&["run", "-d", "busybox", "--", "true"]);
    assert!(out.status.success(), "{}", show(&out));
    let short = stdout(&out).trim().to_string();
    wait_until(
        "the ended sandbox's record releases its room",
        Duration::from_secs(120),
        || d.inspect(&short)["status"] == "exited" && node()["sandboxes"] == 1,
    );

    let out = d.hearth(&["rm", "-f", &id]);
    assert!(out.status.success(), "{}", show(&out));
    let out = d.hearth(&["rm", &short]);
    assert!(out.status.success(), "{}", show(&out));
    let n = node();
    assert_eq!(n["sandboxes"], 0, "{n}");
    assert_eq!(n["allocated"]["cpus"], 0, "{n}");
}
