//! A real Raft group of in-process members talking HTTP over loopback.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use hearth_sched::{Accel, Resources};
use hearth_store::{Command, NodeRecord, Reply, Store, StoreConfig, StoreError};

struct Member {
    store: Store,
    server: tokio::task::JoinHandle<()>,
    addr: String,
}

impl Member {
    async fn stop(self) {
        self.server.abort();
        self.store.shutdown().await;
    }
}

async fn start(
    id: u64,
    dir: &Path,
    listener: tokio::net::TcpListener,
    peers: BTreeMap<u64, String>,
    snapshot_every: u64,
) -> Member {
    let addr = listener.local_addr().unwrap().to_string();
    let mut cfg = StoreConfig::new(id, dir.join(format!("m{id}")), peers);
    cfg.snapshot_every = snapshot_every;
    let store = Store::open(cfg).await.expect("open store");
    let app = hearth_store::network::routes(store.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    Member {
        store,
        server,
        addr,
    }
}

async fn group(dir: &Path, n: u64, snapshot_every: u64) -> Vec<Member> {
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=n {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, l.local_addr().unwrap().to_string());
        listeners.push(l);
    }
    let mut members = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        members.push(start(i as u64 + 1, dir, l, peers.clone(), snapshot_every).await);
    }
    members
}

fn node(id: &str) -> Command {
    Command::RegisterNode {
        node: NodeRecord {
            id: id.into(),
            instance: "a".into(),
            address: "http://127.0.0.1:1".into(),
            capacity: Resources::new(4, 4096, 10_000),
            accel: Accel::Tcg,
            labels: Default::default(),
            cordoned: false,
            ready: true,
            registered_ms: 1,
            last_heartbeat_ms: 1,
            warm_templates: Default::default(),
            volumes: Default::default(),
        },
    }
}

