//! Live migration driven by the control plane on the dev shard
//! (scripts/shard): `hearth migrate SANDBOX --to NODE|auto`, the refusals,
//! `hearth node drain`, and a target agent killed mid-transfer. Agents live
//! in their own network namespaces; the CLI talks to a control-plane member.
//! The tests share one shard and take turns ([`SERIAL`]). Needs root and
//! iproute2; skipped (with a message) otherwise.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hearth_e2e::{show, stdout, vmm_pids_under, wait_until};

const NAME: &str = "hsm";
const NET: &str = "10.77.203";
const TOKEN: &str = "hearth-e2e-shard-migrate-token-0123";
/// Every test here brings up the one shard `NAME`; they take turns (held for
/// the whole test, shard down included).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
const COUNTER: &str = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done";

fn shard(args: &[&str]) -> Output {
    Command::new(hearth_e2e::repo_root().join("scripts/shard"))
        .args(args)
        .env("HEARTH_SHARD", NAME)
        .env("HEARTH_SHARD_NET", NET)
        .env("HEARTH_BIN_DIR", hearth_e2e::bin_dir())
        // why: long enough that an agent the networked test kills and starts
        // again heartbeats before its node is NotReady (its sandboxes would be
        // marked lost and fenced: a CI run under load took longer than 2 s);
        // the NotReady test waits for it (wait_node allows 30 s).
        .env("HEARTH_SHARD_NODE_TIMEOUT_MS", "10000")
        .env("HEARTH_TOKEN", TOKEN)
        .output()
        .expect("run scripts/shard")
}

struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        shard(&["down"]);
    }
}

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The control member (its port) the tests' API and CLI calls go to: member
/// 1 unless a test killed it.
static MEMBER_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(7101);

fn member() -> String {
    let port = MEMBER_PORT.load(std::sync::atomic::Ordering::SeqCst);
    format!("http://{NET}.1:{port}")
}

/// `hearth ARGS` against the control member of [`member`].
fn hearth_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(hearth_e2e::bin_dir().join("hearth"));
    c.env("HEARTH_API", member())
        .env("HEARTH_TOKEN", TOKEN)
        .args(args)
        .stdin(Stdio::null());
    c
}

fn hearth(args: &[&str]) -> Output {
    hearth_cmd(args).output().expect("run hearth")
}

/// `hearth ARGS` against control member `port` (not [`member`]'s).
fn hearth_via(port: u16, args: &[&str]) -> Output {
    hearth_cmd(args)
        .env("HEARTH_API", format!("http://{NET}.1:{port}"))
        .output()
        .expect("run hearth")
}

