//! `tandem reserve ...`: persistent reservations of a volume, whole or by byte range, made for a
//! host (as the nexus `host:NAME`, the one its NBD connections use) through the HTTP API.

use reqwest::Method;
use tandem_node::reservation_api::{ReservationsView, ReserveRequest};

use crate::client::find_api;
use crate::{ReserveCmd, Target};

pub async fn reserve(target: &Target, cmd: ReserveCmd) -> anyhow::Result<()> {
    let api = find_api(target).await?;
    let (op, volume, opts) = match cmd {
        ReserveCmd::List { volume, json } => {
            let view: ReservationsView = api.get(&format!("/v1/volumes/{volume}/reservations")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print_view(&view);
            }
            return Ok(());
        }
        ReserveCmd::Register { volume, opts } => ("register", volume, opts),
        ReserveCmd::Reserve { volume, opts } => ("reserve", volume, opts),
        ReserveCmd::Release { volume, opts } => ("release", volume, opts),
        ReserveCmd::Preempt { volume, opts } => ("preempt", volume, opts),
        ReserveCmd::Clear { volume, opts } => ("clear", volume, opts),
        ReserveCmd::Move { volume, opts } => ("move", volume, opts),
    };
    let json = opts.json;
    let req = ReserveRequest {
        op: op.to_string(),
        host: opts.host,
        key: opts.key,
        current: opts.current,
        kind: opts.kind,
        victim: opts.victim,
        abort: opts.abort,
        range: opts.range,
        to: opts.to,
        aptpl: opts.aptpl,
    };
    // Checked here too, so a typo is named before anything is sent.
    req.op().map_err(anyhow::Error::msg)?;
    let reply: serde_json::Value =
        api.request(Method::POST, &format!("/v1/volumes/{volume}/reservations"), Some(&req)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        let changed = reply["changed"].as_bool().unwrap_or(false);
        let what = req.range.as_deref().map_or(String::new(), |r| format!(" of range {r}"));
        println!(
            "{op}{what} on {volume} for host {}: {}",
            req.host,
            if changed { "done" } else { "nothing to change" }
        );
    }
    Ok(())
}

fn print_view(v: &ReservationsView) {
    let port = |p: u16| p.to_string();
    println!("volume {}: generation {}, aptpl {}", v.volume, v.generation, v.aptpl);
    if v.registrations.is_empty() {
        println!("no registrations");
    } else {
        println!("{:<48} {:>5}  KEY", "REGISTRANT", "PORT");
        for r in &v.registrations {
            println!("{:<48} {:>5}  {}", r.initiator, port(r.port), r.key);
        }
    }
    match &v.reservation {
        Some(r) => println!("reservation: {} by {} (port {}, key {})", r.kind, r.holder, port(r.port), r.key),
        None => println!("no reservation of the whole volume"),
    }
    if !v.ranges.is_empty() {
        println!("{:<24} {:<36} {:<40} KEY", "RANGE", "TYPE", "HOLDER");
        for r in &v.ranges {
            println!("{:<24} {:<36} {:<40} {}", r.range.as_deref().unwrap_or(""), r.kind, r.holder, r.key);
        }
    }
}
