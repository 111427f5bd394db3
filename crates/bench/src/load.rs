//! The client loop that drives every system a benchmark compares, so that Tandem and its
//! reference see exactly the same load: C clients, each its own connection, each doing
//! sequential puts of one value to distinct keys for a fixed time; every latency is recorded.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Barrier;
use tokio::time::Instant;

/// A put slower than this is an error, not a latency: something is broken.
pub const PUT_TIMEOUT: Duration = Duration::from_secs(10);

/// One client of a key-value system: one connection, one request in flight.
pub trait KvClient: Send + Sync + 'static {
    fn put(&self, key: &str, value: &Bytes) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// The figures of one timed run.
#[derive(Clone, Debug, Serialize)]
pub struct RunFigures {
    pub writes: u64,
    pub elapsed_s: f64,
    pub writes_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Runs `clients` concurrently for `duration`: each does one unmeasured put first (so that
/// connection setup is not measured), all start together, and each stops issuing puts at the
/// deadline. writes/s counts completed puts over the time until the last one completed.
pub async fn run<C: KvClient>(
    clients: Vec<C>,
    duration: Duration,
    key_prefix: &str,
    value: Bytes,
) -> anyhow::Result<RunFigures> {
    let start_line = Arc::new(Barrier::new(clients.len() + 1));
    let mut tasks = Vec::with_capacity(clients.len());
    for (i, client) in clients.into_iter().enumerate() {
        let start_line = start_line.clone();
        let value = value.clone();
        let prefix = format!("{key_prefix}.c{i}");
        tasks.push(tokio::spawn(async move {
            let warm_up = put_once(&client, &format!("{prefix}.warmup"), &value).await;
            // Every client reaches the start line, even one whose warm-up failed: the others
            // would wait for it forever otherwise.
            start_line.wait().await;
            warm_up?;
            let deadline = Instant::now() + duration;
            let mut latencies_ns = Vec::new();
            let mut seq: u64 = 0;
            while Instant::now() < deadline {
                let key = format!("{prefix}.{seq}");
                let t0 = Instant::now();
                put_once(&client, &key, &value).await?;
                latencies_ns.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
                seq += 1;
            }
            anyhow::Ok((latencies_ns, Instant::now()))
        }));
    }
    start_line.wait().await;
    let start = Instant::now();
    let mut all_ns = Vec::new();
    let mut end = start;
    let mut first_error = None;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok((ns, finished))) => {
                all_ns.extend(ns);
                end = end.max(finished);
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e.context(format!("client {i}")));
            }
            Err(e) => {
                first_error.get_or_insert(anyhow!("client {i} crashed: {e}"));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(figures(all_ns, end - start))
}

/// What filling a system with keys took.
#[derive(Clone, Debug, Serialize)]
pub struct FillFigures {
    pub keys: u64,
    pub clients: usize,
    pub elapsed_s: f64,
    pub keys_per_s: f64,
}

/// Puts `keys` distinct keys (`{key_prefix}.{i}` for i in 0..keys) as fast as `clients` go:
/// each client takes the next unwritten index until none is left, one put in flight. For
/// preloading a system with a large state before it is measured.
pub async fn fill<C: KvClient>(
    clients: Vec<C>,
    keys: u64,
    key_prefix: &str,
    value: Bytes,
) -> anyhow::Result<FillFigures> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let client_count = clients.len();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(client_count);
    for client in clients {
        let (next, value, prefix) = (next.clone(), value.clone(), key_prefix.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= keys {
                    return anyhow::Ok(());
                }
                put_once(&client, &format!("{prefix}.{i}"), &value).await?;
            }
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        t.await.map_err(|e| anyhow!("fill client {i} crashed: {e}"))?.with_context(|| format!("fill client {i}"))?;
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    Ok(FillFigures {
        keys,
        clients: client_count,
        elapsed_s,
        keys_per_s: if elapsed_s > 0.0 { keys as f64 / elapsed_s } else { 0.0 },
    })
}

async fn put_once<C: KvClient>(client: &C, key: &str, value: &Bytes) -> anyhow::Result<()> {
    tokio::time::timeout(PUT_TIMEOUT, client.put(key, value))
        .await
        .map_err(|_| anyhow!("put {key}: no answer within {PUT_TIMEOUT:?}"))?
        .with_context(|| format!("put {key}"))
}

fn figures(mut latencies_ns: Vec<u64>, elapsed: Duration) -> RunFigures {
    latencies_ns.sort_unstable();
    let writes = latencies_ns.len() as u64;
    let elapsed_s = elapsed.as_secs_f64();
    RunFigures {
        writes,
        elapsed_s,
        writes_per_s: if elapsed_s > 0.0 { writes as f64 / elapsed_s } else { 0.0 },
        p50_ms: percentile(&latencies_ns, 0.50) as f64 / 1e6,
        p99_ms: percentile(&latencies_ns, 0.99) as f64 / 1e6,
    }
}

/// Nearest-rank percentile of sorted samples (0 for none).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of some figures (the mean of the middle two for an even count; 0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn figures_count_writes_over_elapsed_time() {
        let f = figures(vec![2_000_000, 1_000_000, 3_000_000, 4_000_000], Duration::from_secs(2));
        assert_eq!(f.writes, 4);
        assert_eq!(f.writes_per_s, 2.0);
        assert_eq!(f.p50_ms, 2.0);
        assert_eq!(f.p99_ms, 4.0);
    }

    struct Counter(std::sync::atomic::AtomicU64);

    impl KvClient for Arc<Counter> {
        async fn put(&self, _key: &str, _value: &Bytes) -> anyhow::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::task::yield_now().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn fill_puts_every_key_once() {
        let c = Arc::new(Counter(Default::default()));
        let f = fill(vec![c.clone(), c.clone(), c.clone()], 100, "k", Bytes::from_static(b"v")).await.expect("fill");
        assert_eq!(f.keys, 100);
        assert_eq!(c.0.load(std::sync::atomic::Ordering::Relaxed), 100);
    }

    #[tokio::test]
    async fn every_completed_put_is_counted_once() {
        let c = Arc::new(Counter(Default::default()));
        let f = run(vec![c.clone(), c.clone()], Duration::from_millis(50), "k", Bytes::from_static(b"v"))
            .await
            .expect("run");
        // Two warm-up puts are not counted.
        assert_eq!(f.writes + 2, c.0.load(std::sync::atomic::Ordering::Relaxed));
    }
}
