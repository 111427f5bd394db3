//! The host endpoints of the admin API: hosts, the volumes they may reach, their path maps
//! (with a long-poll watch), and their agents' probe reports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tandem_clustermap::{ClusterMap, HostCredential, HostRecord, MetaCmd, Principal};
use tandem_paths::VolumePaths;
use tandem_types::NodeId;
use tandem_wire::data::PathProbe;

use crate::api_state::{created_status, ApiError, ApiResult, ApiState};
use crate::hosts::{ReportError, PROBES_PER_REPORT_MAX};
use crate::security;

/// How long `GET /v1/hosts/{name}/paths?since=G` waits for a newer generation by default.
const WATCH_WAIT_MS_DEFAULT: u64 = 30_000;
/// The longest wait a watcher may ask for (`wait_ms`); a proxy in between should not time out.
const WATCH_WAIT_MS_MAX: u64 = 120_000;
/// The longest error text of one probe result that is passed on.
const PROBE_ERROR_BYTES_MAX: usize = 200;

/// A host as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    pub site: String,
    /// The volumes it may reach, by name.
    pub volumes: Vec<String>,
    /// The generation of its published path map (0: none yet).
    pub generation: u64,
    /// Its iSCSI initiator names.
    #[serde(default)]
    pub iqns: Vec<String>,
    /// Its client certificate's SHA-256, once credentials were issued.
    #[serde(default)]
    pub cert_sha256: Option<String>,
    /// Its CHAP settings: `one-way`, `mutual`, or none. The secrets are never shown.
    #[serde(default)]
    pub chap: Option<String>,
}

fn host_view(map: &ClusterMap, h: &HostRecord) -> HostView {
    let mut volumes: Vec<String> =
        h.volumes.iter().filter_map(|id| map.volumes.get(id)).map(|v| v.name.clone()).collect();
    volumes.sort();
    HostView {
        name: h.name.clone(),
        site: h.site.clone(),
        volumes,
        generation: h.generation,
        iqns: h.iqns.iter().cloned().collect(),
        cert_sha256: h.credential.as_ref().map(|c| c.cert_sha256.clone()),
        chap: h.chap.as_ref().map(|c| if c.target_user.is_some() { "mutual" } else { "one-way" }.to_string()),
    }
}

/// A host's path map, `GET /v1/hosts/{name}/paths`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PathMapView {
    pub host: String,
    pub site: String,
    /// Grows by one with every change of the map; never goes back.
    pub generation: u64,
    pub volumes: Vec<VolumePaths>,
    /// The iSCSI portal of each node the map names (nodes that serve iSCSI only): the same
    /// path through iSCSI.
    #[serde(default)]
    pub iscsi_portals: std::collections::BTreeMap<tandem_types::NodeId, std::net::SocketAddr>,
}

fn no_host(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no host named {name:?}"))
}

pub(crate) async fn list_hosts(State(s): State<ApiState>) -> ApiResult<Vec<HostView>> {
    Ok(Json(s.meta.read(|st| st.map.hosts.values().map(|h| host_view(&st.map, h)).collect()).await?))
}

