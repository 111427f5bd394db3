//! Copy by reference over HTTP: `/v1/volumes/{name}/tokens` (make, list, revoke copy tokens),
//! `POST /v1/volumes/{name}/copy` (write a token's data into a volume), and `POST
//! /v1/volumes/{name}/clone` and `/snapshots` (volumes made by reference). A host's credential
//! may make and use tokens of its own volumes; clones and snapshots are an administrator's.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use tandem_clustermap::{Principal, TokenRecord};
use tandem_types::VolumeId;

use crate::api::VolumeView;
use crate::api_state::{ApiError, ApiResult, ApiState};
use crate::copies::{Asker, Copies, CopyError, IDLE_DEFAULT, LIFETIME_DEFAULT};
use crate::security::{hex, unhex};

impl From<CopyError> for ApiError {
    fn from(e: CopyError) -> ApiError {
        let status = match &e {
            CopyError::NotFound(_) => StatusCode::NOT_FOUND,
            CopyError::Invalid(_) | CopyError::Token(..) => StatusCode::BAD_REQUEST,
            CopyError::Denied(_) => StatusCode::FORBIDDEN,
            CopyError::Conflict(_) => StatusCode::CONFLICT,
            CopyError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            CopyError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn asker(principal: &Principal) -> Asker {
    match principal {
        Principal::Host(h) => Asker::host(h),
        Principal::Admin(a) => Asker::admin(a),
        Principal::Anonymous => Asker::admin("anonymous"),
    }
}

fn copies(s: &ApiState) -> Copies {
    Copies {
        meta: s.meta.clone(),
        plane: s.plane.clone(),
        secret: s.secret.clone(),
        default_access: s.cfg.security.access,
    }
}

/// `POST /v1/volumes/{name}/tokens`: either `offset` and `length`, or `ranges`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub length: Option<u64>,
    /// Several ranges `[offset, length]`, which the token's data concatenates.
    #[serde(default)]
    pub ranges: Option<Vec<(u64, u64)>>,
    /// The token's maximum lifetime, in seconds (default 3600).
    #[serde(default)]
    pub lifetime_s: Option<u64>,
    /// The token's inactivity timeout, in seconds (default 600, at most the lifetime).
    #[serde(default)]
    pub idle_s: Option<u64>,
}

impl TokenRequest {
    pub fn ranges(&self) -> Result<Vec<(u64, u64)>, String> {
        match (&self.ranges, self.offset, self.length) {
            (Some(r), None, None) => Ok(r.clone()),
            (None, Some(o), Some(l)) => Ok(vec![(o, l)]),
            _ => Err("give either offset and length, or ranges".into()),
        }
    }
}

/// A token as the API shows it; `token` (its 512-byte value, in hex) only when it is made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenView {
    pub id: VolumeId,
    pub volume: String,
    pub bytes: u64,
    pub ranges: Vec<(u64, u64)>,
    pub holders: Vec<tandem_types::NodeId>,
    pub host: Option<String>,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub idle_ms: u64,
    pub last_used_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl TokenView {
    fn of(volume: &str, t: &TokenRecord, value: Option<&[u8]>) -> TokenView {
        TokenView {
            id: t.id,
            volume: volume.to_string(),
            bytes: t.len(),
            ranges: t.ranges.clone(),
            holders: t.holders.clone(),
            host: t.host.clone(),
            created_ms: t.created_ms,
            expires_ms: t.expires_ms,
            idle_ms: t.idle_ms,
            last_used_ms: t.last_used_ms,
            token: value.map(hex),
        }
    }
}

/// `POST /v1/volumes/{name}/tokens`.
pub async fn create_token(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<TokenView>), ApiError> {
    let Json(req) = body?;
    let ranges = req.ranges().map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let lifetime = req.lifetime_s.map_or(LIFETIME_DEFAULT, Duration::from_secs);
    let idle = req.idle_s.map_or(IDLE_DEFAULT.min(lifetime), Duration::from_secs);
    let (token, value) = copies(&s).create_token(&asker(&principal), &name, ranges, lifetime, idle).await?;
    Ok((StatusCode::CREATED, Json(TokenView::of(&name, &token, Some(&value)))))
}

/// `GET /v1/volumes/{name}/tokens` (a host sees its own only; values are never shown again).
pub async fn list_tokens(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Vec<TokenView>> {
    let host = match &principal {
        Principal::Host(h) => Some(h.clone()),
        _ => None,
    };
    let views = s
        .meta
        .read(|st| {
            let v = st.map.volume_by_name(&name)?;
            Some(
                st.map
                    .tokens_of(v.id)
                    .filter(|t| host.is_none() || t.host == host)
                    .map(|t| TokenView::of(&name, t, None))
                    .collect::<Vec<_>>(),
            )
        })
        .await?;
    views.map(Json).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no volume named {name:?}")))
}

/// `DELETE /v1/volumes/{name}/tokens/{id}`.
pub async fn revoke_token(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path((name, id)): Path<(String, u64)>,
) -> ApiResult<serde_json::Value> {
    copies(&s).revoke(&asker(&principal), &name, VolumeId(id)).await?;
    Ok(Json(serde_json::json!({ "volume": name, "revoked": id })))
}

/// `POST /v1/volumes/{name}/copy`: write a token's data at `offset`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    /// The token's value, in hex (1024 digits).
    pub token: String,
    pub offset: u64,
    /// Where in the token's data to start (default 0).
    #[serde(default)]
    pub token_offset: u64,
    /// How many bytes (default: the rest of the token's data).
    #[serde(default)]
    pub length: Option<u64>,
}

/// `POST /v1/volumes/{name}/copy`.
pub async fn copy(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<CopyRequest>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(req) = body?;
    let value =
        unhex(req.token.trim()).ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "the token is not hex".into()))?;
    let copied = copies(&s).copy(&asker(&principal), &value, &name, req.offset, req.token_offset, req.length).await?;
    Ok(Json(serde_json::json!({
        "volume": name,
        "offset": req.offset,
        "bytes": copied.bytes,
        "by_reference": copied.by_reference,
    })))
}

