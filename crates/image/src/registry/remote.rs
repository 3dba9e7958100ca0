//! One registry repository as seen by a pull: manifests and blobs fetched with
//! `oci-client`, each wait bounded by the timeout, each failure turned into an
//! [`ImageError`] that names the registry and what was being fetched.

use std::error::Error as _;
use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::blob_cache::{BlobCache, Writer};
use super::RegistryOptions;
use crate::digest;
use crate::source::{pick_linux_amd64, Descriptor, Index, Manifest, INDEX_TYPES, MAX_JSON_BYTES};
use crate::ImageError;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPT: [&str; 4] = [
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    INDEX_TYPES[0],
    INDEX_TYPES[1],
];

/// Progress callbacks are throttled to one per this many bytes.
const PROGRESS_STEP: u64 = 256 * 1024;

pub(super) struct Remote {
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
    /// The registry as the user wrote it (`127.0.0.1:5000`, `docker.io`).
    registry: String,
    timeout: Duration,
}

/// True for `localhost`, `127.x.y.z` and `[::1]`, with or without a port.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The registries of `opts` and `resolved` that are reached over plain HTTP:
/// the ones marked insecure, and `resolved` itself when it is loopback.
fn plain_http(insecure: &[String], resolved: &str) -> Vec<String> {
    let mut list = insecure.to_vec();
    if is_loopback(resolved) {
        list.push(resolved.to_string());
    }
    list
}

