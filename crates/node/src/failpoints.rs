//! Failpoints: named places in the node where the chaos suite injects faults (errors, stalls,
//! crashes) into a running process. Compiled only in a `failpoints` build (`cargo build -p
//! tandem --features failpoints`); a default or release build has none of this code (only the
//! chaos suite, a client of the nodes, names the failpoints it sets).
//!
//! [`FAILPOINTS`] is the contract: the names the chaos suite may set, where each sits and
//! what its `return` action does. They are set with the `fail` crate's action syntax
//! (`off`, `return`, `sleep(ms)`, `delay(ms)`, `panic`, `pause`, with `N%` probability and
//! `N*` counts, chained with `->`: `20%return`, `1*panic`, `50%sleep(3000)`), at startup from
//! `TANDEM_FAILPOINTS` (`name=actions;name2=actions`) and at run time through
//! `PUT /v1/debug/failpoints/{name}`.
//!
//! How the actions behave here: `return` is the failure the entry describes; `panic` aborts
//! the process (a crash at that point, not one dead thread or task); `sleep`, `delay` and
//! `pause` stall the step they sit in — the store's commit thread for the journal points, and
//! for points in async code only the awaiting task (they are evaluated on the blocking pool,
//! never on an async worker).

use axum::extract::rejection::JsonRejection;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::api_state::{ApiError, ApiResult, ApiState};

/// Just before a primary proposes an ISR change (`volumes.rs`, `MetaCoordinator::propose_isr`)
/// and before the leader's failover supervisor proposes a `Failover` (`failover.rs`,
/// `Supervisor::supervise`). `return`: the proposal fails as if the store could not be
/// reached (nothing was proposed; the primary proposes again on a later tick, the supervisor
/// on its next round).
pub const ISR_BEFORE_PROPOSE: &str = "isr-before-propose";

/// A failpoint of the node: its name, where it sits, what its `return` action does.
#[derive(Clone, Copy, Debug)]
pub struct Failpoint {
    pub name: &'static str,
    pub location: &'static str,
    pub on_return: &'static str,
}

/// Every failpoint of the node (docs/ARCHITECTURE.md, "Failpoints", has the same table).
pub const FAILPOINTS: &[Failpoint] = &[
    Failpoint {
        name: tandem_storage::failpoints::JOURNAL_BEFORE_FSYNC,
        location: "crates/storage/src/store/commit.rs: commit (the commit thread), before the fdatasync",
        on_return: "the flush fails with an I/O error: the store is poisoned until the node restarts",
    },
    Failpoint {
        name: tandem_storage::failpoints::JOURNAL_AFTER_FSYNC,
        location: "crates/storage/src/store/commit.rs: commit, after the fdatasync, before durability is published",
        on_return: "the flush fails although the data reached the disk: the store is poisoned",
    },
    Failpoint {
        name: tandem_storage::failpoints::CLONE_BETWEEN_STEPS,
        location: "crates/storage/src/store/clone.rs: clone_blocks, between two 16 MiB steps of a clone_range",
        on_return: "the clone fails with an I/O error after its first steps: the record or image fails",
    },
    Failpoint {
        name: tandem_replication::failpoints::BACKUP_BEFORE_REPLY,
        location: "crates/replication/src/driver/replica.rs: send_acks, after the writes are durable",
        on_return: "the backup's acknowledgements are dropped: the primary times the member out",
    },
    Failpoint {
        name: tandem_replication::failpoints::PROXY_BEFORE_REROUTE,
        location: "crates/replication/src/driver/host_io.rs: Inner::before_attempt, before a host write's \
                   attempt whose primary moved to another node since the last one",
        on_return: "nothing (the write is re-routed at once); sleep(ms) makes the re-route late",
    },
    Failpoint {
        name: ISR_BEFORE_PROPOSE,
        location: "crates/node/src/volumes.rs: MetaCoordinator::propose_isr; crates/node/src/failover.rs: \
                   Supervisor::supervise",
        on_return: "the ISR change or failover is not proposed, as if the store were unreachable",
    },
    Failpoint {
        name: tandem_meta::failpoints::SNAPSHOT_BEFORE_INSTALL,
        location: "crates/meta/src/state_machine.rs: StateMachine::install_snapshot",
        on_return: "the install fails with a StorageError: openraft stops this node's Raft",
    },
];

/// The environment variable read at startup: `name=actions;name2=actions`.
pub const ENV: &str = "TANDEM_FAILPOINTS";

fn known(name: &str) -> bool {
    FAILPOINTS.iter().any(|f| f.name == name)
}

/// Why a failpoint setting was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    #[error("no failpoint named {0:?}")]
    Unknown(String),
    #[error("bad actions {actions:?} for failpoint {name}: {why}")]
    BadActions { name: String, actions: String, why: String },
}