async fn leader(members: &[Member]) -> u64 {
    let start = Instant::now();
    loop {
        for m in members {
            if let Some(l) = m.store.raft.metrics().borrow().current_leader {
                if members.iter().any(|x| x.store.id() == l) {
                    return l;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no leader within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_member_are_read_linearizably_from_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let members = group(dir.path(), 3, 1000).await;
    let l = leader(&members).await;
    // Write through each member in turn, followers included.
    for (i, m) in members.iter().enumerate() {
        let r = m.store.write(node(&format!("n{i}"))).await.unwrap();
        assert!(matches!(r, Reply::Node { .. }), "{r:?}");
    }
    for m in &members {
        let ids = m
            .store
            .read(|s| s.nodes.keys().cloned().collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(
            ids,
            ["n0", "n1", "n2"],
            "member {} (leader {l})",
            m.store.id()
        );
    }
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_serves_after_the_leader_stops_and_no_acknowledged_write_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = group(dir.path(), 3, 1000).await;
    let l = leader(&members).await;
    for i in 0..20 {
        members[0]
            .store
            .write(node(&format!("a{i}")))
            .await
            .unwrap();
    }
    let old = members.remove(members.iter().position(|m| m.store.id() == l).unwrap());
    old.stop().await;
    let t = Instant::now();
    let l2 = leader(&members).await;
    assert_ne!(l2, l);
    members[0].store.write(node("after")).await.unwrap();
    let elapsed = t.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "new leader took {elapsed:?}"
    );
    for m in &members {
        let n = m.store.read(|s| s.nodes.len()).await.unwrap();
        assert_eq!(n, 21);
    }
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_restarted_after_compaction_catches_up_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = group(dir.path(), 3, 20).await;
    let l = leader(&members).await;
    let fi = members.iter().position(|m| m.store.id() != l).unwrap();
    let follower = members.remove(fi);
    let (fid, faddr) = (follower.store.id(), follower.addr.clone());
    let peers: BTreeMap<u64, String> = follower.store.member_status().members;
    follower.stop().await;

    let leased = lease_some(&members[0].store).await;
    for i in 0..120 {
        members[0]
            .store
            .write(node(&format!("n{i}")))
            .await
            .unwrap();
    }
    let li = members.iter().position(|m| m.store.id() == l).unwrap();
    let purged = wait_for(&members[li].store, |s| s.purged_index.is_some())
        .await
        .purged_index
        .unwrap();
    assert!(purged > 20, "leader compacted its log up to {purged}");

    let listener = rebind(&faddr).await;
    let back = start(fid, dir.path(), listener, peers, 20).await;
    let st = wait_for(&back.store, |s| {
        s.applied_index >= Some(purged) && s.snapshot_index.is_some()
    })
    .await;
    assert!(st.snapshot_index.unwrap() >= purged, "{st:?}");
    assert_eq!(back.store.read(|s| s.nodes.len()).await.unwrap(), 120);
    let got = back
        .store
        .read(|s| s.slices["n0"].leases.clone())
        .await
        .unwrap();
    assert_eq!(got, leased, "leases came with the snapshot");
    back.stop().await;
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_online() {
    let dir = tempfile::tempdir().unwrap();
    let members = group(dir.path(), 3, 1000).await;
    leader(&members).await;
    members[1].store.write(node("x")).await.unwrap();
    let l4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // A joining member starts with no peers: it never bootstraps a group of its own.
    let m4 = start(4, dir.path(), l4, BTreeMap::new(), 1000).await;
    members[2]
        .store
        .add_member(4, m4.addr.clone())
        .await
        .unwrap();
    let st = members[0].store.member_status();
    assert_eq!(st.voters, [1, 2, 3, 4]);
    assert_eq!(m4.store.read(|s| s.nodes.len()).await.unwrap(), 1);

    members[0].store.remove_member(2).await.unwrap();
    let st = wait_for(&members[0].store, |s| s.voters == [1, 3, 4]).await;
    assert!(!st.members.contains_key(&2));
    members[0].store.write(node("y")).await.unwrap();
    assert_eq!(m4.store.read(|s| s.nodes.len()).await.unwrap(), 2);
    m4.stop().await;
    for m in members {
        m.stop().await;
    }
}

#[tokio::test]
async fn a_corrupted_database_refuses_to_start_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m1");
    std::fs::create_dir_all(&mdir).unwrap();
    let db = mdir.join(hearth_store::DB_FILE);
    let garbage: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&db, &garbage).unwrap();
    let cfg = StoreConfig::new(1, mdir.clone(), [(1, "127.0.0.1:1".to_string())].into());
    let err = match Store::open(cfg).await {
        Err(e) => e,
        Ok(_) => panic!("opened a corrupted database"),
    };
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("refusing to start") && msg.contains("left untouched"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        garbage,
        "the file was modified"
    );
}

/// Node n0 joins with a slice and leases two addresses, then frees one.
async fn lease_some(s: &Store) -> BTreeMap<String, std::net::Ipv4Addr> {
    let r = s
        .write(Command::AllocateSlice {
            node: "n0".into(),
            instance: "a".into(),
            want: None,
        })
        .await
        .unwrap();
    assert!(matches!(r, Reply::Slice { .. }), "{r:?}");
    for sb in ["s1", "s2", "s3"] {
        let r = s
            .write(Command::Lease {
                node: "n0".into(),
                instance: "a".into(),
                sandbox: sb.into(),
                want: None,
            })
            .await
            .unwrap();
        assert!(matches!(r, Reply::Lease { .. }), "{r:?}");
    }
    s.write(Command::Release {
        node: "n0".into(),
        instance: "a".into(),
        sandbox: "s2".into(),
    })
    .await
    .unwrap();
    let leases = s.read(|st| st.slices["n0"].leases.clone()).await.unwrap();
    assert_eq!(leases.len(), 2, "{leases:?}");
    leases
}

#[tokio::test]
async fn slices_and_leases_survive_a_restart_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let peers: BTreeMap<u64, String> = [(1, addr.clone())].into();
    let m = start(1, dir.path(), l, peers.clone(), 1000).await;
    let leased = lease_some(&m.store).await;
    let cidr = m.store.read(|st| st.slices["n0"].cidr).await.unwrap();
    m.stop().await;

    let m = start(1, dir.path(), rebind(&addr).await, peers, 1000).await;
    let (c, got) = m
        .store
        .read(|st| (st.slices["n0"].cidr, st.slices["n0"].leases.clone()))
        .await
        .unwrap();
    assert_eq!((c, got), (cidr, leased));
    // The same agent instance joining again keeps its slice; the next lease
    // reuses the freed address, never one still held.
    let r = m
        .store
        .write(Command::Lease {
            node: "n0".into(),
            instance: "a".into(),
            sandbox: "s4".into(),
            want: None,
        })
        .await
        .unwrap();
    let Reply::Lease { ip, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(ip.to_string(), "10.88.0.2");
    m.stop().await;
}

async fn wait_for(
    s: &Store,
    f: impl Fn(&hearth_store::MemberStatus) -> bool,
) -> hearth_store::MemberStatus {
    let start = Instant::now();
    loop {
        let st = s.member_status();
        if f(&st) {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out; last status {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn rebind(addr: &str) -> tokio::net::TcpListener {
    let start = Instant::now();
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("rebinding {addr}: {e}"),
        }
    }
}
