//! A small client for the Hearth HTTP API.

use hearth_api::ApiError;
use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach hearthd at {api}: {source}; is it running? (start it with `hearthd dev`)"
    )]
    Unreachable {
        api: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Api(ApiError),
    #[error("hearthd answered {status} to {what}: {body}")]
    Unexpected {
        status: u16,
        what: String,
        body: String,
    },
    #[error(
        "the output stream ended before the workload's exit status arrived (hearthd stopped?)"
    )]
    StreamEnded,
}

#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// A client for the API at `base`, sending `token` as a bearer token.
    pub fn new(base: &str, token: Option<String>) -> Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(v) =
            token.and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
        {
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap_or_default();
        Client {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> CliError {
        CliError::Unreachable {
            api: self.base.clone(),
            source: e,
        }
    }

    async fn check(resp: reqwest::Response, what: &str) -> Result<reqwest::Response, CliError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ApiError>(&body) {
            Ok(e) => Err(CliError::Api(e)),
            Err(_) => Err(CliError::Unexpected {
                status,
                what: what.to_string(),
                body,
            }),
        }
    }

    /// Sends a request to `path` (with a JSON body if given) and checks the answer.
    async fn call<B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<reqwest::Response, CliError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        Self::check(resp, path).await
    }

    async fn json<T: DeserializeOwned>(&self, resp: reqwest::Response) -> Result<T, CliError> {
        resp.json().await.map_err(|e| self.unreachable(e))
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let resp = self.call::<()>(reqwest::Method::GET, path, None).await?;
        self.json(resp).await
    }

    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        let resp = self.call(reqwest::Method::POST, path, Some(body)).await?;
        self.json(resp).await
    }

    /// POST without a body, expecting no content back.
    pub async fn post_empty(&self, path: &str) -> Result<(), CliError> {
        self.call::<()>(reqwest::Method::POST, path, None).await?;
        Ok(())
    }

    /// POSTs JSON to a route that answers with no body (204).
    pub async fn post_json_no_content<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(), CliError> {
        self.call(reqwest::Method::POST, path, Some(body)).await?;
        Ok(())
    }

    pub async fn put_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        let resp = self.call(reqwest::Method::PUT, path, Some(body)).await?;
        self.json(resp).await
    }

    pub async fn delete(&self, path: &str) -> Result<(), CliError> {
        self.call::<()>(reqwest::Method::DELETE, path, None).await?;
        Ok(())
    }

    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let resp = self.call::<()>(reqwest::Method::DELETE, path, None).await?;
        self.json(resp).await
    }

    pub async fn get_stream(&self, path: &str) -> Result<reqwest::Response, CliError> {
        self.call::<()>(reqwest::Method::GET, path, None).await
    }

    pub async fn post_stream<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<reqwest::Response, CliError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Streams this process's stdin as the request body.
    pub async fn post_stdin(&self, path: &str) -> Result<(), CliError> {
        let stream = tokio_util::io::ReaderStream::new(tokio::io::stdin());
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::check(resp, path).await?;
        Ok(())
    }
}