/// Sets failpoint `name` to `actions` (`off` clears it).
pub fn set(name: &str, actions: &str) -> Result<(), SetError> {
    if !known(name) {
        return Err(SetError::Unknown(name.to_string()));
    }
    let actions = actions.trim();
    if actions == "off" {
        // Also wakes anything held by `pause`.
        fail::remove(name);
        return Ok(());
    }
    fail::cfg(name, actions).map_err(|why| SetError::BadActions {
        name: name.to_string(),
        actions: actions.to_string(),
        why,
    })?;
    tracing::warn!(failpoint = name, actions, "failpoint set");
    Ok(())
}

/// Parses a `TANDEM_FAILPOINTS` value into `(name, actions)` pairs; empty entries are skipped.
pub fn parse_env(value: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for entry in value.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry.split_once('=').ok_or_else(|| format!("{ENV}: {entry:?} is not name=actions"))?;
        out.push((name.trim().to_string(), actions.trim().to_string()));
    }
    Ok(out)
}

/// Applies `TANDEM_FAILPOINTS`, if set. An unknown name or bad actions refuse the start: a
/// typo would otherwise run a chaos test without its fault.
pub fn apply_env() -> anyhow::Result<()> {
    let Ok(value) = std::env::var(ENV) else { return Ok(()) };
    for (name, actions) in parse_env(&value).map_err(anyhow::Error::msg)? {
        set(&name, &actions).map_err(|e| anyhow::anyhow!("{ENV}: {e}"))?;
    }
    Ok(())
}

/// A failpoint as the debug API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailpointView {
    pub name: String,
    /// The actions in force, as set; `off` when none.
    pub actions: String,
    pub location: String,
    pub on_return: String,
}

/// Every failpoint with its actions in force.
pub fn views() -> Vec<FailpointView> {
    let set: std::collections::HashMap<String, String> = fail::list().into_iter().collect();
    FAILPOINTS
        .iter()
        .map(|f| FailpointView {
            name: f.name.to_string(),
            actions: set.get(f.name).filter(|a| !a.is_empty()).cloned().unwrap_or_else(|| "off".into()),
            location: f.location.to_string(),
            on_return: f.on_return.to_string(),
        })
        .collect()
}

/// The debug endpoints, merged into the API's router in a `failpoints` build only.
pub fn routes() -> Router<ApiState> {
    Router::new().route("/v1/debug/failpoints", get(list)).route("/v1/debug/failpoints/{name}", put(put_failpoint))
}

#[derive(Serialize, Deserialize)]
struct FailpointList {
    failpoints: Vec<FailpointView>,
}

/// `GET /v1/debug/failpoints`: every failpoint of this node and its actions.
async fn list() -> ApiResult<FailpointList> {
    Ok(Json(FailpointList { failpoints: views() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRequest {
    actions: String,
}

/// `PUT /v1/debug/failpoints/{name}` with `{"actions": "20%return"}`: sets one failpoint of this
/// node (not the cluster's: each process has its own). 404 for an unknown name, 400 for actions
/// the `fail` crate does not parse; `off` clears.
async fn put_failpoint(
    Path(name): Path<String>,
    body: Result<Json<SetRequest>, JsonRejection>,
) -> ApiResult<FailpointView> {
    let Json(req) = body?;
    // `fail::cfg` may spin briefly while a `pause`d evaluation lets go: off the async workers.
    let n = name.clone();
    let result = tokio::task::spawn_blocking(move || set(&n, &req.actions))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("failpoint task: {e}")))?;
    match result {
        Ok(()) => {}
        Err(e @ SetError::Unknown(_)) => return Err(ApiError(StatusCode::NOT_FOUND, e.to_string())),
        Err(e @ SetError::BadActions { .. }) => return Err(ApiError(StatusCode::BAD_REQUEST, e.to_string())),
    }
    let view = views().into_iter().find(|v| v.name == name).expect("a known failpoint has a view");
    Ok(Json(view))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_value_parses_into_pairs() {
        assert_eq!(
            parse_env(" journal-before-fsync=20%return ; backup-before-reply=sleep(3000);").unwrap(),
            vec![
                ("journal-before-fsync".to_string(), "20%return".to_string()),
                ("backup-before-reply".to_string(), "sleep(3000)".to_string())
            ]
        );
        assert_eq!(parse_env("").unwrap(), vec![]);
        assert!(parse_env("journal-before-fsync").is_err());
    }

    #[test]
    fn names_are_unique_and_setting_checks_name_and_actions() {
        let mut names: Vec<&str> = FAILPOINTS.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAILPOINTS.len());
        assert_eq!(set("no-such-point", "return"), Err(SetError::Unknown("no-such-point".into())));
        assert!(matches!(set(ISR_BEFORE_PROPOSE, "bogus"), Err(SetError::BadActions { .. })));
        set(ISR_BEFORE_PROPOSE, "20%return").unwrap();
        let view = views().into_iter().find(|v| v.name == ISR_BEFORE_PROPOSE).unwrap();
        assert_eq!(view.actions, "20%return");
        set(ISR_BEFORE_PROPOSE, "off").unwrap();
        let view = views().into_iter().find(|v| v.name == ISR_BEFORE_PROPOSE).unwrap();
        assert_eq!(view.actions, "off");
    }
}
