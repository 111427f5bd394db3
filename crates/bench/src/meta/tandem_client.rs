//! Tandem's side of `bench meta`'s client loop: one HTTP/1.1 connection (kept alive) per
//! client to the leader's API, each put a setting committed through Raft.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use bytes::Bytes;
use tandem_client::PROBE_TIMEOUT;
use tandem_node::api::SettingBody;

use crate::load::{KvClient, PUT_TIMEOUT};

/// One benchmark client of Tandem: its own HTTP/1.1 connection (kept alive) to the leader's API,
/// writing settings (`PUT /v1/settings/{key}`), each one committed through Raft.
pub struct TandemClient {
    http: reqwest::Client,
    base: String,
}

impl TandemClient {
    /// `token`: the admin's API token (every request carries it, as every client's does).
    pub fn new(leader_api: SocketAddr, token: Option<String>) -> anyhow::Result<TandemClient> {
        let http = reqwest::Client::builder()
            .default_headers(tandem_testkit::bearer_headers(token.as_deref()))
            .timeout(PUT_TIMEOUT)
            .connect_timeout(PROBE_TIMEOUT)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1)
            .build()
            .context("cannot build an HTTP client")?;
        Ok(TandemClient { http, base: format!("http://{leader_api}/v1/settings/") })
    }
}

impl KvClient for TandemClient {
    async fn put(&self, key: &str, value: &Bytes) -> anyhow::Result<()> {
        let value = std::str::from_utf8(value).context("a setting's value must be UTF-8")?;
        let body = SettingBody { value: value.to_string() };
        let resp = self.http.put(format!("{}{key}", self.base)).json(&body).send().await?;
        let status = resp.status();
        // Reading the whole answer lets the connection be reused for the next put.
        let answer = resp.bytes().await?;
        if !status.is_success() {
            bail!("{status}: {}", String::from_utf8_lossy(&answer));
        }
        Ok(())
    }
}
