//! Shared harness of the black-box tests: starts the real `hearthd dev` on a free
//! port with its own data dir, drives it with the real `hearth` CLI or raw HTTP,
//! and builds test images (a busybox root filesystem directory, OCI layouts and
//! docker archives written by hand).
//!
//! The binaries are taken from `HEARTH_BIN_DIR`, else from the cargo target
//! directory of this test executable (`scripts/test` builds them first).

pub mod cluster;
pub mod images;
pub mod registry;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding `hearth` and `hearthd`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HEARTH_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-exe> or target/<profile>/<bench-exe> -> target/<profile>
    let exe = std::env::current_exe().expect("current exe");
    let parent = exe.parent().expect("exe dir");
    let dir = if parent.join("hearthd").is_file() {
        parent.to_path_buf()
    } else {
        parent.parent().expect("target dir").to_path_buf()
    };
    for b in ["hearth", "hearthd"] {
        assert!(
            dir.join(b).is_file(),
            "{} not found in {}: build the binaries first (cargo build --release --bins) or set HEARTH_BIN_DIR",
            b,
            dir.display()
        );
    }
    dir
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A /24 for the daemon on `port`, distinct for distinct ports in a run.
pub fn net_pool(port: u16) -> String {
    format!("10.{}.{}.0/24", 100 + (port / 256) % 150, port % 256)
}

/// Options for [`Daemon::start_with`].
#[derive(Clone)]
pub struct DaemonOptions {
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
    /// Import the busybox image as `busybox`.
    pub busybox: bool,
    /// Extra environment for hearthd (e.g. `HEARTH_NET_POOL`).
    pub env: Vec<(String, String)>,
    /// More `hearthd dev` arguments.
    pub extra_args: Vec<String>,
    /// Run the daemon inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Address the API listens on (default 127.0.0.1).
    pub listen_ip: Option<String>,
    /// Address the tests reach the API at (default: `listen_ip`).
    pub reach_ip: Option<String>,
    /// Called with the data dir (not yet created) before the first start, e.g. to mount it.
    pub before_start: Option<fn(&Path)>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            accel: "tcg".into(),
            busybox: true,
            env: Vec::new(),
            extra_args: Vec::new(),
            netns: None,
            listen_ip: None,
            reach_ip: None,
            before_start: None,
        }
    }
}

