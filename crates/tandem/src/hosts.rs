//! Host commands: `tandem host add|connect|disconnect|remove|list` and `tandem paths`, plus what
//! they share with the host agent (`agent.rs`): the list of every node's API to fail over
//! between ([`Endpoints`]) and the long-poll that follows a host's path map ([`PathFollower`]).

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use reqwest::Method;
use serde::Serialize;
use tandem_client::{Api, StatusError};
use tandem_node::api::NodeView;
use tandem_node::config::ClusterConfig;
pub use tandem_node::host_api::{HostView, PathMapView};

use crate::client::{self, print_table};
use crate::local::write_durable;
use crate::{HostCmd, Target};

/// How long one long-poll asks the node to wait for a newer generation. It bounds how long a
/// watcher stays on a node whose map is frozen (cut off from the majority, or draining its
/// requests on its way down), at the cost of one request per wait from an idle watcher.
const WATCH_WAIT_MS: u64 = 2_000;
/// A long-poll that gets no answer this long after the node's own wait is given up.
const WATCH_SLACK: Duration = Duration::from_secs(5);
/// Asking a node for the member list: a node that does not answer this fast counts as down.
const DISCOVER_TIMEOUT: Duration = Duration::from_secs(2);
/// Retries after a failure wait this long at first, doubling up to [`RETRY_DELAY_MAX`].
const RETRY_DELAY_MIN: Duration = Duration::from_millis(100);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(1);
/// An unchanged long-poll answer faster than this means the node did not wait (an older node,
/// a proxy): back off instead of spinning.
const POLL_TOO_FAST: Duration = Duration::from_millis(100);
/// The same warning is logged again after this long at the earliest (a dead cluster must not
/// flood the log).
const WARN_REPEAT_AFTER: Duration = Duration::from_secs(10);
/// Node APIs kept for failover, at most.
const ENDPOINTS_MAX: usize = 256;
/// How often the member list is asked for again ([`Endpoints::refresh_if_due`]), so that nodes
/// added after a watcher or an agent started become failover candidates too.
const RELEARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Serialize)]
struct HostRequest<'a> {
    name: &'a str,
    site: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    iqns: &'a [String],
}

#[derive(Serialize)]
struct ConnectRequest<'a> {
    volume: &'a str,
}

pub async fn host(target: &Target, cmd: HostCmd) -> anyhow::Result<()> {
    let api = client::find_api(target).await?;
    match cmd {
        HostCmd::Add { name, site, iqn } => {
            let req = HostRequest { name: &name, site: &site, iqns: &iqn };
            let (status, h): (_, HostView) = api.request_with_status(Method::POST, "/v1/hosts", Some(&req)).await?;
            let iqns = if h.iqns.is_empty() { String::new() } else { format!(", iSCSI {}", h.iqns.join(",")) };
            println!("host {} {}: site {}{iqns}", h.name, client::created(status), h.site);
        }
        HostCmd::Connect { name, volume } => {
            let req = ConnectRequest { volume: &volume };
            let (status, h): (_, HostView) =
                api.request_with_status(Method::POST, &format!("/v1/hosts/{name}/volumes"), Some(&req)).await?;
            let how = if status == reqwest::StatusCode::CREATED { "connected to" } else { "already connected to" };
            println!("host {} {how} volume {volume}", h.name);
        }
        HostCmd::Disconnect { name, volume } => {
            let h: HostView =
                api.request::<(), _>(Method::DELETE, &format!("/v1/hosts/{name}/volumes/{volume}"), None).await?;
            println!("host {} disconnected from volume {volume}", h.name);
        }
        HostCmd::Credentials { name, out, chap, mutual_chap } => {
            credentials(&api, &name, &out).await?;
            if chap || mutual_chap {
                chap_credentials(&api, &name, &out, mutual_chap).await?;
            }
        }
        HostCmd::Remove { name } => {
            let _: serde_json::Value = api.request::<(), _>(Method::DELETE, &format!("/v1/hosts/{name}"), None).await?;
            println!("host {name} removed");
        }
        HostCmd::List { json } => {
            let all: Vec<HostView> = api.get("/v1/hosts").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|h| {
                        let volumes = if h.volumes.is_empty() { "-".to_string() } else { h.volumes.join(",") };
                        let iqns = if h.iqns.is_empty() { "-".to_string() } else { h.iqns.join(",") };
                        let chap = h.chap.clone().unwrap_or_else(|| "-".into());
                        let cert = if h.cert_sha256.is_some() { "issued" } else { "-" }.to_string();
                        vec![h.name.clone(), h.site.clone(), volumes, iqns, chap, cert, h.generation.to_string()]
                    })
                    .collect();
                print_table(&["NAME", "SITE", "VOLUMES", "ISCSI", "CHAP", "CERTIFICATE", "GENERATION"], &rows);
            }
        }
        HostCmd::Agent { .. } => unreachable!("dispatched to agent::run"),
    }
    Ok(())
}

