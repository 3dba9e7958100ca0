//! Host↔guest TCP throughput and connection rate with and without the eBPF
//! policy programs on the sandbox's tap, in the same run: two sandboxes boot
//! alike; sandbox B's TC links are unpinned (programs detached). Both boot
//! cold, so their virtio-net device is on its tap directly (offloads on). A
//! third sandbox C, with its programs, comes from a template's warm pool: its
//! device sits on QEMU's hub 0 (no offloads), the pool path's cost. All three
//! have 256 MiB and 1 vCPU (the template is made with `--memory 256`), so the
//! NIC layout and the programs are the only differences. Each round measures
//! the three in a rotated order (A B C, B C A, C A B, ...) so drift and
//! position hit all alike, and the per-round ratios B/A (programs' cost) and
//! C/A (hub vs direct tap) are printed besides the medians.
//!
//! Usage: net-policy [ROUNDS] [MIB] [CONNS]   (default 3, 16, 200; root, scripts/setup artifacts)

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_e2e::{show, stdout, wait_until, Daemon};

const GUEST: &str = "mkdir -p /www && echo ok > /www/index.html && httpd -p 8080 -h /www && \
    (while true; do nc -l -p 5001 > /dev/null; done) & \
    while true; do nc -l -p 5002 < /dev/zero; done";

struct Sb {
    name: &'static str,
    ip: String,
}

fn start(d: &Daemon, name: &'static str, path: &str) -> Sb {
    let out = d.hearth(&[
        "run", "--detach", "--name", name, "busybox", "--", "sh", "-c", GUEST,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let id = stdout(&out).trim().to_string();
    wait_until("sandbox running", Duration::from_secs(120), || {
        d.inspect(&id)["status"] == "running"
    });
    let s = d.inspect(&id);
    assert_eq!(s["start_path"], path, "{s}");
    let ip = s["network"]["ip"].as_str().unwrap().to_string();
    let addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
    wait_until("guest httpd", Duration::from_secs(60), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    });
    Sb { name, ip }
}

fn connect(ip: &str, port: u16) -> TcpStream {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Host → guest: MiB/s until the guest has read everything and closed.
fn upload(ip: &str, mib: usize) -> f64 {
    let buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut s = connect(ip, 5001);
    for _ in 0..mib {
        s.write_all(&buf).expect("upload");
    }
    s.shutdown(Shutdown::Write).unwrap();
    let _ = s.read(&mut [0u8; 1]);
    mib as f64 / t.elapsed().as_secs_f64()
}

/// Guest → host: MiB/s.
fn download(ip: &str, mib: usize) -> f64 {
    let mut buf = vec![0u8; 1 << 16];
    let t = Instant::now();
    let mut s = connect(ip, 5002);
    let mut left = mib << 20;
    while left > 0 {
        let n = s.read(&mut buf).expect("download");
        assert!(n > 0, "guest closed early");
        left = left.saturating_sub(n);
    }
    mib as f64 / t.elapsed().as_secs_f64()
}

/// Sequential HTTP/1.0 requests (a new TCP connection each) per second.
fn conn_rate(ip: &str, n: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        let mut s = connect(ip, 8080);
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(out.starts_with(b"HTTP/1."), "bad reply");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// One sandbox's samples: upload, download, connection rate.
#[derive(Default)]
struct Samples {
    up: Vec<f64>,
    down: Vec<f64>,
    conns: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let conns: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let d = Daemon::start();
    let a = start(&d, "with-policy", "cold");
    let b = start(&d, "without-policy", "cold");
    let out = d.hearth(&[
        "template", "create", "busybox", "--name", "netbench", "--pool", "1", "--memory", "256",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    wait_until("the warm pool to fill", Duration::from_secs(300), || {
        let v: serde_json::Value =
            serde_json::from_str(&stdout(&d.hearth(&["template", "ls", "--json"])))
                .unwrap_or_default();
        v[0]["pool_ready"] == 1
    });
    let c = start(&d, "pool-hub", "pool");
    for sb in [&a, &b, &c] {
        let s = d.inspect(sb.name);
        assert_eq!(s["memory_mib"], 256, "{s}");
    }
    let tap_b = d.inspect(b.name)["network"]["tap"]
        .as_str()
        .unwrap()
        .to_string();
    for l in ["link_guest_out", "link_guest_in"] {
        std::fs::remove_file(format!("/sys/fs/bpf/hearth/{tap_b}/{l}")).expect("unpin link");
    }
    let links = String::from_utf8_lossy(
        &Command::new("bpftool")
            .args(["link", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    eprintln!("links after detaching B:\n{links}");

    let mut res = [
        (a.name, Samples::default()),
        (b.name, Samples::default()),
        (c.name, Samples::default()),
    ];
    let sbs = [&a, &b, &c];
    for r in 0..rounds {
        for k in 0..sbs.len() {
            let i = (r + k) % sbs.len();
            let sb = sbs[i];
            res[i].1.up.push(upload(&sb.ip, mib));
            res[i].1.down.push(download(&sb.ip, mib));
            res[i].1.conns.push(conn_rate(&sb.ip, conns));
        }
        eprintln!("round {} done", r + 1);
    }
    let ratios = |i: usize| -> [Vec<f64>; 3] {
        let per = |x: &Vec<f64>, y: &Vec<f64>| -> Vec<f64> {
            x.iter().zip(y).map(|(x, y)| x / y).collect()
        };
        [
            per(&res[i].1.up, &res[0].1.up),
            per(&res[i].1.down, &res[0].1.down),
            per(&res[i].1.conns, &res[0].1.conns),
        ]
    };
    let (b_a, c_a) = (ratios(1), ratios(2));
    let st = d.hearth(&["policy", "stats", a.name]);
    eprintln!("{}", stdout(&st));
    println!(
        "| sandbox | host→guest MiB/s | guest→host MiB/s | connections/s (HTTP/1.0, sequential) |"
    );
    println!("|---|---|---|---|");
    for (name, s) in res {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            median(s.up),
            median(s.down),
            median(s.conns)
        );
    }
    println!(
        "\n(median of {rounds} rounds; {mib} MiB per transfer; {conns} connections per round)"
    );
    println!(
        "\n| per-round ratio | host→guest | guest→host | connections/s | rounds (host→guest) |"
    );
    println!("|---|---|---|---|---|");
    for (what, r) in [
        ("without-policy / with-policy", b_a),
        ("pool-hub / with-policy", c_a),
    ] {
        let list = r[0]
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        let [up, down, conns] = r;
        println!(
            "| {what} | {:.2} | {:.2} | {:.2} | {list} |",
            median(up),
            median(down),
            median(conns)
        );
    }
    for n in [a.name, b.name, c.name] {
        let _ = d.hearth(&["rm", "-f", n]);
    }
    let _ = d.hearth(&["template", "rm", "netbench"]);
}
