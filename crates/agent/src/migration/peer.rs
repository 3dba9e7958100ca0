//! The source agent's HTTP client for the target agent's API (authenticated
//! with the target's token). Errors distinguish an answer from no answer: after
//! the commit, "the target said no" and "the target did not answer" lead to
//! different phases.

use std::time::Duration;

use hearth_api::migration::{IncomingAccepted, IncomingCommit, IncomingOffer};
use hearth_api::{ApiError, ErrorCode, Info, Sandbox};
use serde::de::DeserializeOwned;

/// Bound on one request; the commit includes starting the guest under TCG.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on reaching the target at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A failed call to the target.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The target answered with an error.
    #[error("target {url} refused: {error}")]
    Refused { url: String, error: ApiError },
    /// No (complete) answer: the request may or may not have taken effect.
    #[error("target {url} did not answer: {detail}")]
    Unreachable { url: String, detail: String },
}

/// The target agent's API.
#[derive(Clone)]
pub struct Peer {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Peer {
    pub fn new(base: &str, token: &str) -> Peer {
        Peer {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .connect_timeout(CONNECT_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The host part of the target's URL (where its tunnel listens too).
    pub fn host(&self) -> Option<String> {
        let u = reqwest::Url::parse(&self.base).ok()?;
        u.host_str().map(str::to_string)
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> PeerError {
        PeerError::Unreachable {
            url: self.base.clone(),
            detail: e.to_string(),
        }
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<T, PeerError> {
        let resp = r
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| self.unreachable(e));
        }
        let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
            ApiError::new(
                ErrorCode::Internal,
                format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
            )
        });
        Err(PeerError::Refused {
            url: self.base.clone(),
            error,
        })
    }

    pub async fn info(&self) -> Result<Info, PeerError> {
        self.answer(self.http.get(format!("{}/v1/info", self.base)))
            .await
    }

    pub async fn offer(&self, o: &IncomingOffer) -> Result<IncomingAccepted, PeerError> {
        self.answer(
            self.http
                .post(format!("{}/v1/migrations/incoming", self.base))
                .json(o),
        )
        .await
    }

    pub async fn put_log(&self, id: &str, log: Vec<u8>) -> Result<(), PeerError> {
        let _: serde_json::Value = self
            .answer(
                self.http
                    .put(format!("{}/v1/migrations/incoming/{id}/log", self.base))
                    .body(log),
            )
            .await?;
        Ok(())
    }

    pub async fn commit(&self, id: &str, c: &IncomingCommit) -> Result<Sandbox, PeerError> {
        self.answer(
            self.http
                .post(format!("{}/v1/migrations/incoming/{id}/commit", self.base))
                .json(c),
        )
        .await
    }

    /// Removes the target's incoming VM. `Refused` with `conflict` means the
    /// target runs the sandbox (it was committed).
    pub async fn abort(&self, id: &str) -> Result<(), PeerError> {
        let _: serde_json::Value = self
            .answer(
                self.http
                    .delete(format!("{}/v1/migrations/incoming/{id}", self.base)),
            )
            .await?;
        Ok(())
    }
}