impl Remote {
    pub(super) fn new(reference: Reference, opts: &RegistryOptions) -> Result<Remote, ImageError> {
        let registry = reference.registry().to_string();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http(
                &opts.insecure,
                reference.resolve_registry(),
            )),
            // why: we choose the platform ourselves, to name the ones present when amd64 is not.
            platform_resolver: None,
            connect_timeout: Some(opts.timeout),
            read_timeout: Some(opts.timeout),
            max_concurrent_download: 4,
            ..ClientConfig::default()
        });
        let auth = opts.credentials.lookup(&registry)?;
        Ok(Remote {
            client,
            auth,
            reference,
            registry,
            timeout: opts.timeout,
        })
    }

    /// Follows image indexes down to the linux/amd64 image manifest; returns its digest.
    pub(super) async fn resolve_manifest(&self) -> Result<(String, Manifest), ImageError> {
        let mut reference = self.reference.clone();
        for _ in 0..4 {
            let what = format!("manifest {}", reference.whole());
            let (bytes, _) = self
                .timed(
                    &what,
                    self.client
                        .pull_manifest_raw(&reference, &self.auth, &ACCEPT),
                )
                .await?;
            if bytes.len() as u64 > MAX_JSON_BYTES {
                return Err(ImageError::LimitExceeded {
                    object: what,
                    limit: "MAX_JSON_BYTES",
                    max: MAX_JSON_BYTES,
                });
            }
            let digest = digest::of_bytes(&bytes);
            if let Some(expected) = reference.digest() {
                digest::verify(expected, None, &digest, bytes.len() as u64)?;
            }
            let doc: serde_json::Value = parse(&what, &bytes)?;
            if doc["schemaVersion"].as_u64() == Some(1) {
                return Err(ImageError::BadSource {
                    object: what,
                    reason: "is a docker schema 1 manifest, which is not supported; push the image again with a current client".into(),
                });
            }
            let media_type = doc["mediaType"].as_str().unwrap_or_default();
            if INDEX_TYPES.contains(&media_type) || doc.get("manifests").is_some() {
                let index: Index = parse(&what, &bytes)?;
                let chosen = pick_linux_amd64(&index.manifests, &what)?;
                digest::hex_of(&chosen.digest, &what)?;
                reference = reference.clone_with_digest(chosen.digest.clone());
                continue;
            }
            let manifest: Manifest = parse(&what, &bytes)?;
            return Ok((digest, manifest));
        }
        Err(ImageError::BadSource {
            object: format!("image {}", self.reference.whole()),
            reason: "image indexes nest more than 4 deep".into(),
        })
    }

    /// The blob of `desc` from the cache, or fetched into it (hashed as it arrives).
    /// Returns the open file and whether it was already cached.
    pub(super) async fn fetch(
        &self,
        cache: &BlobCache,
        desc: &Descriptor,
        what: &str,
        progress: impl Fn(u64),
    ) -> Result<(File, bool), ImageError> {
        if let Some(file) = cache.open(&desc.digest)? {
            return Ok((file, true));
        }
        let mut writer: Writer = cache.writer(&desc.digest)?;
        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size as i64,
            // why: never follow a descriptor's foreign URLs: the registry is the only source.
            urls: None,
            annotations: None,
        };
        let mut stream = self
            .timed(
                what,
                self.client.pull_blob_stream(&self.reference, &oci_desc),
            )
            .await?
            .stream;
        let mut reported = 0u64;
        loop {
            let next = tokio::time::timeout(self.timeout, stream.next())
                .await
                .map_err(|_| self.stalled(what))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| self.stream_error(what, desc, e))?;
            writer.write(&chunk)?;
            if writer.len() > desc.size {
                return Err(ImageError::BlobSizeMismatch {
                    digest: desc.digest.clone(),
                    expected: desc.size,
                    actual: writer.len(),
                });
            }
            if writer.len() - reported >= PROGRESS_STEP {
                reported = writer.len();
                progress(reported);
            }
        }
        progress(writer.len());
        let file = writer.finish(Some(desc.size))?;
        Ok((file, false))
    }

    async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, OciDistributionError>>,
    ) -> Result<T, ImageError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| self.stalled(what))?
            .map_err(|e| self.oci_error(what, e))
    }

    fn stalled(&self, what: &str) -> ImageError {
        ImageError::RegistryTimeout {
            registry: self.registry.clone(),
            what: what.to_string(),
            secs: self.timeout.as_secs(),
        }
    }

    fn failed(&self, what: &str, reason: String) -> ImageError {
        ImageError::Registry {
            registry: self.registry.clone(),
            what: what.to_string(),
            reason,
        }
    }

    fn by_status(&self, what: &str, status: u16, reason: String) -> ImageError {
        match status {
            401 | 403 => ImageError::RegistryUnauthorized {
                registry: self.registry.clone(),
                status,
            },
            404 => ImageError::RegistryNotFound {
                registry: self.registry.clone(),
            },
            _ => self.failed(what, format!("HTTP {status}: {}", clip(&reason))),
        }
    }

    fn oci_error(&self, what: &str, e: OciDistributionError) -> ImageError {
        match e {
            OciDistributionError::UnauthorizedError { .. } => ImageError::RegistryUnauthorized {
                registry: self.registry.clone(),
                status: 401,
            },
            OciDistributionError::AuthenticationFailure(reason) => self.failed(
                what,
                format!(
                    "the token service refused the credentials: {}",
                    clip(&reason)
                ),
            ),
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    ImageError::RegistryNotFound {
                        registry: self.registry.clone(),
                    }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    ImageError::RegistryUnauthorized {
                        registry: self.registry.clone(),
                        status: 401,
                    }
                } else {
                    self.failed(what, clip(&envelope.to_string()))
                }
            }
            OciDistributionError::ServerError { code, message, .. } => {
                self.by_status(what, code, message)
            }
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { expected, actual },
            ) => ImageError::BlobDigestMismatch {
                digest: expected,
                actual,
            },
            OciDistributionError::RequestError(re) => self.request_error(what, &re),
            other => self.failed(what, clip(&other.to_string())),
        }
    }

    fn request_error(&self, what: &str, re: &reqwest::Error) -> ImageError {
        if re.is_timeout() {
            return self.stalled(what);
        }
        if let Some(status) = re.status() {
            return self.by_status(what, status.as_u16(), String::new());
        }
        let mut reason = re.to_string();
        let mut src = re.source();
        while let Some(s) = src {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            src = s.source();
        }
        if !is_loopback(&self.registry)
            && (reason.contains("tls") || reason.contains("TLS") || reason.contains("certificate"))
        {
            reason.push_str(&format!(
                "; if {} speaks plain HTTP, start hearthd with --insecure-registry {}",
                self.registry, self.registry
            ));
        }
        self.failed(what, reason)
    }

    /// An error from the middle of a blob stream (`oci-client` wraps its own
    /// digest check and reqwest's errors in `io::Error`).
    fn stream_error(&self, what: &str, desc: &Descriptor, e: std::io::Error) -> ImageError {
        if let Some(inner) = e.get_ref() {
            if let Some(oci_client::errors::DigestError::VerificationError { actual, .. }) =
                inner.downcast_ref::<oci_client::errors::DigestError>()
            {
                return ImageError::BlobDigestMismatch {
                    digest: desc.digest.clone(),
                    actual: actual.clone(),
                };
            }
            if let Some(OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { actual, .. },
            )) = inner.downcast_ref::<OciDistributionError>()
            {
                return ImageError::BlobDigestMismatch {
                    digest: desc.digest.clone(),
                    actual: actual.clone(),
                };
            }
            if let Some(re) = inner.downcast_ref::<reqwest::Error>() {
                return self.request_error(what, re);
            }
        }
        self.failed(what, e.to_string())
    }
}

fn parse<T: serde::de::DeserializeOwned>(object: &str, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::BadJson {
        object: object.to_string(),
        source,
    })
}

/// The first 300 characters of a registry's message (they can be whole HTML pages).
fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_insecure_or_loopback_registries() {
        let insecure = vec!["build.internal:5000".to_string()];
        assert_eq!(
            plain_http(&insecure, "127.0.0.1:5000"),
            ["build.internal:5000", "127.0.0.1:5000"]
        );
        assert_eq!(
            plain_http(&insecure, "registry.example"),
            ["build.internal:5000"]
        );
        assert!(plain_http(&[], "index.docker.io").is_empty());
    }

    #[test]
    fn loopback_registries_are_recognized() {
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "10.0.0.1:5000",
            "registry.example:5000",
            "docker.io",
            "[fe80::1]:5000",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }
}
