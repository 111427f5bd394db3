//! `/v1/volumes/{name}/reservations`: persistent reservations (whole volume and byte ranges)
//! made by a host over HTTP, as the nexus `host:<name>` (the same one its NBD connections use,
//! through every node). Commands go to the volume's primary through the data plane, which
//! orders them with the volume's writes; the answers: 200 with what changed, 409 for a
//! reservation conflict, 400 for a command the reservations find invalid.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use tandem_clustermap::Principal;
use tandem_replication::driver::IoFail;
use tandem_reservations::{Kind, Nexus, Op, Range, Refusal, Reservations};
use tandem_wire::data::Requester;

use crate::api_state::{ApiError, ApiResult, ApiState};

/// A reservation command, as `POST /v1/volumes/{name}/reservations` takes it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// `register`, `reserve`, `release`, `preempt`, `clear` or `move`.
    pub op: String,
    /// The host the command is made for (a host's own credential may name only itself).
    pub host: String,
    /// The host's reservation key (for `register`: the key to register, `0` to unregister),
    /// decimal or `0x` hex.
    pub key: String,
    /// `register`: the key the host holds now; without it the registration replaces whatever
    /// key the host has (REGISTER AND IGNORE EXISTING KEY).
    #[serde(default)]
    pub current: Option<String>,
    /// `reserve`, `release`, `preempt`: the reservation type ([`Kind::parse`]).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// `preempt`: the key whose registrations (or range) are taken over.
    #[serde(default)]
    pub victim: Option<String>,
    /// `preempt`: also abort the victim's commands in progress.
    #[serde(default)]
    pub abort: bool,
    /// A byte range `START:LEN` for a range reservation (`move`: the range held now).
    #[serde(default)]
    pub range: Option<String>,
    /// `move`: the range to move the reservation to.
    #[serde(default)]
    pub to: Option<String>,
    /// `register`: persist through power loss (the cluster keeps reservations in Raft
    /// whatever this says; READ RESERVATION reports it).
    #[serde(default)]
    pub aptpl: bool,
}

/// A reservation key: decimal, or hex with `0x`.
pub fn parse_key(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a reservation key (a 64-bit number, decimal or 0x hex)"))
}

/// A byte range `START:LEN` (decimal bytes).
pub fn parse_range(text: &str) -> Result<Range, String> {
    let bad = || format!("{text:?} is not a byte range START:LEN");
    let (start, len) = text.split_once(':').ok_or_else(bad)?;
    let range = Range::new(start.trim().parse().map_err(|_| bad())?, len.trim().parse().map_err(|_| bad())?);
    if range.len == 0 || range.end().is_none() {
        return Err(format!("range {text:?} is empty or too large"));
    }
    Ok(range)
}

impl ReserveRequest {
    /// The command, or why it is malformed.
    pub fn op(&self) -> Result<Op, String> {
        let key = parse_key(&self.key)?;
        let kind = || -> Result<Kind, String> {
            let name = self.kind.as_deref().ok_or_else(|| format!("{} needs a type", self.op))?;
            Kind::parse(name).ok_or_else(|| {
                format!("{name:?} is not a reservation type (we, ea, we-ro, ea-ro, we-ar, ea-ar, or a full name)")
            })
        };
        let range = self.range.as_deref().map(parse_range).transpose()?;
        let victim = || -> Result<u64, String> {
            parse_key(self.victim.as_deref().ok_or_else(|| "preempt needs the victim's key".to_string())?)
        };
        let op = match (self.op.as_str(), range) {
            ("register", None) => match &self.current {
                Some(current) => Op::Register {
                    key: parse_key(current)?,
                    new_key: key,
                    ignore_existing: false,
                    all_ports: Vec::new(),
                    aptpl: self.aptpl,
                    also: Vec::new(),
                },
                None => Op::Register {
                    key: 0,
                    new_key: key,
                    ignore_existing: true,
                    all_ports: Vec::new(),
                    aptpl: self.aptpl,
                    also: Vec::new(),
                },
            },
            ("reserve", None) => Op::Reserve { key, kind: kind()? },
            ("reserve", Some(range)) => Op::ReserveRange { key, range, kind: kind()? },
            ("release", None) => Op::Release { key, kind: kind()? },
            ("release", Some(range)) => Op::ReleaseRange { key, range },
            ("preempt", None) => Op::Preempt { key, victim: victim()?, kind: kind()?, abort: self.abort },
            ("preempt", Some(range)) => Op::PreemptRange { key, victim: victim()?, range, kind: kind()? },
            ("clear", None) => Op::Clear { key },
            ("clear", Some(range)) => Op::ClearRange { key, range },
            ("move", Some(from)) => {
                let to = parse_range(self.to.as_deref().ok_or_else(|| "move needs the range to move to".to_string())?)?;
                Op::MoveRange { key, from, to }
            }
            ("move", None) => return Err("move needs the range held now (range) and the new one (to)".into()),
            ("register", Some(_)) => return Err("register takes no range: a registration is for the volume".into()),
            (other, _) => {
                return Err(format!(
                    "{other:?} is not a reservation command (register, reserve, release, preempt, clear, move)"
                ))
            }
        };
        Ok(op)
    }
}

