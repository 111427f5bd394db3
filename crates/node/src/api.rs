//! The admin HTTP API (JSON). Every node serves all of it; reads are linearizable and writes
//! are carried out by the Raft leader whichever node receives them. Bad input is answered with
//! a 4xx and `{"error": "..."}`, and changes nothing.
//!
//! This file assembles the router and holds the cluster, node, setting, transport, dataset,
//! volume and metrics endpoints; the host endpoints are `host_api`, and what both share
//! (state, errors) is `api_state`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tandem_clustermap::{DatasetRecord, MetaCmd, NodeRecord, VolumeRecord};
use tandem_meta::store::{RaftRole, RaftStatus};
use tandem_paths::PathState;
use tandem_transport::link::LinkStats;
use tandem_types::{Epoch, NodeId, VolumeId};
use tandem_types::{Layer, TransportKind};

use crate::api_state::{created_status, ApiResult};
pub use crate::api_state::{ApiError, ApiState, LinkView};
use crate::copy_api;
use crate::host_api;
use crate::reservation_api;
use crate::volumes::FrontendStats;

/// Request bodies are small JSON documents; anything larger is refused unread.
const BODY_BYTES_MAX: usize = 64 * 1024;

pub fn router(state: ApiState) -> Router {
    let router = Router::new()
        .route("/v1/cluster", get(get_cluster))
        .route("/v1/cluster/init", post(init_cluster))
        .route("/v1/nodes", get(list_nodes).post(add_node))
        .route("/v1/nodes/{id}", axum::routing::delete(remove_node))
        .route("/v1/settings", get(list_settings))
        .route("/v1/settings/{key}", get(get_setting).put(put_setting).delete(delete_setting))
        .route("/v1/transport", get(get_transport).put(put_transport))
        .route("/v1/datasets", get(list_datasets).post(create_dataset))
        .route("/v1/datasets/{name}", get(get_dataset).delete(delete_dataset))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(get_volume).delete(delete_volume))
        .route(
            "/v1/volumes/{name}/reservations",
            get(reservation_api::get_reservations).post(reservation_api::post_reservation),
        )
        .route("/v1/volumes/{name}/tokens", get(copy_api::list_tokens).post(copy_api::create_token))
        .route("/v1/volumes/{name}/tokens/{id}", axum::routing::delete(copy_api::revoke_token))
        .route("/v1/volumes/{name}/copy", post(copy_api::copy))
        .route("/v1/volumes/{name}/clone", post(copy_api::clone_volume))
        .route("/v1/volumes/{name}/snapshots", post(copy_api::create_snapshot))
        .route("/v1/hosts", get(host_api::list_hosts).post(host_api::add_host))
        .route("/v1/hosts/{name}", get(host_api::get_host).delete(host_api::remove_host))
        .route("/v1/hosts/{name}/volumes", post(host_api::connect_volume))
        .route("/v1/hosts/{name}/volumes/{volume}", axum::routing::delete(host_api::disconnect_volume))
        .route("/v1/hosts/{name}/paths", get(host_api::get_paths))
        .route("/v1/hosts/{name}/probes", post(host_api::post_probes))
        .route("/v1/hosts/{name}/credentials", post(host_api::issue_credentials))
        .route("/v1/hosts/{name}/chap", axum::routing::put(host_api::put_chap).delete(host_api::delete_chap))
        .route("/v1/admin/credentials", post(host_api::issue_admin_credentials))
        .route("/v1/local/volumes", get(local_volumes))
        .route("/metrics", get(metrics));
    // The failpoints' debug endpoints exist only in a `failpoints` build.
    #[cfg(feature = "failpoints")]
    let router = router.merge(crate::failpoints::routes());
    #[cfg(feature = "chaos-bugs")]
    let router = router.merge(crate::debug_bugs::routes());
    router
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::api_auth::authenticate))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

/// A node as the API shows it: its record and its place in the Raft membership.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeView {
    #[serde(flatten)]
    pub record: NodeRecord,
    /// `voter`, `learner`, or `none` (recorded but not in the membership).
    pub membership: String,
}