/// `tandem host credentials NAME --out DIR`: a key pair made here (the private key never leaves
/// this machine), the certificate the cluster signs for it, the CA and the API token.
async fn credentials(api: &Api, name: &str, out: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (key_pem, public_raw) = tandem_transport::tls::new_host_key()?;
    let public_key: String = public_raw.iter().map(|b| format!("{b:02x}")).collect();
    let req = tandem_node::host_api::CredentialsRequest { public_key };
    let c: tandem_node::host_api::HostCredentials =
        api.request(Method::POST, &format!("/v1/hosts/{name}/credentials"), Some(&req)).await?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))?;
    write_durable(&out.join("ca-cert.pem"), &c.ca_pem, 0o644)?;
    write_durable(&out.join("client-cert.pem"), &c.cert_pem, 0o644)?;
    write_durable(&out.join("client-key.pem"), &key_pem, 0o600)?;
    write_durable(&out.join("token"), &format!("{}\n", c.token), 0o600)?;
    let nodes: Vec<NodeView> = api.get("/v1/nodes").await?;
    let nbd = nodes.first().map(|n| n.record.nbd_addr.to_string()).unwrap_or_else(|| "NODE:10809".into());
    let dir = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    println!("credentials of host {name} written to {} (certificate sha256 {})", dir.display(), c.cert_sha256);
    println!("  qemu:   --object tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display());
    println!("          then a block device with tls-creds=tls0, e.g. nbd:{nbd}:exportname=VOLUME");
    println!("  libnbd: nbds://{nbd}/VOLUME?tls-certificates={}", dir.display());
    println!("  API:    tandem paths --host {name} --token-file {}/token", dir.display());
    if !c.iqns.is_empty() {
        println!("  iSCSI:  initiator names {}", c.iqns.join(", "));
    }
    Ok(())
}

/// A CHAP secret: 16 random bytes as 32 hex digits (printable, as initiators' configs want).
fn chap_secret() -> String {
    tandem_node::security::hex(&tandem_node::security::random_bytes::<16>())
}

/// New CHAP settings for the host, recorded sealed in the cluster and written to `out/chap` in
/// open-iscsi's and libiscsi's terms.
async fn chap_credentials(api: &Api, name: &str, out: &std::path::Path, mutual: bool) -> anyhow::Result<()> {
    let secret = chap_secret();
    let target = mutual.then(|| (format!("tandem-{name}"), chap_secret()));
    let req = tandem_node::host_api::ChapRequest {
        user: name.to_string(),
        secret: secret.clone(),
        target_user: target.as_ref().map(|t| t.0.clone()),
        target_secret: target.as_ref().map(|t| t.1.clone()),
    };
    let _: HostView = api.request(Method::PUT, &format!("/v1/hosts/{name}/chap"), Some(&req)).await?;
    let mut text = format!(
        "# iSCSI CHAP of host {name}.\n\
         # open-iscsi (iscsiadm -m node -o update -n KEY -v VALUE, or iscsid.conf):\n\
         node.session.auth.authmethod = CHAP\n\
         node.session.auth.username = {name}\n\
         node.session.auth.password = {secret}\n"
    );
    if let Some((user, pass)) = &target {
        text.push_str(&format!("node.session.auth.username_in = {user}\nnode.session.auth.password_in = {pass}\n"));
    }
    text.push_str(&format!("# libiscsi and qemu: iscsi://{name}%{secret}@PORTAL/TARGET/0\n"));
    if let Some((user, pass)) = &target {
        text.push_str(&format!(
            "# mutual: LIBISCSI_CHAP_TARGET_USERNAME={user} LIBISCSI_CHAP_TARGET_PASSWORD={pass}\n"
        ));
    }
    write_durable(&out.join("chap"), &text, 0o600)?;
    println!(
        "  iSCSI:  CHAP ({}) for user {name}: settings in {}/chap",
        if mutual { "mutual" } else { "one-way" },
        out.display()
    );
    Ok(())
}

