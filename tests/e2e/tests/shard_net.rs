//! Networking on the dev shard (scripts/shard): leases in the control-plane state and
//! the cluster ingress across namespaces; the tests share one shard and take turns
//! ([`SERIAL`]). Agents live in their own network namespaces,
//! reachable only through their veth. Cutting that link is a real partition.
//! Needs root and iproute2; skipped (with a message) otherwise.

use std::process::Command;
use std::time::{Duration, Instant};

const NAME: &str = "hsn";
const NET: &str = "10.77.202";
const TOKEN: &str = "hearth-e2e-shard-token-0123456789";
/// Every test here brings up the one shard `NAME`; CI runs two tests at a
/// time, so they take turns (held for the whole test, shard down included).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    api_within(path, method, body, 10)
}

/// [`api`] for calls that boot VMs or build images on every node (TCG is slow).
fn api_within(path: &str, method: &str, body: Option<&str>, secs: u32) -> (u16, serde_json::Value) {
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

/// curl from namespace `ns` to `base` (`http://IP:PORT`) + `path`, with
/// `Host: host`: the body, then the status on its own line.
fn curl_in(ns: &str, base: &str, host: &str, path: &str, token: Option<&str>) -> String {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns,
        "curl",
        "-s",
        "-m",
        "10",
        "-w",
        "\n%{http_code}",
        "-H",
    ])
    .arg(format!("Host: {host}"));
    if let Some(t) = token {
        c.args(["-H", &format!("X-Hearth-Token: {t}")]);
    }
    let o = c.arg(format!("{base}{path}")).output().expect("curl");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn create_on(node: &str, cmd: &str) -> String {
    let body = serde_json::json!({
        "image": "busybox",
        "cmd": ["sh", "-c", cmd],
        "memory_mib": 64,
    });
    let (code, sb) = api_within(
        &format!("/v1/sandboxes?selector=host={node}"),
        "POST",
        Some(&body.to_string()),
        300,
    );
    assert_eq!(code, 201, "{sb}");
    assert_eq!(sb["node"], node, "{sb}");
    sb["id"].as_str().expect("id").to_string()
}