pub(crate) async fn get_host(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<HostView> {
    s.meta
        .read(|st| st.map.hosts.get(&name).map(|h| host_view(&st.map, h)))
        .await?
        .map(Json)
        .ok_or_else(|| no_host(&name))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HostRequest {
    name: String,
    site: String,
    /// The host's iSCSI initiator names; left out, they stay as they are.
    #[serde(default)]
    iqns: Vec<String>,
}

/// `POST /v1/hosts`: 201 with the new host, 200 if it existed (its site is updated).
pub(crate) async fn add_host(
    State(s): State<ApiState>,
    body: Result<Json<HostRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<HostView>), ApiError> {
    let Json(req) = body?;
    let name = req.name.clone();
    let reply = s.meta.write(MetaCmd::AddHost { name: req.name, site: req.site, iqns: req.iqns }).await?;
    let view = s.meta.read(|st| st.map.hosts.get(&name).map(|h| host_view(&st.map, h))).await?;
    let view = view.ok_or_else(|| ApiError(StatusCode::CONFLICT, format!("host {name:?} was removed meanwhile")))?;
    Ok((created_status(&reply), Json(view)))
}

pub(crate) async fn remove_host(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<serde_json::Value> {
    s.meta.write(MetaCmd::RemoveHost { name: name.clone() }).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConnectRequest {
    volume: String,
}

/// `POST /v1/hosts/{name}/volumes` `{"volume": V}`: lets the host reach V.
pub(crate) async fn connect_volume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<ConnectRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<HostView>), ApiError> {
    let Json(req) = body?;
    let reply = s.meta.write(MetaCmd::ConnectHost { host: name.clone(), volume: req.volume }).await?;
    let view = s.meta.read(|st| st.map.hosts.get(&name).map(|h| host_view(&st.map, h))).await?;
    let view = view.ok_or_else(|| no_host(&name))?;
    Ok((created_status(&reply), Json(view)))
}

pub(crate) async fn disconnect_volume(
    State(s): State<ApiState>,
    Path((name, volume)): Path<(String, String)>,
) -> ApiResult<HostView> {
    s.meta.write(MetaCmd::DisconnectHost { host: name.clone(), volume }).await?;
    let view = s.meta.read(|st| st.map.hosts.get(&name).map(|h| host_view(&st.map, h))).await?;
    view.map(Json).ok_or_else(|| no_host(&name))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PathsQuery {
    /// Wait until the generation passes this one.
    since: Option<u64>,
    /// Only this volume's paths.
    volume: Option<String>,
    /// How long to wait for a newer generation (default 30 s, at most 120 s).
    wait_ms: Option<u64>,
}

/// The host's published map, or why there is none: `Err(message)` for an unknown host or a
/// volume the host does not reach.
fn path_map(map: &ClusterMap, host: &str, volume: Option<&str>) -> Result<PathMapView, String> {
    let h = map.hosts.get(host).ok_or_else(|| format!("no host named {host:?}"))?;
    let mut volumes = h.paths.clone();
    if let Some(v) = volume {
        let Some(rec) = map.volume_by_name(v) else { return Err(format!("no volume named {v:?}")) };
        if !h.volumes.contains(&rec.id) {
            return Err(format!("host {host:?} is not connected to volume {v:?} (tandem host connect {host} {v})"));
        }
        volumes.retain(|p| p.volume == v);
    }
    let iscsi_portals = volumes
        .iter()
        .flat_map(|v| &v.paths)
        .filter_map(|p| Some((p.node, map.nodes.get(&p.node)?.iscsi_addr?)))
        .collect();
    Ok(PathMapView { host: h.name.clone(), site: h.site.clone(), generation: h.generation, volumes, iscsi_portals })
}

/// `GET /v1/hosts/{name}/paths[?since=G][&volume=V][&wait_ms=MS]`: the host's path map as
/// committed. With `since`, answers once the generation passes G, or after the wait with the
/// map unchanged (the caller compares generations).
pub(crate) async fn get_paths(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<PathsQuery>, QueryRejection>,
) -> ApiResult<PathMapView> {
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad query: {}", e.body_text())))?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(WATCH_WAIT_MS_DEFAULT).min(WATCH_WAIT_MS_MAX));
    // Linearizable first: never older than what another node already showed.
    let first = s.meta.read(|st| path_map(&st.map, &name, q.volume.as_deref())).await?;
    let view = first.map_err(|e| ApiError(StatusCode::NOT_FOUND, e))?;
    let Some(since) = q.since else { return Ok(Json(view)) };
    if view.generation > since {
        return Ok(Json(view));
    }
    // Woken only by changes to this host's record (its published map, its volumes; deleting a
    // volume it reaches changes the record too): a watcher costs nothing while the rest of the
    // map changes (`host_watch.rs`).
    let mut changed = s.host_watches.watch(&name);
    let mut stopping = s.stopping.clone();
    let newer = async {
        loop {
            // Maps this node applied are committed.
            let now = s.meta.local_read(|st| path_map(&st.map, &name, q.volume.as_deref()));
            match now {
                Ok(v) if v.generation > since => return Ok(v),
                Ok(_) => {}
                // Deleted (host, or volume) while waiting.
                Err(e) => return Err(ApiError(StatusCode::NOT_FOUND, e)),
            }
            let stop = tokio::select! {
                c = changed.changed() => c.is_err(),
                _ = stopping.wait_for(|s| *s) => true,
            };
            if stop {
                return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping; ask another node".into()));
            }
        }
    };
    match tokio::time::timeout(wait, newer).await {
        Ok(result) => result.map(Json),
        Err(_) => Ok(Json(view)),
    }
}

/// One probe result as an agent reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeReport {
    pub node: NodeId,
    pub address: SocketAddr,
    /// Whether the path answered.
    pub ok: bool,
    /// The round trip in microseconds (with `ok`).
    #[serde(default)]
    pub rtt_us: Option<u64>,
    /// The connection was refused (nothing listens at the address).
    #[serde(default)]
    pub refused: bool,
    /// Why the probe failed.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProbesRequest {
    probes: Vec<ProbeReport>,
}

/// `POST /v1/hosts/{name}/probes`: probe results of the host's agent, for the leader's path
/// manager. Every result must name a target port of a node that holds one of the host's
/// volumes; otherwise nothing is taken.
pub(crate) async fn post_probes(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<ProbesRequest>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(req) = body?;
    if req.probes.len() > PROBES_PER_REPORT_MAX {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{} probe results in one report; at most {PROBES_PER_REPORT_MAX}", req.probes.len()),
        ));
    }
    let targets: Option<HashMap<NodeId, Vec<SocketAddr>>> = s
        .meta
        .read(|st| {
            st.map.hosts.contains_key(&name).then(|| st.map.nodes.values().map(|n| (n.id, n.targets())).collect())
        })
        .await?;
    let targets = targets.ok_or_else(|| no_host(&name))?;
    let mut probes = Vec::with_capacity(req.probes.len());
    for p in req.probes {
        let Some(addrs) = targets.get(&p.node) else {
            return Err(ApiError(StatusCode::BAD_REQUEST, format!("probe of node {}: no such node", p.node)));
        };
        if !addrs.contains(&p.address) {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("probe of node {} at {}: not one of its target ports {addrs:?}", p.node, p.address),
            ));
        }
        let (rtt_us, error) = match (p.ok, p.rtt_us) {
            (true, Some(rtt)) => (Some(rtt), String::new()),
            (true, None) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("probe of node {} at {}: ok without rtt_us", p.node, p.address),
                ))
            }
            (false, _) => (None, truncate(p.error.unwrap_or_else(|| "probe failed".into()), PROBE_ERROR_BYTES_MAX)),
        };
        probes.push(PathProbe { node: p.node, address: p.address, rtt_us, refused: !p.ok && p.refused, error });
    }
    let accepted = probes.len();
    match s.paths.report(s.transport.as_ref(), &name, probes).await {
        Ok(()) => Ok(Json(serde_json::json!({ "accepted": accepted }))),
        Err(ReportError::Refused(why)) if why.starts_with("no host") => Err(ApiError(StatusCode::NOT_FOUND, why)),
        Err(ReportError::Refused(why)) => Err(ApiError(StatusCode::BAD_REQUEST, why)),
        Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// `POST /v1/hosts/{name}/credentials`: new credentials for a host, replacing its old ones
/// (their certificate and token stop working once this commits). The host keeps its private
/// key: the request carries only the public key, and the answer the certificate the cluster CA
/// signed for it, the CA's certificate and the host's API token.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsRequest {
    /// The host's public key: an uncompressed ECDSA P-256 point, in hex (130 digits).
    pub public_key: String,
}

