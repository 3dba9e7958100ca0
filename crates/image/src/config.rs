//! The part of an image's config the guest needs to run it, and OCI config parsing.

use serde::{Deserialize, Serialize};

use crate::ImageError;

/// How to run the image: the OCI `config` fields the guest applies.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// PATH of a directory import, which has no config of its own.
pub(crate) const DEFAULT_PATH: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ImageConfig {
    pub(crate) fn for_directory() -> ImageConfig {
        ImageConfig {
            env: vec![DEFAULT_PATH.to_string()],
            ..ImageConfig::default()
        }
    }
}

/// An OCI / docker image config blob (only what we use).
#[derive(Deserialize, Default)]
pub(crate) struct OciConfig {
    #[serde(default)]
    pub(crate) architecture: Option<String>,
    #[serde(default)]
    pub(crate) os: Option<String>,
    #[serde(default)]
    pub(crate) variant: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

impl OciConfig {
    pub(crate) fn parse(object: &str, bytes: &[u8]) -> Result<OciConfig, ImageError> {
        serde_json::from_slice(bytes).map_err(|source| ImageError::BadJson {
            object: object.to_string(),
            source,
        })
    }

    pub(crate) fn image_config(&self) -> ImageConfig {
        let c = self.config.as_ref();
        ImageConfig {
            entrypoint: c.and_then(|c| c.entrypoint.clone()).unwrap_or_default(),
            cmd: c.and_then(|c| c.cmd.clone()).unwrap_or_default(),
            env: c.and_then(|c| c.env.clone()).unwrap_or_default(),
            working_dir: c.and_then(|c| c.working_dir.clone()).unwrap_or_default(),
            user: c.and_then(|c| c.user.clone()).unwrap_or_default(),
        }
    }

    /// Fails if the config says the image is for another platform than linux/amd64.
    pub(crate) fn check_platform(&self) -> Result<(), ImageError> {
        let os = self.os.as_deref().unwrap_or("linux");
        let arch = self.architecture.as_deref().unwrap_or("amd64");
        if os == "linux" && arch == "amd64" {
            return Ok(());
        }
        let mut present = format!("{os}/{arch}");
        if let Some(v) = &self.variant {
            present.push('/');
            present.push_str(v);
        }
        Err(ImageError::NoMatchingPlatform { present })
    }
}