/// `GET /v1/cluster`: this node's view of the cluster. Answered from local state, without a
/// round trip to the leader, so it works (and shows the trouble) even without a quorum.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterView {
    pub cluster_name: String,
    /// The node that answered.
    pub node_id: NodeId,
    pub raft: RaftStatus,
    pub nodes: Vec<NodeView>,
    /// Every volume, as this node's map holds it.
    #[serde(default)]
    pub volumes: Vec<VolumeView>,
}

fn node_views(records: Vec<NodeRecord>, status: &RaftStatus) -> Vec<NodeView> {
    let mut views: Vec<NodeView> = records
        .into_iter()
        .map(|record| {
            let membership = if status.voters.contains(&record.id) {
                "voter"
            } else if status.learners.contains(&record.id) {
                "learner"
            } else {
                "none"
            };
            NodeView { record, membership: membership.into() }
        })
        .collect();
    views.sort_by_key(|v| v.record.id);
    views
}

async fn get_cluster(State(s): State<ApiState>) -> ApiResult<ClusterView> {
    let status = s.meta.status();
    let (records, volumes) = s.meta.local_read(|st| {
        (st.map.nodes.values().cloned().collect(), st.map.volumes.values().map(VolumeView::from).collect())
    });
    Ok(Json(ClusterView {
        cluster_name: s.cfg.cluster.name.clone(),
        node_id: s.meta.id(),
        nodes: node_views(records, &status),
        raft: status,
        volumes,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InitRequest {
    /// Defaults to the config's `initial_members`.
    #[serde(default)]
    members: Option<Vec<NodeRecord>>,
}

/// `POST /v1/cluster/init`: forms the cluster (once). Idempotent: on an initialized cluster it
/// answers `{"initialized": false}`.
async fn init_cluster(
    State(s): State<ApiState>,
    body: Result<Json<InitRequest>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(req) = body?;
    let members = req.members.unwrap_or_else(|| s.cfg.initial_records());
    if members.is_empty() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "no members: give some or set cluster.initial_members".into()));
    }
    let initialized = s.meta.initialize(&members).await?;
    if initialized {
        // Record the starting transport, so nodes that join later follow the cluster's choice
        // rather than their own config's.
        for layer in [Layer::Control, Layer::Data] {
            s.meta.write(MetaCmd::SetTransport { layer, kind: s.cfg.cluster.transport }).await?;
        }
    }
    Ok(Json(serde_json::json!({ "initialized": initialized })))
}

/// `GET /v1/transport`: the layers this node uses now, and its links.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransportView {
    pub node_id: NodeId,
    pub control: TransportKind,
    pub data: TransportKind,
    pub links: Vec<LinkStats>,
}