/// `POST /v1/volumes/{name}/clone` and `/snapshots`: the new volume's name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MadeFromRequest {
    pub name: String,
}

async fn made_from(
    s: &ApiState,
    source: &str,
    req: MadeFromRequest,
    snapshot: bool,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let vol = copies(s).clone_volume(source, &req.name, snapshot).await?;
    Ok((StatusCode::CREATED, Json(VolumeView::from(&vol))))
}

/// `POST /v1/volumes/{name}/clone`.
pub async fn clone_volume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<MadeFromRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let Json(req) = body?;
    made_from(&s, &name, req, false).await
}

/// `POST /v1/volumes/{name}/snapshots`.
pub async fn create_snapshot(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<MadeFromRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let Json(req) = body?;
    made_from(&s, &name, req, true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_requests_name_one_range_or_several() {
        let one: TokenRequest = serde_json::from_value(serde_json::json!({"offset": 0, "length": 4096})).unwrap();
        assert_eq!(one.ranges(), Ok(vec![(0, 4096)]));
        let many: TokenRequest =
            serde_json::from_value(serde_json::json!({"ranges": [[0, 4096], [8192, 4096]]})).unwrap();
        assert_eq!(many.ranges(), Ok(vec![(0, 4096), (8192, 4096)]));
        let both: TokenRequest =
            serde_json::from_value(serde_json::json!({"offset": 0, "length": 1, "ranges": [[0, 4096]]})).unwrap();
        assert!(both.ranges().is_err());
        assert!(TokenRequest::default().ranges().is_err());
        assert!(serde_json::from_value::<TokenRequest>(serde_json::json!({"offset": 0, "len": 1})).is_err());
    }
}