/// The answer of `POST /v1/hosts/{name}/credentials`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostCredentials {
    pub host: String,
    /// The host's bearer token for the API (its own path map and probe reports).
    pub token: String,
    pub cert_pem: String,
    /// The cluster CA's certificate: what a host checks the nodes' certificates against.
    pub ca_pem: String,
    /// SHA-256 of the certificate (DER), as the cluster map records it.
    pub cert_sha256: String,
    /// The host's iSCSI initiator names.
    pub iqns: Vec<String>,
}

/// The longest hex public key accepted (a P-256 point is 130 digits).
const PUBLIC_KEY_HEX_MAX: usize = 130;

pub(crate) async fn issue_credentials(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<CredentialsRequest>, JsonRejection>,
) -> ApiResult<HostCredentials> {
    let Json(req) = body?;
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let raw = Some(&req.public_key)
        .filter(|k| k.len() <= PUBLIC_KEY_HEX_MAX)
        .and_then(|k| security::unhex(k))
        .ok_or_else(|| bad("public_key is not hex of at most 130 digits".into()))?;
    let public_key = tandem_transport::tls::HostPublicKey::from_raw(raw).map_err(|e| bad(e.to_string()))?;
    let iqns = s
        .meta
        .read(|st| st.map.hosts.get(&name).map(|h| h.iqns.iter().cloned().collect::<Vec<_>>()))
        .await?
        .ok_or_else(|| no_host(&name))?;
    let Some(ca_key) = &s.cfg.tls.ca_key else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this node holds no CA key (tls.ca_key) to sign host certificates with; ask a node that does".into(),
        ));
    };
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(s.cfg.resolve(p))
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read {}: {e}", p.display())))
    };
    let (ca_key_pem, ca_pem) = (read(ca_key)?, read(&s.cfg.tls.ca_cert)?);
    let (cert_pem, cert_der) =
        tandem_transport::tls::issue_host_cert(&s.cfg.cluster.name, &ca_key_pem, &name, &public_key)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let credential = HostCredential { id: security::new_credential_id(), cert_sha256: security::sha256_hex(&cert_der) };
    let token = s.secret.mint(&Principal::Host(name.clone()), &credential.id).expect("a host has a token");
    let cert_sha256 = credential.cert_sha256.clone();
    s.meta.write(MetaCmd::SetHostCredential { host: name.clone(), credential }).await?;
    Ok(Json(HostCredentials { host: name, token, cert_pem, ca_pem, cert_sha256, iqns }))
}

