//! Against the real kernel (needs root): a sandbox network is built, its policy
//! changes live, and teardown leaves nothing behind.

use std::collections::HashSet;
use std::process::Command;

use hearth_net::{Action, NetConfig, NodeNet, Policy, Rule};

/// The `n`th /29 of this test process (n < 32): derived from the pid, so
/// concurrent runs on one host use different addresses.
fn pool(n: u32) -> (String, [u8; 3]) {
    let third = (20 + std::process::id() % 230) as u8;
    let base = (n * 8) as u8;
    (format!("10.251.{third}.{base}/29"), [251, third, base])
}

fn addr(p: [u8; 3], host: u8) -> String {
    format!("10.{}.{}.{}", p[0], p[1], p[2] + host)
}

/// Whether `text` names address `a` (as a whole token).
fn names(text: &str, a: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .any(|t| t == a)
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn sandbox_network_is_built_updated_and_removed_without_leftovers() {
    let d = tempfile::tempdir().unwrap();
    let (cidr, pp) = pool(0);
    let net = NodeNet::open(NetConfig {
        pool: cidr.parse().unwrap(),
        state_dir: d.path().to_path_buf(),
        dns: vec![],
    })
    .unwrap();
    let id = "nettest00001";
    let rec = net.setup(id, Policy::default()).unwrap();
    assert_eq!(rec.ip.to_string(), addr(pp, 1));
    assert!(sh("ip -o link show").contains(&rec.tap));
    assert!(sh("ip route show").contains(&format!("{} dev {}", addr(pp, 1), rec.tap)));
    assert!(sh("nft list set ip hearth sandboxes").contains(&addr(pp, 1)));
    // The guest's gateway ARP is answered at once (a delayed proxy answer made
    // first connections miss busybox nc's 3 s; docs/networking.md).
    let delay = format!("/proc/sys/net/ipv4/neigh/{}/proxy_delay", rec.tap);
    assert_eq!(std::fs::read_to_string(&delay).unwrap().trim(), "0");
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
    net.set_policy(id, p.clone(), Some(2)).unwrap();
    assert_eq!(net.get(id).unwrap().policy, p);
    // The update went to the other slot and flipped to it.
    assert_eq!(
        hearth_net::policy::maps::active_slot(&rec.tap).unwrap(),
        slot ^ 1
    );
    // An older version of the control plane's (a set that lost a race) is
    // refused and changes nothing; the same version applies again; a set
    // without a version (node-local) applies and keeps the version.
    let older = Policy::egress(Action::Allow, vec![]);
    let e = net
        .set_policy(id, older.clone(), Some(1))
        .expect_err("an older policy version replaced a newer one");
    assert!(e.is_stale(), "{e}");
    assert!(e.to_string().contains("version 2"), "{e}");
    assert_eq!(net.get(id).unwrap().policy, p);
    assert_eq!(
        hearth_net::policy::maps::active_slot(&rec.tap).unwrap(),
        slot ^ 1,
        "a refused set flipped the maps"
    );
    net.set_policy(id, p.clone(), Some(2)).unwrap();
    net.set_policy(id, p.clone(), None).unwrap();
    assert_eq!(net.get(id).unwrap().policy_version, 2);
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
    let (routes, set) = (sh("ip route show"), sh("nft list set ip hearth sandboxes"));
    for h in 1..=6 {
        assert!(!names(&routes, &addr(pp, h)), "{routes}");
        assert!(!names(&set, &addr(pp, h)), "{set}");
    }
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
            pool: pool(1).0.parse().unwrap(),
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
            match n2.set_policy(id, p.clone(), None) {
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

/// Elements left in the NAT set and this agent's entries in the host's
/// sandbox map for addresses no sandbox of this node holds (a crash between
/// teardown steps) are removed at start (`remove_orphans`); another agent's
/// entries stay, even for an address inside this pool, and a kept sandbox's
/// missing ones come back.
#[test]
fn stale_nat_and_host_map_entries_of_the_pool_are_reconciled_at_start() {
    use hearth_net::policy::maps::{add_host_sandbox, host_sandboxes, remove_host_sandbox};
    let d = tempfile::tempdir().unwrap();
    let (cidr, p) = pool(2);
    let (_, q) = pool(3);
    let net = NodeNet::open(NetConfig {
        pool: cidr.parse().unwrap(),
        state_dir: d.path().to_path_buf(),
        dns: vec![],
    })
    .unwrap();
    let me = net.owner();
    // why: a live agent (registered), or an agent registering meanwhile would
    // purge its entries as those of an agent that is gone.
    let other_dir = tempfile::tempdir().unwrap();
    let _other =
        hearth_net::registry::register(pool(4).0.parse().unwrap(), other_dir.path(), |_| {})
            .unwrap();
    let other_agent = _other.tag();
    let id = "netsync00001";
    let rec = net.setup(id, Policy::default()).unwrap();
    // Stale: an address of this pool nobody holds, tagged by this agent;
    // foreign: entries another agent tagged (one inside this pool).
    let stale: std::net::Ipv4Addr = addr(p, 5).parse().unwrap();
    let foreign: std::net::Ipv4Addr = addr(p, 6).parse().unwrap();
    let foreign_nat = addr(q, 5);
    // why: routed, as another agent's sandbox is (a routeless element is
    // purged by any agent that registers meanwhile).
    sh(&format!("ip route add {foreign_nat}/32 dev lo"));
    sh(&format!(
        "nft add element ip hearth sandboxes '{{ {stale}, {foreign_nat} }}'"
    ));
    add_host_sandbox(stale, 29, me).unwrap();
    add_host_sandbox(foreign, 29, other_agent).unwrap();
    // The kept sandbox lost its NAT element and host map entry.
    sh(&format!(
        "nft delete element ip hearth sandboxes '{{ {} }}'",
        rec.ip
    ));
    remove_host_sandbox(rec.ip, me).unwrap();

    net.remove_orphans(&HashSet::from([id.to_string()]));
    let set = sh("nft list set ip hearth sandboxes");
    let hosts: Vec<_> = host_sandboxes().unwrap();
    let has = |ip: std::net::Ipv4Addr| hosts.iter().find(|(a, _)| *a == ip).map(|(_, e)| e.owner);
    sh(&format!(
        "nft delete element ip hearth sandboxes '{{ {foreign_nat} }}'"
    ));
    sh(&format!("ip route del {foreign_nat}/32 dev lo"));
    remove_host_sandbox(foreign, other_agent).unwrap();
    net.teardown(id).unwrap();
    assert!(
        !names(&set, &stale.to_string()),
        "stale NAT element removed: {set}"
    );
    assert!(
        names(&set, &foreign_nat),
        "another pool's element kept: {set}"
    );
    assert!(
        names(&set, &rec.ip.to_string()),
        "kept sandbox re-added: {set}"
    );
    assert_eq!(has(stale), None, "stale map entry removed: {hosts:?}");
    assert_eq!(
        has(foreign),
        Some(other_agent),
        "another agent's entry kept: {hosts:?}"
    );
    assert_eq!(has(rec.ip), Some(me), "kept sandbox re-added: {hosts:?}");
    let after = host_sandboxes().unwrap();
    assert!(
        !after.iter().any(|(a, _)| *a == rec.ip),
        "teardown removes it: {after:?}"
    );
    assert!(!after.iter().any(|(a, _)| *a == foreign));
}

/// Two agents on one host with overlapping pools (e.g. two `hearthd dev`
/// without --net-pool) would hand out the same addresses: the second is
/// refused at start, naming the first and what to do; and an address that is
/// already another agent's sandbox is refused at setup.
#[test]
fn an_agent_whose_pool_overlaps_another_agents_is_refused() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // why: a /24 of its own (10.252.x), as the wider pool below must not overlap
    // the /29s the other tests of this process hold at the same time.
    let (_, q) = pool(0);
    let p = [252, q[1], 0];
    let cidr = format!("10.252.{}.0/29", q[1]);
    let first = NodeNet::open(NetConfig {
        pool: cidr.parse().unwrap(),
        state_dir: d1.path().to_path_buf(),
        dns: vec![],
    })
    .unwrap();
    let wider = format!("10.{}.{}.0/24", p[0], p[1]);
    let e = NodeNet::open(NetConfig {
        pool: wider.parse().unwrap(),
        state_dir: d2.path().to_path_buf(),
        dns: vec![],
    })
    .err()
    .expect("an overlapping pool is refused");
    let msg = e.to_string();
    assert!(msg.contains(&format!("overlaps pool {cidr}")), "{msg}");
    assert!(msg.contains("--net-pool"), "{msg}");

    // A sandbox address another live agent holds (e.g. one whose pool was
    // registered in another namespace's registry) is refused, and its entry
    // left alone.
    let rec = first.setup("netovl00001", Policy::default()).unwrap();
    let taken: std::net::Ipv4Addr = addr(p, 2).parse().unwrap();
    // (live, so an agent registering meanwhile does not purge its entry)
    let _stranger =
        hearth_net::registry::register(pool(5).0.parse().unwrap(), d2.path(), |_| {}).unwrap();
    let stranger = _stranger.tag();
    hearth_net::policy::maps::add_host_sandbox(taken, 29, stranger).unwrap();
    let e = first.setup("netovl00002", Policy::default()).unwrap_err();
    let held = hearth_net::policy::maps::host_sandboxes().unwrap();
    hearth_net::policy::maps::remove_host_sandbox(taken, stranger).unwrap();
    // A host route to the address on another device (an agent of an older
    // build, or a manual route): a picked address skips it, one leased by
    // the control plane is refused rather than routed twice.
    sh(&format!("ip route add {taken}/32 dev lo"));
    let skipped = first.setup("netovl00003", Policy::default());
    let routed = first
        .setup_with("netovl00004", Some(taken), Policy::default())
        .unwrap_err();
    let routes = sh("ip route show");
    sh(&format!("ip route del {taken}/32 dev lo"));
    first.teardown("netovl00003").unwrap();
    first.teardown(&rec.sandbox).unwrap();
    let skipped = skipped.expect("another address is picked");
    assert_ne!(skipped.ip, taken, "the routed address is skipped");
    assert!(
        routed.to_string().contains("already routed to lo"),
        "{routed}"
    );
    assert!(!routes.contains("hthnetovl00004"), "{routes}");
    assert!(
        e.to_string().contains("already a sandbox of another agent"),
        "{e}"
    );
    assert!(held.iter().any(|(a, v)| *a == taken && v.owner == stranger));
    assert!(!sh("ip -o link show").contains("hthnetovl00002"));
}

/// Host state no sandbox can be using is purged when an agent registers,
/// decided by the resource: a NAT element without a route to its address,
/// the pin directory of a tap that is gone whose maps no program uses, and
/// the pool registry directory and host map pins of a network namespace
/// that no longer exists. A routed NAT element, the pins of a live
/// sandbox's tap and this namespace's registry stay.
#[test]
fn leftovers_no_sandbox_uses_are_purged_when_an_agent_registers() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cidr, p) = pool(6);
    let live = NodeNet::open(NetConfig {
        pool: cidr.parse().unwrap(),
        state_dir: d1.path().to_path_buf(),
        dns: vec![],
    })
    .unwrap();
    let rec = live.setup("netleft00001", Policy::default()).unwrap();
    // A NAT element nobody routes, and one routed on a non-Hearth device.
    let (_, q) = pool(7);
    let (unrouted, routed) = (addr(q, 1), addr(q, 2));
    sh(&format!("ip route add {routed}/32 dev lo"));
    sh(&format!(
        "nft add element ip hearth sandboxes '{{ {unrouted}, {routed} }}'"
    ));
    // Pins of a tap that is gone: a map nothing uses.
    let gone_tap = format!("hthleft{}", std::process::id() % 100000);
    let gone_pins = format!("/sys/fs/bpf/hearth/{gone_tap}");
    sh(&format!(
        "mkdir -p {gone_pins} && bpftool map create {gone_pins}/CONFIG type array key 4 value 24 entries 1 name CONFIG"
    ));
    assert!(
        std::path::Path::new(&format!("{gone_pins}/CONFIG")).exists(),
        "bpftool made the pin"
    );
    // A namespace that does not exist (nsfs inodes start at 0xf0000000).
    let dead = 1_000_000 + u64::from(std::process::id());
    let dead_reg = format!("/run/hearth/pools/netns-{dead}");
    let dead_pins = format!("/sys/fs/bpf/hearth-host/netns-{dead}");
    std::fs::create_dir_all(&dead_reg).unwrap();
    std::fs::write(format!("{dead_reg}/.lock"), "").unwrap();
    std::fs::write(format!("{dead_reg}/10.9.0.0_24"), "1 v2 7 /gone\n").unwrap();
    std::fs::create_dir_all(&dead_pins).unwrap();

    let (cidr2, _) = pool(8);
    let second = NodeNet::open(NetConfig {
        pool: cidr2.parse().unwrap(),
        state_dir: d2.path().to_path_buf(),
        dns: vec![],
    })
    .unwrap();
    let set = sh("nft list set ip hearth sandboxes");
    let pins = sh("ls /sys/fs/bpf/hearth");
    let own_reg = format!(
        "/run/hearth/pools/netns-{}",
        hearth_net::registry::netns_id()
    );
    // why: read before the clean-up below removes them anyway.
    let (dead_reg_left, dead_pins_left) = (
        std::path::Path::new(&dead_reg).exists(),
        std::path::Path::new(&dead_pins).exists(),
    );
    sh(&format!(
        "nft delete element ip hearth sandboxes '{{ {routed} }}'; ip route del {routed}/32 dev lo; rm -rf {gone_pins} {dead_reg} {dead_pins}"
    ));
    live.teardown(&rec.sandbox).unwrap();
    drop(second);
    assert!(
        !names(&set, &unrouted),
        "unrouted NAT element purged: {set}"
    );
    assert!(names(&set, &routed), "routed NAT element kept: {set}");
    assert!(
        names(&set, &addr(p, 1)),
        "the live sandbox's NAT element kept: {set}"
    );
    assert!(
        !pins.split_whitespace().any(|t| t == gone_tap),
        "pins of a tap that is gone purged: {pins}"
    );
    assert!(
        pins.split_whitespace().any(|t| t == rec.tap),
        "the live sandbox's pins kept: {pins}"
    );
    assert!(
        !dead_reg_left,
        "registry of a namespace that is gone purged"
    );
    assert!(
        !dead_pins_left,
        "host map pins of a namespace that is gone purged"
    );
    assert!(
        std::path::Path::new(&own_reg).exists(),
        "this namespace's registry kept"
    );
}
