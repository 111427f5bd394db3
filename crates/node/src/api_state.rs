//! What every handler of the admin API shares: the state it is given ([`ApiState`]), its
//! error answer ([`ApiError`]), and the narrow views of the transport it may use. The
//! endpoint modules (`api`, `host_api`) import from here; nothing here imports them.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tandem_clustermap::MetaReply;
use tandem_frontend::Budgets;
use tandem_meta::network::MetaError;
use tandem_meta::store::MetaStore;
use tandem_transport::link::{LinkStats, Mesh};
use tandem_transport::Transport;
use tandem_types::{Layer, TransportKind};

use crate::config::ClusterConfig;
use crate::host_watch::HostWatches;
use crate::hosts::PathManager;
use crate::security::ClusterSecret;
use crate::volumes::Plane;

/// `GET /v1/local/volumes` requests digesting at once, at most: each reads the checksum of every
/// block of every local volume on a blocking thread, so more at once would only compete for the
/// same store and take blocking threads from the data plane; the rest wait their turn.
const LOCAL_DIGESTS_MAX: usize = 2;

/// What the API shows of this node's links: the network layer in use and each link's
/// counters. [`Mesh`] is the real one; the API never needs more of it.
pub trait LinkView: Send + Sync + 'static {
    /// The network layer `layer` runs over now.
    fn kind(&self, layer: Layer) -> TransportKind;
    /// Every link's counters.
    fn link_stats(&self) -> Vec<LinkStats>;
}

impl LinkView for Mesh {
    fn kind(&self, layer: Layer) -> TransportKind {
        Mesh::kind(self, layer)
    }

    fn link_stats(&self) -> Vec<LinkStats> {
        Mesh::link_stats(self)
    }
}

#[derive(Clone)]
pub struct ApiState {
    pub(crate) meta: Arc<MetaStore>,
    pub(crate) cfg: Arc<ClusterConfig>,
    /// Checks the API's bearer tokens and seals CHAP secrets.
    pub(crate) secret: Arc<ClusterSecret>,
    /// For forwarding to other nodes (probe reports to the leader).
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) links: Arc<dyn LinkView>,
    pub(crate) plane: Plane,
    pub(crate) paths: Arc<PathManager>,
    /// Wakes path-map long-polls when their host changes.
    pub(crate) host_watches: Arc<HostWatches>,
    /// Turns true when the node begins to stop: long-polls answer at once then.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    /// Permits for `GET /v1/local/volumes` ([`LOCAL_DIGESTS_MAX`]).
    pub(crate) local_digests: Arc<tokio::sync::Semaphore>,
    /// The budgets the host protocol servers share, shown by `GET /v1/local/volumes`.
    pub(crate) budgets: Budgets,
}

impl ApiState {
    /// `transport` is the node's mesh (or anything that calls peers and shows its links).
    #[allow(clippy::too_many_arguments)]
    pub fn new<T: Transport + LinkView>(
        meta: Arc<MetaStore>,
        cfg: Arc<ClusterConfig>,
        secret: Arc<ClusterSecret>,
        host_watches: Arc<HostWatches>,
        transport: T,
        plane: Plane,
        paths: Arc<PathManager>,
        stopping: tokio::sync::watch::Receiver<bool>,
        budgets: Budgets,
    ) -> ApiState {
        let transport = Arc::new(transport);
        ApiState {
            host_watches,
            meta,
            cfg,
            secret,
            transport: transport.clone(),
            links: transport,
            plane,
            paths,
            stopping,
            local_digests: Arc::new(tokio::sync::Semaphore::new(LOCAL_DIGESTS_MAX)),
            budgets,
        }
    }
}

/// An error answer: a status and `{"error": message}`.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> ApiError {
        let status = match &e {
            MetaError::NotFound(_) => StatusCode::NOT_FOUND,
            MetaError::Invalid(_) => StatusCode::BAD_REQUEST,
            MetaError::Conflict(_) => StatusCode::CONFLICT,
            MetaError::NotLeader { .. } | MetaError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            MetaError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        ApiError(e.status(), format!("bad request body: {}", e.body_text()))
    }
}

pub(crate) type ApiResult<T> = Result<Json<T>, ApiError>;

/// 201 when a command created something, 200 when it already existed as asked.
pub(crate) fn created_status(reply: &MetaReply) -> StatusCode {
    match reply {
        MetaReply::Done { changed: true } => StatusCode::CREATED,
        _ => StatusCode::OK,
    }
}

#[cfg(test)]
mod tests {
    use tandem_meta::store::RaftRole;

    use super::*;

    /// The API serves the Raft role under these names (INTERFACE.md).
    #[test]
    fn raft_roles_serve_their_lowercase_names() {
        let roles = [
            (RaftRole::Leader, "leader"),
            (RaftRole::Follower, "follower"),
            (RaftRole::Candidate, "candidate"),
            (RaftRole::Learner, "learner"),
            (RaftRole::Shutdown, "shutdown"),
        ];
        for (role, name) in roles {
            assert_eq!(serde_json::to_value(role).unwrap(), serde_json::json!(name));
            assert_eq!(serde_json::from_value::<RaftRole>(serde_json::json!(name)).unwrap(), role);
        }
    }

    #[test]
    fn created_only_when_something_changed() {
        assert_eq!(created_status(&MetaReply::Done { changed: true }), StatusCode::CREATED);
        assert_eq!(created_status(&MetaReply::Done { changed: false }), StatusCode::OK);
    }
}
