//! Sandbox networking with real VMs: egress policy enforced by the eBPF program
//! on the sandbox's tap, live policy changes, anti-spoofing, limits, and a clean
//! host after `rm`. Test servers run in network namespaces these tests create
//! (192.168.x.0/24, x from the test process id); no traffic leaves the machine.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hearth_e2e::{show, stderr, stdout, wait_until, Daemon};

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// The `k`th test subnet of this process (0..3): concurrent runs of the suite
/// (different pids) get different subnets.
fn subnet(k: u32) -> u8 {
    (100 + (std::process::id() % 50) * 3 + k) as u8
}

/// A network namespace with a veth to the host and busybox httpd servers.
struct ServerNs {
    name: String,
    host_if: String,
    server_ip: String,
    servers: Vec<Child>,
    _www: tempfile::TempDir,
}

impl ServerNs {
    /// `192.168.<subnet>.1` on the host, `.2` in the namespace, httpd on `ports`.
    fn start(subnet: u8, ports: &[u16]) -> ServerNs {
        let tag = format!("{}{subnet}", std::process::id() % 10000);
        let name = format!("hnet{tag}");
        let host_if = format!("hn{tag}h");
        let ns_if = format!("hn{tag}n");
        let server_ip = format!("192.168.{subnet}.2");
        let www = tempfile::tempdir().expect("www");
        std::fs::write(www.path().join("index.html"), "hello-from-netns\n").expect("index");
        let script = format!(
            "set -e; ip netns add {name}; ip link add {host_if} type veth peer name {ns_if}; \
             ip link set {ns_if} netns {name}; ip addr add 192.168.{subnet}.1/24 dev {host_if}; \
             ip link set {host_if} up; ip -n {name} addr add {server_ip}/24 dev {ns_if}; \
             ip -n {name} link set {ns_if} up; ip -n {name} link set lo up"
        );
        let st = Command::new("sh")
            .args(["-c", &script])
            .status()
            .expect("sh");
        let mut ns = ServerNs {
            name,
            host_if,
            server_ip,
            servers: Vec::new(),
            _www: www,
        };
        assert!(st.success(), "creating the test namespace failed");
        for p in ports {
            let child = Command::new("ip")
                .args(["netns", "exec", &ns.name, "busybox", "httpd", "-f", "-p"])
                .arg(format!("{}:{p}", ns.server_ip))
                .arg("-h")
                .arg(ns._www.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("busybox httpd (busybox-static)");
            ns.servers.push(child);
        }
        let name = ns.name.clone();
        for p in ports {
            wait_until("test httpd listening", Duration::from_secs(10), || {
                sh(&format!("ip netns exec {name} ss -ltn")).contains(&format!(":{p} "))
            });
        }
        ns
    }
}

impl Drop for ServerNs {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Shell run inside the VM: prints `PORT=ok` or `PORT=blocked` per port
/// (busybox nc; a dropped SYN times out).
fn probe(ip: &str, ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| {
            format!(
                "if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {p} | grep -q hello-from-netns; \
                 then echo {p}=ok; else echo {p}=blocked; fi; "
            )
        })
        .collect()
}

fn exec(d: &Daemon, sb: &str, script: &str) -> String {
    let out = d.hearth(&["exec", sb, "--", "sh", "-c", script]);
    assert!(out.status.success(), "exec: {}", show(&out));
    stdout(&out)
}

fn stats(d: &Daemon, sb: &str) -> serde_json::Value {
    let out = d.hearth(&["policy", "stats", "--json", sb]);
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_str(&stdout(&out)).expect("stats json")
}

fn counter(stats: &serde_json::Value, label_part: &str) -> u64 {
    stats["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .filter(|c| c["label"].as_str().unwrap_or("").contains(label_part))
        .map(|c| c["packets"].as_u64().unwrap_or(0))
        .sum()
}

fn start_detached(d: &Daemon, args: &[&str]) -> (String, String) {
    let mut a = vec!["run", "--detach"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["busybox", "--", "sleep", "600"]);
    let out = d.hearth(&a);
    assert!(out.status.success(), "{}", show(&out));
    let id = stdout(&out).trim().to_string();
    wait_until("sandbox running", Duration::from_secs(120), || {
        d.inspect(&id)["status"] == "running"
    });
    let ip = d.inspect(&id)["network"]["ip"]
        .as_str()
        .expect("sandbox has an ip")
        .to_string();
    (id, ip)
}

fn host_state() -> String {
    sh("ip -o link show; ip route show; nft list table ip hearth; bpftool prog show; ls /sys/fs/bpf/hearth")
}

#[test]
fn policy_blocks_denied_port_allows_others_and_changes_live() {
    let ns = ServerNs::start(subnet(0), &[8080, 8081]);
    let d = Daemon::start();
    let deny = format!("{}/32:8081", ns.server_ip);
    let (id, ip) = start_detached(&d, &["--egress-deny", &deny]);
    let tap = d.inspect(&id)["network"]["tap"]
        .as_str()
        .unwrap()
        .to_string();

    let got = exec(&d, &id, &probe(&ns.server_ip, &[8080, 8081]));
    assert_eq!(got, "8080=ok\n8081=blocked\n", "initial policy");
    let s = stats(&d, &id);
    assert!(counter(&s, &format!("deny {deny}")) >= 1, "{s}");
    assert!(counter(&s, "default allow") >= 1, "{s}");

    // Live change, no restart: default deny, only 8081 allowed.
    let allow = format!("{}/32:8081", ns.server_ip);
    let out = d.hearth(&[
        "policy",
        "set",
        &id,
        "--egress-default",
        "deny",
        "--egress-allow",
        &allow,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let shown = d.hearth(&["policy", "show", &id]);
    assert!(stdout(&shown).contains("default deny") && stdout(&shown).contains(&allow));
    let got = exec(&d, &id, &probe(&ns.server_ip, &[8080, 8081]));
    assert_eq!(got, "8080=blocked\n8081=ok\n", "after the live change");
    assert_eq!(d.inspect(&id)["status"], "running");

    // Metadata is denied even under an allow-all rule.
    let out = d.hearth(&["policy", "set", &id, "--egress-allow", "0.0.0.0/0"]);
    assert!(out.status.success(), "{}", show(&out));
    exec(&d, &id, "nc -w 2 169.254.169.254 80 </dev/null; true");
    let s = stats(&d, &id);
    assert!(counter(&s, "implicit deny 169.254.0.0/16") >= 1, "{s}");

    // rm leaves nothing behind.
    // The sandbox's programs: those using its pinned COUNTERS map.
    let map = sh(&format!(
        "bpftool map show pinned /sys/fs/bpf/hearth/{tap}/COUNTERS"
    ));
    let map_id = map.split(':').next().unwrap_or("").trim().to_string();
    assert!(
        !map_id.is_empty() && map_id.bytes().all(|b| b.is_ascii_digit()),
        "{map}"
    );
    let progs = sh("bpftool prog show");
    let mut prog_ids = Vec::new();
    let mut current = String::new();
    for line in progs.lines() {
        if let Some((id, rest)) = line.split_once(':') {
            if rest.contains("sched_cls") {
                current = id.trim().to_string();
            }
        }
        if let Some(ids) = line.split("map_ids ").nth(1) {
            if ids
                .split_whitespace()
                .next()
                .unwrap_or("")
                .split(',')
                .any(|m| m == map_id)
            {
                prog_ids.push(current.clone());
            }
        }
    }
    assert_eq!(
        prog_ids.len(),
        2,
        "guest_out and guest_in use the maps: {progs}"
    );
    let out = d.hearth(&["rm", "-f", &id]);
    assert!(out.status.success(), "{}", show(&out));
    let state = host_state();
    assert!(!state.contains(&tap), "tap or pins left: {state}");
    assert!(
        !state.contains(&format!("{ip} ")),
        "route or NAT entry left: {state}"
    );
    let leases = std::fs::read_to_string(d.data_dir().join("net/leases.json")).unwrap();
    assert!(
        !leases.contains(&format!("\"{ip}\"")),
        "lease left: {leases}"
    );
    for p in prog_ids {
        // why: the kernel frees a program after an RCU grace period, not at once.
        wait_until("policy program freed", Duration::from_secs(10), || {
            !Command::new("bpftool")
                .args(["prog", "show", "id", &p])
                .output()
                .expect("bpftool")
                .status
                .success()
        });
    }
}

#[test]
fn spoofed_source_ip_and_mac_are_dropped_and_counted() {
    let ns = ServerNs::start(subnet(1), &[8080]);
    let d = Daemon::start();
    let (id, _ip) = start_detached(&d, &[]);
    assert_eq!(exec(&d, &id, &probe(&ns.server_ip, &[8080])), "8080=ok\n");
    let before = counter(&stats(&d, &id), "spoofed");

    // Another source address on eth0: its packets never leave the tap.
    let spoof = format!(
        "ip addr add 10.254.254.254/32 dev eth0; ping -c 2 -W 1 -I 10.254.254.254 {} >/dev/null 2>&1 && echo reached || echo dropped",
        ns.server_ip
    );
    assert_eq!(exec(&d, &id, &spoof), "dropped\n");
    let mid = counter(&stats(&d, &id), "spoofed");
    assert!(mid >= before + 2, "spoofed IP counted: {before} -> {mid}");

    // Another MAC: dropped too (the old one is restored after).
    let mac = format!(
        "ip addr del 10.254.254.254/32 dev eth0; old=$(cat /sys/class/net/eth0/address); \
         ip link set eth0 address 02:00:00:00:00:01; {} ip link set eth0 address $old",
        probe(&ns.server_ip, &[8080])
    );
    assert_eq!(exec(&d, &id, &mac), "8080=blocked\n");
    let after = counter(&stats(&d, &id), "spoofed");
    assert!(after > mid, "spoofed MAC counted: {mid} -> {after}");
    assert_eq!(exec(&d, &id, &probe(&ns.server_ip, &[8080])), "8080=ok\n");
}

#[test]
fn bad_rules_pool_exhaustion_and_network_none_give_clear_answers() {
    let d = Daemon::start();
    for (flag, rule, want) in [
        ("--egress-allow", "10.0.0.1/8", "host bits"),
        ("--egress-allow", "10.0.0.0/8:0", "port range"),
        ("--egress-deny", "10.0.0.0/8:70000", "port range"),
        ("--egress-deny", "banana", "not an IPv4 CIDR"),
    ] {
        let out = d.hearth(&["run", flag, rule, "busybox", "--", "true"]);
        assert_eq!(out.status.code(), Some(125), "{}", show(&out));
        assert!(stderr(&out).contains(want), "{rule}: {}", show(&out));
    }
    let out = d.hearth(&[
        "run",
        "--egress-allow",
        "10.0.0.0/8:80-90",
        "--egress-deny",
        "10.0.0.0/8:85",
        "busybox",
        "--",
        "true",
    ]);
    assert!(stderr(&out).contains("overlap"), "{}", show(&out));
    let mut args = vec!["run".to_string()];
    for i in 0..65 {
        args.extend(["--egress-allow".into(), format!("10.{i}.0.0/16")]);
    }
    args.extend(["busybox".into(), "--".into(), "true".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = d.hearth(&args);
    assert!(stderr(&out).contains("too many rules"), "{}", show(&out));

    // --network none: no device in the guest, no network record.
    let out = d.hearth(&[
        "run",
        "--network",
        "none",
        "busybox",
        "--",
        "sh",
        "-c",
        "ls /sys/class/net",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(!stdout(&out).contains("eth0"), "{}", show(&out));

    // A full pool is a clear error, not a duplicate address.
    let d2 = Daemon::start_with_env(&[("HEARTH_NET_POOL", "10.253.7.0/30")]);
    let out = d2.hearth(&["run", "busybox", "--", "true"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = d2.hearth(&["run", "busybox", "--", "true"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = d2.hearth(&["run", "busybox", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", show(&out));
    assert!(stderr(&out).contains("exhausted"), "{}", show(&out));
    let o = d2.hearth(&["ps", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("ps json");
    let ips: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["network"]["ip"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ips.len(), 2);
    assert_ne!(ips[0], ips[1]);
}

#[test]
fn ingress_reaches_httpd_in_the_sandbox_from_another_namespace() {
    let ns = ServerNs::start(subnet(2), &[]);
    let host_ip = format!("192.168.{}.1", subnet(2));
    let port = std::net::TcpListener::bind((host_ip.as_str(), 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("{host_ip}:{port}");
    let d = Daemon::start_with_env(&[("HEARTH_INGRESS_LISTEN", &listen)]);
    let out = d.hearth(&[
        "run", "--detach", "busybox", "--", "sh", "-c",
        "mkdir -p /www && echo hello-from-sandbox > /www/index.html && exec httpd -f -p 8080 -h /www",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let id = stdout(&out).trim().to_string();
    wait_until("sandbox running", Duration::from_secs(120), || {
        d.inspect(&id)["status"] == "running"
    });
    let token = d.inspect(&id)["network"]["ingress_token"]
        .as_str()
        .expect("token")
        .to_string();
    // curl from the other namespace; prints the body then the status.
    let curl = |host: &str, path: &str, token: Option<&str>| {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &ns.name,
            "curl",
            "-s",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
        ]);
        c.args(["-H", &format!("Host: {host}")]);
        if let Some(t) = token {
            c.args(["-H", &format!("X-Hearth-Token: {t}")]);
        }
        c.arg(format!("http://{listen}{path}"));
        let o = c.output().expect("curl");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let path = format!("/sandboxes/{id}/ports/8080/index.html");
    wait_until(
        "httpd in the sandbox answers",
        Duration::from_secs(60),
        || curl("x", &path, Some(&token)).ends_with("\n200"),
    );
    assert_eq!(curl("x", &path, Some(&token)), "hello-from-sandbox\n\n200");
    let host = format!("8080-{id}.hearth.localhost");
    assert_eq!(curl(&host, "/", Some(&token)), "hello-from-sandbox\n\n200");
    assert!(curl(&host, "/", None).ends_with("401"));
    assert!(curl(&host, "/", Some("wrong")).ends_with("403"));

    let out = d.hearth(&["stop", "--timeout", "1", &id]);
    assert!(out.status.success(), "{}", show(&out));
    let r = curl(&host, "/", Some(&token));
    assert!(r.ends_with("502") && r.contains("not running"), "{r}");
}

#[test]
fn agent_restart_re_adopts_running_networks_and_removes_the_rest() {
    let ns = ServerNs::start(subnet(1), &[8080]);
    let mut d = Daemon::start();
    let (a, ip_a) = start_detached(&d, &["--egress-deny", "10.0.0.0/8"]);
    let (b, ip_b) = start_detached(&d, &[]);
    let (c, ip_c) = start_detached(&d, &[]);
    let tap = |id: &str| {
        d.inspect(id)["network"]["tap"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (tap_a, tap_b, tap_c) = (tap(&a), tap(&b), tap(&c));
    assert_eq!(exec(&d, &a, &probe(&ns.server_ip, &[8080])), "8080=ok\n");
    d.kill9();
    // While hearthd is down, b's and c's VMs end; b's record disappears too:
    // both networks (tap, pins, NAT entry, lease) must go.
    let sandboxes = d.data_dir().join("sandboxes");
    for id in [&b, &c] {
        let dir = sandboxes.join(id);
        for pid in hearth_e2e::vmm_pids_under(&dir) {
            // SAFETY: kill(2) on a QEMU this test's daemon started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_until("the VM gone", Duration::from_secs(10), || {
            hearth_e2e::vmm_pids_under(&dir).is_empty()
        });
    }
    std::fs::remove_dir_all(sandboxes.join(&b)).unwrap();
    d.spawn();

    let state = host_state();
    let leases = std::fs::read_to_string(d.data_dir().join("net/leases.json")).unwrap();
    for (id, tap, ip) in [(&b, &tap_b, &ip_b), (&c, &tap_c, &ip_c)] {
        assert!(
            !state.contains(tap.as_str()),
            "tap or pins of {id} left: {state}"
        );
        assert!(
            !state.contains(&format!("{ip} ")),
            "route or NAT entry of {id} left: {state}"
        );
        assert!(
            !leases.contains(id.as_str()),
            "lease of {id} left: {leases}"
        );
    }
    assert_eq!(d.inspect(&c)["status"], "lost");

    // a was re-adopted: same VM, same address, its policy and counters, and it
    // still reaches the test server.
    let s = d.inspect(&a);
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(s["network"]["ip"], ip_a.as_str(), "{s}");
    assert!(state.contains(&tap_a), "{state}");
    assert!(leases.contains(&a), "{leases}");
    let shown = d.hearth(&["policy", "show", &a]);
    assert!(
        stdout(&shown).contains("deny    10.0.0.0/8"),
        "{}",
        show(&shown)
    );
    assert!(d.hearth(&["policy", "stats", &a]).status.success());
    assert_eq!(exec(&d, &a, &probe(&ns.server_ip, &[8080])), "8080=ok\n");
    let out = d.hearth(&["rm", "-f", &a]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(!host_state().contains(&tap_a));
}
