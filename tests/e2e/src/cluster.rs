//! A multi-process cluster on loopback: control-plane members (`hearthd
//! control`) and node agents (`hearthd agent`), each a real process that a
//! test can kill -9, stop (SIGSTOP, a node that goes silent) and restart.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bin_dir;

/// The cluster's API token: every member and agent of a test cluster shares it.
pub const TOKEN: &str = "hearth-e2e-cluster-token-0123456789";

/// Picks a free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One `hearthd` process of the cluster.
pub struct Proc {
    pub name: String,
    pub args: Vec<String>,
    pub port: u16,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Proc {
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = Command::new(bin_dir().join("hearthd"));
        // SAFETY: prctl in the forked child before exec; async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .args(&self.args)
            .env("RUST_LOG", "info,openraft=warn")
            .env("HEARTH_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn hearthd");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // why: a stopped process must be able to die.
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit on its own; its status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Control-plane members and agents on loopback.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Proc>,
    pub agents: Vec<Proc>,
}

impl Drop for Cluster {
    /// Kills the agents before their VMs, then every QEMU under the cluster's
    /// dir: QEMU outlives a killed agent by design, and a failed test must not
    /// leave VMs running on the machine.
    fn drop(&mut self) {
        for p in self.agents.iter_mut().chain(self.members.iter_mut()) {
            p.kill9();
        }
        crate::kill_vmms_under(self.dir.path());
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A minimal HTTP/1.1 request to 127.0.0.1:`port`.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // why: axum answers small bodies with Content-Length, streams chunked; the
    // cluster API's JSON answers are never chunked.
    Ok(Resp { status, body })
}

impl Cluster {
    /// `n` control members (ids 1..=n), no agents yet.
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("hearth-cluster-")
            .tempdir()
            .expect("tempdir");
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peers: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect();
        let mut c = Cluster {
            dir,
            members: Vec::new(),
            agents: Vec::new(),
        };
        for (i, port) in ports.iter().enumerate() {
            let id = i + 1;
            let mut args: Vec<String> = vec![
                "control".into(),
                "--id".into(),
                id.to_string(),
                "--peers".into(),
                peers.join(","),
                "--data-dir".into(),
                c.dir
                    .path()
                    .join(format!("control{id}"))
                    .display()
                    .to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut p = Proc {
                name: format!("control{id}"),
                args,
                port: *port,
                log: c.dir.path().join(format!("control{id}.log")),
                child: None,
            };
            p.spawn();
            c.members.push(p);
        }
        c.wait_leader(Duration::from_secs(30));
        c
    }

    /// The last `lines` lines of every member's and agent's log, for a
    /// failed assertion's message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in self.members.iter().chain(&self.agents) {
            let text = p.log_text();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            out.push_str(&format!("--- {} (last {lines} lines)\n", p.name));
            for l in &all[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub fn control_addrs(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts an agent (not waiting for it to register).
    pub fn spawn_agent(&mut self, node: &str, data: &str, extra: &[&str]) -> usize {
        let control = self.control_addrs();
        self.spawn_agent_via(node, data, &control, extra)
    }

    /// Starts an agent that talks only to the members in `control`
    /// (`HOST:PORT,...`), not waiting for it to register.
    pub fn spawn_agent_via(
        &mut self,
        node: &str,
        data: &str,
        control: &str,
        extra: &[&str],
    ) -> usize {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--control".into(),
            control.into(),
            "--node".into(),
            node.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            self.dir.path().join(data).display().to_string(),
            "--accel".into(),
            "tcg".into(),
            "--heartbeat-ms".into(),
            "300".into(),
            // why: agents of concurrent test clusters share the root namespace.
            "--net-pool".into(),
            crate::net_pool(port),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = Proc {
            name: format!("agent-{node}-{data}"),
            args,
            port,
            log: self.dir.path().join(format!("agent-{node}-{data}.log")),
            child: None,
        };
        p.spawn();
        self.agents.push(p);
        self.agents.len() - 1
    }

    /// Starts an agent and waits until the control plane lists it ready.
    pub fn add_agent(&mut self, node: &str, extra: &[&str]) -> usize {
        let i = self.spawn_agent(node, node, extra);
        self.wait_node(node, "ready", Duration::from_secs(60));
        i
    }

    /// Any live member's port.
    pub fn any_port(&self) -> u16 {
        self.members
            .iter()
            .find(|m| m.child.is_some())
            .map(|m| m.port)
            .expect("a live member")
    }

    pub fn get(&self, path: &str) -> Resp {
        http(self.any_port(), "GET", path, None, &[]).expect("GET")
    }

    /// The leader's id, as a live member reports it.
    pub fn leader(&self) -> Option<u64> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            if let Ok(r) = http(m.port, "GET", "/raft/status", None, &[]) {
                if let Some(l) = r.json()["leader"].as_u64() {
                    let live = self
                        .members
                        .get(l as usize - 1)
                        .is_some_and(|p| p.child.is_some());
                    if live {
                        return Some(l);
                    }
                }
            }
        }
        None
    }

    pub fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until node `id` has `status` (`ready` / `not_ready`).
    pub fn wait_node(&self, id: &str, status: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = http(
                self.any_port(),
                "GET",
                &format!("/v1/nodes/{id}"),
                None,
                &[],
            ) {
                let v = r.json();
                if r.status == 200 && v["status"] == status {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {id} not {status} within {timeout:?}; agents: {}",
                self.agents
                    .iter()
                    .map(|a| a.log_text())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Restarts a killed member with its old arguments and data.
    pub fn restart_member(&mut self, id: u64) {
        let m = &mut self.members[id as usize - 1];
        m.kill9();
        m.spawn();
    }
}
