//! A client of one node's HTTP API: JSON requests and answers, and a node's error status as a
//! typed error ([`StatusError`]) that callers can tell a refusal from a node in trouble by.

use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A request to a node that does not answer within this long counts that node as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Writes may wait for an election or for a new node to catch up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// One node's API, and the bearer token its requests carry.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
    timeout: Duration,
    token: Option<std::sync::Arc<str>>,
}

fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("an HTTP client without TLS always builds")
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// A node answered with an error status; `message` is its `{"error": ...}` text. Callers that
/// retry find it with `anyhow::Error::downcast_ref` to tell a refusal (4xx) from a node in
/// trouble (5xx).
#[derive(Debug)]
pub struct StatusError {
    pub status: reqwest::StatusCode,
    pub message: String,
}

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for StatusError {}

impl Api {
    pub fn new(base: &str) -> Api {
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", base.trim_end_matches('/'))
        };
        Api { base, http: http_client(REQUEST_TIMEOUT), timeout: REQUEST_TIMEOUT, token: None }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Api {
        self.http = http_client(timeout);
        self.timeout = timeout;
        self
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    pub fn with_token(mut self, token: Option<String>) -> Api {
        self.token = token.map(Into::into);
        self
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The same client (token, timeout) for another node's API.
    pub fn at(&self, base: &str) -> Api {
        Api::new(base).with_timeout(self.timeout).with_token(self.token.as_deref().map(str::to_string))
    }

    pub async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        Ok(self.request_with_status(method, path, body).await?.1)
    }

    /// [`Api::request`], also returning the (successful) HTTP status.
    pub async fn request_with_status<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<(reqwest::StatusCode, T)> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.with_context(|| format!("{method} {url}: reading the answer"))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(StatusError { status, message }).with_context(|| format!("{method} {url}"));
        }
        let answer = serde_json::from_slice(&bytes).with_context(|| format!("{method} {url}: unexpected answer"))?;
        Ok((status, answer))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.request::<(), T>(Method::GET, path, None).await
    }
}
