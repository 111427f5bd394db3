//! Planted bugs at the node (`tandem_types::chaos_bugs`): switched on from
//! `TANDEM_CHAOS_BUGS=name,name` at startup and, with the `chaos-bugs` feature, over
//! `GET /v1/debug/bugs` and `PUT /v1/debug/bugs/{name}` (body `{"on": true}`). Without the
//! feature the routes do not exist, and a node asked to plant bugs refuses to start rather than
//! run a chaos test that cannot fail.

/// The environment variable naming the bugs to switch on at startup.
pub const ENV: &str = "TANDEM_CHAOS_BUGS";

/// Switches on the bugs `TANDEM_CHAOS_BUGS` names, and says loudly which are on.
#[cfg(feature = "chaos-bugs")]
pub fn plant_from_env(id: tandem_types::NodeId) -> anyhow::Result<()> {
    use tandem_types::chaos_bugs::{self, Bugs};
    let list = std::env::var(ENV).unwrap_or_default();
    let bugs = Bugs::parse(&list).map_err(|e| anyhow::anyhow!("node {id}: {ENV}: {e}"))?;
    for b in bugs.list() {
        chaos_bugs::set(b, true);
    }
    let on: Vec<&str> = Bugs::current().list().into_iter().map(|b| b.name()).collect();
    tracing::warn!(
        node = %id,
        "CHAOS-BUGS BUILD: known bugs are planted in this binary; switched on: [{}] (PUT /v1/debug/bugs/{{name}} to change)",
        on.join(", ")
    );
    Ok(())
}

/// Without the feature nothing is planted: a request to plant bugs is refused.
#[cfg(not(feature = "chaos-bugs"))]
pub fn plant_from_env(id: tandem_types::NodeId) -> anyhow::Result<()> {
    match std::env::var(ENV) {
        Ok(list) if !list.trim().is_empty() => Err(anyhow::anyhow!(
            "node {id}: {ENV} is set ({list:?}) but this binary was built without the chaos-bugs feature"
        )),
        _ => Ok(()),
    }
}

#[cfg(feature = "chaos-bugs")]
pub use routes::routes;

#[cfg(feature = "chaos-bugs")]
mod routes {
    use axum::extract::rejection::JsonRejection;
    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::routing::{get, put};
    use axum::{Json, Router};
    use serde::{Deserialize, Serialize};
    use tandem_types::chaos_bugs::{self, Bug, Bugs};

    use crate::api_state::ApiError;

    /// `GET /v1/debug/bugs`: the bugs switched on now.
    #[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
    pub struct BugsView {
        pub on: Vec<String>,
        /// Every planted bug this binary knows.
        pub known: Vec<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Switch {
        on: bool,
    }

    pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
        Router::new().route("/v1/debug/bugs", get(list)).route("/v1/debug/bugs/{name}", put(switch))
    }

    fn view() -> BugsView {
        BugsView {
            on: Bugs::current().list().into_iter().map(|b| b.name().to_string()).collect(),
            known: Bug::ALL.iter().map(|b| b.name().to_string()).collect(),
        }
    }

    async fn list() -> Json<BugsView> {
        Json(view())
    }

    async fn switch(
        Path(name): Path<String>,
        body: Result<Json<Switch>, JsonRejection>,
    ) -> Result<Json<BugsView>, ApiError> {
        let bug = Bug::from_name(&name)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no planted bug named {name:?}")))?;
        let Json(s) = body?;
        chaos_bugs::set(bug, s.on);
        tracing::warn!(bug = bug.name(), on = s.on, "CHAOS-BUGS: planted bug switched");
        Ok(Json(view()))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The routes over real HTTP. The only test in this crate that switches a bug (the
        /// registry is per process).
        #[tokio::test]
        async fn the_routes_list_and_switch_bugs_and_refuse_unknown_names() {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = tokio::spawn(async move { axum::serve(listener, routes::<()>()).await });
            let http = reqwest::Client::new();
            let url = |p: &str| format!("http://{addr}{p}");

            let v: BugsView = http.get(url("/v1/debug/bugs")).send().await.expect("get").json().await.expect("json");
            assert!(v.on.is_empty(), "{v:?}");
            assert_eq!(v.known.len(), Bug::ALL.len());

            let r = http.put(url("/v1/debug/bugs/skip-reconciliation")).json(&serde_json::json!({"on": true}));
            let v: BugsView = r.send().await.expect("put").json().await.expect("json");
            assert_eq!(v.on, vec!["skip-reconciliation".to_string()]);
            assert!(chaos_bugs::on(Bug::SkipReconciliation));

            let r = http.put(url("/v1/debug/bugs/no-such-bug")).json(&serde_json::json!({"on": true}));
            let resp = r.send().await.expect("put");
            assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND);
            let e: serde_json::Value = resp.json().await.expect("json");
            assert!(e["error"].as_str().is_some_and(|e| e.contains("no-such-bug")), "{e}");

            let r = http.put(url("/v1/debug/bugs/skip-reconciliation")).body("{\"on\": 1}");
            let resp = r.header("content-type", "application/json").send().await.expect("put");
            assert!(resp.status().is_client_error(), "{}", resp.status());

            let r = http.put(url("/v1/debug/bugs/skip-reconciliation")).json(&serde_json::json!({"on": false}));
            let v: BugsView = r.send().await.expect("put").json().await.expect("json");
            assert!(v.on.is_empty());
            assert!(!chaos_bugs::on(Bug::SkipReconciliation));
            server.abort();
        }
    }
}