fn running(id: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let (_, sb) = api(&format!("/v1/sandboxes/{id}"), "GET", None);
        if sb["status"] == "running" && sb["network"]["ip"].is_string() {
            return sb;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "sandbox {id} not running with a network: {sb}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn leases() -> Vec<serde_json::Value> {
    let (code, v) = api("/v1/leases", "GET", None);
    assert_eq!(code, 200, "{v}");
    v.as_array().cloned().unwrap_or_default()
}

/// Takes this file's turn ([`SERIAL`]), brings a shard of `agents` agents up
/// and imports busybox on every node. `None` (the test skips) without root.
/// Dropping the result brings the shard down, then gives up the turn.
fn shard_with_busybox(agents: u32) -> Option<(Down, std::sync::MutexGuard<'static, ()>)> {
    if !hearth_e2e::require(can_run(), "root and iproute2 (network namespaces)") {
        return None;
    }
    // why: a failed test poisons the lock; the next one still takes its turn.
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    shard(&["down"]);
    let down = Down;
    let out = shard(&["up", "--agents", &agents.to_string()]);
    assert!(out.status.success(), "shard up: {}", hearth_e2e::show(&out));
    let rootfs = tempfile::tempdir().expect("tempdir");
    hearth_e2e::images::busybox_rootfs(rootfs.path());
    let body = serde_json::json!({"name": "busybox", "path": rootfs.path()});
    let (code, img) = api_within("/v1/images/import", "POST", Some(&body.to_string()), 300);
    assert!(
        code == 200 || code == 201,
        "import on every node: {code} {img}"
    );
    Some((down, serial))
}

#[test]
fn ingress_reaches_httpd_on_agent1_from_another_namespace_and_leases_follow_sandboxes() {
    let Some(_shard) = shard_with_busybox(3) else {
        return;
    };

    let web = create_on(
        "agent1",
        "mkdir -p /www && echo hello-from-agent1 > /www/index.html && exec httpd -f -p 8080 -h /www",
    );
    let others = [
        create_on("agent2", "exec sleep 600"),
        create_on("agent3", "exec sleep 600"),
    ];
    let sb = running(&web);
    let token = sb["network"]["ingress_token"]
        .as_str()
        .expect("ingress token")
        .to_string();
    let mut ips = vec![sb["network"]["ip"].as_str().unwrap().to_string()];
    for id in &others {
        ips.push(running(id)["network"]["ip"].as_str().unwrap().to_string());
    }
    let distinct: std::collections::BTreeSet<_> = ips.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "sandboxes on three nodes share an address: {ips:?}"
    );

    // Every address is a lease in the replicated state, on the right node.
    let held = leases();
    for (id, ip) in [&web, &others[0], &others[1]].iter().zip(&ips) {
        assert!(
            held.iter()
                .any(|l| l["ip"] == ip.as_str() && l["sandbox"] == id.as_str()),
            "no lease {ip} for {id}: {held:?}"
        );
    }

    // The mapping is in the API: the member's answer names its cluster
    // ingress, and every URL below is built from it (`{port}`: the port).
    let ingress = &sb["network"]["ingress"];
    let (_, info) = api("/v1/info", "GET", None);
    assert_eq!(info["ingress"]["listen"], format!("{NET}.1:7201"), "{info}");
    let port_of = |template: &serde_json::Value| {
        template
            .as_str()
            .unwrap_or_else(|| panic!("no template in {ingress}"))
            .replace("{port}", "8080")
    };
    let (url, path, host) = (
        port_of(&ingress["url"]),
        port_of(&ingress["path"]),
        port_of(&ingress["host"]),
    );
    assert_eq!(host, format!("8080-{web}.hearth.localhost"), "{ingress}");
    let base = url.strip_suffix(&path).expect("url ends with path");
    assert_eq!(base, format!("http://{NET}.1:7201"), "{ingress}");

    // From agent2's namespace, through the cluster ingress, to agent1's sandbox.
    let ns = format!("{NAME}-a2");
    let t = Instant::now();
    while !curl_in(&ns, base, &host, "/", Some(&token)).ends_with("\n200") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "httpd never answered: {}",
            curl_in(&ns, base, &host, "/", Some(&token))
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        curl_in(&ns, base, &host, "/", Some(&token)),
        "hello-from-agent1\n\n200"
    );
    let path = format!("{path}index.html");
    assert_eq!(
        curl_in(&format!("{NAME}-a3"), base, "x", &path, Some(&token)),
        "hello-from-agent1\n\n200"
    );
    assert!(curl_in(&ns, base, &host, "/", None).ends_with("\n401"));
    assert!(curl_in(&ns, base, &host, "/", Some("wrong")).ends_with("\n403"));

    let (code, r) = api_within(
        &format!("/v1/sandboxes/{web}?force=true"),
        "DELETE",
        None,
        120,
    );
    assert_eq!(code, 204, "{r}");
    let r = curl_in(&ns, base, &host, "/", Some(&token));
    assert!(r.ends_with("\n502") && r.contains("does not exist"), "{r}");
    let held = leases();
    assert!(
        !held.iter().any(|l| l["ip"] == ips[0].as_str()),
        "the removed sandbox's lease is still held: {held:?}"
    );
    assert_eq!(held.len(), 2, "{held:?}");
}

/// The slice of `node` in the control-plane state.
fn slice_of(node: &str) -> String {
    let (code, v) = api("/v1/slices", "GET", None);
    assert_eq!(code, 200, "{v}");
    v.as_array()
        .and_then(|a| a.iter().find(|s| s["node"] == node))
        .and_then(|s| s["cidr"].as_str())
        .unwrap_or_else(|| panic!("no slice for {node}: {v}"))
        .to_string()
}