/// One registration, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistrationView {
    pub initiator: String,
    /// The relative target port (0: Tandem's own paths).
    pub port: u16,
    pub key: String,
}

/// A reservation (of the whole volume, or of `range`), as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReservationView {
    pub holder: String,
    pub port: u16,
    #[serde(rename = "type")]
    pub kind: String,
    /// The holder's key (`0x0` for the all-registrants types, as READ RESERVATION says).
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<String>,
}

/// `GET /v1/volumes/{name}/reservations`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReservationsView {
    pub volume: String,
    pub generation: u32,
    pub aptpl: bool,
    pub registrations: Vec<RegistrationView>,
    pub reservation: Option<ReservationView>,
    pub ranges: Vec<ReservationView>,
}

fn key_text(key: u64) -> String {
    format!("{key:#x}")
}

impl ReservationsView {
    pub fn of(volume: &str, r: &Reservations) -> ReservationsView {
        ReservationsView {
            volume: volume.to_string(),
            generation: r.generation,
            aptpl: r.aptpl,
            registrations: r
                .registrations
                .iter()
                .map(|g| RegistrationView {
                    initiator: g.nexus.initiator.clone(),
                    port: g.nexus.port,
                    key: key_text(g.key),
                })
                .collect(),
            reservation: r.reservation.as_ref().map(|res| ReservationView {
                holder: res.holder.initiator.clone(),
                port: res.holder.port,
                kind: res.kind.name().to_string(),
                key: key_text(r.holder_key().unwrap_or(0)),
                range: None,
            }),
            ranges: r
                .ranges
                .iter()
                .map(|x| ReservationView {
                    holder: x.holder.initiator.clone(),
                    port: x.holder.port,
                    kind: x.kind.name().to_string(),
                    key: key_text(r.key_of(&x.holder).unwrap_or(0)),
                    range: Some(x.range.to_string()),
                })
                .collect(),
        }
    }
}

/// Whether `principal` may act for `host` on `volume`: admins for any host; a host for
/// itself, on a volume connected to it.
async fn check_host(s: &ApiState, principal: &Principal, host: &str, volume: &str) -> Result<(), ApiError> {
    if let Principal::Host(me) = principal {
        if me != host {
            return Err(ApiError(StatusCode::FORBIDDEN, format!("host {me} may not act for host {host}")));
        }
    }
    let default = s.cfg.security.access;
    let verdict = s
        .meta
        .read(|st| {
            if !st.map.hosts.contains_key(host) {
                return Err(ApiError(StatusCode::NOT_FOUND, format!("no host named {host:?}")));
            }
            if st.map.volume_by_name(volume).is_none() {
                return Err(ApiError(StatusCode::NOT_FOUND, format!("no volume named {volume:?}")));
            }
            st.map
                .may_open(st.map.access_policy(default), &Principal::Host(host.to_string()), volume)
                .map(|_| ())
                .map_err(|r| ApiError(StatusCode::FORBIDDEN, r.to_string()))
        })
        .await?;
    verdict
}

