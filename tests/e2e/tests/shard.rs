//! The dev shard (scripts/shard): agents in their own network namespaces,
//! reachable only through their veth. Cutting that link is a real partition.
//! Needs root and iproute2; skipped (with a message) otherwise.

use std::process::Command;
use std::time::{Duration, Instant};

const NAME: &str = "hse";
const NET: &str = "10.77.200";
const TOKEN: &str = "hearth-e2e-shard-token-0123456789";

fn shard(args: &[&str]) -> std::process::Output {
    Command::new(hearth_e2e::repo_root().join("scripts/shard"))
        .args(args)
        .env("HEARTH_SHARD", NAME)
        .env("HEARTH_SHARD_NET", NET)
        .env("HEARTH_BIN_DIR", hearth_e2e::bin_dir())
        .env("HEARTH_SHARD_NODE_TIMEOUT_MS", "2000")
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

fn api(path: &str, method: &str, body: Option<&str>) -> (u16, serde_json::Value) {
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
    let out = c
        .arg(format!("http://{NET}.1:7101{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn wait_node(id: &str, status: &str) -> Duration {
    let t = Instant::now();
    loop {
        let (_, n) = api(&format!("/v1/nodes/{id}"), "GET", None);
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
    if !can_run() {
        eprintln!("skipped: needs root and iproute2 for network namespaces");
        return;
    }
    shard(&["down"]);
    let _down = Down;
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