/// `tandem paths`: the map once, or with `watch` every new generation until Ctrl-C.
pub async fn paths(target: &Target, host: &str, volume: Option<&str>, watch: bool, json: bool) -> anyhow::Result<()> {
    if !watch {
        let api = client::find_api(target).await?;
        let map: PathMapView = api.get(&paths_url(host, volume, None)).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&map)?);
        } else {
            print_map(&map, None);
        }
        return Ok(());
    }
    let mut endpoints = Endpoints::candidates(target)?;
    endpoints.learn_nodes().await?;
    let mut follower = PathFollower::new(endpoints, host, volume);
    let follow = async {
        let mut since = None;
        loop {
            let map = follower.next(since).await?;
            if json {
                println!("{}", serde_json::to_string(&map)?);
            } else {
                if since.is_some() {
                    println!();
                }
                print_map(&map, Some(&utc_timestamp(SystemTime::now())));
            }
            std::io::stdout().flush().context("writing to stdout")?;
            since = Some(map.generation);
        }
    };
    tokio::select! {
        r = follow => r,
        r = stop_signal() => r,
    }
}

/// Returns once the process gets SIGINT (Ctrl-C) or SIGTERM.
pub async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn paths_url(host: &str, volume: Option<&str>, since: Option<u64>) -> String {
    let mut query = Vec::new();
    if let Some(g) = since {
        query.push(format!("since={g}"));
        query.push(format!("wait_ms={WATCH_WAIT_MS}"));
    }
    if let Some(v) = volume {
        query.push(format!("volume={v}"));
    }
    if query.is_empty() {
        format!("/v1/hosts/{host}/paths")
    } else {
        format!("/v1/hosts/{host}/paths?{}", query.join("&"))
    }
}

/// Prints a map like `multipath -ll`: a header line, then one row per path in the server's
/// order (the order of preference).
pub fn print_map(map: &PathMapView, at: Option<&str>) {
    let at = at.map(|t| format!(" at {t}")).unwrap_or_default();
    println!("host {} (site {}) generation {}{at}", map.host, map.site, map.generation);
    if map.volumes.is_empty() {
        println!("no paths (the host reaches no volume, or its map is not published yet)");
        return;
    }
    let mut rows = Vec::new();
    for v in &map.volumes {
        if v.paths.is_empty() {
            rows.push(vec![v.volume.clone(), "-".into(), "-".into(), "-".into(), "-".into(), "-".into(), "-".into()]);
        }
        for p in &v.paths {
            rows.push(vec![
                v.volume.clone(),
                p.path.clone(),
                p.node.to_string(),
                p.address.to_string(),
                map.iscsi_portals.get(&p.node).map_or_else(|| "-".to_string(), ToString::to_string),
                p.state.to_string(),
                p.reason.clone(),
            ]);
        }
    }
    print_table(&["VOLUME", "PATH", "NODE", "ADDRESS", "ISCSI", "STATE", "REASON"], &rows);
}

/// `2024-05-01T12:00:00.123Z` (UTC, milliseconds).
fn utc_timestamp(t: SystemTime) -> String {
    let since_epoch = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, for days since 1970-01-01).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Whether a failed request is a definite answer (a 4xx: unknown host, bad input) rather than
/// trouble with the node (unreachable, no leader, timed out) that another node or a retry may
/// not have.
pub fn is_refusal(e: &anyhow::Error) -> bool {
    e.downcast_ref::<StatusError>().is_some_and(|s| {
        s.status.is_client_error()
            && s.status != reqwest::StatusCode::REQUEST_TIMEOUT
            && s.status != reqwest::StatusCode::TOO_MANY_REQUESTS
    })
}

/// The APIs of every node of the cluster, one of them current. A caller that fails to reach the
/// current one moves on with [`Endpoints::rotate`], so that losing the node it talked to does
/// not stop it. The list is learned from the cluster ([`Endpoints::learn_nodes`]) and asked for
/// again every [`RELEARN_EVERY`] ([`Endpoints::refresh_if_due`]).
#[derive(Clone)]
pub struct Endpoints {
    apis: Vec<Api>,
    current: usize,
    /// The request timeout every API gets, also those learned later.
    timeout: Option<Duration>,
    learned_at: Instant,
}