#[test]
fn a_restarted_agent_keeps_its_slice_and_re_adopts_its_sandboxes_with_their_leases() {
    let Some(_shard) = shard_with_busybox(2) else {
        return;
    };

    let (s1, s2) = (slice_of("agent1"), slice_of("agent2"));
    assert_ne!(s1, s2);
    let first = create_on("agent1", "exec sleep 600");
    let ip1 = running(&first)["network"]["ip"]
        .as_str()
        .unwrap()
        .to_string();

    // kill -9 the agent and start it again, same command line, same namespace.
    let state = std::fs::read_to_string(format!("/tmp/hearth-shard-{NAME}/state")).unwrap();
    let pid: i32 = state
        .lines()
        .find_map(|l| l.strip_prefix("pid ")?.strip_suffix(" agent1"))
        .expect("agent1 pid")
        .parse()
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("agent1 cmdline");
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // SAFETY: kill(2) on the shard's own agent process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_node("agent1", "not_ready");
    let log =
        std::fs::File::create(format!("/tmp/hearth-shard-{NAME}/agent1-restarted.log")).unwrap();
    let mut again = Command::new("ip")
        .args(["netns", "exec", &format!("{NAME}-a1")])
        .args(&argv)
        .env("HEARTH_TOKEN", TOKEN)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("restart agent1");
    wait_node("agent1", "ready");

    assert_eq!(slice_of("agent1"), s1, "the same agent keeps its slice");
    // The restarted agent re-adopts the running sandbox (the record read
    // `lost` while the node was NotReady; the agent's heartbeats bring it
    // back): it runs on with its address, and keeps its lease.
    let t = Instant::now();
    loop {
        let (_, sb) = api(&format!("/v1/sandboxes/{first}"), "GET", None);
        if sb["status"] == "running" && sb["error"].is_null() {
            assert_eq!(sb["network"]["ip"], ip1.as_str(), "{sb}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the sandbox is not running again after the agent's restart: {sb}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        leases()
            .iter()
            .any(|l| l["ip"] == ip1.as_str() && l["node"] == "agent1"),
        "the re-adopted sandbox keeps its lease: {:?}",
        leases()
    );
    let second = create_on("agent1", "exec sleep 600");
    let ip2 = running(&second)["network"]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        leases()
            .iter()
            .any(|l| l["ip"] == ip2.as_str() && l["node"] == "agent1"),
        "the new sandbox's lease is in the control-plane state"
    );
    let cidr: Vec<u8> = s1
        .split(['.', '/'])
        .take(3)
        .map(|o| o.parse().unwrap())
        .collect();
    assert!(
        ip2.starts_with(&format!("{}.{}.{}.", cidr[0], cidr[1], cidr[2])),
        "{ip2} is not from {s1}"
    );
    assert_ne!(ip2, ip1, "an address in use is never handed out again");
    for id in [&first, &second] {
        let (code, r) = api_within(
            &format!("/v1/sandboxes/{id}?force=true"),
            "DELETE",
            None,
            120,
        );
        assert_eq!(code, 204, "{r}");
    }
    let held = leases();
    assert!(
        !held.iter().any(|l| l["node"] == "agent1"),
        "leases left after rm: {held:?}"
    );
    let _ = again.kill();
    let _ = again.wait();
}

#[test]
fn node_rm_of_a_running_agent_keeps_its_slice_and_leases_until_it_rejoins() {
    let Some(_shard) = shard_with_busybox(2) else {
        return;
    };

    let s1 = slice_of("agent1");
    let first = create_on("agent1", "exec sleep 600");
    let ip1 = running(&first)["network"]["ip"]
        .as_str()
        .unwrap()
        .to_string();

    // The agent still runs the sandbox: its slice and lease must stay taken.
    let (code, r) = api("/v1/nodes/agent1", "DELETE", None);
    assert_eq!(code, 204, "{r}");
    assert_eq!(
        slice_of("agent1"),
        s1,
        "node rm kept the slice of a running agent"
    );
    let held = leases();
    assert!(
        held.iter()
            .any(|l| l["ip"] == ip1.as_str() && l["node"] == "agent1"),
        "the running sandbox's lease must survive node rm: {held:?}"
    );
    let (code, r) = api("/v1/nodes/agent1", "DELETE", None);
    assert!(
        code == 409 || code == 204,
        "a second rm: {code} {r} (409 while the slice is retired, 204 once re-registered)"
    );

    // The agent re-registers; its next sandbox makes it re-join its own slice.
    wait_node("agent1", "ready");
    let second = create_on("agent1", "exec sleep 600");
    let ip2 = running(&second)["network"]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(ip1, ip2, "an address in use is never handed out again");
    assert_eq!(slice_of("agent1"), s1);
    let prefix: String = s1.rsplit_once('.').unwrap().0.to_string();
    assert!(
        ip2.starts_with(&format!("{prefix}.")),
        "{ip2} is not from {s1}"
    );
    assert_ne!(slice_of("agent2"), s1);
}
