//! `tandem token ...`, `tandem copy`, `tandem volume clone` and `tandem snapshot ...`: copy by
//! reference through the HTTP API (docs/OPERATIONS.md, "Copies, clones and snapshots").

use reqwest::Method;
use tandem_client::format_size;
use tandem_node::api::VolumeView;
use tandem_node::copy_api::{CopyRequest, MadeFromRequest, TokenRequest, TokenView};

use crate::client::{find_api, print_volumes};
use crate::{SnapshotCmd, Target, TokenCmd};

pub async fn token(target: &Target, cmd: TokenCmd) -> anyhow::Result<()> {
    let api = find_api(target).await?;
    match cmd {
        TokenCmd::Create { volume, offset, length, lifetime, idle, json } => {
            let req = TokenRequest {
                offset: Some(offset),
                length: Some(length),
                ranges: None,
                lifetime_s: lifetime,
                idle_s: idle,
            };
            let t: TokenView = api.request(Method::POST, &format!("/v1/volumes/{volume}/tokens"), Some(&req)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                // The value alone on stdout, for `T=$(tandem token create ...)`.
                eprintln!(
                    "token {} for {} of {volume} at {offset}, held by nodes {:?}, expires in {} s",
                    t.id,
                    format_size(t.bytes),
                    t.holders,
                    t.expires_ms.saturating_sub(t.created_ms) / 1000
                );
                println!("{}", t.token.unwrap_or_default());
            }
        }
        TokenCmd::List { volume, json } => {
            let all: Vec<TokenView> = api.get(&format!("/v1/volumes/{volume}/tokens")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!("{:>8} {:>10} {:<24} {:<12} {:<10}", "ID", "BYTES", "RANGES", "HOLDERS", "HOST");
                for t in &all {
                    let ranges: Vec<String> = t.ranges.iter().map(|(o, l)| format!("{o}:{l}")).collect();
                    println!(
                        "{:>8} {:>10} {:<24} {:<12} {:<10}",
                        t.id.to_string(),
                        format_size(t.bytes),
                        ranges.join(","),
                        format!("{:?}", t.holders),
                        t.host.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        TokenCmd::Revoke { volume, id } => {
            let _: serde_json::Value =
                api.request::<(), _>(Method::DELETE, &format!("/v1/volumes/{volume}/tokens/{id}"), None).await?;
            println!("token {id} of {volume} revoked");
        }
    }
    Ok(())
}

pub async fn copy(
    target: &Target,
    token: String,
    to: String,
    offset: u64,
    token_offset: u64,
    length: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let api = find_api(target).await?;
    let req = CopyRequest { token, offset, token_offset, length };
    let reply: serde_json::Value = api.request(Method::POST, &format!("/v1/volumes/{to}/copy"), Some(&req)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        let bytes = reply["bytes"].as_u64().unwrap_or(0);
        let how = if reply["by_reference"].as_bool() == Some(true) {
            "by reference on every in-sync replica"
        } else {
            "streamed (not every replica holds the token's data)"
        };
        println!("copied {} to {to} at {offset}, {how}", format_size(bytes));
    }
    Ok(())
}

/// `tandem volume clone SRC NEW` and `tandem snapshot create SRC NAME`.
pub async fn made_from(target: &Target, source: &str, name: String, snapshot: bool) -> anyhow::Result<()> {
    let api = find_api(target).await?;
    let path = format!("/v1/volumes/{source}/{}", if snapshot { "snapshots" } else { "clone" });
    let v: VolumeView = api.request(Method::POST, &path, Some(&MadeFromRequest { name })).await?;
    println!(
        "{} {} of {source}: id {}, {}, primary {}, in sync on {:?}",
        if snapshot { "snapshot" } else { "clone" },
        v.name,
        v.id,
        format_size(v.size_bytes),
        v.primary,
        v.isr
    );
    Ok(())
}

pub async fn snapshot(target: &Target, cmd: SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create { volume, name } => made_from(target, &volume, name, true).await,
        SnapshotCmd::List { volume, json } => {
            let api = find_api(target).await?;
            let all: Vec<VolumeView> = api.get("/v1/volumes").await?;
            let snaps: Vec<VolumeView> = all
                .into_iter()
                .filter(|v| {
                    v.origin.as_ref().is_some_and(|o| o.snapshot && volume.as_ref().is_none_or(|s| &o.source == s))
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&snaps)?);
            } else {
                println!("{:<24} {:<24} {:>8} MADE", "SNAPSHOT", "OF", "SIZE");
                for v in &snaps {
                    let o = v.origin.as_ref().expect("filtered");
                    println!(
                        "{:<24} {:<24} {:>8} {}",
                        v.name,
                        o.source,
                        format_size(v.size_bytes),
                        if o.made { "yes" } else { "being made" }
                    );
                }
                if snaps.is_empty() {
                    print_volumes(&[]);
                }
            }
            Ok(())
        }
        SnapshotCmd::Delete { name } => {
            let api = find_api(target).await?;
            let v: VolumeView = api.get(&format!("/v1/volumes/{name}")).await?;
            if !v.origin.as_ref().is_some_and(|o| o.snapshot) {
                anyhow::bail!("{name} is not a snapshot (tandem volume delete deletes volumes)");
            }
            let _: serde_json::Value =
                api.request::<(), _>(Method::DELETE, &format!("/v1/volumes/{name}"), None).await?;
            println!("snapshot {name} deleted");
            Ok(())
        }
    }
}
