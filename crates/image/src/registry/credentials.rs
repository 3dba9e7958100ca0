//! Registry credentials: hearth's own file (written by `hearth login`, mode 0600),
//! then docker's `config.json`. Both use docker's format,
//! `{"auths": {"HOST[:PORT]": {"auth": base64("USER:PASSWORD")}}}`, so a file can
//! be copied from one to the other. Credential helpers (`credsStore`) are not run.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};

use crate::ImageError;

/// Where credentials are looked up, and where `hearth login` stores them.
#[derive(Clone, Debug)]
pub struct Credentials {
    file: PathBuf,
    docker_config: Option<PathBuf>,
}

#[derive(Serialize, Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Serialize, Deserialize, Default, Clone)]
struct AuthEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `host:5000` stays.
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// The names one registry goes by (docker hub has three).
fn aliases(registry: &str) -> Vec<&str> {
    match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => {
            vec!["docker.io", "index.docker.io", "registry-1.docker.io"]
        }
        r => vec![r],
    }
}

impl Credentials {
    /// `file` is hearth's own; `docker_config` a docker `config.json` to fall back on.
    pub fn new(file: PathBuf, docker_config: Option<PathBuf>) -> Credentials {
        Credentials {
            file,
            docker_config,
        }
    }

    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
    pub fn default_docker_config() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(d).join("config.json"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
    }

    /// Saves a username and password for `registry`, replacing any earlier ones.
    pub fn store(&self, registry: &str, username: &str, password: &str) -> Result<(), ImageError> {
        if registry.is_empty() || registry.contains('/') || username.contains(':') {
            return Err(ImageError::Credentials {
                path: self.file.clone(),
                reason: format!(
                    "registry {registry:?} must be HOST[:PORT] and the username must not contain ':'"
                ),
            });
        }
        let mut cfg = read(&self.file)?.unwrap_or_default();
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        cfg.auths.insert(
            registry.to_string(),
            AuthEntry {
                auth: Some(auth),
                ..AuthEntry::default()
            },
        );
        self.write(&cfg)
    }

    /// Forgets the credentials for `registry`; false when there were none.
    pub fn remove(&self, registry: &str) -> Result<bool, ImageError> {
        let Some(mut cfg) = read(&self.file)? else {
            return Ok(false);
        };
        let removed = cfg.auths.remove(registry).is_some();
        if removed {
            self.write(&cfg)?;
        }
        Ok(removed)
    }

    fn write(&self, cfg: &ConfigFile) -> Result<(), ImageError> {
        let err = |e: io::Error| ImageError::Credentials {
            path: self.file.clone(),
            reason: e.to_string(),
        };
        let dir = self.file.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(err)?;
        // tempfile creates the file 0600, so the secret is never readable by others.
        let mut tmp = tempfile::Builder::new()
            .prefix(".registry-auth-")
            .tempfile_in(dir)
            .map_err(err)?;
        let bytes = serde_json::to_vec_pretty(cfg).map_err(|e| err(e.into()))?;
        tmp.write_all(&bytes).map_err(err)?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(&self.file).map_err(|e| err(e.error))?;
        Ok(())
    }

    /// The credentials to use for `registry` (anonymous when none are known).
    pub(crate) fn lookup(&self, registry: &str) -> Result<RegistryAuth, ImageError> {
        for path in std::iter::once(&self.file).chain(self.docker_config.as_ref()) {
            let Some(cfg) = read(path)? else { continue };
            let names = aliases(registry);
            let Some(entry) = cfg
                .auths
                .iter()
                .find(|(k, _)| names.contains(&key_host(k)))
                .map(|(_, v)| v)
            else {
                continue;
            };
            if let Some(auth) = decode(entry, path)? {
                return Ok(auth);
            }
        }
        Ok(RegistryAuth::Anonymous)
    }
}

fn decode(entry: &AuthEntry, path: &Path) -> Result<Option<RegistryAuth>, ImageError> {
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(RegistryAuth::Basic(u.clone(), p.clone())));
    }
    let Some(auth) = &entry.auth else {
        return Ok(None);
    };
    let bad = || ImageError::Credentials {
        path: path.to_path_buf(),
        reason: "an \"auth\" entry is not base64 of USER:PASSWORD".into(),
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (u, p) = text.split_once(':').ok_or_else(bad)?;
    Ok(Some(RegistryAuth::Basic(u.to_string(), p.to_string())))
}

fn read(path: &Path) -> Result<Option<ConfigFile>, ImageError> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ImageError::Credentials {
                    path: path.to_path_buf(),
                    reason: format!("not a docker-style config.json: {e}"),
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ImageError::Credentials {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: RegistryAuth) -> Option<(String, String)> {
        match a {
            RegistryAuth::Basic(u, p) => Some((u, p)),
            _ => None,
        }
    }

    #[test]
    fn stored_login_is_private_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let c = Credentials::new(dir.path().join("registry-auth.json"), None);
        c.store("127.0.0.1:5000", "alice", "s3:cret").unwrap();
        let mode = fs::metadata(dir.path().join("registry-auth.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            basic(c.lookup("127.0.0.1:5000").unwrap()),
            Some(("alice".into(), "s3:cret".into()))
        );
        assert!(basic(c.lookup("127.0.0.1:5001").unwrap()).is_none());
        assert!(c.remove("127.0.0.1:5000").unwrap());
        assert!(basic(c.lookup("127.0.0.1:5000").unwrap()).is_none());
    }

    #[test]
    fn docker_config_is_a_fallback_and_knows_docker_hub_aliases() {
        let dir = tempfile::tempdir().unwrap();
        let docker = dir.path().join("config.json");
        fs::write(
            &docker,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"Ym9iOnB3"},"reg.example:443":{"username":"u","password":"p"}},"credsStore":"desktop"}"#,
        )
        .unwrap();
        let c = Credentials::new(dir.path().join("none.json"), Some(docker));
        assert_eq!(
            basic(c.lookup("docker.io").unwrap()),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(
            basic(c.lookup("reg.example:443").unwrap()),
            Some(("u".into(), "p".into()))
        );
    }
}
