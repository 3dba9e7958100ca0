//! The dev shard (scripts/shard): agents in their own network namespaces,
//! reachable only through their veth. Cutting that link is a real partition.
//! Needs root and iproute2; skipped (with a message) otherwise.

use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "hearth-e2e-shard-token-0123456789";

/// One shard: each test has its own name and /24, so tests may run at once.
#[derive(Clone, Copy)]
struct Shard {
    name: &'static str,
    net: &'static str,
}

const NOT_READY: Shard = Shard {
    name: "hse",
    net: "10.77.200",
};
const FENCE: Shard = Shard {
    name: "hsf",
    net: "10.77.201",
};

fn shard_cmd(sh: Shard, args: &[&str]) -> std::process::Output {
    Command::new(hearth_e2e::repo_root().join("scripts/shard"))
        .args(args)
        .env("HEARTH_SHARD", sh.name)
        .env("HEARTH_SHARD_NET", sh.net)
        .env("HEARTH_BIN_DIR", hearth_e2e::bin_dir())
        .env("HEARTH_SHARD_NODE_TIMEOUT_MS", "2000")
        .env("HEARTH_TOKEN", TOKEN)
        .output()
        .expect("run scripts/shard")
}

struct Down(Shard);

impl Drop for Down {
    fn drop(&mut self) {
        shard_cmd(self.0, &["down"]);
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

fn api_on(sh: Shard, path: &str, method: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    curl(&format!("http://{}.1:7101{path}", sh.net), method, body)
}

fn curl(url: &str, method: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "10",
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
    let out = c.arg(url).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn wait_node_on(sh: Shard, id: &str, status: &str) -> Duration {
    let t = Instant::now();
    loop {
        let (_, n) = api_on(sh, &format!("/v1/nodes/{id}"), "GET", None);
        if n["status"] == status {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "node {id} not {status}: {n}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        hearth_e2e::show(&out)
    );
}

#[test]
fn partitioned_agent_goes_not_ready_and_recovers_and_shard_down_leaves_no_trace() {
    if !hearth_e2e::require(can_run(), "root and iproute2 (network namespaces)") {
        return;
    }
    const NAME: &str = NOT_READY.name;
    const NET: &str = NOT_READY.net;
    let shard = |args: &[&str]| shard_cmd(NOT_READY, args);
    let api = |path: &str, method: &str, body: Option<&str>| api_on(NOT_READY, path, method, body);
    let wait_node = |id: &str, status: &str| wait_node_on(NOT_READY, id, status);
    shard(&["down"]);
    let _down = Down(NOT_READY);
    let out = shard(&["up", "--agents", "2"]);
    assert!(out.status.success(), "shard up: {}", hearth_e2e::show(&out));
    let told = hearth_e2e::stdout(&out);
    assert!(
        told.contains(&format!("HEARTH_API=http://{NET}.1:7101")),
        "{told}"
    );

    let (code, sb) = api(
        "/v1/sandboxes?record_only=true&selector=host=agent1",
        "POST",
        Some(r#"{"image":"busybox","memory_mib":64}"#),
    );
    assert_eq!(code, 201, "{sb}");
    let id = sb["id"].as_str().unwrap().to_string();

    ip(&["link", "set", &format!("{NAME}a1"), "down"]);
    let took = wait_node("agent1", "not_ready");
    eprintln!("agent1 NotReady {took:?} after its link went down");
    let (_, sb) = api(&format!("/v1/sandboxes/{id}"), "GET", None);
    assert_eq!(sb["status"], "lost", "{sb}");
    assert_eq!(api("/v1/nodes/agent2", "GET", None).1["status"], "ready");
    ip(&["link", "set", &format!("{NAME}a1"), "up"]);
    let took = wait_node("agent1", "ready");
    eprintln!("agent1 Ready {took:?} after its link came back");

    let out = shard(&["down"]);
    assert!(out.status.success(), "{}", hearth_e2e::show(&out));
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !hearth_e2e::stdout(&netns).contains(&format!("{NAME}-a")),
        "namespaces left"
    );
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = hearth_e2e::stdout(&links);
    for l in [
        format!("{NAME}br"),
        format!("{NAME}a1"),
        format!("{NAME}a2"),
    ] {
        assert!(
            !links.contains(&format!(" {l}:")) && !links.contains(&format!(" {l}@")),
            "link {l} left"
        );
    }
    assert!(
        !std::path::Path::new(&format!("/tmp/hearth-shard-{NAME}")).exists(),
        "data left"
    );
    // why: never probe the shard's address once it is gone (it would leave
    // the machine); look at the listening sockets instead.
    let ss = Command::new("ss").args(["-ltnH"]).output().expect("ss");
    assert!(
        !hearth_e2e::stdout(&ss).contains(&format!("{NET}.1:710")),
        "control plane still listening"
    );
}

/// QEMU processes of the whole shard (every agent's data dir is under it).
fn shard_vms(sh: Shard) -> Vec<i32> {
    hearth_e2e::vmm_pids_under(std::path::Path::new(&format!(
        "/tmp/hearth-shard-{}/",
        sh.name
    )))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out after {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
    t.elapsed()
}

#[test]
fn a_partitioned_agents_stale_copies_are_stopped_when_its_link_returns() {
    if !hearth_e2e::require(can_run(), "root and iproute2 (network namespaces)") {
        return;
    }
    let sh = FENCE;
    let api = |path: &str, method: &str, body: Option<&str>| api_on(sh, path, method, body);
    shard_cmd(sh, &["down"]);
    let _down = Down(sh);
    let out = shard_cmd(sh, &["up", "--agents", "2"]);
    assert!(out.status.success(), "shard up: {}", hearth_e2e::show(&out));
    let rootfs = tempfile::tempdir().unwrap();
    hearth_e2e::images::busybox_rootfs(rootfs.path());
    let body = serde_json::json!({"name": "busybox", "path": rootfs.path()}).to_string();
    let (code, img) = api("/v1/images/import", "POST", Some(&body));
    assert_eq!(code, 201, "{img}");

    // A restart=always sandbox, and a plain one beside it on the same node.
    const SLEEPER: &str = r#"{"image":"busybox","memory_mib":128,"cmd":["sleep","100000"],"network":{"mode":"none"}}"#;
    let (code, sb) = api("/v1/sandboxes?restart=always", "POST", Some(SLEEPER));
    assert_eq!(code, 201, "{sb}");
    let always = sb["id"].as_str().unwrap().to_string();
    let old_node = sb["node"].as_str().unwrap().to_string();
    let (code, sb) = api(
        &format!("/v1/sandboxes?selector=host={old_node}"),
        "POST",
        Some(SLEEPER),
    );
    assert_eq!(code, 201, "{sb}");
    let doomed = sb["id"].as_str().unwrap().to_string();
    let running = |id: &str| api(&format!("/v1/sandboxes/{id}"), "GET", None).1;
    for id in [&always, &doomed] {
        wait_for(&format!("{id} running"), Duration::from_secs(120), || {
            running(id)["status"] == "running"
        });
    }
    assert_eq!(shard_vms(sh).len(), 2, "one QEMU per sandbox");

    // Cut the node off: the restart=always sandbox is started on the other
    // node while its old copy still runs behind the cut.
    let i = old_node.trim_start_matches("agent");
    let veth = format!("{}a{i}", sh.name);
    ip(&["link", "set", &veth, "down"]);
    wait_node_on(sh, &old_node, "not_ready");
    let took = wait_for(
        "the restart=always sandbox running on the other node",
        Duration::from_secs(120),
        || {
            let s = running(&always);
            s["node"] != old_node.as_str() && s["status"] == "running"
        },
    );
    eprintln!("moved and running again {took:?} after NotReady");
    assert_eq!(running(&doomed)["status"], "lost");
    // Deleted while its node is cut off: the record goes at once.
    let (code, body) = api(&format!("/v1/sandboxes/{doomed}"), "DELETE", None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(
        shard_vms(sh).len(),
        3,
        "both stale copies still run behind the cut"
    );

    // The link returns: the old node's agent stops both stale copies itself.
    ip(&["link", "set", &veth, "up"]);
    wait_node_on(sh, &old_node, "ready");
    let took = wait_for(
        "exactly one QEMU left in the shard",
        Duration::from_secs(60),
        || shard_vms(sh).len() == 1,
    );
    eprintln!("stale copies stopped {took:?} after the node was Ready again");
    let s = running(&always);
    assert_eq!(s["status"], "running", "{s}");
    let new_node = s["node"].as_str().unwrap().to_string();
    let vm = shard_vms(sh)[0];
    let cmd = std::fs::read(format!("/proc/{vm}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmd).contains(&format!("/{new_node}/")),
        "the QEMU left runs on {new_node}"
    );
    // Once ended, the moved record's stale copy is removed from the old node
    // (its record says it runs elsewhere); the deleted record's copy is only
    // stopped: absence of a record is never a reason to erase data.
    let old_api = format!(
        "http://{}.{}:7070/v1/sandboxes",
        sh.net,
        10 + i.parse::<u32>().unwrap()
    );
    // `CLUSTER/ID@GEN`, or `ID@GEN` before the cluster has an id.
    let doomed_tag = format!("{doomed}@");
    wait_for(
        "the old node keeps only the deleted record's stopped copy",
        Duration::from_secs(30),
        || {
            curl(&old_api, "GET", None).1.as_array().is_some_and(|a| {
                a.len() == 1
                    && a[0]["owner"]
                        .as_str()
                        .and_then(|o| o.rsplit('/').next())
                        .is_some_and(|t| t.starts_with(&doomed_tag))
                    && a[0]["status"] != "running"
            })
        },
    );
    assert_eq!(api(&format!("/v1/sandboxes/{doomed}"), "GET", None).0, 404);
}