impl Endpoints {
    /// The APIs to start from: `--endpoint`, else every node of the `--cluster` dir's config.
    pub fn candidates(target: &Target) -> anyhow::Result<Endpoints> {
        let apis = if let Some(e) = &target.endpoint {
            vec![target.api(e)?]
        } else {
            let dir = target.dir();
            let path = tandem_client::config_path(&dir);
            if !path.exists() {
                bail!(
                    "no cluster at {}: give --endpoint URL, or --cluster DIR of a cluster made by `tandem up`",
                    dir.display()
                );
            }
            let cfg = ClusterConfig::load(&path)?;
            cfg.nodes.iter().map(|n| target.api(&n.api_addr.to_string())).collect::<anyhow::Result<_>>()?
        };
        assert!(!apis.is_empty(), "a cluster config names at least one node");
        Ok(Endpoints { apis, current: 0, timeout: None, learned_at: Instant::now() })
    }

    /// Asks the candidates in turn for the member list until one answers, and adds every
    /// member's API; the one that answered becomes current.
    pub async fn learn_nodes(&mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        for i in 0..self.apis.len() {
            let api = self.apis[(self.current + i) % self.apis.len()].clone();
            let probe = api.at(&api.base).with_timeout(DISCOVER_TIMEOUT);
            match probe.get::<Vec<NodeView>>("/v1/nodes").await {
                Ok(nodes) => {
                    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.record.api_addr).collect();
                    self.current = (self.current + i) % self.apis.len();
                    self.add(&addrs);
                    self.learned_at = Instant::now();
                    return Ok(());
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!("no node of the cluster answers:\n  {}", errors.join("\n  "))
    }

    /// Asks for the member list again if it was learned [`RELEARN_EVERY`] ago or earlier; on
    /// failure keeps the list it has (and tries again after as long).
    pub async fn refresh_if_due(&mut self) {
        if self.learned_at.elapsed() < RELEARN_EVERY {
            return;
        }
        self.learned_at = Instant::now();
        if let Err(e) = self.learn_nodes().await {
            tracing::debug!(error = %format!("{e:#}"), "cannot refresh the member list; keeping the one known");
        }
    }

    fn add(&mut self, addrs: &[SocketAddr]) {
        for a in addrs {
            let mut api = self.apis[0].at(&a.to_string());
            if let Some(t) = self.timeout {
                api = api.with_timeout(t);
            }
            if self.apis.len() < ENDPOINTS_MAX && !self.apis.iter().any(|known| known.base == api.base) {
                self.apis.push(api);
            }
        }
    }

    /// Every request through these endpoints times out after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Endpoints {
        self.apis = self.apis.into_iter().map(|a| a.with_timeout(timeout)).collect();
        self.timeout = Some(timeout);
        self
    }

    pub fn current(&self) -> &Api {
        &self.apis[self.current]
    }

    /// Moves on to the next node's API.
    pub fn rotate(&mut self) {
        self.current = (self.current + 1) % self.apis.len();
    }
}

/// Retry delays: [`RETRY_DELAY_MIN`], doubling up to [`RETRY_DELAY_MAX`].
#[derive(Default)]
pub struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    pub fn delay(&mut self) -> Duration {
        let d = self.next.unwrap_or(RETRY_DELAY_MIN);
        self.next = Some((d * 2).min(RETRY_DELAY_MAX));
        d
    }

    pub fn reset(&mut self) {
        self.next = None;
    }
}

/// Rate-limits the warnings of one ongoing trouble (a node down, no leader): the first failure
/// after a success is logged at once, later ones at most once per [`WARN_REPEAT_AFTER`], with
/// the count of those held back. Messages are not compared: while requests rotate over dead
/// nodes each one fails differently.
#[derive(Default)]
pub struct WarnLimiter {
    last_logged: Option<Instant>,
    held_back: u64,
}

impl WarnLimiter {
    /// Whether to log this failure: `Some(n)` with the number of failures held back since the
    /// last one logged.
    pub fn should_log(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(at) if now.duration_since(at) < WARN_REPEAT_AFTER => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }

    /// The trouble is over: the next failure is logged at once.
    pub fn clear(&mut self) {
        self.last_logged = None;
        self.held_back = 0;
    }
}

/// ` (N more failures since the last warning)`, or nothing.
pub fn held_back(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more failures since the last warning)")
    }
}