/// `GET /v1/volumes/{name}/reservations`.
pub async fn get_reservations(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<ReservationsView> {
    if let Principal::Host(me) = &principal {
        check_host(&s, &principal, me, &name).await?;
    }
    let view = s
        .meta
        .read(|st| {
            let id = st.map.volume_by_name(&name).map(|v| v.id)?;
            Some(ReservationsView::of(&name, st.map.reservations_of(id).unwrap_or(&Reservations::default())))
        })
        .await?;
    view.map(Json).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no volume named {name:?}")))
}

/// `POST /v1/volumes/{name}/reservations`.
pub async fn post_reservation(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<ReserveRequest>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(req) = body?;
    let op = req.op().map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    check_host(&s, &principal, &req.host, &name).await?;
    let Some(mut cfg) = s.plane.volume_by_name(&name) else {
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("volume {name:?} is not served here yet")));
    };
    cfg.requester = Some(Requester::host(&req.host));
    let nexus = Nexus::host(&req.host);
    match s.plane.reserve(&cfg, op.clone()).await {
        Ok(Ok(outcome)) => Ok(Json(serde_json::json!({
            "volume": name,
            "op": op.name(),
            "initiator": nexus.initiator,
            "changed": outcome.changed,
            "aborted": outcome.aborted.iter().map(|n| n.initiator.clone()).collect::<Vec<_>>(),
        }))),
        Ok(Err(refusal)) => {
            let status = match refusal {
                Refusal::Conflict(_) | Refusal::NoResources(_) => StatusCode::CONFLICT,
                Refusal::InvalidParameter(_) | Refusal::InvalidRelease(_) => StatusCode::BAD_REQUEST,
            };
            Err(ApiError(status, refusal.to_string()))
        }
        Err(e @ (IoFail::Invalid(_) | IoFail::NoVolume(_))) => Err(ApiError(StatusCode::BAD_REQUEST, e.to_string())),
        Err(e @ IoFail::Denied(_)) => Err(ApiError(StatusCode::FORBIDDEN, e.to_string())),
        Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> Result<Op, String> {
        serde_json::from_value::<ReserveRequest>(json).map_err(|e| e.to_string())?.op()
    }

    #[test]
    fn requests_become_commands_and_bad_ones_say_why() {
        let op = request(serde_json::json!({"op": "register", "host": "h", "key": "0xab"})).unwrap();
        assert!(matches!(op, Op::Register { key: 0, new_key: 0xab, ignore_existing: true, .. }));
        let op = request(serde_json::json!({"op": "register", "host": "h", "key": "5", "current": "0xab"})).unwrap();
        assert!(matches!(op, Op::Register { key: 0xab, new_key: 5, ignore_existing: false, .. }));
        let op = request(serde_json::json!({"op": "reserve", "host": "h", "key": "1", "type": "we-ro"})).unwrap();
        assert_eq!(op, Op::Reserve { key: 1, kind: Kind::WriteExclusiveRegistrantsOnly });
        let op =
            request(serde_json::json!({"op": "reserve", "host": "h", "key": "1", "type": "ea", "range": "4096:8192"}))
                .unwrap();
        assert_eq!(op, Op::ReserveRange { key: 1, range: Range::new(4096, 8192), kind: Kind::ExclusiveAccess });
        let op = request(serde_json::json!({"op": "move", "host": "h", "key": "1", "range": "0:10", "to": "10:10"}))
            .unwrap();
        assert_eq!(op, Op::MoveRange { key: 1, from: Range::new(0, 10), to: Range::new(10, 10) });
        let op = request(
            serde_json::json!({"op": "preempt", "host": "h", "key": "1", "victim": "2", "type": "we", "abort": true}),
        )
        .unwrap();
        assert_eq!(op, Op::Preempt { key: 1, victim: 2, kind: Kind::WriteExclusive, abort: true });

        for (bad, needle) in [
            (serde_json::json!({"op": "reserve", "host": "h", "key": "1"}), "needs a type"),
            (serde_json::json!({"op": "reserve", "host": "h", "key": "1", "type": "x"}), "not a reservation type"),
            (serde_json::json!({"op": "reserve", "host": "h", "key": "zz", "type": "we"}), "not a reservation key"),
            (
                serde_json::json!({"op": "reserve", "host": "h", "key": "1", "type": "we", "range": "5"}),
                "not a byte range",
            ),
            (serde_json::json!({"op": "reserve", "host": "h", "key": "1", "type": "we", "range": "5:0"}), "empty"),
            (serde_json::json!({"op": "preempt", "host": "h", "key": "1", "type": "we"}), "victim"),
            (serde_json::json!({"op": "move", "host": "h", "key": "1", "range": "0:1"}), "range to move to"),
            (serde_json::json!({"op": "steal", "host": "h", "key": "1"}), "not a reservation command"),
            (serde_json::json!({"op": "clear", "host": "h", "key": "1", "extra": 1}), "unknown field"),
        ] {
            let err = request(bad.clone()).expect_err(&bad.to_string());
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