/// A running `hearthd dev`, killed (and its VMs with it) on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub api: String,
    /// The API's address.
    pub host: String,
    pub port: u16,
    pub data: tempfile::TempDir,
    pub log: PathBuf,
    opts: DaemonOptions,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(DaemonOptions::default())
    }

    /// A default daemon with extra environment.
    pub fn start_with_env(env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(DaemonOptions {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..DaemonOptions::default()
        })
    }

    pub fn start_with(opts: DaemonOptions) -> Daemon {
        let data = tempfile::Builder::new()
            .prefix("hearth-e2e-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let host = opts
            .reach_ip
            .clone()
            .or_else(|| opts.listen_ip.clone())
            .unwrap_or_else(|| "127.0.0.1".into());
        let mut d = Daemon {
            child: None,
            api: format!("http://{host}:{port}"),
            host,
            port,
            log: data.path().join("hearthd.log"),
            data,
            opts: opts.clone(),
        };
        if let Some(f) = opts.before_start {
            f(&d.data_dir());
        }
        d.spawn();
        if opts.busybox {
            let rootfs = d.data.path().join("busybox-rootfs");
            images::busybox_rootfs(&rootfs);
            let out = d.hearth(&[
                "image",
                "import",
                "--name",
                "busybox",
                rootfs.to_str().unwrap(),
            ]);
            assert!(out.status.success(), "import busybox: {}", show(&out));
        }
        d
    }

    /// Sets (`Some`) or removes (`None`) an environment variable for the
    /// daemon's next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.opts.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.opts.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Starts (or restarts) the daemon process on the same port and data dir.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = match &self.opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin_dir().join("hearthd"));
                c
            }
            None => Command::new(bin_dir().join("hearthd")),
        };
        // SAFETY: prctl in the forked child before exec; async-signal-safe. It
        // makes hearthd die with the test thread that started it, so a crashed
        // test run leaves no daemon behind.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .args(["dev", "--data-dir"])
            .arg(self.data.path().join("data"))
            .args([
                "--listen",
                &format!(
                    "{}:{}",
                    self.opts.listen_ip.as_deref().unwrap_or(&self.host),
                    self.port
                ),
            ])
            .args(["--accel", &self.opts.accel])
            // why: daemons of concurrent tests share the host's routing table;
            // each gets its own address pool, derived from its unique port.
            .env("HEARTH_NET_POOL", net_pool(self.port))
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .args(&self.opts.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn hearthd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = self.http("GET", "/v1/info", None) {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("hearthd exited with {st}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "hearthd did not answer on {} within 60s: {}",
                self.api,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("data")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILLs the daemon (its VMs, in their own sessions, survive it).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's API token (created by hearthd in its data dir).
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("api-token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    }

    /// A `hearth` command pointed at this daemon.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("hearth"));
        c.env("HEARTH_API", &self.api)
            .env("HEARTH_TOKEN", self.token())
            .args(args);
        c
    }

    /// Runs `hearth ARGS` with stdin from /dev/null.
    pub fn hearth(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hearth")
    }

    /// Runs `hearth ARGS` feeding `input` on stdin.
    pub fn hearth_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run hearth");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("wait hearth");
        let _ = writer.join();
        out
    }

    /// A minimal authenticated HTTP/1.1 request; returns (status, body).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        self.http_as(Some(&self.token()), method, path, body)
    }

    /// An HTTP/1.1 request with the given token (or none); returns (status, body).
    pub fn http_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let mut s = TcpStream::connect((self.host.as_str(), self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
        Ok((status, body))
    }

    /// `GET /v1/info` as JSON.
    pub fn inspect_info(&self) -> serde_json::Value {
        let (status, body) = self.http("GET", "/v1/info", None).expect("info");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("info json")
    }

    /// Waits until no sandbox is `recovering` (a restarted hearthd takes
    /// running sandboxes over in the background while it serves the API).
    pub fn wait_recovered(&self) {
        wait_until(
            "the restarted hearthd to recover its sandboxes",
            Duration::from_secs(120),
            || {
                let out = self.hearth(&["ps", "--json"]);
                assert!(out.status.success(), "ps: {}", show(&out));
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ps json");
                v.as_array()
                    .expect("list")
                    .iter()
                    .all(|s| s["status"] != "recovering")
            },
        );
    }

    /// `hearth inspect` as JSON.
    pub fn inspect(&self, id: &str) -> serde_json::Value {
        let out = self.hearth(&["inspect", id]);
        assert!(out.status.success(), "inspect {id}: {}", show(&out));
        serde_json::from_slice(&out.stdout).expect("inspect json")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Remove every sandbox so no VM outlives the test, then stop the daemon.
        if self.child.is_some() {
            if let Ok((200, body)) = self.http("GET", "/v1/sandboxes", None) {
                if let Ok(serde_json::Value::Array(list)) = serde_json::from_str(&body) {
                    for s in list {
                        if let Some(id) = s["id"].as_str() {
                            let _ = self.http(
                                "DELETE",
                                &format!("/v1/sandboxes/{id}?force=true"),
                                None,
                            );
                        }
                    }
                }
            }
        }
        self.kill9();
        let leaked = vmm_pids_under(self.data.path());
        kill_vmms_under(self.data.path());
        if !leaked.is_empty() && !std::thread::panicking() {
            panic!("QEMU processes outlived the removal of every sandbox: {leaked:?}");
        }
    }
}

/// PIDs of QEMU processes whose command line mentions `dir`.
pub fn vmm_pids_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Kills (SIGKILL) every QEMU process whose command line mentions `dir`.
pub fn kill_vmms_under(dir: &Path) {
    for pid in vmm_pids_under(dir) {
        // SAFETY: kill(2) on a pid we just read from /proc; at worst ESRCH.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// True once process `pid` has closed its files: it is gone, or a zombie
/// (`Z`/`X` in `/proc/PID/stat`) with no other thread left. An empty
/// `/proc/PID/cmdline` is not enough (the kernel drops a dying process's
/// memory, and so its command line, before it closes its files), nor is a
/// zombie main thread while other threads (sharing the file table) still
/// exit: its locks and listening sockets may still be held.
pub fn process_exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(st) => {
            let zombie = st
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
                .is_none_or(|state| matches!(state, 'Z' | 'X'));
            let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
            zombie && threads <= 1
        }
        Err(_) => true,
    }
}

/// SIGKILL of `pid`, then waits (up to 30 s) until it has closed its files
/// ([`process_exited`]).
pub fn kill9_and_wait(pid: i32) {
    // SAFETY: kill(2) of a pid the caller started or read from a state file; at worst ESRCH.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    let e = std::io::Error::last_os_error();
    assert!(
        r == 0 || e.raw_os_error() == Some(libc::ESRCH),
        "kill -9 {pid}: {e}"
    );
    wait_until(
        &format!("process {pid} to exit after SIGKILL"),
        Duration::from_secs(30),
        || process_exited(pid),
    );
}

/// Skips the calling test (prints why) when `ok` is false — unless
/// `HEARTH_TEST_STRICT` is set (scripts/test, i.e. CI, sets it), where a
/// missing capability is a failure: a CI that lacked root would otherwise
/// pass the tests that need it without running them.
/// Returns whether the test may go on.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    assert!(
        std::env::var_os("HEARTH_TEST_STRICT").is_none(),
        "this test needs {what}, and HEARTH_TEST_STRICT forbids skipping it"
    );
    eprintln!("skipped: needs {what}");
    false
}

/// Waits until `f` holds, or panics naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Formats a command's output for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
