//! Creating a step's volumes, hosts and connections through the leader's API, from
//! [`CREATE_CLIENTS`] concurrent clients (each one request in flight, as fast as they go), and
//! the rate of each kind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use tandem_client::PROBE_TIMEOUT;

use super::{host_name, volume_name, CREATE_CLIENTS};

/// A create slower than this is an error, not a latency: something is broken.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts of one create that fails without a refusal (a leader change, a node in trouble);
/// creates are idempotent, so a repeat is harmless.
const ATTEMPTS_MAX: u32 = 5;
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// What creating one kind of object took.
#[derive(Clone, Debug, Serialize)]
pub struct CreateFigures {
    /// `volumes`, `hosts` or `connections`.
    pub what: &'static str,
    pub count: u64,
    pub elapsed_s: f64,
    pub per_s: f64,
}

/// Volumes `from..to` (`scale-v00000`, ...) in the default dataset, `size_bytes` each. The
/// first volume of the cluster goes alone: it makes the default dataset.
pub async fn create_volumes(
    leader: std::net::SocketAddr,
    from: u64,
    to: u64,
    size_bytes: u64,
) -> anyhow::Result<CreateFigures> {
    let url = format!("http://{leader}/v1/volumes");
    let request = move |i: u64| (url.clone(), serde_json::json!({ "name": volume_name(i), "size_bytes": size_bytes }));
    let start = Instant::now();
    let first = from;
    let mut from = from;
    if from == 0 && to > 0 {
        let (url, body) = request(0);
        post(&client()?, &url, &body).await?;
        from = 1;
    }
    let mut f = post_all(from, to, request).await?;
    f.count = to.saturating_sub(first);
    f.elapsed_s = start.elapsed().as_secs_f64();
    f.per_s = per_s(f.count, f.elapsed_s);
    f.what = "volumes";
    Ok(f)
}

/// Hosts `from..to` (`scale-h0000`, ...) in `site`.
pub async fn create_hosts(
    leader: std::net::SocketAddr,
    from: u64,
    to: u64,
    site: &str,
) -> anyhow::Result<CreateFigures> {
    let url = format!("http://{leader}/v1/hosts");
    let site = site.to_string();
    let mut f =
        post_all(from, to, move |i| (url.clone(), serde_json::json!({ "name": host_name(i), "site": site }))).await?;
    f.what = "hosts";
    Ok(f)
}

/// Connects each host of `from..to` to `per_host` volumes: host i to volumes i*K .. i*K+K-1
/// modulo `volumes`.
pub async fn connect_hosts(
    leader: std::net::SocketAddr,
    from: u64,
    to: u64,
    per_host: u64,
    volumes: u64,
) -> anyhow::Result<CreateFigures> {
    let mut f = post_all(from * per_host, to * per_host, move |n| {
        let (host, j) = (n / per_host, n % per_host);
        let volume = (host * per_host + j) % volumes;
        (
            format!("http://{leader}/v1/hosts/{}/volumes", host_name(host)),
            serde_json::json!({ "volume": volume_name(volume) }),
        )
    })
    .await?;
    f.what = "connections";
    Ok(f)
}

fn per_s(count: u64, elapsed_s: f64) -> f64 {
    if elapsed_s > 0.0 {
        count as f64 / elapsed_s
    } else {
        0.0
    }
}

fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(CREATE_TIMEOUT)
        .connect_timeout(PROBE_TIMEOUT)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(CREATE_CLIENTS)
        .build()
        .context("cannot build an HTTP client")
}

/// POSTs the requests of `from..to` from [`CREATE_CLIENTS`] clients, each taking the next index.
async fn post_all<F>(from: u64, to: u64, request: F) -> anyhow::Result<CreateFigures>
where
    F: Fn(u64) -> (String, serde_json::Value) + Send + Sync + 'static,
{
    let http = client()?;
    let next = Arc::new(AtomicU64::new(from));
    let request = Arc::new(request);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(CREATE_CLIENTS);
    for _ in 0..CREATE_CLIENTS {
        let (http, next, request) = (http.clone(), next.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return anyhow::Ok(());
                }
                let (url, body) = request(i);
                post(&http, &url, &body).await?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| anyhow!("a create client crashed: {e}"))??;
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    let count = to.saturating_sub(from);
    Ok(CreateFigures { what: "", count, elapsed_s, per_s: per_s(count, elapsed_s) })
}

/// One create, retried (it is idempotent) while the failure is not a refusal (4xx).
async fn post(http: &reqwest::Client, url: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    let mut attempt = 1;
    loop {
        let why = match http.post(url).json(body).send().await {
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                if status.is_success() {
                    return Ok(());
                }
                if status.is_client_error() {
                    bail!("POST {url} {body}: {status}: {text}");
                }
                format!("{status}: {text}")
            }
            Err(e) => e.to_string(),
        };
        if attempt >= ATTEMPTS_MAX {
            bail!("POST {url} {body}: {why} (after {attempt} attempts)");
        }
        attempt += 1;
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
}
