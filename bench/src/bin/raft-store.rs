//! Raft store: committed writes per second and latency, 1 and 3 members,
//! beside etcd (Debian's etcd-server) on the same machine and disk, with the
//! same value size, both with fsync on (redb's default durability; etcd
//! always fsyncs its WAL). Each system gets the same closed-loop load: C
//! clients over keep-alive HTTP, each sending its next write when the last
//! one was acknowledged as committed, to the leader.
//!
//! Hearth's write is a real state-machine command (`put_image`, value in the
//! digest field) posted to the leader's `/raft/forward`; etcd's is
//! `POST /v3/kv/put` through its JSON gateway.
//!
//! Run: cargo build --release --bins && cargo run --release -p hearth-bench --bin raft-store

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hearth_bench::percentile;
use hearth_e2e::cluster::{free_port, Cluster};

const VALUE_BYTES: usize = 256;
const CLIENTS: usize = 16;
const WRITES: usize = 2000;

struct Result {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

async fn drive(make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync>) -> Result {
    // Warm up connections and the leader.
    for i in 0..50 {
        let _ = make(1_000_000 + i).send().await;
    }
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let make = make.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in (c..WRITES).step_by(CLIENTS) {
                    let t = Instant::now();
                    let r = make(i).send().await.expect("write");
                    assert!(r.status().is_success(), "write failed: {}", r.status());
                    let body = r.text().await.expect("body");
                    assert!(
                        !body.contains("not_leader") && !body.contains("failed"),
                        "{body}"
                    );
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("client"));
    }
    let total = start.elapsed();
    Result {
        rate: WRITES as f64 / total.as_secs_f64(),
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
    }
}

fn value(i: usize) -> String {
    let s = format!("{i:08}");
    s.repeat(VALUE_BYTES / s.len())
}

async fn hearth(members: u64) -> Result {
    let c = Cluster::start(members, &[]);
    let leader = c.wait_leader(Duration::from_secs(30));
    let port = c.members[leader as usize - 1].port;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/raft/forward");
    let r = drive(Arc::new(move |i| {
        let body = serde_json::json!({"write": {"op": "put_image", "image": {"name": format!("key{i:08}"), "digest": value(i), "nodes": []}}});
        http.post(&url).bearer_auth(hearth_e2e::cluster::TOKEN).json(&body)
    }))
    .await;
    drop(c);
    r
}

struct Etcd {
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn etcd(members: usize) -> Result {
    let dir = tempfile::Builder::new()
        .prefix("hearth-bench-etcd-")
        .tempdir()
        .expect("tempdir");
    let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
    let cluster: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("e{i}=http://127.0.0.1:{p}"))
        .collect();
    let mut children = Vec::new();
    for (i, (cp, pp)) in ports.iter().enumerate() {
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(dir.path().join(format!("e{i}")))
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{cp}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{cp}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{pp}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{pp}"),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (apt-get install etcd-server)");
        children.push(child);
    }
    let guard = Etcd {
        children,
        _dir: dir,
    };
    let http = reqwest::Client::new();
    // Find the leader: the member whose id is the leader it reports.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader_port = loop {
        let mut found = None;
        for (cp, _) in &ports {
            let r = http
                .post(format!("http://127.0.0.1:{cp}/v3/maintenance/status"))
                .body("{}")
                .send()
                .await;
            if let Ok(r) = r {
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    let me = v["header"]["member_id"].as_str().map(str::to_string);
                    let leader = v["leader"].as_str().map(str::to_string);
                    if me.is_some() && me == leader {
                        found = Some(*cp);
                    }
                }
            }
        }
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "etcd has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let url = format!("http://127.0.0.1:{leader_port}/v3/kv/put");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let r = drive(Arc::new(move |i| {
        let body = serde_json::json!({"key": b64(&format!("key{i:08}")), "value": b64(&value(i))});
        http.post(&url).json(&body)
    }))
    .await;
    drop(guard);
    r
}

#[tokio::main]
async fn main() {
    println!(
        "{WRITES} writes of {VALUE_BYTES}-byte values, {CLIENTS} concurrent clients, fsync on\n"
    );
    println!("| system          | members | writes/s | p50 (ms) | p99 (ms) |");
    println!("|-----------------|---------|----------|----------|----------|");
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let mut ratios = Vec::new();
    for members in [1usize, 3] {
        let h = hearth(members as u64).await;
        println!(
            "| hearth (redb)   | {members:>7} | {:>8.0} | {:>8} | {:>8} |",
            h.rate,
            ms(h.p50),
            ms(h.p99)
        );
        let e = etcd(members).await;
        println!(
            "| etcd 3.4        | {members:>7} | {:>8.0} | {:>8} | {:>8} |",
            e.rate,
            ms(e.p50),
            ms(e.p99)
        );
        ratios.push((
            members,
            h.rate / e.rate,
            h.p99.as_secs_f64() / e.p99.as_secs_f64(),
        ));
    }
    println!();
    for (m, rate, p99) in ratios {
        println!("{m} member(s): hearth/etcd throughput {rate:.2}x, p99 latency {p99:.2}x");
    }
}