/// `POST /v1/admin/credentials`: a token for another operator (admins only).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminCredentialsRequest {
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdminCredentials {
    pub name: String,
    pub token: String,
}

pub(crate) async fn issue_admin_credentials(
    State(s): State<ApiState>,
    body: Result<Json<AdminCredentialsRequest>, JsonRejection>,
) -> ApiResult<AdminCredentials> {
    let Json(req) = body?;
    tandem_types::validate_name(&req.name)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("operator name {:?} {e}", req.name)))?;
    let token = s.secret.mint(&Principal::Admin(req.name.clone()), &security::new_credential_id()).expect("admin");
    Ok(Json(AdminCredentials { name: req.name, token }))
}

/// `PUT /v1/hosts/{name}/chap`: the CHAP settings of a host's iSCSI initiators (admins only).
/// The secrets are sealed with the cluster secret before they go to Raft, and never shown again.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapRequest {
    /// The name the initiator sends as CHAP_N.
    pub user: String,
    pub secret: String,
    /// Mutual CHAP: the name and secret the target answers the initiator's challenge with.
    #[serde(default)]
    pub target_user: Option<String>,
    #[serde(default)]
    pub target_secret: Option<String>,
}

pub(crate) async fn put_chap(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<ChapRequest>, JsonRejection>,
) -> ApiResult<HostView> {
    let Json(req) = body?;
    let mutual = match (req.target_user, req.target_secret) {
        (Some(u), Some(t)) => Some((u, t.into_bytes())),
        (None, None) => None,
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "mutual CHAP needs both target_user and target_secret".into(),
            ))
        }
    };
    let creds = tandem_iscsi::ChapCredentials { user: req.user, secret: req.secret.into_bytes(), mutual };
    creds.validate().map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("CHAP settings: {e}")))?;
    let chap = tandem_clustermap::SealedChap {
        user: creds.user.clone(),
        secret: s.secret.seal(&name, &creds.secret),
        target_user: creds.mutual.as_ref().map(|(u, _)| u.clone()),
        target_secret: creds.mutual.as_ref().map(|(_, t)| s.secret.seal(&name, t)),
    };
    s.meta.write(MetaCmd::SetHostChap { host: name.clone(), chap: Some(chap) }).await?;
    get_host(State(s), Path(name)).await
}

/// `DELETE /v1/hosts/{name}/chap`: the host's initiators log in without CHAP again.
pub(crate) async fn delete_chap(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<HostView> {
    s.meta.write(MetaCmd::SetHostChap { host: name.clone(), chap: None }).await?;
    get_host(State(s), Path(name)).await
}
