//! The source agent's HTTP client for the target agent's API (authenticated
//! with the target's token). Errors distinguish an answer from no answer: after
//! the commit, "the target said no" and "the target did not answer" lead to
//! different phases.

use std::time::Duration;

use hearth_api::migration::{
    IncomingAborted, IncomingAccepted, IncomingCommit, IncomingOffer, IncomingRemoved,
    VM_RESUMED_HEADER,
};
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
    /// `log_len`: on a 409 to an output log upload, the length of the log
    /// the target has ([`hearth_api::migration::LOG_LEN_HEADER`]).
    #[error("target {url} refused: {error}")]
    Refused {
        url: String,
        error: ApiError,
        log_len: Option<u64>,
    },
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
        Ok(self.answer_with_headers(r).await?.0)
    }

    async fn answer_with_headers<T: DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<(T, reqwest::header::HeaderMap), PeerError> {
        let resp = r
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(|v| (v, headers))
                .map_err(|e| self.unreachable(e));
        }
        let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
            ApiError::new(
                ErrorCode::Internal,
                format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
            )
        });
        let log_len = headers
            .get(hearth_api::migration::LOG_LEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Err(PeerError::Refused {
            url: self.base.clone(),
            error,
            log_len,
        })
    }

    pub async fn info(&self) -> Result<Info, PeerError> {
        self.answer(self.http.get(format!("{}/v1/info", self.base)))
            .await
    }

    /// The offer; `tunnel_port` is the port the stream's socket is bound to
    /// ([`super::tunnel::TUNNEL_PORT_HEADER`]).
    pub async fn offer(
        &self,
        o: &IncomingOffer,
        tunnel_port: u16,
    ) -> Result<IncomingAccepted, PeerError> {
        self.answer(
            self.http
                .post(format!("{}/v1/migrations/incoming", self.base))
                .header(super::tunnel::TUNNEL_PORT_HEADER, tunnel_port.to_string())
                .json(o),
        )
        .await
    }

    /// Sends the output log from byte `offset` on (0: the whole log); the
    /// body may be streamed from the file ([`reqwest::Body::wrap_stream`]).
    pub async fn put_log(
        &self,
        id: &str,
        log: reqwest::Body,
        truncated: bool,
        offset: u64,
    ) -> Result<(), PeerError> {
        let mut url = format!(
            "{}/v1/migrations/incoming/{id}/log?truncated={truncated}",
            self.base
        );
        if offset > 0 {
            url.push_str(&format!("&offset={offset}"));
        }
        let _: serde_json::Value = self.answer(self.http.put(url).body(log)).await?;
        Ok(())
    }

    /// The commit; with the sandbox as the target runs it, the time the
    /// target resumed its VM (µs since the epoch, its clock) if it says.
    pub async fn commit(
        &self,
        id: &str,
        c: &IncomingCommit,
    ) -> Result<(Sandbox, Option<u64>), PeerError> {
        let (sb, headers) = self
            .answer_with_headers(
                self.http
                    .post(format!("{}/v1/migrations/incoming/{id}/commit", self.base))
                    .json(c),
            )
            .await?;
        let resumed = headers
            .get(VM_RESUMED_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((sb, resumed))
    }

    /// The control plane's question about its migration attempt `attempt`
    /// of sandbox `id` (copy tag `owner`), after it ended that migration
    /// without the source's word: the target removes the attempt's incoming
    /// VM, or says it committed; [`classify_abort`] says what the answer
    /// means (only a "removed uncommitted" is a promise that the attempt
    /// never commits there).
    pub async fn give_up(
        &self,
        id: &str,
        attempt: &str,
        owner: &str,
    ) -> Result<IncomingAborted, PeerError> {
        self.answer(
            self.http
                .delete(format!("{}/v1/migrations/incoming/{id}", self.base))
                .query(&[("attempt", attempt), ("owner", owner)]),
        )
        .await
    }

    /// Asks the target to remove its incoming VM; [`classify_abort`] says
    /// what the answer means.
    pub async fn abort(&self, id: &str) -> Result<IncomingAborted, PeerError> {
        self.answer(
            self.http
                .delete(format!("{}/v1/migrations/incoming/{id}", self.base)),
        )
        .await
    }
}

/// What an abort sent to the target after the commit was sent says.
#[derive(Debug, PartialEq, Eq)]
pub enum AbortVerdict {
    /// The target said it removed an uncommitted incoming VM: the sandbox
    /// does not run there, the source's VM may run on.
    RemovedUncommitted,
    /// The target said the sandbox was committed: it runs there.
    Committed,
    /// Anything else (no answer, 404 unknown, 401, 5xx, a proxy's page): the
    /// target may have committed, so the source's VM must stay paused.
    Unknown(String),
}

/// Only an explicit "removed an uncommitted VM" lets the source resume;
/// every other answer, including an unknown sandbox, is [`AbortVerdict::Unknown`].
pub fn classify_abort(r: &Result<IncomingAborted, PeerError>) -> AbortVerdict {
    match r {
        Ok(IncomingAborted {
            removed: IncomingRemoved::Uncommitted,
            ..
        }) => AbortVerdict::RemovedUncommitted,
        Err(PeerError::Refused { error, .. }) if error.code == ErrorCode::MigrationCommitted => {
            AbortVerdict::Committed
        }
        Err(e) => AbortVerdict::Unknown(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: ErrorCode) -> Result<IncomingAborted, PeerError> {
        Err(PeerError::Refused {
            url: "http://t".into(),
            error: ApiError::new(code, "x"),
            log_len: None,
        })
    }

    #[test]
    fn only_an_explicit_uncommitted_removal_resumes_the_source() {
        let ok: Result<IncomingAborted, PeerError> = Ok(IncomingAborted {
            removed: IncomingRemoved::Uncommitted,
            vm_ended: None,
        });
        assert_eq!(classify_abort(&ok), AbortVerdict::RemovedUncommitted);
        assert_eq!(
            classify_abort(&refused(ErrorCode::MigrationCommitted)),
            AbortVerdict::Committed
        );
        // why: a 409 of some other conflict (a proxy, another handler) is no
        // statement about the commit.
        for code in [
            ErrorCode::Conflict,
            ErrorCode::NotFound,
            ErrorCode::Unauthorized,
            ErrorCode::Internal,
            ErrorCode::Unavailable,
            ErrorCode::VmFailed,
        ] {
            assert!(
                matches!(classify_abort(&refused(code)), AbortVerdict::Unknown(_)),
                "{code:?} must not resume the source"
            );
        }
        let none: Result<IncomingAborted, PeerError> = Err(PeerError::Unreachable {
            url: "http://t".into(),
            detail: "timeout".into(),
        });
        assert!(matches!(classify_abort(&none), AbortVerdict::Unknown(_)));
    }

    #[test]
    fn an_old_style_or_foreign_2xx_body_is_not_an_answer() {
        // The pre-fix answer {"removed": "<id>"} (or a proxy's 200 page) must not
        // parse as an uncommitted removal.
        assert!(serde_json::from_str::<IncomingAborted>(r#"{"removed":"sb-1"}"#).is_err());
        assert!(serde_json::from_str::<IncomingAborted>("<html>").is_err());
        let a: IncomingAborted = serde_json::from_str(r#"{"removed":"uncommitted"}"#).unwrap();
        assert_eq!(a.removed, IncomingRemoved::Uncommitted);
    }
}