async fn get_transport(State(s): State<ApiState>) -> ApiResult<TransportView> {
    Ok(Json(TransportView {
        node_id: s.meta.id(),
        control: s.links.kind(Layer::Control),
        data: s.links.kind(Layer::Data),
        links: s.links.link_stats(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportRequest {
    pub transport: TransportKind,
    /// Defaults to `data`.
    #[serde(default)]
    pub layer: Option<Layer>,
}

/// `PUT /v1/transport`: selects the network layer of `layer` for the whole cluster. Every node
/// moves its links when it applies the change, make-before-break.
async fn put_transport(
    State(s): State<ApiState>,
    body: Result<Json<TransportRequest>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(req) = body?;
    let layer = req.layer.unwrap_or(Layer::Data);
    s.meta.write(MetaCmd::SetTransport { layer, kind: req.transport }).await?;
    let policy = s.meta.read(|st| st.map.transport.clone()).await?;
    Ok(Json(serde_json::json!({ "layer": layer, "transport": req.transport, "policy": policy })))
}

async fn list_nodes(State(s): State<ApiState>) -> ApiResult<Vec<NodeView>> {
    let records = s.meta.read(|st| st.map.nodes.values().cloned().collect()).await?;
    Ok(Json(node_views(records, &s.meta.status())))
}

/// `POST /v1/nodes`: add a node (it must be running, with a certificate from the cluster CA).
async fn add_node(
    State(s): State<ApiState>,
    body: Result<Json<NodeRecord>, JsonRejection>,
) -> Result<(StatusCode, Json<NodeRecord>), ApiError> {
    let Json(rec) = body?;
    rec.validate().map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    s.meta.add_node(rec.clone()).await?;
    Ok((StatusCode::CREATED, Json(rec)))
}

async fn remove_node(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<serde_json::Value> {
    let id: NodeId =
        id.parse().map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("node id {id:?} is not a number")))?;
    s.meta.remove_node(id).await?;
    Ok(Json(serde_json::json!({ "removed": id })))
}

async fn list_settings(State(s): State<ApiState>) -> ApiResult<std::collections::BTreeMap<String, String>> {
    Ok(Json(s.meta.read(|st| st.map.settings.clone()).await?))
}

async fn get_setting(State(s): State<ApiState>, Path(key): Path<String>) -> ApiResult<SettingBody> {
    match s.meta.read(|st| st.map.settings.get(&key).cloned()).await? {
        Some(value) => Ok(Json(SettingBody { value })),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no setting named {key:?}"))),
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingBody {
    pub value: String,
}

async fn put_setting(
    State(s): State<ApiState>,
    Path(key): Path<String>,
    body: Result<Json<PutSettingBody>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(body) = body?;
    let cmd = match body.expect {
        None => MetaCmd::PutSetting { key, value: body.value },
        Some(expect) => MetaCmd::CasSetting { key, expect, value: body.value },
    };
    let reply = s.meta.write(cmd).await?;
    Ok(Json(serde_json::to_value(reply).unwrap_or_default()))
}

/// `PUT /v1/settings/{key}`: `{"value": V}` sets it; `{"value": V, "expect": E}` sets it only
/// if it holds `E` now (`"expect": null`: only if it does not exist), else 409 and nothing
/// changes: a compare-and-set, linearizable like every write.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSettingBody {
    pub value: String,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub expect: Option<Option<String>>,
}

/// A field that is present, `null` included: `Some(None)` for `null`, where a plain `Option`
/// would read `null` as absent.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

async fn delete_setting(State(s): State<ApiState>, Path(key): Path<String>) -> ApiResult<serde_json::Value> {
    s.meta.write(MetaCmd::DeleteSetting { key: key.clone() }).await?;
    Ok(Json(serde_json::json!({ "deleted": key })))
}

/// A dataset as the API shows it: its record and the names of its volumes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatasetView {
    #[serde(flatten)]
    pub record: DatasetRecord,
    pub volumes: Vec<String>,
}

/// `POST /v1/datasets`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRequest {
    pub name: String,
    /// How many nodes hold a copy; every node when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_site: Option<String>,
}

/// One replica's resync progress.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResyncView {
    pub node: NodeId,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// A volume as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeView {
    pub id: VolumeId,
    pub name: String,
    pub dataset: String,
    pub size_bytes: u64,
    pub replicas: Vec<NodeId>,
    pub primary: NodeId,
    pub isr: Vec<NodeId>,
    pub epoch: Epoch,
    /// Grows with every change of the ISR (ISR changes are compare-and-set on it).
    #[serde(default)]
    pub isr_version: u64,
    /// Replicas being resynced, by node id.
    pub resync: Vec<ResyncView>,
    /// A clone or snapshot: the volume it was made from, by reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<OriginView>,
}

/// Where a volume made by reference comes from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OriginView {
    pub source: String,
    pub snapshot: bool,
    /// False while its image is being made (no node serves it yet).
    pub made: bool,
    pub created_ms: u64,
}

impl From<&VolumeRecord> for VolumeView {
    fn from(v: &VolumeRecord) -> VolumeView {
        VolumeView {
            id: v.id,
            name: v.name.clone(),
            dataset: v.dataset.clone(),
            size_bytes: v.size_bytes,
            replicas: v.replicas.clone(),
            primary: v.primary,
            isr: v.isr.clone(),
            epoch: v.epoch,
            isr_version: v.isr_version,
            resync: v
                .resync
                .iter()
                .map(|(node, p)| ResyncView { node: *node, done_bytes: p.done_bytes, total_bytes: p.total_bytes })
                .collect(),
            origin: v.origin.as_ref().map(|o| OriginView {
                source: o.source_name.clone(),
                snapshot: o.snapshot,
                made: o.made,
                created_ms: o.created_ms,
            }),
        }
    }
}

/// `POST /v1/volumes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRequest {
    pub name: String,
    /// A positive multiple of the block size (4096).
    pub size_bytes: u64,
    /// The `default` dataset (every node) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
}