/// Follows one host's path map with the long-poll, across nodes: `tandem paths --watch` and
/// the agent.
pub struct PathFollower {
    endpoints: Endpoints,
    host: String,
    volume: Option<String>,
    backoff: Backoff,
    warned: WarnLimiter,
}

impl PathFollower {
    pub fn new(endpoints: Endpoints, host: &str, volume: Option<&str>) -> PathFollower {
        PathFollower {
            endpoints: endpoints.with_timeout(Duration::from_millis(WATCH_WAIT_MS) + WATCH_SLACK),
            host: host.to_string(),
            volume: volume.map(str::to_string),
            backoff: Backoff::default(),
            warned: WarnLimiter::default(),
        }
    }

    /// The map once its generation passes `since` (with `None`: the current map). Trouble with
    /// a node (unreachable, no leader, timeout) is retried with a backoff on the next node, for
    /// as long as it takes; an error is returned only for a refusal (an unknown host, or a
    /// volume the host does not reach).
    pub async fn next(&mut self, since: Option<u64>) -> anyhow::Result<PathMapView> {
        let url = paths_url(&self.host, self.volume.as_deref(), since);
        loop {
            self.endpoints.refresh_if_due().await;
            let asked = Instant::now();
            match self.endpoints.current().get::<PathMapView>(&url).await {
                Ok(map) if since.is_none_or(|g| map.generation > g) => {
                    self.backoff.reset();
                    self.warned.clear();
                    return Ok(map);
                }
                Ok(_) => {
                    // The wait ended with the map unchanged: ask again.
                    if asked.elapsed() < POLL_TOO_FAST {
                        tokio::time::sleep(self.backoff.delay()).await;
                    } else {
                        self.backoff.reset();
                    }
                }
                Err(e) if is_refusal(&e) => return Err(e),
                Err(e) => {
                    let failed = self.endpoints.current().base.clone();
                    self.endpoints.rotate();
                    if let Some(n) = self.warned.should_log(Instant::now()) {
                        tracing::warn!(
                            "following the path map of host {}: {failed} failed ({e:#}); trying {}{}",
                            self.host,
                            self.endpoints.current().base,
                            held_back(n)
                        );
                    }
                    tokio::time::sleep(self.backoff.delay()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_iso8601_with_milliseconds() {
        let at = |secs: u64, ms: u64| {
            utc_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_714_564_800 + 3_661, 123), "2024-05-01T13:01:01.123Z");
        assert_eq!(at(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..6).map(|_| b.delay().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.delay(), RETRY_DELAY_MIN);
    }

    #[test]
    fn warnings_of_one_trouble_are_held_back_until_it_ends() {
        let mut w = WarnLimiter::default();
        let t0 = Instant::now();
        assert_eq!(w.should_log(t0), Some(0));
        assert_eq!(w.should_log(t0 + Duration::from_secs(1)), None);
        assert_eq!(w.should_log(t0 + Duration::from_secs(2)), None);
        assert_eq!(w.should_log(t0 + WARN_REPEAT_AFTER), Some(2));
        w.clear();
        assert_eq!(w.should_log(t0 + WARN_REPEAT_AFTER + Duration::from_secs(1)), Some(0));
        assert_eq!(held_back(0), "");
        assert_eq!(held_back(3), " (3 more failures since the last warning)");
    }

    #[test]
    fn refusals_are_4xx_answers_only() {
        let answer = |status: u16| {
            anyhow::Error::new(StatusError {
                status: reqwest::StatusCode::from_u16(status).unwrap(),
                message: "x".into(),
            })
            .context("GET http://node/v1/hosts/h/paths")
        };
        assert!(is_refusal(&answer(404)));
        assert!(is_refusal(&answer(400)));
        assert!(!is_refusal(&answer(503)));
        assert!(!is_refusal(&answer(429)));
        assert!(!is_refusal(&anyhow::anyhow!("connection refused")));
    }

    #[test]
    fn path_urls_carry_the_watch_and_the_volume() {
        assert_eq!(paths_url("h1", None, None), "/v1/hosts/h1/paths");
        assert_eq!(paths_url("h1", Some("v"), None), "/v1/hosts/h1/paths?volume=v");
        assert_eq!(
            paths_url("h1", Some("v"), Some(7)),
            format!("/v1/hosts/h1/paths?since=7&wait_ms={WATCH_WAIT_MS}&volume=v")
        );
    }
}
