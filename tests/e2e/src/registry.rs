//! A real OCI registry for the tests: Debian's `docker-registry` (distribution
//! 2.8) started on 127.0.0.1 with a free port, its own storage directory and a
//! config written here, optionally behind htpasswd basic auth. Images are built
//! here as OCI layouts (layers are tars made by the tests, compressed as asked)
//! and pushed with `skopeo copy`. Also: fake registries that answer 500 or stall.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::free_port;

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A running `docker-registry`, stopped on drop.
pub struct Registry {
    child: Option<Child>,
    pub port: u16,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: tempfile::TempDir,
    /// User and password, when the registry requires them.
    pub creds: Option<(String, String)>,
    /// The token service of a bearer-auth registry.
    pub token_server: Option<TokenServer>,
}

enum Auth {
    None,
    Basic,
    Token,
}

impl Registry {
    /// An open registry (no auth).
    pub fn start() -> Registry {
        Registry::start_inner(None, Auth::None)
    }

    /// A registry that demands HTTP basic auth (htpasswd, bcrypt) for everything.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Registry {
        Registry::start_inner(Some((user.to_string(), password.to_string())), Auth::Basic)
    }

    /// A registry that demands bearer tokens (the Distribution token flow) from a
    /// [`TokenServer`] that grants them for `user`/`password` only.
    pub fn start_with_token_auth(user: &str, password: &str) -> Registry {
        Registry::start_inner(Some((user.to_string(), password.to_string())), Auth::Token)
    }

    fn start_inner(creds: Option<(String, String)>, kind: Auth) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("hearth-registry-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let mut auth = String::new();
        let mut token_server = None;
        if let (Auth::Token, Some((u, p))) = (&kind, &creds) {
            let ts = TokenServer::start(dir.path(), u, p);
            auth = format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                ts.realm,
                TokenServer::SERVICE,
                TokenServer::ISSUER,
                dir.path().join("token-cert.pem").display()
            );
            token_server = Some(ts);
        } else if let (Auth::Basic, Some((u, p))) = (&kind, &creds) {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd (apache2-utils) is needed for the auth tests");
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).expect("htpasswd file");
            auth = format!(
                "auth:\n  htpasswd:\n    realm: hearth-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("storage").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).expect("config");
        let mut r = Registry {
            child: None,
            port,
            addr: format!("127.0.0.1:{port}"),
            dir,
            creds,
            token_server,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("registry.log")).expect("log");
        let mut cmd = Command::new("docker-registry");
        // SAFETY: prctl in the forked child before exec; async-signal-safe. The
        // registry dies with the test that started it.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect(
                "spawn docker-registry (Debian package docker-registry; scripts/setup installs it)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = write!(
                    s,
                    "GET /v2/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    self.addr
                );
                let mut resp = String::new();
                let _ = s.read_to_string(&mut resp);
                if resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.1 401") {
                    return;
                }
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("docker-registry exited with {st}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on {} within 30s: {}",
                self.addr,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the registry (its storage stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many `GET …/blobs/DIGEST` requests the registry answered with 200.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} HTTP/1.1\" 200");
        self.log_text()
            .lines()
            .filter(|l| l.contains("\"GET ") && l.contains(&needle))
            .count()
    }

    /// `127.0.0.1:PORT/NAME` (NAME may carry `:tag` or `@digest`).
    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }

    /// Pushes the OCI layout at `layout` as `NAME:TAG` with `skopeo copy --all`;
    /// `format` `Some("v2s2")` converts it to a docker schema-2 manifest.
    pub fn push(&self, layout: &Path, name_tag: &str, format: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--all",
            "--dest-tls-verify=false",
        ]);
        if let Some(f) = format {
            cmd.args(["--format", f]);
        }
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        let out = cmd
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://{}", self.reference(name_tag)))
            .output()
            .expect("run skopeo (Debian package skopeo; scripts/setup installs it)");
        assert!(
            out.status.success(),
            "skopeo push of {name_tag} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The file in the registry's storage that holds blob `digest` (to corrupt it).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Layer compression for [`Layout`].
#[derive(Clone, Copy)]
pub enum Compress {
    None,
    Gzip,
    Zstd,
}

/// An OCI image layout under construction.
#[derive(Default)]
pub struct Layout {
    /// (blob, mediaType, diff_id)
    layers: Vec<(Vec<u8>, &'static str, String)>,
    config: serde_json::Value,
}

impl Layout {
    /// A linux/amd64 image running `cmd` by default.
    pub fn new(cmd: &[&str]) -> Layout {
        Layout {
            layers: Vec::new(),
            config: serde_json::json!({"Env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"], "Cmd": cmd}),
        }
    }

    /// Adds an (uncompressed) tar layer, compressed as asked.
    pub fn layer(mut self, tar: &[u8], c: Compress) -> Layout {
        let (blob, mt) = match c {
            Compress::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
            Compress::Gzip => (gzip(tar), "application/vnd.oci.image.layer.v1.tar+gzip"),
            Compress::Zstd => (
                zstd::encode_all(tar, 3).expect("zstd"),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        self.layers.push((blob, mt, sha(tar)));
        self
    }

    /// Adds a gzip layer whose bytes are given as is (e.g. truncated).
    pub fn raw_gzip_layer(mut self, blob: Vec<u8>) -> Layout {
        let id = sha(&blob);
        self.layers
            .push((blob, "application/vnd.oci.image.layer.v1.tar+gzip", id));
        self
    }

    /// The digests of the layer blobs, in order.
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|(b, _, _)| sha(b)).collect()
    }

    /// Writes the layout; the index lists one manifest per platform in `platforms`
    /// (`("linux","amd64")`…), all with the same layers. Returns the manifest digests.
    pub fn write_platforms(&self, dir: &Path, platforms: &[(&str, &str)]) -> Vec<String> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        let put = |data: &[u8]| -> (String, usize) {
            let d = sha(data);
            std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data).expect("blob");
            (d, data.len())
        };
        let layer_descs: Vec<serde_json::Value> = self
            .layers
            .iter()
            .map(|(b, mt, _)| {
                let (d, s) = put(b);
                serde_json::json!({"mediaType": mt, "digest": d, "size": s})
            })
            .collect();
        let mut entries = Vec::new();
        let mut digests = Vec::new();
        for (os, arch) in platforms {
            let config = serde_json::to_vec(&serde_json::json!({
                "architecture": arch, "os": os, "config": self.config,
                "rootfs": {"type": "layers", "diff_ids": self.layers.iter().map(|l| l.2.clone()).collect::<Vec<_>>()},
            }))
            .expect("json");
            let (cd, cs) = put(&config);
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                "layers": layer_descs,
            }))
            .expect("json");
            let (md, ms) = put(&manifest);
            digests.push(md.clone());
            entries.push(
                serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md, "size": ms, "platform": {"architecture": arch, "os": os}}),
            );
        }
        let index = if platforms.len() == 1 {
            serde_json::json!({"schemaVersion": 2, "manifests": entries})
        } else {
            // A nested image index, as multi-platform images are pushed.
            let inner = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}))
            .expect("json");
            let (id, is) = put(&inner);
            serde_json::json!({"schemaVersion": 2, "manifests": [
                {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": id, "size": is}]})
        };
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        std::fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("index");
        digests
    }

    /// Writes a single linux/amd64 image; returns its manifest digest.
    pub fn write(&self, dir: &Path) -> String {
        self.write_platforms(dir, &[("linux", "amd64")]).remove(0)
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// One tar entry with a name and link target written verbatim (hostile layers).
pub enum Raw<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// A tar whose entry names are not checked or normalized in any way.
pub fn raw_tar(entries: &[Raw]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (kind, name, link, data): (tar::EntryType, &str, Option<&str>, &[u8]) = match e {
            Raw::File(n, d) => (tar::EntryType::Regular, n, None, d),
            Raw::Dir(n) => (tar::EntryType::Directory, n, None, b""),
            Raw::Symlink(n, t) => (tar::EntryType::Symlink, n, Some(t), b""),
            Raw::Hardlink(n, t) => (tar::EntryType::Link, n, Some(t), b""),
        };
        let mut h = tar::Header::new_old();
        assert!(name.len() < 100 && link.map_or(0, str::len) < 100);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data).expect("tar");
    }
    b.into_inner().expect("tar")
}

/// A registry stand-in on 127.0.0.1 that answers every request with HTTP 500,
/// or accepts connections and never answers. Stops with the value.
pub struct FakeRegistry {
    pub addr: String,
    stop: Arc<AtomicBool>,
}

impl FakeRegistry {
    pub fn failing_500() -> FakeRegistry {
        FakeRegistry::serve(false)
    }

    pub fn stalling() -> FakeRegistry {
        FakeRegistry::serve(true)
    }

    fn serve(stall: bool) -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        if stall {
                            held.push(s);
                            continue;
                        }
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf);
                        let body = "internal trouble";
                        let _ = write!(
                            s,
                            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        FakeRegistry { addr, stop }
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A Distribution token service on 127.0.0.1: `GET /token?service=…&scope=…`
/// with basic auth answers a JWT (RS256, signed with `openssl`, its certificate in
/// the `x5c` header and in the registry's `rootcertbundle`) granting the asked
/// scopes to the one known user; anonymous requests get a token granting nothing,
/// wrong credentials a 401. Stops with the value.
pub struct TokenServer {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    stop: Arc<AtomicBool>,
}

impl TokenServer {
    pub const SERVICE: &'static str = "hearth-test-registry";
    pub const ISSUER: &'static str = "hearth-test-issuer";

    fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=hearth-test-token",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl req");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("openssl x509");
        assert!(der.status.success());
        let x5c = base64::engine::general_purpose::STANDARD.encode(&der.stdout);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let realm = format!("http://{}/token", listener.local_addr().expect("addr"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let user = user.to_string();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                    match s.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let authz = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("authorization")
                        .then(|| v.trim().to_string())
                });
                let (status, body) = match authz {
                    Some(a) if a != expected => (
                        "401 Unauthorized",
                        "{\"details\":\"bad credentials\"}".to_string(),
                    ),
                    a => {
                        let scopes: Vec<String> = target
                            .split_once('?')
                            .map(|(_, q)| q)
                            .unwrap_or("")
                            .split('&')
                            .filter_map(|kv| kv.strip_prefix("scope="))
                            .map(percent_decode)
                            .collect();
                        let granted = if a.is_some() { scopes } else { Vec::new() };
                        let jwt =
                            sign_token(&key, &x5c, if a.is_some() { &user } else { "" }, &granted);
                        ("200 OK", format!("{{\"token\":\"{jwt}\",\"access_token\":\"{jwt}\",\"expires_in\":300}}"))
                    }
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenServer { realm, stop }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An RS256 JWT granting `scopes` (`repository:NAME:ACTIONS`).
fn sign_token(key: &Path, x5c: &str, sub: &str, scopes: &[String]) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TokenServer::ISSUER, "sub": sub, "aud": TokenServer::SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", scopes.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl dgst");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(signing_input.as_bytes())
        .expect("sign input");
    let out = child.wait_with_output().expect("openssl dgst");
    assert!(out.status.success(), "openssl dgst -sign");
    format!("{signing_input}.{}", b64(&out.stdout))
}