/// A call to `base` (a control member or an agent) with the cluster token.
fn call(
    base: &str,
    path: &str,
    method: &str,
    body: Option<&str>,
    secs: u32,
) -> (u16, serde_json::Value) {
    let secs = secs.to_string();
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        &secs,
        "-X",
        method,
        "-H",
        "content-type: application/json",
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(b) = body {
        c.args(["--data", b]);
    }
    let out = c.arg(format!("{base}{path}")).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn api(path: &str, method: &str, body: Option<&str>, secs: u32) -> (u16, serde_json::Value) {
    call(&member(), path, method, body, secs)
}

/// The sandboxes agent `i`'s own node API lists.
fn on_agent(i: u32) -> Vec<serde_json::Value> {
    let (code, v) = call(
        &format!("http://{NET}.{}:7070", 10 + i),
        "/v1/sandboxes",
        "GET",
        None,
        5,
    );
    assert_eq!(code, 200, "agent{i}: {v}");
    v.as_array().cloned().unwrap_or_default()
}

/// Agent `i`'s copy of record `id` (agents know it by their own id; the owner
/// tag `CLUSTER/ID@GENERATION` names the record).
fn agent_has(i: u32, id: &str) -> Option<serde_json::Value> {
    on_agent(i).into_iter().find(|s| owned_by(s, id))
}

/// `copy` (an agent's sandbox) runs for record `id`: its owner tag is
/// `CLUSTER/ID@GENERATION`, or `ID@GENERATION` before the cluster has an id
/// (a sandbox created right after the shard came up).
fn owned_by(copy: &serde_json::Value, id: &str) -> bool {
    let tag = format!("{id}@");
    copy["owner"]
        .as_str()
        .and_then(|o| o.rsplit('/').next())
        .is_some_and(|t| t.starts_with(&tag))
}

/// Agent `i`'s copy of record `id`, waited for (a loaded node answers its list
/// late); on a timeout the message shows every agent's list and the record.
fn agent_copy(i: u32, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(copy) = agent_has(i, id) {
            return copy;
        }
        if Instant::now() > deadline {
            // why: diagnostics only; an agent that does not answer is shown, not asserted.
            let lists: Vec<_> = (1..=3)
                .map(|a| {
                    let (code, v) = call(
                        &format!("http://{NET}.{}:7070", 10 + a),
                        "/v1/sandboxes",
                        "GET",
                        None,
                        5,
                    );
                    format!("agent{a}: {code} {v}")
                })
                .collect();
            let ps = Command::new("sh")
                .args([
                    "-c",
                    "ps -eo pid,etimes,args | grep '[h]earthd' | cut -c1-200; ip netns list",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            panic!(
                "agent{i} has no copy of {id} after 30 s; record {}\n{}\n{ps}",
                api(&format!("/v1/sandboxes/{id}"), "GET", None, 10).1,
                lists.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sandbox(id: &str) -> serde_json::Value {
    let (code, sb) = api(&format!("/v1/sandboxes/{id}"), "GET", None, 10);
    assert_eq!(code, 200, "{sb}");
    sb
}

fn node(id: &str) -> serde_json::Value {
    api(&format!("/v1/nodes/{id}"), "GET", None, 10).1
}

fn wait_node(id: &str, status: &str) {
    wait_until(
        &format!("node {id} to be {status}"),
        Duration::from_secs(30),
        || node(id)["status"] == status,
    );
}

/// Starts `cmd` on `node` of the 3 agents, with or without a network, and
/// waits until it runs. The other nodes are cordoned meanwhile (a selector
/// would pin it: migrations respect selectors).
fn create_on(node: &str, name: &str, cmd: &str, network: bool) -> String {
    let others: Vec<String> = (1..=3)
        .map(|i| format!("agent{i}"))
        .filter(|n| n != node)
        .collect();
    for n in &others {
        let (code, v) = api(&format!("/v1/nodes/{n}/cordon"), "POST", None, 10);
        assert_eq!(code, 200, "{v}");
    }
    let mut body = serde_json::json!({
        "image": "busybox",
        "cmd": ["sh", "-c", cmd],
        "memory_mib": 128,
        "name": name,
    });
    if !network {
        body["network"] = serde_json::json!({"mode": "none"});
    }
    let (code, sb) = api("/v1/sandboxes", "POST", Some(&body.to_string()), 300);
    for n in &others {
        let (code, v) = api(&format!("/v1/nodes/{n}/uncordon"), "POST", None, 10);
        assert_eq!(code, 200, "{v}");
    }
    assert_eq!(code, 201, "{sb}");
    assert_eq!(sb["node"], node, "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    // why: the record (what migrations are checked against) learns it from a heartbeat.
    wait_until(
        &format!("the record of sandbox {name} to say running"),
        Duration::from_secs(180),
        || {
            let (_, all) = api("/v1/sandboxes", "GET", None, 10);
            all.as_array()
                .is_some_and(|a| a.iter().any(|s| s["id"] == id && s["status"] == "running"))
        },
    );
    id
}

/// The counter values in the sandbox's output log, read through the control plane.
fn counted(name: &str) -> Vec<u64> {
    stdout(&hearth(&["logs", name]))
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn assert_contiguous_from_zero(v: &[u64]) {
    for (i, x) in v.iter().enumerate() {
        assert_eq!(*x, i as u64, "counter reset or gap at line {i}: {v:?}");
    }
}

/// Waits until the counter runs on and has never reset or skipped.
fn counter_goes_on(name: &str) {
    let n = counted(name).len();
    wait_until(
        &format!("counter {name} to go on"),
        Duration::from_secs(60),
        || counted(name).len() > n + 10,
    );
    assert_contiguous_from_zero(&counted(name));
}

fn status_json(name: &str) -> serde_json::Value {
    let out = hearth(&["migrate", "--status", "--json", name]);
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).expect("status json")
}

/// The pid of a shard process (`control1`, `agent2`, ...).
fn pid_of(what: &str) -> i32 {
    let state = std::fs::read_to_string(format!("/tmp/hearth-shard-{NAME}/state")).unwrap();
    state
        .lines()
        .find_map(|l| l.strip_prefix("pid ")?.strip_suffix(&format!(" {what}")))
        .unwrap_or_else(|| panic!("no pid for {what}: {state}"))
        .parse()
        .unwrap()
}

/// QEMU processes of the shard for the agent sandbox `id` (running or incoming).
fn qemus_of(id: &str) -> usize {
    let needle = format!("/sandboxes/{id}/");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("qemu-system") && c.contains(&needle) && c.contains(NAME))
        .count()
}

/// Takes this file's turn, brings up a shard of `agents` agents and imports
/// busybox everywhere. `None` (the test skips) without root.
fn shard_with_busybox(agents: u32) -> Option<(Down, std::sync::MutexGuard<'static, ()>)> {
    if !hearth_e2e::require(can_run(), "root and iproute2 (network namespaces)") {
        return None;
    }
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    MEMBER_PORT.store(7101, std::sync::atomic::Ordering::SeqCst);
    shard(&["down"]);
    let down = Down;
    let out = shard(&["up", "--agents", &agents.to_string()]);
    assert!(out.status.success(), "shard up: {}", show(&out));
    let rootfs = tempfile::tempdir().expect("tempdir");
    hearth_e2e::images::busybox_rootfs(rootfs.path());
    let body = serde_json::json!({"name": "busybox", "path": rootfs.path()});
    let (code, img) = api("/v1/images/import", "POST", Some(&body.to_string()), 300);
    assert!(
        code == 200 || code == 201,
        "import on every node: {code} {img}"
    );
    Some((down, serial))
}

fn refused(args: &[&str], needle: &str) {
    let out = hearth(args);
    assert!(
        !out.status.success(),
        "hearth {args:?} succeeded: {}",
        show(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(needle),
        "hearth {args:?}: want {needle:?} in: {}",
        show(&out)
    );
}

#[test]
fn a_counter_migrates_to_a_named_node_then_auto_and_bad_targets_are_refused() {
    let Some(_shard) = shard_with_busybox(3) else {
        return;
    };
    let id = create_on("agent1", "counter", COUNTER, false);
    wait_until("the counter to count", Duration::from_secs(60), || {
        counted("counter").len() >= 5
    });

    // Refusals, each naming the sandbox or node and what to do.
    refused(
        &["migrate", "counter", "--to", "agent1"],
        "already runs on node agent1",
    );
    refused(&["migrate", "counter", "--to", "agent9"], "no node agent9");
    let out = hearth(&["node", "cordon", "agent3"]);
    assert!(out.status.success(), "{}", show(&out));
    refused(
        &["migrate", "counter", "--to", "agent3"],
        "node agent3 is cordoned",
    );
    let out = hearth(&["node", "uncordon", "agent3"]);
    assert!(out.status.success(), "{}", show(&out));
    let veth = format!("{NAME}a3");
    let ip = |state: &str| {
        let o = Command::new("ip")
            .args(["link", "set", &veth, state])
            .output()
            .expect("ip link");
        assert!(o.status.success(), "{}", show(&o));
    };
    ip("down");
    wait_node("agent3", "not_ready");
    refused(
        &["migrate", "counter", "--to", "agent3"],
        "node agent3 is NotReady",
    );
    ip("up");
    wait_node("agent3", "ready");
    // why: it runs long enough for a heartbeat to show it running (create_on
    // waits for that) on a loaded host; 1 s was missed under load.
    let done = create_on("agent1", "done", "sleep 15; exit 0", false);
    // why: the record (what a migration is checked against) learns it from a heartbeat.
    wait_until(
        "the record of sandbox done to say exited",
        Duration::from_secs(90),
        || {
            let (_, all) = api("/v1/sandboxes", "GET", None, 10);
            all.as_array()
                .is_some_and(|a| a.iter().any(|s| s["id"] == done && s["status"] == "exited"))
        },
    );
    refused(&["migrate", "done", "--to", "agent2"], "not running");
    assert_eq!(sandbox(&id)["node"], "agent1", "a refusal moved it");

    // `hearth migrate --abort` (mig3): a slowed migration in pre-copy is
    // cancelled at its source through the control plane; the record ends
    // aborted, the sandbox runs on at agent1 with no gap, agent2 keeps
    // nothing, and a second abort is refused (nothing in progress).
    let slow = hearth_cmd(&[
        "migrate",
        "counter",
        "--to",
        "agent2",
        "--bandwidth-mib",
        "1",
        "--json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("hearth migrate");
    wait_until(
        "the migration to agent2 to be in pre-copy",
        Duration::from_secs(60),
        || {
            let out = hearth(&["migrate", "--status", "--json", "counter"]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .is_ok_and(|s| s["target"] == "agent2" && s["phase"] == "precopy")
        },
    );
    let out = hearth(&["migrate", "--abort", "--json", "counter"]);
    assert!(out.status.success(), "{}", show(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["phase"], "aborted", "{st}");
    assert!(
        st["error"]
            .as_str()
            .is_some_and(|e| e.contains("aborted on request") && e.contains("agent1")),
        "{st}"
    );
    let out = slow.wait_with_output().expect("hearth migrate");
    assert!(
        !out.status.success(),
        "the aborted migration succeeded: {}",
        show(&out)
    );
    let sb = sandbox(&id);
    assert_eq!(
        (&sb["node"], &sb["status"]),
        (&serde_json::json!("agent1"), &serde_json::json!("running")),
        "{sb}"
    );
    assert_eq!(status_json("counter")["phase"], "aborted");
    wait_until(
        "agent2 to keep nothing of the aborted migration",
        Duration::from_secs(60),
        || {
            agent_has(2, &id).is_none()
                && qemus_of(agent_copy(1, &id)["id"].as_str().unwrap_or_default()) == 1
        },
    );
    counter_goes_on("counter");
    refused(
        &["migrate", "--abort", "counter"],
        "no migration in progress",
    );

    // To a named node; a second migration meanwhile is refused. The first is
    // slowed (2 MiB/s) so the refusal is checked while it is still copying.
    // why the 3 s downtime budget: at 2 MiB/s a 100 ms budget fits 200 KiB,
    // less than one dirty disk chunk (QEMU tracks written blocks in 1 MiB
    // chunks; the counter writes its file) and barely an idle TCG guest's
    // timer-tick dirtying (160-1000 pages/s at 99% throttle; QEMU 7.2 sizes
    // the switch-over from the last 100 ms's measured bandwidth), so the
    // pre-copy sometimes gave up after 60 passes (three times in CI, at 1
    // and 2 MiB/s). This test is about the refusal, not the pause.
    let t = Instant::now();
    let first = hearth_cmd(&[
        "migrate",
        "counter",
        "--to",
        "agent2",
        "--bandwidth-mib",
        "2",
        "--downtime-ms",
        "3000",
        "--json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("hearth migrate");
    wait_until(
        "the migration to agent2 to be in progress",
        Duration::from_secs(30),
        || {
            let out = hearth(&["migrate", "--status", "--json", "counter"]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|s| {
                    s["target"] == "agent2"
                        && matches!(s["phase"].as_str(), Some("preparing" | "precopy"))
                })
        },
    );
    refused(
        &["migrate", "counter", "--to", "agent3"],
        "already migrating",
    );
    // why: the refusal must have met the active migration, not a finished one.
    let st = status_json("counter");
    assert!(
        matches!(st["phase"].as_str(), Some("preparing" | "precopy")),
        "the migration ended before the second one was refused, so the refusal proves nothing: {st}"
    );
    let out = first.wait_with_output().expect("hearth migrate");
    assert!(out.status.success(), "{}", show(&out));
    eprintln!("migrate --to agent2 took {:?}", t.elapsed());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["phase"], "completed", "{st}");
    assert_eq!(st["from"], "agent1", "{st}");
    // Across namespaces too, agent2 knew the stream by the address and port
    // agent1's offer named (its ticket check was the last a flood could evict).
    let log2 =
        std::fs::read_to_string(format!("/tmp/hearth-shard-{NAME}/agent2.log")).unwrap_or_default();
    assert!(
        log2.contains("the stream came from the source the offer named"),
        "agent2's log: {log2}"
    );

    // The placement moved; agent1 no longer has it, agent2 runs it with the new tag.
    let sb = sandbox(&id);
    assert_eq!(sb["node"], "agent2", "{sb}");
    assert_eq!(sb["status"], "running", "{sb}");
    assert!(
        agent_has(1, &id).is_none(),
        "agent1 still has it: {:?}",
        on_agent(1)
    );
    let there = agent_has(2, &id).expect("agent2 runs it");
    assert_eq!(there["status"], "running", "{there}");
    assert!(
        there["owner"]
            .as_str()
            .is_some_and(|o| o.ends_with(&format!("{id}@1"))),
        "{there}"
    );
    let st = status_json("counter");
    assert_eq!(
        (
            st["phase"].as_str(),
            st["from"].as_str(),
            st["target"].as_str()
        ),
        (Some("completed"), Some("agent1"), Some("agent2")),
        "{st}"
    );
    counter_goes_on("counter");
    // Several heartbeats later nothing fenced or lost it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sandbox(&id)["status"], "running");
    assert_eq!(
        agent_has(2, &id).expect("still on agent2")["status"],
        "running"
    );

    // auto picks another node.
    let out = hearth(&["migrate", "counter", "--to", "auto", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let to = st["target"].as_str().expect("target").to_string();
    assert!(to == "agent1" || to == "agent3", "auto picked {to}: {st}");
    assert_eq!(sandbox(&id)["node"], to.as_str());
    assert!(agent_has(2, &id).is_none(), "agent2 still has it");
    counter_goes_on("counter");
    let agent_id = there["id"].as_str().expect("agent id");
    assert_eq!(qemus_of(agent_id), 1, "copies of the counter");
}

/// The control plane's leader is killed (-9) while it records a live
/// migration in mid pre-copy: a surviving member takes over, and the
/// migration ends (completed or aborted, recorded through Raft) with the
/// sandbox running on exactly one node, the one its record names, its counter
/// going on without a reset or gap.
#[test]
fn a_migration_survives_the_control_plane_leader_being_killed_with_one_copy() {
    let Some(_shard) = shard_with_busybox(3) else {
        return;
    };
    let id = create_on("agent1", "fo", COUNTER, false);
    wait_until("the counter to count", Duration::from_secs(60), || {
        counted("fo").len() >= 5
    });
    let (code, cluster) = api("/v1/cluster", "GET", None, 10);
    assert_eq!(code, 200, "{cluster}");
    let leader = cluster["leader"].as_u64().expect("a leader");
    // The CLI asks the leader itself, so the member recording the move is the
    // one killed.
    MEMBER_PORT.store(7100 + leader as u16, std::sync::atomic::Ordering::SeqCst);
    // why the 3 s downtime budget: see the named-node test (at 2 MiB/s one
    // dirty 1 MiB disk chunk alone takes 500 ms).
    let cli = hearth_cmd(&[
        "migrate",
        "fo",
        "--to",
        "agent2",
        "--bandwidth-mib",
        "2",
        "--downtime-ms",
        "3000",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("hearth migrate");
    wait_until("pre-copy to start", Duration::from_secs(120), || {
        let out = hearth(&["migrate", "--status", "--json", "fo"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["phase"] == "precopy" && s["bytes_sent"].as_u64().unwrap_or(0) > 0)
    });
    // why: the leader read before the CLI call may have changed under load;
    // the member to kill is the one recording the migration now.
    let (code, cluster) = api("/v1/cluster", "GET", None, 10);
    assert_eq!(code, 200, "{cluster}");
    let leader = cluster["leader"].as_u64().unwrap_or(leader);
    let pid = pid_of(&format!("control{leader}"));
    // SAFETY: kill(2) on the pid of a shard control member this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let survivor = if leader == 1 { 2 } else { 1 };
    MEMBER_PORT.store(7100 + survivor, std::sync::atomic::Ordering::SeqCst);
    let out = cli.wait_with_output().expect("hearth migrate");
    eprintln!("hearth migrate (its member killed): {}", show(&out));

    // A new leader among the two others.
    wait_until("a new leader", Duration::from_secs(60), || {
        let (code, c) = api("/v1/cluster", "GET", None, 5);
        code == 200 && c["leader"].as_u64().is_some_and(|l| l != leader)
    });
    let ended = |s: &serde_json::Value| s["phase"] == "completed" || s["phase"] == "aborted";
    let mut last = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let out = hearth(&["migrate", "--status", "--json", "fo"]);
        if out.status.success() {
            last = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if ended(&last) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("migration after the leader's death: {last}");
    assert!(ended(&last), "the migration never ended: {last}");
    // Exactly one running copy, on the node the record names.
    wait_until("the record to say running", Duration::from_secs(60), || {
        sandbox(&id)["status"] == "running"
    });
    let rec = sandbox(&id);
    let want = rec["node"].as_str().expect("node").to_string();
    let expect_node = if last["phase"] == "completed" {
        "agent2"
    } else {
        "agent1"
    };
    assert_eq!(want, expect_node, "record {rec} vs migration {last}");
    wait_until(
        "one copy, on the recorded node",
        Duration::from_secs(60),
        || {
            let copies: Vec<u32> = (1..=3)
                .filter(|i| {
                    agent_has(*i, &id)
                        .is_some_and(|c| c["status"] == "running" || c["status"] == "paused")
                })
                .collect();
            copies == vec![want.trim_start_matches("agent").parse::<u32>().unwrap()]
        },
    );
    let copy = agent_copy(want.trim_start_matches("agent").parse().unwrap(), &id);
    assert_eq!(copy["status"], "running", "{copy}");
    // why: an agent lists only the copies it has records of; an incoming
    // QEMU orphaned by the leader's death would not be listed.
    let agent_id = copy["id"].as_str().expect("agent id").to_string();
    wait_until(
        "exactly one QEMU of the sandbox on the shard",
        Duration::from_secs(60),
        || qemus_of(&agent_id) == 1,
    );
    counter_goes_on("fo");
}

#[test]
fn drain_migrates_what_it_can_and_a_target_killed_mid_transfer_leaves_the_source_running() {
    let Some(_shard) = shard_with_busybox(3) else {
        return;
    };
    let id = create_on("agent1", "counter", COUNTER, false);
    let web = create_on("agent1", "web", "exec sleep 600", true);
    wait_until("the counter to count", Duration::from_secs(60), || {
        counted("counter").len() >= 5
    });

    // Drain, two at a time with a bandwidth cap and a downtime budget: the
    // counter and the networked sandbox move live. The drain runs in the
    // control plane: the CLI that started it is killed while it runs, and
    // `--status` follows it to the end.
    let mut cli = hearth_cmd(&[
        "node",
        "drain",
        "agent1",
        "--parallel",
        "2",
        "--bandwidth-mib",
        "8",
        "--downtime-ms",
        "1000",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("hearth node drain");
    let drain_status = || {
        let out = hearth(&["node", "drain", "agent1", "--status", "--json"]);
        assert!(out.status.success(), "{}", show(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("drain status json")
    };
    // why: until the CLI's request arrived, the member knows no drain (404).
    wait_until("a sandbox to be migrating", Duration::from_secs(60), || {
        let out = hearth(&["node", "drain", "agent1", "--status", "--json"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|d| {
                d["sandboxes"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|o| o["outcome"] == "migrating"))
            })
    });
    cli.kill().expect("kill the drain CLI");
    let _ = cli.wait();
    let d = drain_status();
    assert_eq!(
        d["state"], "running",
        "the drain ended before the CLI was killed: {d}"
    );
    refused(&["node", "drain", "agent1"], "is being drained already");
    // A cap that cannot send one written disk chunk within the default budget
    // is warned about before the request, as `hearth migrate` does.
    refused(
        &["node", "drain", "agent1", "--bandwidth-mib", "2"],
        "warning: at 2 MiB/s one written 1 MiB disk chunk takes 500 ms to send, more than the 100 ms downtime budget",
    );
    wait_until("the drain to finish", Duration::from_secs(180), || {
        drain_status()["state"] == "done"
    });
    let d = drain_status();
    eprintln!("drain: {d}");
    assert_eq!(d["params"]["parallel"], 2, "{d}");
    assert_eq!(d["params"]["max_bandwidth_mib"], 8, "{d}");
    assert_eq!(d["params"]["downtime_limit_ms"], 1000, "{d}");
    let outs = d["sandboxes"].as_array().expect("sandboxes").clone();
    assert_eq!(outs.len(), 2, "{d}");
    for o in &outs {
        assert_eq!(o["outcome"], "migrated", "{d}");
        assert!(o["bytes_sent"].as_u64() > Some(0), "{d}");
        // The cap: no move sent faster than 8 MiB/s (with slack for rounding).
        let took = o["finished_ms"].as_u64().unwrap() - o["started_ms"].as_u64().unwrap();
        let floor_ms = o["bytes_sent"].as_u64().unwrap() * 1000 / (10 << 20);
        assert!(took >= floor_ms, "{o} moved faster than the cap");
    }
    // Two at a time: the two migrations overlapped.
    let span = |o: &serde_json::Value| {
        (
            o["started_ms"].as_u64().unwrap(),
            o["finished_ms"].as_u64().unwrap(),
        )
    };
    let ((a0, a1), (b0, b1)) = (span(&outs[0]), span(&outs[1]));
    assert!(
        a0 < b1 && b0 < a1,
        "the migrations ran one after the other: {d}"
    );
    let out = hearth(&["node", "drain", "agent1", "--status"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        text.contains("drain of agent1: done")
            && text.contains("counter: migrated to agent")
            && text.contains("web: migrated to agent")
            && text.contains("still on agent1: []"),
        "{}",
        show(&out)
    );
    assert_eq!(node("agent1")["cordoned"], true);
    let to = sandbox(&id)["node"].as_str().expect("node").to_string();
    assert_ne!(to, "agent1");
    assert!(agent_has(1, &id).is_none(), "agent1 still has the counter");
    assert_ne!(sandbox(&web)["node"], "agent1");
    assert_eq!(sandbox(&web)["status"], "running");
    counter_goes_on("counter");

    // Removed where it was drained to: that node releases the lease in the
    // slice of agent1, which still holds it (a release across nodes).
    let web_ip = sandbox(&web)["network"]["ip"]
        .as_str()
        .expect("web's address")
        .to_string();
    let web_leases = leases_of(&web_ip);
    if web_leases.len() != 1 {
        // why: diagnostics only (seen once: no lease right after the drain);
        // the record, every lease and what the agents logged about leases.
        let logs: String = (1..=3)
            .map(|i| {
                let log = std::fs::read_to_string(format!("/tmp/hearth-shard-{NAME}/agent{i}.log"))
                    .unwrap_or_default();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("lease") || l.contains(&web_ip))
                    .collect();
                format!(
                    "--- agent{i} (lease lines) ---\n{}\n",
                    last_lines(&lines.join("\n"), 30)
                )
            })
            .collect();
        panic!(
            "web ({web_ip}) has {} leases after the drain: {web_leases:?}\nrecord {}\nall leases {}\n{logs}",
            web_leases.len(),
            sandbox(&web),
            api("/v1/leases", "GET", None, 10).1
        );
    }
    let out = hearth(&["rm", "-f", "web"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until(
        "web's lease to be released",
        Duration::from_secs(30),
        || leases_of(&web_ip).is_empty(),
    );

    // Kill the target agent mid-transfer: the source keeps the one copy.
    let (src, dst) = if to == "agent2" {
        ("agent2", "agent3")
    } else {
        ("agent3", "agent2")
    };
    let src_i: u32 = src[5..].parse().unwrap();
    let mig = hearth_cmd(&[
        "migrate",
        "counter",
        "--to",
        dst,
        "--bandwidth-mib",
        "1",
        "--json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("hearth migrate");
    wait_until("the transfer to start", Duration::from_secs(60), || {
        let s = status_json("counter");
        s["target"] == dst && s["phase"] == "precopy" && s["bytes_sent"].as_u64() > Some(0)
    });
    let pid = pid_of(dst);
    // SAFETY: kill(2) of a shard agent's pid this test read from the shard's state file.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let out = mig.wait_with_output().expect("hearth migrate");
    assert!(
        !out.status.success(),
        "migration to a killed agent succeeded: {}",
        show(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("keeps running on node {src}")),
        "{}",
        show(&out)
    );
    let st = status_json("counter");
    assert_eq!(st["phase"], "aborted", "{st}");
    let sb = sandbox(&id);
    assert_eq!(
        (sb["node"].as_str(), sb["status"].as_str()),
        (Some(src), Some("running")),
        "{sb}"
    );
    let copy = agent_has(src_i, &id).expect("the source runs it");
    assert_eq!(copy["status"], "running");
    let agent_id = copy["id"].as_str().expect("agent id").to_string();
    wait_until(
        "exactly one QEMU of the counter",
        Duration::from_secs(30),
        || qemus_of(&agent_id) == 1,
    );
    counter_goes_on("counter");

    // A drain stopped while its first migration runs: that one is aborted,
    // the second never starts, both run on where they were; the node stays
    // cordoned and the drain ends `stopped`.
    let idle = create_on(src, "idle", "exec sleep 600", false);
    let (code, v) = api("/v1/nodes/agent1/uncordon", "POST", None, 10);
    assert_eq!(code, 200, "{v}");
    let cli = hearth_cmd(&[
        "node",
        "drain",
        src,
        "--parallel",
        "1",
        "--bandwidth-mib",
        "1",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("hearth node drain");
    wait_until(
        "the drain's migration to send",
        Duration::from_secs(60),
        || {
            // why: a member that does not run the drain asks the one that does
            // (behind a load balancer any member may get the call).
            let out = hearth_via(7102, &["node", "drain", src, "--status", "--json"]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|d| {
                    d["sandboxes"].as_array().is_some_and(|a| {
                        a.iter().any(|o| {
                            o["outcome"] == "migrating"
                                && o["phase"] == "precopy"
                                && o["bytes_sent"].as_u64() > Some(0)
                        })
                    })
                })
        },
    );
    // why: exit 1: the node was not emptied (both still run there). Sent
    // to a member that does not run the drain: it passes the stop on.
    let out = hearth_via(7103, &["node", "drain", src, "--stop", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(d["state"], "stopped", "{d}");
    assert!(d["stop_requested_ms"].as_u64().is_some(), "{d}");
    let mut outcomes: Vec<&str> = d["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .map(|o| o["outcome"].as_str().unwrap_or("?"))
        .collect();
    outcomes.sort();
    assert_eq!(outcomes, ["skipped", "stopped"], "{d}");
    let drained = cli.wait_with_output().expect("hearth node drain");
    assert_eq!(drained.status.code(), Some(1), "{}", show(&drained));
    assert!(
        stdout(&drained).contains("not moved (the drain was stopped)"),
        "{}",
        show(&drained)
    );
    for (sid, name) in [(&id, "counter"), (&idle, "idle")] {
        let sb = sandbox(sid);
        assert_eq!(
            (sb["node"].as_str(), sb["status"].as_str()),
            (Some(src), Some("running")),
            "{name}: {sb}"
        );
    }
    assert_eq!(node(src)["cordoned"], true);
    wait_until(
        "exactly one QEMU of the counter after the stop",
        Duration::from_secs(30),
        || qemus_of(&agent_id) == 1,
    );
    assert!(agent_has(1, &id).is_none(), "agent1 kept an incoming copy");
    counter_goes_on("counter");
    refused(
        &["node", "drain", src, "--stop"],
        "no control-plane member runs a drain of node",
    );
}

/// A TCP listener in the shard's host namespace (on the bridge address) that
/// answers every connection with `allowed-ok` and records its peers.
struct Listener {
    port: u16,
    peers: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
}

fn listen() -> Listener {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind(format!("{NET}.1:0")).expect("bind");
    let port = l.local_addr().expect("addr").port();
    let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let p2 = peers.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            if let Ok(a) = s.peer_addr() {
                p2.lock().unwrap().push(a);
            }
            let mut s = s;
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nallowed-ok");
        }
    });
    Listener { port, peers }
}

impl Listener {
    fn peers(&self) -> Vec<std::net::SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// Connects from inside sandbox `name` to `NET.1:port`; the answer, if any.
fn egress_from(name: &str, port: u16) -> Output {
    hearth(&[
        "exec",
        name,
        "--",
        "sh",
        "-c",
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {NET}.1 {port}"),
    ])
}

/// One ingress request to `web`'s port 8080 from the shard's host namespace.
fn ingress_get(id: &str, token: &str) -> (u16, String) {
    let o = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", "-H"])
        .arg(format!("X-Hearth-Token: {token}"))
        .arg(format!("http://{NET}.1:7201/sandboxes/{id}/ports/8080/"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Network state of agent `i`'s namespace for a sandbox: its tap exists, a
/// route to `ip` exists.
fn net_on(i: u32, tap: &str, ip: &str) -> (bool, bool) {
    let ns = format!("{NAME}-a{i}");
    let tap_there = Command::new("ip")
        .args(["-n", &ns, "link", "show", tap])
        .output()
        .is_ok_and(|o| o.status.success());
    let route = Command::new("ip")
        .args(["-n", &ns, "route", "show", &format!("{ip}/32")])
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
        .unwrap_or(false);
    (tap_there, route)
}

fn leases_of(ip: &str) -> Vec<serde_json::Value> {
    let (code, v) = api("/v1/leases", "GET", None, 10);
    assert_eq!(code, 200, "{v}");
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l["ip"] == ip)
        .collect()
}

/// The QEMU command line agent `i` recorded for its sandbox `aid` (vm.json).
fn vm_argv(i: u32, aid: &str) -> String {
    let path = format!("/tmp/hearth-shard-{NAME}/agent{i}/sandboxes/{aid}/vm/vm.json");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
            .unwrap();
    rec["argv"]
        .as_array()
        .expect("argv")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Agent `i` runs sandbox `aid` with its network device directly on its tap
/// (`vnet_hdr=on`, no hub) and recorded that for its snapshots and restarts.
fn assert_direct_tap(i: u32, aid: &str) {
    let argv = vm_argv(i, aid);
    assert!(
        argv.contains("-netdev tap,id=net0,")
            && argv.contains("vnet_hdr=on")
            && !argv.contains("hubport"),
        "agent{i} {aid}: not directly on its tap: {argv}"
    );
    let path = format!("/tmp/hearth-shard-{NAME}/agent{i}/sandboxes/{aid}/workload.json");
    let w: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
            .unwrap();
    assert_eq!(
        (w["nic"].as_bool(), w["nic_mode"].as_str()),
        (Some(true), Some("tap")),
        "agent{i} {aid}: {w}"
    );
}

/// Snapshots agent `i`'s sandbox `aid` through that node's API as `name`:
/// `snapshot.json` says tap (format 2). Then forks it once there: the fork's
/// device is rebuilt on its own tap, it runs and answers on its own address;
/// fork and snapshots are removed again.
fn snapshot_and_fork_on(i: u32, aid: &str, name: &str) {
    let base = format!("http://{NET}.{}:7070", 10 + i);
    let body = serde_json::json!({ "name": name }).to_string();
    let (code, v) = call(
        &base,
        &format!("/v1/sandboxes/{aid}/snapshot"),
        "POST",
        Some(&body),
        120,
    );
    assert_eq!(code, 201, "snapshot on agent{i}: {v}");
    let path = format!("/tmp/hearth-shard-{NAME}/agent{i}/snapshots/{name}/snapshot.json");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
            .unwrap();
    assert_eq!(
        (
            meta["nic"].as_bool(),
            meta["nic_mode"].as_str(),
            meta["version"].as_u64()
        ),
        (Some(true), Some("tap"), Some(2)),
        "{meta}"
    );
    let (code, v) = call(
        &base,
        &format!("/v1/sandboxes/{aid}/fork"),
        "POST",
        Some(r#"{"count":1}"#),
        180,
    );
    assert_eq!(code, 201, "fork on agent{i}: {v}");
    let fork = v[0]["id"].as_str().expect("fork id").to_string();
    wait_until("the fork to run", Duration::from_secs(180), || {
        let (_, f) = call(&base, &format!("/v1/sandboxes/{fork}"), "GET", None, 10);
        assert_ne!(f["status"], "failed", "{f}");
        f["status"] == "running"
    });
    assert_direct_tap(i, &fork);
    let (_, f) = call(&base, &format!("/v1/sandboxes/{fork}"), "GET", None, 10);
    let fip = f["network"]["ip"].as_str().expect("fork ip").to_string();
    let (_, src) = call(&base, &format!("/v1/sandboxes/{aid}"), "GET", None, 10);
    assert_ne!(Some(fip.as_str()), src["network"]["ip"].as_str(), "{f}");
    let (code, v) = call(
        &base,
        &format!("/v1/sandboxes/{fork}?force=true"),
        "DELETE",
        None,
        60,
    );
    assert_eq!(code, 204, "{v}");
    let (code, v) = call(&base, &format!("/v1/snapshots/{name}"), "DELETE", None, 60);
    assert_eq!(code, 204, "{v}");
}

#[test]
fn a_networked_web_server_migrates_with_its_address_policy_and_ingress_and_a_failed_move_leaves_it_working(
) {
    let Some(_shard) = shard_with_busybox(2) else {
        return;
    };
    let allowed = listen();
    let denied = listen();
    // A web server and a counter, egress to `denied` blocked by its policy.
    let others = ["agent2"];
    for n in others {
        let (code, v) = api(&format!("/v1/nodes/{n}/cordon"), "POST", None, 10);
        assert_eq!(code, 200, "{v}");
    }
    let body = serde_json::json!({
        "image": "busybox",
        "cmd": ["sh", "-c", format!(
            "mkdir -p /www && echo hello-web > /www/index.html && httpd -p 8080 -h /www && {COUNTER}"
        )],
        "memory_mib": 128,
        "name": "web",
        "network": {"egress": {"default": "allow", "allow": [], "deny": [format!("{NET}.1/32:{}:tcp", denied.port)]}},
    });
    let (code, sb) = api("/v1/sandboxes", "POST", Some(&body.to_string()), 300);
    for n in others {
        let (code, v) = api(&format!("/v1/nodes/{n}/uncordon"), "POST", None, 10);
        assert_eq!(code, 200, "{v}");
    }
    assert_eq!(code, 201, "{sb}");
    assert_eq!(sb["node"], "agent1", "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    wait_until("web to run", Duration::from_secs(180), || {
        sandbox(&id)["status"] == "running"
    });
    let before = sandbox(&id);
    let net = before["network"].clone();
    let (ip, token) = (
        net["ip"].as_str().expect("ip").to_string(),
        net["ingress_token"].as_str().expect("token").to_string(),
    );
    let tap = net["tap"].as_str().expect("tap").to_string();
    wait_until(
        "the page through the ingress",
        Duration::from_secs(60),
        || ingress_get(&id, &token) == (200, "hello-web\n".into()),
    );
    wait_until("the counter to count", Duration::from_secs(60), || {
        counted("web").len() >= 5
    });
    // The policy holds on agent1: the allowed listener answers, the denied one is never reached.
    let out = egress_from("web", allowed.port);
    assert!(stdout(&out).contains("allowed-ok"), "{}", show(&out));
    assert!(
        allowed
            .peers()
            .iter()
            .all(|p| p.ip().to_string() == format!("{NET}.11")),
        "{:?}",
        allowed.peers()
    );
    let out = egress_from("web", denied.port);
    assert!(!stdout(&out).contains("allowed-ok"), "{}", show(&out));
    assert!(denied.peers().is_empty(), "{:?}", denied.peers());
    assert_eq!(leases_of(&ip).len(), 1, "{:?}", leases_of(&ip));
    // A cold boot: its device is directly on its tap (the layout that migrates).
    let aid1 = agent_copy(1, &id)["id"]
        .as_str()
        .expect("agent id")
        .to_string();
    assert_direct_tap(1, &aid1);

    // Poll the ingress URL from the host namespace while it moves to agent2.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, id2, token2) = (stop.clone(), id.clone(), token.clone());
    let poller = std::thread::spawn(move || {
        let mut results: Vec<(Instant, Duration, u16, String)> = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            let (code, body) = ingress_get(&id2, &token2);
            results.push((t, t.elapsed(), code, body));
            std::thread::sleep(Duration::from_millis(20));
        }
        results
    });
    let t = Instant::now();
    let out = hearth(&["migrate", "web", "--to", "agent2", "--json"]);
    let took = t.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = poller.join().expect("poller");
    assert!(out.status.success(), "{}", show(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["phase"], "completed", "{st}");
    let errors: Vec<_> = results
        .iter()
        .filter(|r| (r.2, r.3.as_str()) != (200, "hello-web\n"))
        .map(|r| format!("{} {}", r.2, r.3))
        .collect();
    // The longest time between the start of one successful request and the end of the next.
    let ok: Vec<_> = results.iter().filter(|r| r.2 == 200).collect();
    let stall = ok
        .windows(2)
        .map(|w| (w[1].0 + w[1].1).duration_since(w[0].0))
        .max()
        .unwrap_or_default();
    for r in results.iter().filter(|r| r.1 > Duration::from_millis(500)) {
        eprintln!(
            "slow ingress request at +{:?}: {:?} {} {}",
            r.0.saturating_duration_since(t),
            r.1,
            r.2,
            r.3.trim()
        );
    }
    eprintln!(
        "networked migration took {took:?} (downtime {} ms, handover {} ms); {} ingress requests during it, {} failed, longest stall {stall:?}",
        st["downtime_ms"], st["handover_ms"], results.len(), errors.len()
    );
    assert!(
        errors.is_empty(),
        "ingress errors during the move: {errors:?}"
    );
    assert!(ok.len() > 5, "too few requests to tell: {}", ok.len());
    assert!(stall < Duration::from_secs(3), "ingress stalled {stall:?}");

    // Same id, address, MAC and token, on agent2; the page and the counter go on.
    let after = sandbox(&id);
    assert_eq!(after["node"], "agent2", "{after}");
    assert_eq!(after["status"], "running", "{after}");
    for k in ["ip", "mac", "ingress_token"] {
        assert_eq!(after["network"][k], net[k], "{k}: {after}");
    }
    let out = hearth(&["inspect", "web"]);
    assert!(
        out.status.success() && stdout(&out).contains(&ip) && stdout(&out).contains("agent2"),
        "{}",
        show(&out)
    );
    assert_eq!(ingress_get(&id, &token), (200, "hello-web\n".into()));
    counter_goes_on("web");
    // agent1 kept nothing but the lease; agent2 has the tap and route.
    assert_eq!(
        net_on(1, &tap, &ip),
        (false, false),
        "agent1 kept its tap or route"
    );
    assert_eq!(
        net_on(2, &tap, &ip),
        (true, true),
        "agent2 has no tap or route"
    );
    assert_eq!(leases_of(&ip).len(), 1, "{:?}", leases_of(&ip));
    // The policy still holds on agent2, and egress now leaves through agent2.
    let out = egress_from("web", allowed.port);
    assert!(stdout(&out).contains("allowed-ok"), "{}", show(&out));
    assert_eq!(
        allowed.peers().last().map(|p| p.ip().to_string()),
        Some(format!("{NET}.12"))
    );
    let out = egress_from("web", denied.port);
    assert!(!stdout(&out).contains("allowed-ok"), "{}", show(&out));
    assert!(denied.peers().is_empty(), "{:?}", denied.peers());
    // agent2 built the incoming VM's device as agent1's was (on the tap
    // directly) and recorded it: a snapshot and a fork of it work there.
    let aid2 = agent_copy(2, &id)["id"]
        .as_str()
        .expect("agent id")
        .to_string();
    assert_direct_tap(2, &aid2);
    snapshot_and_fork_on(2, &aid2, "web-moved");
    counter_goes_on("web");

    // A move back that fails (agent1 killed mid-transfer) leaves it working on agent2.
    let mig = hearth_cmd(&[
        "migrate",
        "web",
        "--to",
        "agent1",
        "--bandwidth-mib",
        "1",
        "--json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("hearth migrate");
    wait_until("the transfer to start", Duration::from_secs(60), || {
        let s = status_json("web");
        s["target"] == "agent1" && s["phase"] == "precopy" && s["bytes_sent"].as_u64() > Some(0)
    });
    let pid = pid_of("agent1");
    let argv = argv_of(pid);
    kill_agent(pid);
    let out = mig.wait_with_output().expect("hearth migrate");
    assert!(!out.status.success(), "{}", show(&out));
    let sb = sandbox(&id);
    assert_eq!(
        (sb["node"].as_str(), sb["status"].as_str()),
        (Some("agent2"), Some("running")),
        "{sb}"
    );
    assert_eq!(ingress_get(&id, &token), (200, "hello-web\n".into()));
    assert_eq!(net_on(2, &tap, &ip), (true, true));
    let out = egress_from("web", allowed.port);
    assert!(stdout(&out).contains("allowed-ok"), "{}", show(&out));
    counter_goes_on("web");

    // agent1 starts again: it removes the tap of the aborted incoming VM but
    // keeps the lease of the sandbox that moved away (moved-leases.json).
    let mut again = spawn_agent(1, &argv, &[]);
    wait_until(
        "agent1 to remove the aborted incoming network",
        Duration::from_secs(30),
        || net_on(1, &tap, &ip) == (false, false),
    );
    assert_eq!(leases_of(&ip).len(), 1, "{:?}", leases_of(&ip));
    assert_eq!(ingress_get(&id, &token), (200, "hello-web\n".into()));

    // agent2 is killed and starts again with a workload.json as hearthd wrote
    // it before the mode was recorded (no `nic`, no `nic_mode`): it re-adopts
    // the migrated VM, reads its device off vm.json (direct tap), and records
    // that, so a snapshot and a fork of it still work there.
    let pid2 = pid_of("agent2");
    let argv2 = argv_of(pid2);
    kill_agent(pid2);
    let wpath = format!("/tmp/hearth-shard-{NAME}/agent2/sandboxes/{aid2}/workload.json");
    let mut w: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&wpath).expect("workload.json")).unwrap();
    let o = w.as_object_mut().expect("object");
    o.remove("nic");
    o.remove("nic_mode");
    std::fs::write(&wpath, serde_json::to_vec(&w).unwrap()).unwrap();
    let mut again2 = spawn_agent(2, &argv2, &[]);
    // why: the node may still read ready from before the kill; the agent's
    // own API answers once it has re-adopted what it runs.
    let readopt_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, v) = call(
            &format!("http://{NET}.12:7070"),
            "/v1/sandboxes",
            "GET",
            None,
            5,
        );
        let adopted = code == 200
            && v.as_array().is_some_and(|a| {
                a.iter()
                    .any(|s| owned_by(s, &id) && s["status"] == "running")
            });
        if adopted {
            break;
        }
        if Instant::now() > readopt_deadline {
            // why: diagnostics only (this wait failed twice in loaded CI runs
            // with nothing to go on): the agent's list, the record, its log.
            let tail = last_lines(&restart_log(2), 60);
            panic!(
                "agent2 did not re-adopt web ({id}, agent id {aid2}) within 120 s: \
                 agent2 answers {code} {v}\nrecord {}\n--- agent2 log (tail) ---\n{tail}",
                api(&format!("/v1/sandboxes/{id}"), "GET", None, 10).1
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // why: the control plane's record says recovering until agent2's next heartbeat.
    wait_until(
        "the page through the ingress after the restart",
        Duration::from_secs(60),
        || ingress_get(&id, &token) == (200, "hello-web\n".into()),
    );
    counter_goes_on("web");
    assert_direct_tap(2, &aid2);
    snapshot_and_fork_on(2, &aid2, "web-readopted");

    // Back home: agent1 takes an address of its own pool back (its own slice
    // leases it, as the control plane confirms), and agent2 keeps the lease
    // while it hands the sandbox over.
    let out = hearth(&["migrate", "web", "--to", "agent1", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    let sb = sandbox(&id);
    assert_eq!(
        (sb["node"].as_str(), sb["status"].as_str()),
        (Some("agent1"), Some("running")),
        "{sb}"
    );
    assert_eq!(ingress_get(&id, &token), (200, "hello-web\n".into()));
    counter_goes_on("web");
    assert_eq!(
        net_on(1, &tap, &ip),
        (true, true),
        "agent1 has no tap or route"
    );
    wait_until(
        "agent2 to remove the tap and route",
        Duration::from_secs(30),
        || net_on(2, &tap, &ip) == (false, false),
    );
    assert_eq!(leases_of(&ip).len(), 1, "{:?}", leases_of(&ip));

    // Removed on agent1: no tap or route there, and the lease is released.
    let out = hearth(&["rm", "-f", "web"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until(
        "agent1 to remove the tap and route",
        Duration::from_secs(30),
        || net_on(1, &tap, &ip) == (false, false),
    );
    wait_until("the lease to be released", Duration::from_secs(30), || {
        leases_of(&ip).is_empty()
    });
    let _ = again.kill();
    let _ = again.wait();
    let _ = again2.kill();
    let _ = again2.wait();
}

/// A networked sandbox that agent1 started from a template (its NIC on hub 0,
/// the tap joined to the hub) moves to agent2 with its address, MAC, policy
/// and counter; agent2 builds the same device shape and leaves agent1 with
/// no tap or route. The default `hearth run` path (a template exists) is a
/// restore, so this is the move most sandboxes take.
#[test]
fn a_networked_sandbox_started_from_a_template_migrates_with_its_address_and_policy() {
    let Some(_shard) = shard_with_busybox(2) else {
        return;
    };
    let allowed = listen();
    let denied = listen();
    let a1 = format!("http://{NET}.11:7070");
    let body = serde_json::json!({"image": "busybox", "name": "bbt", "memory_mib": 128});
    let (code, v) = call(&a1, "/v1/templates", "POST", Some(&body.to_string()), 300);
    assert_eq!(code, 201, "template on agent1: {v}");
    let (code, v) = api("/v1/nodes/agent2/cordon", "POST", None, 10);
    assert_eq!(code, 200, "{v}");
    let body = serde_json::json!({
        "image": "busybox",
        "cmd": ["sh", "-c", COUNTER],
        "memory_mib": 128,
        "name": "tpl",
        "network": {"egress": {"default": "allow", "allow": [], "deny": [format!("{NET}.1/32:{}:tcp", denied.port)]}},
    });
    let (code, sb) = api("/v1/sandboxes", "POST", Some(&body.to_string()), 300);
    let (c2, v) = api("/v1/nodes/agent2/uncordon", "POST", None, 10);
    assert_eq!(c2, 200, "{v}");
    assert_eq!(code, 201, "{sb}");
    assert_eq!(sb["node"], "agent1", "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    wait_until("tpl to run", Duration::from_secs(180), || {
        sandbox(&id)["status"] == "running"
    });
    let copy = agent_copy(1, &id);
    assert_eq!(copy["start_path"], "template", "{copy}");
    let aid1 = copy["id"].as_str().expect("agent id").to_string();
    let argv = vm_argv(1, &aid1);
    // why: a restore's tap is joined to hub 0 at run time (netdev_add), so
    // the launch argv names only the hub.
    assert!(
        argv.contains("-netdev hubport,id=net0,hubid=0"),
        "agent1's template restore is not on hub 0: {argv}"
    );
    let net = sandbox(&id)["network"].clone();
    let (ip, tap) = (
        net["ip"].as_str().expect("ip").to_string(),
        net["tap"].as_str().expect("tap").to_string(),
    );
    wait_until("the counter to count", Duration::from_secs(60), || {
        counted("tpl").len() >= 5
    });
    let out = egress_from("tpl", allowed.port);
    assert!(stdout(&out).contains("allowed-ok"), "{}", show(&out));
    let out = egress_from("tpl", denied.port);
    assert!(!stdout(&out).contains("allowed-ok"), "{}", show(&out));

    let out = hearth(&["migrate", "tpl", "--to", "agent2", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["phase"], "completed", "{st}");
    eprintln!(
        "template-started networked migration: downtime {} ms, paused {} ms, handover {} ms; {st}",
        st["downtime_ms"], st["paused_ms"], st["handover_ms"]
    );
    let after = sandbox(&id);
    assert_eq!(
        (after["node"].as_str(), after["status"].as_str()),
        (Some("agent2"), Some("running")),
        "{after}"
    );
    for k in ["ip", "mac"] {
        assert_eq!(after["network"][k], net[k], "{k}: {after}");
    }
    counter_goes_on("tpl");
    let aid2 = agent_copy(2, &id)["id"]
        .as_str()
        .expect("agent id")
        .to_string();
    let argv = vm_argv(2, &aid2);
    eprintln!("agent2's incoming VM: {argv}");
    assert!(
        argv.contains("-netdev hubport,id=net0,hubid=0"),
        "agent2 did not build the source's device shape (hub 0): {argv}"
    );
    assert_eq!(
        net_on(2, &tap, &ip),
        (true, true),
        "agent2 has no tap or route"
    );
    wait_until(
        "agent1 to remove the tap and route",
        Duration::from_secs(30),
        || net_on(1, &tap, &ip) == (false, false),
    );
    // Its address and policy hold on agent2: egress leaves through agent2,
    // the denied port is still never reached.
    let out = egress_from("tpl", allowed.port);
    assert!(stdout(&out).contains("allowed-ok"), "{}", show(&out));
    assert_eq!(
        allowed.peers().last().map(|p| p.ip().to_string()),
        Some(format!("{NET}.12"))
    );
    let out = egress_from("tpl", denied.port);
    assert!(!stdout(&out).contains("allowed-ok"), "{}", show(&out));
    assert!(denied.peers().is_empty(), "{:?}", denied.peers());
    assert_eq!(leases_of(&ip).len(), 1, "{:?}", leases_of(&ip));
    // agent1 released its reference: the template can be removed there.
    let out = hearth(&["rm", "-f", "tpl"]);
    assert!(out.status.success(), "{}", show(&out));
    let (code, v) = call(&a1, "/v1/templates/bbt", "DELETE", None, 60);
    assert_eq!(code, 204, "the template on agent1 is still referenced: {v}");
}

/// The command line of a running shard process.
fn argv_of(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("cmdline")
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Starts shard agent `i` again from `argv` (its VMs, which outlive it, are
/// re-adopted) with `env` added, and waits until its node is ready.
fn spawn_agent(i: u32, argv: &[String], env: &[(&str, &str)]) -> std::process::Child {
    static RESTARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path = format!(
        "/tmp/hearth-shard-{NAME}/agent{i}-restarted-{}-{}.log",
        std::process::id(),
        RESTARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let log = std::fs::File::create(&path).expect("log");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &format!("{NAME}-a{i}")])
        .args(argv)
        .env("HEARTH_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("start the agent again");
    let tail = |path: &str| last_lines(&std::fs::read_to_string(path).unwrap_or_default(), 40);
    // why: the node may still read ready from before the kill; the agent's
    // own API answers once it is up again. An agent that exits or never
    // answers is reported with its log.
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("agent{i} exited again ({st}); its log:\n{}", tail(&path));
        }
        let (code, _) = call(
            &format!("http://{NET}.{}:7070", 10 + i),
            "/v1/sandboxes",
            "GET",
            None,
            5,
        );
        if code == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "agent{i}'s API did not answer again in 120 s (last: {code}); its log:\n{}",
            tail(&path)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_node(&format!("agent{i}"), "ready");
    child
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The log of agent `i`'s latest restart by [`spawn_agent`].
fn restart_log(i: u32) -> String {
    let prefix = format!("agent{i}-restarted-");
    std::fs::read_dir(format!("/tmp/hearth-shard-{NAME}"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .and_then(|e| std::fs::read_to_string(e.path()).ok())
        .unwrap_or_default()
}

/// kill -9 of a shard agent's pid, waiting until it is gone.
fn kill_agent(pid: i32) {
    assert!(
        !hearth_e2e::process_exited(pid),
        "agent {pid} had already exited"
    );
    // why: the restarted agent needs the data dir's lock and the API's port,
    // which the old one holds until it has closed its files.
    hearth_e2e::kill9_and_wait(pid);
}

/// kill -9 of the QEMU of agent sandbox `aid` on agent `i`, waiting until it is gone.
fn kill_qemu_of(i: u32, aid: &str) {
    let dir =
        std::path::PathBuf::from(format!("/tmp/hearth-shard-{NAME}/agent{i}/sandboxes/{aid}"));
    let pids = vmm_pids_under(&dir);
    assert_eq!(pids.len(), 1, "QEMUs of {aid} on agent{i}: {pids:?}");
    hearth_e2e::kill_vmms_under(&dir);
    wait_until("the QEMU to exit", Duration::from_secs(30), || {
        vmm_pids_under(&dir).is_empty()
    });
}

/// Two failures of the issue's list on the dev shard, each ending with exactly
/// one running copy: the target's network cut during pre-copy (the source
/// gives up and runs on), and the source node killed (agent and VM) right
/// after the switch-over, before it released its paused VM (the target's
/// copy is the sandbox).
#[test]
fn a_cut_during_precopy_and_a_source_killed_after_the_switchover_each_leave_one_copy() {
    let Some(_shard) = shard_with_busybox(3) else {
        return;
    };
    // 1. The target's link goes down in pre-copy.
    let id = create_on("agent1", "cut", COUNTER, false);
    let aid = agent_copy(1, &id)["id"]
        .as_str()
        .expect("agent id")
        .to_string();
    counter_goes_on("cut");
    let mig = hearth_cmd(&[
        "migrate",
        "cut",
        "--to",
        "agent2",
        "--bandwidth-mib",
        "1",
        "--give-up-secs",
        "10",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("hearth migrate");
    // why: until the CLI's request arrived, no migration is recorded (404).
    wait_until("the transfer to start", Duration::from_secs(60), || {
        let out = hearth(&["migrate", "--status", "--json", "cut"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["phase"] == "precopy" && s["bytes_sent"].as_u64() > Some(0))
    });
    let link = format!("{NAME}a2");
    let set_link = |up: &str| {
        let out = Command::new("ip")
            .args(["link", "set", &link, up])
            .output()
            .expect("ip link");
        assert!(out.status.success(), "{}", show(&out));
    };
    set_link("down");
    let out = mig.wait_with_output().expect("hearth migrate");
    set_link("up");
    assert!(!out.status.success(), "{}", show(&out));
    wait_until(
        "the migration to be recorded aborted",
        Duration::from_secs(60),
        || status_json("cut")["phase"] == "aborted",
    );
    wait_node("agent2", "ready");
    let sb = sandbox(&id);
    assert_eq!(
        (sb["node"].as_str(), sb["status"].as_str()),
        (Some("agent1"), Some("running")),
        "{sb}"
    );
    wait_until(
        "agent2 to remove its half-received VM",
        Duration::from_secs(60),
        || agent_has(2, &id).is_none() && qemus_of(&aid) == 1,
    );
    counter_goes_on("cut");

    // 2. The source node dies after the switch-over: agent1 holds after the
    // commit (before it releases its paused VM); then it and that VM are
    // killed -9.
    let first = pid_of("agent1");
    let argv = argv_of(first);
    kill_agent(first);
    let mut held = spawn_agent(1, &argv, &[("HEARTH_MIGRATION_HOLD", "release:120000")]);
    let id2 = create_on("agent1", "late", COUNTER, false);
    let aid2 = agent_copy(1, &id2)["id"]
        .as_str()
        .expect("agent id")
        .to_string();
    counter_goes_on("late");
    let before = counted("late").len();
    let mut mig = hearth_cmd(&["migrate", "late", "--to", "agent2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hearth migrate");
    // why: the source's own status says completed once the target committed;
    // the hold keeps it from releasing its paused VM.
    wait_until(
        "the source to hold after the commit",
        Duration::from_secs(120),
        || {
            let (code, s) = call(
                &format!("http://{NET}.11:7070"),
                &format!("/v1/sandboxes/{aid2}/migration"),
                "GET",
                None,
                5,
            );
            code == 200 && s["phase"] == "completed"
        },
    );
    assert_eq!(qemus_of(&aid2), 2, "the paused source VM and the target's");
    kill_agent(held.id() as i32);
    let _ = held.wait();
    kill_qemu_of(1, &aid2);
    wait_until(
        "the record to name agent2's running copy",
        Duration::from_secs(120),
        || {
            let sb = sandbox(&id2);
            sb["node"] == "agent2" && sb["status"] == "running"
        },
    );
    // why: the CLI follows the migration through the control plane; its
    // answer is not what this test is about (the record is).
    let _ = mig.kill();
    let _ = mig.wait();
    assert_eq!(qemus_of(&aid2), 1, "one copy of {id2}");
    let n = counted("late").len();
    assert!(n >= before, "the log went back: {n} < {before}");
    counter_goes_on("late");
    // agent1 starts again (no hold): it brings back nothing of "late", and
    // re-adopts "cut", which it still runs.
    let mut again = spawn_agent(1, &argv, &[]);
    wait_until("agent1 to re-adopt cut", Duration::from_secs(120), || {
        agent_has(1, &id).is_some_and(|c| c["status"] == "running")
    });
    assert!(
        agent_has(1, &id2).is_none_or(|c| c["status"] != "running"),
        "agent1 runs late again"
    );
    assert_eq!(qemus_of(&aid2), 1, "one copy of {id2}");
    assert_eq!(sandbox(&id2)["node"], "agent2");
    counter_goes_on("late");
    counter_goes_on("cut");
    let _ = again.kill();
    let _ = again.wait();
}
