//! Against the real kernel (needs root): a sandbox network is built, its policy
//! changes live, and teardown leaves nothing behind.

use std::collections::HashSet;
use std::process::Command;

use hearth_net::{Action, NetConfig, NodeNet, Policy, Rule};

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn sandbox_network_is_built_updated_and_removed_without_leftovers() {
    let d = tempfile::tempdir().unwrap();
    let net = NodeNet::open(NetConfig {
        pool: "10.251.7.0/29".parse().unwrap(),
        state_dir: d.path().to_path_buf(),
        dns: vec![],
    })
    .unwrap();
    let id = "nettest00001";
    let rec = net.setup(id, Policy::default()).unwrap();
    assert_eq!(rec.ip.to_string(), "10.251.7.1");
    assert!(sh("ip -o link show").contains(&rec.tap));
    assert!(sh("ip route show").contains(&format!("10.251.7.1 dev {}", rec.tap)));
    assert!(sh("nft list set ip hearth sandboxes").contains("10.251.7.1"));
    let progs = sh("bpftool prog show");
    assert!(
        progs.contains("guest_out") && progs.contains("guest_in"),
        "{progs}"
    );

    let p = Policy::egress(
        Action::Deny,
        vec![Rule::parse(Action::Allow, "192.168.0.0/16:80").unwrap()],
    );
    let slot = hearth_net::policy::maps::active_slot(&rec.tap).unwrap();
    net.set_policy(id, p.clone()).unwrap();
    assert_eq!(net.get(id).unwrap().policy, p);
    // The update went to the other slot and flipped to it.
    assert_eq!(
        hearth_net::policy::maps::active_slot(&rec.tap).unwrap(),
        slot ^ 1
    );
    // The node's addresses are in the HOSTS map (127.0.0.1 is always one; the
    // key is the address in network byte order, dumped as a host u32).
    assert!(net.refresh_host_addresses() >= 1);
    let hosts = sh(&format!(
        "bpftool map dump pinned /sys/fs/bpf/hearth/{}/HOSTS",
        rec.tap
    ));
    let lo = u32::from_ne_bytes([127, 0, 0, 1]).to_string();
    assert!(hosts.contains(&lo), "{hosts}");
    let stats = net.stats(id).unwrap();
    assert!(stats.iter().any(|s| s.label.contains("192.168.0.0/16:80")));

    // Pool of /29 = 6 addresses.
    for i in 2..=6 {
        net.setup(&format!("nettest0000{i}"), Policy::default())
            .unwrap();
    }
    let e = net.setup("nettest00007", Policy::default()).unwrap_err();
    assert!(e.is_exhausted(), "{e}");
    assert!(!sh("ip -o link show").contains("hthnettest00007"));

    net.remove_orphans(&HashSet::from([id.to_string()]));
    // This sandbox's programs are the ones using its COUNTERS map (other
    // sandboxes on this machine have programs of the same name).
    let map = sh(&format!(
        "bpftool map show pinned /sys/fs/bpf/hearth/{}/COUNTERS",
        rec.tap
    ));
    let map_id = map.split(':').next().unwrap_or("").trim().to_string();
    assert!(
        !map_id.is_empty() && map_id.bytes().all(|b| b.is_ascii_digit()),
        "{map}"
    );
    let uses_map = |progs: &str| {
        progs.lines().any(|l| {
            l.split("map_ids ")
                .nth(1)
                .and_then(|ids| ids.split_whitespace().next())
                .is_some_and(|ids| ids.split(',').any(|m| m == map_id))
        })
    };
    assert!(uses_map(&sh("bpftool prog show")), "programs use the map");
    net.teardown(id).unwrap();
    assert!(!sh("ip -o link show").contains("hthnettest"));
    assert!(!sh("ip route show").contains("10.251.7."));
    assert!(!sh("nft list set ip hearth sandboxes").contains("10.251.7."));
    // why: the kernel frees a program after an RCU grace period, not at once.
    let t = std::time::Instant::now();
    while uses_map(&sh("bpftool prog show")) {
        assert!(t.elapsed().as_secs() < 10, "policy programs still loaded");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!sh("ls /sys/fs/bpf/hearth").contains("hthnettest"));
    let leases = std::fs::read_to_string(d.path().join("leases.json")).unwrap();
    let leases: serde_json::Value = serde_json::from_str(&leases).unwrap();
    assert_eq!(leases["leases"], serde_json::json!({}), "{leases}");
}

#[test]
fn policy_update_racing_with_teardown_either_applies_or_finds_no_network() {
    let d = tempfile::tempdir().unwrap();
    let net = std::sync::Arc::new(
        NodeNet::open(NetConfig {
            pool: "10.251.8.0/29".parse().unwrap(),
            state_dir: d.path().to_path_buf(),
            dns: vec![],
        })
        .unwrap(),
    );
    let id = "netrace00001";
    let rec = net.setup(id, Policy::default()).unwrap();
    let n2 = net.clone();
    let applied_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = applied_so_far.clone();
    let updater = std::thread::spawn(move || {
        let p = Policy::egress(
            Action::Deny,
            vec![Rule::parse(Action::Allow, "10.0.0.0/8:443").unwrap()],
        );
        let mut applied = 0;
        loop {
            match n2.set_policy(id, p.clone()) {
                Ok(_) => {
                    applied += 1;
                    seen.store(applied, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) if e.is_not_found() => return applied,
                Err(e) => panic!("unexpected error racing teardown: {e}"),
            }
        }
    });
    // Tear down while updates are in flight.
    while applied_so_far.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        std::thread::yield_now();
    }
    net.teardown(id).unwrap();
    let applied = updater.join().unwrap();
    assert!(applied > 0);
    assert!(!sh("ip -o link show").contains(&rec.tap));
    assert!(!sh("ls /sys/fs/bpf/hearth").contains(&rec.tap));
    assert!(net.get(id).is_err());
}