fn dataset_view(map: &tandem_clustermap::ClusterMap, record: &DatasetRecord) -> DatasetView {
    let volumes = map.volumes.values().filter(|v| v.dataset == record.name).map(|v| v.name.clone()).collect();
    DatasetView { record: record.clone(), volumes }
}

fn no_dataset(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no dataset named {name:?}"))
}

fn no_volume(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no volume named {name:?}"))
}

async fn list_datasets(State(s): State<ApiState>) -> ApiResult<Vec<DatasetView>> {
    let views = s.meta.read(|st| st.map.datasets.values().map(|d| dataset_view(&st.map, d)).collect()).await?;
    Ok(Json(views))
}

async fn get_dataset(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<DatasetView> {
    s.meta
        .read(|st| st.map.datasets.get(&name).map(|d| dataset_view(&st.map, d)))
        .await?
        .map(Json)
        .ok_or_else(|| no_dataset(&name))
}

/// `POST /v1/datasets`: 201 with the new dataset, or 200 if it already existed as asked.
async fn create_dataset(
    State(s): State<ApiState>,
    body: Result<Json<DatasetRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<DatasetView>), ApiError> {
    let Json(req) = body?;
    let name = req.name.clone();
    let reply = s
        .meta
        .write(MetaCmd::CreateDataset { name: req.name, replicas: req.replicas, preferred_site: req.preferred_site })
        .await?;
    let view = s.meta.read(|st| st.map.datasets.get(&name).map(|d| dataset_view(&st.map, d))).await?;
    // Only a concurrent delete can get between the write and the read.
    let view = view.ok_or_else(|| ApiError(StatusCode::CONFLICT, format!("dataset {name:?} was deleted meanwhile")))?;
    Ok((created_status(&reply), Json(view)))
}

async fn delete_dataset(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<serde_json::Value> {
    s.meta.write(MetaCmd::DeleteDataset { name: name.clone() }).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

async fn list_volumes(State(s): State<ApiState>) -> ApiResult<Vec<VolumeView>> {
    Ok(Json(s.meta.read(|st| st.map.volumes.values().map(VolumeView::from).collect()).await?))
}

async fn get_volume(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<VolumeView> {
    s.meta
        .read(|st| st.map.volume_by_name(&name).map(VolumeView::from))
        .await?
        .map(Json)
        .ok_or_else(|| no_volume(&name))
}

/// `POST /v1/volumes`: 201 with the new volume, or 200 if it already existed as asked.
async fn create_volume(
    State(s): State<ApiState>,
    body: Result<Json<VolumeRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let Json(req) = body?;
    let name = req.name.clone();
    let reply = s
        .meta
        .write(MetaCmd::CreateVolume { name: req.name, dataset: req.dataset, size_bytes: req.size_bytes })
        .await?;
    let view = s.meta.read(|st| st.map.volume_by_name(&name).map(VolumeView::from)).await?;
    let view = view.ok_or_else(|| ApiError(StatusCode::CONFLICT, format!("volume {name:?} was deleted meanwhile")))?;
    Ok((created_status(&reply), Json(view)))
}

async fn delete_volume(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<serde_json::Value> {
    s.meta.write(MetaCmd::DeleteVolume { name: name.clone() }).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    use std::fmt::Write;
    let st = s.meta.status();
    let mut out = String::new();
    let is_leader = u8::from(st.role == RaftRole::Leader);
    let _ = writeln!(out, "# TYPE tandem_raft_term gauge\ntandem_raft_term {}", st.term);
    let _ = writeln!(out, "# TYPE tandem_raft_is_leader gauge\ntandem_raft_is_leader {is_leader}");
    let _ = writeln!(
        out,
        "# TYPE tandem_raft_last_log_index gauge\ntandem_raft_last_log_index {}",
        st.last_log_index.unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "# TYPE tandem_raft_applied_index gauge\ntandem_raft_applied_index {}",
        st.applied_index.unwrap_or(0)
    );
    let _ = writeln!(out, "# TYPE tandem_raft_voters gauge\ntandem_raft_voters {}", st.voters.len());
    let _ = writeln!(out, "# TYPE tandem_raft_learners gauge\ntandem_raft_learners {}", st.learners.len());
    {
        use std::sync::atomic::Ordering::Relaxed;
        let snap = s.meta.snapshot_stats();
        let gauges = [
            ("tandem_raft_snapshot_bytes", "gauge", snap.bytes.load(Relaxed) as f64),
            ("tandem_raft_snapshot_index", "gauge", snap.index.load(Relaxed) as f64),
            ("tandem_raft_snapshot_seconds", "gauge", snap.micros.load(Relaxed) as f64 / 1e6),
            ("tandem_raft_snapshots_built_total", "counter", snap.built.load(Relaxed) as f64),
            ("tandem_raft_snapshots_installed_total", "counter", snap.installed.load(Relaxed) as f64),
        ];
        let p = s.paths.stats();
        let paths = [
            ("tandem_paths_recomputes_total", "counter", p.recomputes.load(Relaxed) as f64),
            ("tandem_paths_full_recomputes_total", "counter", p.full_recomputes.load(Relaxed) as f64),
            ("tandem_paths_hosts_recomputed_total", "counter", p.hosts_recomputed.load(Relaxed) as f64),
            ("tandem_paths_recompute_seconds_total", "counter", p.micros_total.load(Relaxed) as f64 / 1e6),
            ("tandem_paths_recompute_max_seconds", "gauge", p.micros_max.load(Relaxed) as f64 / 1e6),
            ("tandem_paths_recompute_last_hosts", "gauge", p.hosts_last.load(Relaxed) as f64),
        ];
        for (name, kind, value) in gauges.into_iter().chain(paths) {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
        }
        let objects = s.meta.local_read(|st| st.map.object_count());
        let _ = writeln!(out, "# TYPE tandem_meta_objects gauge\ntandem_meta_objects {objects}");
        // The block store: bytes its volumes, clones, snapshots and images reference (a block
        // they share counts once), what its files take on disk, and the store ids no volume of
        // the map claims (images of copy tokens, and leftovers the sweeper deletes).
        let space = s.plane.store_space();
        let unclaimed = s.plane.unclaimed_store_ids().len();
        // Bytes host reads through this node returned: a sparse copy (nbdcopy, qemu-img
        // convert) that skips the holes block status reports shows it here.
        let host_read = s.plane.host_read_bytes();
        let _ = writeln!(out, "# TYPE tandem_host_read_bytes_total counter\ntandem_host_read_bytes_total {host_read}");
        let store = [
            ("tandem_store_live_bytes", space.live_bytes as f64),
            ("tandem_store_disk_bytes", space.segment_disk_bytes as f64),
            ("tandem_store_unclaimed_ids", unclaimed as f64),
        ];
        for (name, value) in store {
            let _ = writeln!(out, "# TYPE {name} gauge\n{name} {value}");
        }
        // Copies by token, EXTENDED COPY and WRITE USING TOKEN this node carried out.
        let (by_reference, streamed) = s.plane.copied_bytes();
        let _ = writeln!(out, "# TYPE tandem_copied_bytes_total counter");
        let _ = writeln!(out, "tandem_copied_bytes_total{{how=\"by_reference\"}} {by_reference}");
        let _ = writeln!(out, "tandem_copied_bytes_total{{how=\"streamed\"}} {streamed}");
    }
    let links = s.links.link_stats();
    type Counter = fn(&LinkStats) -> u64;
    let per_link: [(&str, Counter); 4] = [
        ("tandem_transport_bytes_sent", |l| l.bytes_sent),
        ("tandem_transport_messages_sent", |l| l.messages_sent),
        ("tandem_transport_reconnects", |l| l.reconnects),
        ("tandem_transport_switches", |l| l.switches),
    ];
    for (name, value) in per_link {
        let _ = writeln!(out, "# TYPE {name} counter");
        for l in &links {
            let _ = writeln!(out, "{name}{{peer=\"{}\",channel=\"{}\"}} {}", l.peer, l.channel, value(l));
        }
    }
    // Path maps as this node applied them: the generation per host, and paths per state.
    let hosts: Vec<(String, u64, [usize; 3])> = s.meta.local_read(|st| {
        st.map
            .hosts
            .values()
            .map(|h| {
                let mut by_state = [0usize; 3];
                for p in h.paths.iter().flat_map(|v| v.paths.iter()) {
                    by_state[p.state as usize] += 1;
                }
                (h.name.clone(), h.generation, by_state)
            })
            .collect()
    });
    let _ = writeln!(out, "# TYPE tandem_host_path_generation gauge");
    for (host, generation, _) in &hosts {
        let _ = writeln!(out, "tandem_host_path_generation{{host=\"{host}\"}} {generation}");
    }
    let _ = writeln!(out, "# TYPE tandem_host_paths gauge");
    for (host, _, by_state) in &hosts {
        for (state, n) in
            [PathState::ActiveOptimized, PathState::ActiveNonOptimized, PathState::Unavailable].iter().zip(by_state)
        {
            let _ = writeln!(out, "tandem_host_paths{{host=\"{host}\",state=\"{state}\"}} {n}");
        }
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

#[derive(Deserialize)]
struct LocalVolumesQuery {
    /// With `data=true`, each copy also carries `data_digest`: its data read back from the
    /// store (slow on large volumes), where `digest` folds only the stored checksums.
    #[serde(default)]
    data: bool,
}

/// This node's own copies of volumes: whether it serves each as primary, resync figures, and a
/// digest of its data (for comparing replicas); and the host protocols' shared read buffers
/// (`frontend`). Answered locally, never forwarded.
async fn local_volumes(
    State(st): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<LocalVolumesQuery>,
) -> Json<serde_json::Value> {
    // Bounded (LOCAL_DIGESTS_MAX): each digest reads every block's checksum on a blocking thread.
    let _digesting = st.local_digests.acquire().await.expect("the semaphore is never closed");
    let plane = st.plane.clone();
    let volumes = tokio::task::spawn_blocking(move || {
        plane
            .stats()
            .into_iter()
            .map(|v| {
                let digest = plane.local_digest(v.id).map(|d| format!("{d:016x}")).ok();
                let mut copy = serde_json::json!({
                    "id": v.id,
                    "name": v.name,
                    "serving": v.serving,
                    "resync_bytes_sent": v.resync_bytes_sent,
                    "resync_bytes_compared": v.resync_bytes_compared,
                    "digest": digest,
                });
                if q.data {
                    copy["data_digest"] = match plane.local_data_digest(v.id) {
                        Ok(d) => format!("{d:016x}").into(),
                        Err(e) => format!("error: {e}").into(),
                    };
                }
                copy
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Json(serde_json::json!({ "node": st.meta.id(), "volumes": volumes, "frontend": FrontendStats::of(&st.budgets) }))
}
