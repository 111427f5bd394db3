//! Who may call the admin API: every request carries a bearer token (`Authorization: Bearer
//! tdm1_...`, see [`crate::security`]), which names an admin or a host. Admins may do
//! everything; a host may read its own record and path map, report its probes and renew its
//! own credentials, nothing else. `GET /metrics` answers without a token only when the config
//! says so (`security.metrics_open`).
//!
//! A request without a valid token gets 401, a host's request outside its own gets 403, both
//! with `{"error": ...}`, and neither reaches a handler, so nothing changes. Every request that
//! is not a read is logged with its principal and outcome (target `audit`).

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tandem_clustermap::Principal;
use tracing::info;

use crate::api_state::{ApiError, ApiState};
use crate::security::bearer;

/// What a host's token may reach: `GET /v1/nodes`, `GET /v1/hosts/{it}`, `GET /v1/hosts/{it}/paths`, `POST
/// /v1/hosts/{it}/probes`, `POST /v1/hosts/{it}/credentials`, and the reservations of volumes
/// (`GET`/`POST /v1/volumes/{v}/reservations`; the handler lets a host act only for itself, on
/// its own volumes), and copy tokens (`GET`/`POST /v1/volumes/{v}/tokens`, `DELETE
/// /v1/volumes/{v}/tokens/{id}`, `POST /v1/volumes/{v}/copy`; the handlers check that the host
/// may use the volumes).
fn host_may(host: &str, method: &Method, path: &str) -> bool {
    // The members' addresses: a host's agent finds another node through them when one goes.
    if method == Method::GET && path == "/v1/nodes" {
        return true;
    }
    if let Some(volume) = path.strip_prefix("/v1/volumes/").and_then(|rest| rest.strip_suffix("/reservations")) {
        return !volume.contains('/') && matches!(method, &Method::GET | &Method::POST);
    }
    // Copy tokens of its own volumes, and copies into them (the handlers check the volumes).
    if let Some(rest) = path.strip_prefix("/v1/volumes/") {
        let parts: Vec<&str> = rest.split('/').collect();
        return match (method, parts.as_slice()) {
            (&Method::GET | &Method::POST, [_, "tokens"]) | (&Method::POST, [_, "copy"]) => true,
            (&Method::DELETE, [_, "tokens", id]) => id.parse::<u64>().is_ok(),
            _ => false,
        };
    }
    let Some(rest) = path.strip_prefix("/v1/hosts/") else {
        return false;
    };
    let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if name != host {
        return false;
    }
    matches!((method, tail), (&Method::GET, "") | (&Method::GET, "paths") | (&Method::POST, "probes" | "credentials"))
}

/// Whether `principal` may make this request.
pub fn allowed(principal: &Principal, method: &Method, path: &str) -> bool {
    match principal {
        Principal::Admin(_) => true,
        Principal::Host(h) => host_may(h, method, path),
        Principal::Anonymous => false,
    }
}

fn refuse(status: StatusCode, message: String) -> Response {
    let mut resp = ApiError(status, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    resp
}

/// The middleware: finds the principal, refuses what it may not do, hands the rest on with the
/// principal in the request's extensions, and writes the audit line of every write.
pub async fn authenticate(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let principal = match req.headers().get(header::AUTHORIZATION) {
        None if path == "/metrics" && method == Method::GET && s.cfg.security.metrics_open => Principal::Anonymous,
        None => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "this API needs a credential: send `Authorization: Bearer TOKEN` (tandem up writes the admin's \
                 token to DIR/admin.token; hosts get theirs from `tandem host credentials`)"
                    .into(),
            )
        }
        Some(value) => {
            let Some(token) = value.to_str().ok().and_then(bearer) else {
                return refuse(StatusCode::UNAUTHORIZED, "the Authorization header is not `Bearer TOKEN`".into());
            };
            match s.meta.local_read(|st| s.secret.verify(token, &st.map)) {
                Ok(p) => p,
                Err(e) => {
                    info!(target: "audit", %method, %path, error = %e, "refused: bad credential");
                    return refuse(StatusCode::UNAUTHORIZED, e.to_string());
                }
            }
        }
    };
    let open_metrics = principal == Principal::Anonymous;
    if !open_metrics && !allowed(&principal, &method, &path) {
        info!(target: "audit", %principal, %method, %path, "refused: not permitted");
        return refuse(
            StatusCode::FORBIDDEN,
            format!("{principal} may not {method} {path}: a host's credential reaches only its own host's endpoints"),
        );
    }
    req.extensions_mut().insert(principal.clone());
    let resp = next.run(req).await;
    if method != Method::GET && method != Method::HEAD {
        info!(target: "audit", %principal, %method, %path, status = resp.status().as_u16(), "request");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_reaches_only_its_own_endpoints() {
        let h = Principal::Host("esx1".into());
        for (m, p) in [
            (Method::GET, "/v1/hosts/esx1"),
            (Method::GET, "/v1/hosts/esx1/paths"),
            (Method::POST, "/v1/hosts/esx1/probes"),
            (Method::POST, "/v1/hosts/esx1/credentials"),
            (Method::GET, "/v1/nodes"),
            (Method::POST, "/v1/volumes/v1/tokens"),
            (Method::GET, "/v1/volumes/v1/tokens"),
            (Method::DELETE, "/v1/volumes/v1/tokens/12"),
            (Method::POST, "/v1/volumes/v1/copy"),
        ] {
            assert!(allowed(&h, &m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::GET, "/v1/hosts/esx2/paths"),
            (Method::GET, "/v1/hosts/esx1x/paths"),
            (Method::GET, "/v1/hosts"),
            (Method::DELETE, "/v1/hosts/esx1"),
            (Method::POST, "/v1/hosts/esx1/volumes"),
            (Method::POST, "/v1/hosts/esx1/paths"),
            (Method::GET, "/v1/volumes"),
            (Method::POST, "/v1/volumes/v1/clone"),
            (Method::POST, "/v1/volumes/v1/snapshots"),
            (Method::DELETE, "/v1/volumes/v1/tokens/x"),
            (Method::DELETE, "/v1/volumes/v1"),
            (Method::GET, "/v1/volumes/v1/copy"),
            (Method::POST, "/v1/nodes"),
            (Method::GET, "/v1/nodes/1"),
            (Method::GET, "/v1/cluster"),
            (Method::PUT, "/v1/settings/access"),
            (Method::GET, "/metrics"),
        ] {
            assert!(!allowed(&h, &m, p), "{m} {p}");
        }
        assert!(allowed(&Principal::Admin("ops".into()), &Method::DELETE, "/v1/nodes/3"));
        assert!(!allowed(&Principal::Anonymous, &Method::GET, "/v1/cluster"));
    }
}
