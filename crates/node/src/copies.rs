//! Copy by reference, the node's part (docs/PROTOCOL.md, "Copy by reference"): copy tokens (made,
//! checked, used, revoked), clones and snapshots, the token's 512-byte value, the leader's expiry
//! of tokens and the deletion of images no token or volume claims any more.
//!
//! Every path (the HTTP API, iSCSI's POPULATE TOKEN and WRITE USING TOKEN) goes through
//! [`Copies`], which commits the records through Raft and has the data plane make and copy the
//! images.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tandem_clustermap::{AccessPolicy, ClusterMap, MetaCmd, MetaReply, Principal, TokenRecord, VolumeRecord};
use tandem_frontend::TokenFault;
use tandem_meta::network::MetaError;
use tandem_meta::store::MetaStore;
use tandem_replication::driver::IoFail;
use tandem_types::{NodeId, VolumeId};
use tandem_wire::data::Requester;

use crate::security::ClusterSecret;
use crate::volumes::Plane;

/// A token's value: SPC-4's ROD token size.
pub const TOKEN_BYTES: usize = 512;
/// The ROD type a token carries: point-in-time copy, the default kind (SPC-4).
pub const ROD_TYPE_POINT_IN_TIME: u32 = 0x0080_0000;
/// What a token is good for when its maker does not say: its lifetime and inactivity timeout.
pub const LIFETIME_DEFAULT: Duration = Duration::from_secs(3600);
pub const IDLE_DEFAULT: Duration = Duration::from_secs(600);
/// How often the Raft leader looks for expired tokens and unfinished clones.
const EXPIRY_EVERY: Duration = Duration::from_secs(2);
/// How often a node looks for images no token or volume claims; one is deleted only once two
/// sweeps in a row found it unclaimed (a copy that was just made is committed in between).
const IMAGE_SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The token's bytes covered by its MAC, and where the MAC goes.
const MAC_AT: usize = 88;
const MAC_BYTES: usize = 32;

/// Why a copy request failed. Nothing was committed or written for [`CopyError::Invalid`],
/// [`CopyError::NotFound`] and [`CopyError::Denied`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    NotFound(String),
    /// A bad range or request.
    #[error("{0}")]
    Invalid(String),
    /// A token that cannot be used: malformed or forged ([`TokenFault::Corrupt`]), expired,
    /// revoked or its source deleted ([`TokenFault::Unknown`]), or too short for the request.
    #[error("{1}")]
    Token(TokenFault, String),
    /// The requester may not read the source or write the target.
    #[error("{0}")]
    Denied(String),
    /// A reservation excludes the requester.
    #[error("{0}")]
    Conflict(String),
    /// The cluster could not do it now (no primary, no majority); it may be retried.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Io(String),
}

impl From<MetaError> for CopyError {
    fn from(e: MetaError) -> CopyError {
        match e {
            MetaError::NotFound(m) => CopyError::NotFound(m),
            MetaError::Invalid(m) | MetaError::Conflict(m) => CopyError::Invalid(m),
            other => CopyError::Unavailable(other.to_string()),
        }
    }
}

impl From<IoFail> for CopyError {
    fn from(e: IoFail) -> CopyError {
        match e {
            IoFail::Invalid(m) => CopyError::Invalid(m),
            IoFail::NoVolume(m) => CopyError::NotFound(m),
            IoFail::Denied(m) => CopyError::Denied(m),
            IoFail::Conflict(m) => CopyError::Conflict(m),
            IoFail::Io(m) => CopyError::Io(m),
            IoFail::Unavailable(m) | IoFail::CutOff(m) | IoFail::Stopping(m) => CopyError::Unavailable(m),
        }
    }
}

/// What a token's value says, once its MAC is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenValue {
    pub id: VolumeId,
    pub nonce: u128,
    pub volume: VolumeId,
    pub len: u64,
}

/// Lays out a token's value: SPC-4's ROD token header (ROD type, length 1F8h), the token id
/// where the copy manager's ROD token identifier goes, the number of bytes it represents, then
/// Tandem's part: the nonce, the source volume and an HMAC-SHA256 of all that under the
/// cluster secret. The rest is zero.
pub fn encode_token(secret: &ClusterSecret, t: &TokenValue) -> [u8; TOKEN_BYTES] {
    let mut out = [0u8; TOKEN_BYTES];
    out[0..4].copy_from_slice(&ROD_TYPE_POINT_IN_TIME.to_be_bytes());
    out[6..8].copy_from_slice(&((TOKEN_BYTES - 8) as u16).to_be_bytes());
    out[8..16].copy_from_slice(&t.id.get().to_be_bytes());
    out[48..64].copy_from_slice(&u128::from(t.len).to_be_bytes());
    out[64..80].copy_from_slice(&t.nonce.to_be_bytes());
    out[80..88].copy_from_slice(&t.volume.get().to_be_bytes());
    let mac = secret.copy_token_mac(&out[..MAC_AT]);
    out[MAC_AT..MAC_AT + MAC_BYTES].copy_from_slice(&mac);
    out
}

/// Reads a token's value: its layout, then its MAC. Any other value is refused, and which part
/// was wrong is not said beyond "malformed" or "not made by this cluster".
pub fn decode_token(secret: &ClusterSecret, bytes: &[u8]) -> Result<TokenValue, CopyError> {
    let malformed = || CopyError::Token(TokenFault::Corrupt, "the token is malformed".into());
    if bytes.len() != TOKEN_BYTES {
        return Err(CopyError::Token(
            TokenFault::Corrupt,
            format!("a token is {TOKEN_BYTES} bytes, not {}", bytes.len()),
        ));
    }
    let be = |r: std::ops::Range<usize>| bytes[r].iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b));
    if be(0..4) != u128::from(ROD_TYPE_POINT_IN_TIME) || be(6..8) != (TOKEN_BYTES - 8) as u128 {
        return Err(malformed());
    }
    if bytes[MAC_AT + MAC_BYTES..].iter().any(|b| *b != 0) || bytes[4..6] != [0, 0] {
        return Err(malformed());
    }
    if !secret.verify_copy_token_mac(&bytes[..MAC_AT], &bytes[MAC_AT..MAC_AT + MAC_BYTES]) {
        return Err(CopyError::Token(TokenFault::Corrupt, "the token was not made by this cluster".into()));
    }
    let len = u64::try_from(be(48..64)).map_err(|_| malformed())?;
    Ok(TokenValue { id: VolumeId(be(8..16) as u64), nonce: be(64..80), volume: VolumeId(be(80..88) as u64), len })
}

/// The wall clock in milliseconds: the times tokens carry.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A copy made: how many bytes, and whether by reference on every replica or streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    pub by_reference: bool,
}

/// Who asks: the principal (for access), and the requester the data plane checks
/// reservations for (`None`: an administrator, bound by none).
#[derive(Debug, Clone)]
pub struct Asker {
    pub principal: Principal,
    pub requester: Option<Requester>,
}

impl Asker {
    pub fn admin(name: &str) -> Asker {
        Asker { principal: Principal::Admin(name.to_string()), requester: None }
    }

    pub fn host(name: &str) -> Asker {
        Asker { principal: Principal::Host(name.to_string()), requester: Some(Requester::host(name)) }
    }

    fn host_name(&self) -> Option<String> {
        match &self.principal {
            Principal::Host(h) => Some(h.clone()),
            _ => None,
        }
    }
}

/// Copy by reference on this node.
pub struct Copies {
    pub meta: Arc<MetaStore>,
    pub plane: Plane,
    pub secret: Arc<ClusterSecret>,
    pub default_access: AccessPolicy,
}

/// Whether `who` may use volume `name`: a host only the volumes connected to it; anyone else
/// (an administrator) every volume.
fn check_access(map: &ClusterMap, default: AccessPolicy, who: &Principal, name: &str) -> Result<(), CopyError> {
    match who {
        Principal::Host(_) => map
            .may_open(map.access_policy(default), who, name)
            .map(|_| ())
            .map_err(|r| CopyError::Denied(r.to_string())),
        _ if map.volume_by_name(name).is_none() => Err(CopyError::NotFound(format!("no volume named {name:?}"))),
        _ => Ok(()),
    }
}

impl Copies {
    /// The data plane's configuration of volume `name` for `asker`'s requests.
    fn config(&self, name: &str, asker: &Asker) -> Result<tandem_replication::driver::VolumeConfig, CopyError> {
        let mut cfg = self
            .plane
            .volume_by_name(name)
            .ok_or_else(|| CopyError::Unavailable(format!("volume {name:?} is not served here yet")))?;
        cfg.requester = asker.requester.clone();
        Ok(cfg)
    }

    /// Makes a token for `ranges` of volume `name` (block-aligned, concatenated): commits it
    /// pending, makes its image on the volume's in-sync replicas (ordered with its writes, so
    /// the token holds the bytes of this moment), then commits it ready.
    pub async fn create_token(
        &self,
        asker: &Asker,
        name: &str,
        ranges: Vec<(u64, u64)>,
        lifetime: Duration,
        idle: Duration,
    ) -> Result<(TokenRecord, [u8; TOKEN_BYTES]), CopyError> {
        let default = self.default_access;
        let volume = self
            .meta
            .read(|st| {
                check_access(&st.map, default, &asker.principal, name)?;
                Ok::<_, CopyError>(st.map.volume_by_name(name).map(|v| v.id))
            })
            .await??
            .ok_or_else(|| CopyError::NotFound(format!("no volume named {name:?}")))?;
        let cfg = self.config(name, asker)?;
        let nonce = u128::from_be_bytes(crate::security::random_bytes::<16>());
        let cmd = MetaCmd::CreateToken {
            volume,
            ranges,
            host: asker.host_name(),
            nonce,
            now_ms: now_ms(),
            lifetime_ms: lifetime.as_millis().min(u128::from(u64::MAX)) as u64,
            idle_ms: idle.as_millis().min(u128::from(u64::MAX)) as u64,
        };
        let MetaReply::Token(pending) = self.meta.write(cmd).await? else {
            return Err(CopyError::Io("the token was not created".into()));
        };
        let made = async {
            let holders = self.plane.make_image(&cfg, pending.id, pending.image_ranges()).await?;
            match self.meta.write(MetaCmd::TokenReady { id: pending.id, holders }).await? {
                MetaReply::Token(t) => Ok(*t),
                other => Err(CopyError::Io(format!("the token was not made ready: {other:?}"))),
            }
        };
        match made.await {
            Ok(token) => {
                let value = TokenValue { id: token.id, nonce: token.nonce, volume: token.volume, len: token.len() };
                tracing::info!(token = %token.id, volume = %name, bytes = token.len(), holders = ?token.holders, "copy token made");
                Ok((token, encode_token(&self.secret, &value)))
            }
            Err(e) => {
                // Not usable: dropped now rather than at its pending timeout. Its image, if
                // made anywhere, is deleted by the holders' sweeps.
                let _ = self.meta.write(MetaCmd::RevokeToken { id: pending.id }).await;
                Err(e)
            }
        }
    }

    /// The committed token a value stands for, usable now by `asker` to write into volume
    /// `target` (the token's source is a volume `asker` may read, `target` one it may write),
    /// in one linearizable read.
    pub async fn resolve(&self, asker: &Asker, value: &[u8], target: &str) -> Result<TokenRecord, CopyError> {
        let v = decode_token(&self.secret, value)?;
        let default = self.default_access;
        let now = now_ms();
        self.meta
            .read(|st| {
                let t =
                    st.map.tokens.get(&v.id).filter(|t| t.nonce == v.nonce && t.volume == v.volume).ok_or_else(
                        || CopyError::Token(TokenFault::Unknown, "the token expired or was revoked".into()),
                    )?;
                if let Some(why) = t.void_at(now) {
                    return Err(CopyError::Token(TokenFault::Unknown, format!("the token cannot be used: {why}")));
                }
                let source = st.map.volumes.get(&t.volume).ok_or_else(|| {
                    CopyError::Token(TokenFault::Unknown, "the token's source volume was deleted".into())
                })?;
                check_access(&st.map, default, &asker.principal, &source.name).map_err(|e| {
                    CopyError::Denied(format!("the token's source may not be read by this requester: {e}"))
                })?;
                check_access(&st.map, default, &asker.principal, target)?;
                Ok(t.clone())
            })
            .await?
    }

    /// Writes `len` bytes of the token's data from `token_offset` (all of it from there when
    /// `None`) at `offset` of volume `target`.
    pub async fn copy(
        &self,
        asker: &Asker,
        value: &[u8],
        target: &str,
        offset: u64,
        token_offset: u64,
        len: Option<u64>,
    ) -> Result<Copied, CopyError> {
        let token = self.resolve(asker, value, target).await?;
        self.copy_resolved(asker, &token, target, offset, token_offset, len).await
    }

    /// [`Copies::copy`] of a token [`Copies::resolve`] returned for `asker` and `target` (a
    /// caller copying several ranges with one token reads it once).
    pub async fn copy_resolved(
        &self,
        asker: &Asker,
        token: &TokenRecord,
        target: &str,
        offset: u64,
        token_offset: u64,
        len: Option<u64>,
    ) -> Result<Copied, CopyError> {
        let available = token.len().checked_sub(token_offset).ok_or_else(|| {
            CopyError::Token(
                TokenFault::TooShort,
                format!("offset {token_offset} is past the token's {} bytes", token.len()),
            )
        })?;
        let len = len.unwrap_or(available);
        if len > available {
            return Err(CopyError::Token(
                TokenFault::TooShort,
                format!("{len} bytes from offset {token_offset} is past the token's {} bytes", token.len()),
            ));
        }
        let cfg = self.config(target, asker)?;
        match self.meta.write(MetaCmd::TouchToken { id: token.id, now_ms: now_ms() }).await? {
            MetaReply::Token(_) => {}
            other => return Err(CopyError::Token(TokenFault::Unknown, format!("the token cannot be used: {other:?}"))),
        }
        // Range by range of the token: each a piece of its image (whole blocks when the
        // token's ranges are, by reference; streamed otherwise).
        let mut by_reference = true;
        let mut at = offset;
        for (image_offset, piece) in token.image_pieces(token_offset, len) {
            by_reference &= self.plane.copy(&cfg, at, token.id, image_offset, piece, token.holders.clone()).await?;
            at += piece;
        }
        tracing::info!(token = %token.id, %target, offset, bytes = len, by_reference, "copy by token");
        Ok(Copied { bytes: len, by_reference })
    }

    /// Revokes token `id` of volume `name` (a host only its own tokens).
    pub async fn revoke(&self, asker: &Asker, name: &str, id: VolumeId) -> Result<(), CopyError> {
        let default = self.default_access;
        self.meta
            .read(|st| {
                check_access(&st.map, default, &asker.principal, name)?;
                let t = st
                    .map
                    .tokens
                    .get(&id)
                    .filter(|t| st.map.volumes.get(&t.volume).is_some_and(|v| v.name == name))
                    .ok_or_else(|| CopyError::NotFound(format!("volume {name:?} has no token {id}")))?;
                match asker.host_name() {
                    Some(h) if t.host.as_deref() != Some(h.as_str()) => {
                        Err(CopyError::Denied(format!("token {id} is not host {h}'s")))
                    }
                    _ => Ok(()),
                }
            })
            .await??;
        self.meta.write(MetaCmd::RevokeToken { id }).await?;
        Ok(())
    }

    /// Makes volume `name` a clone (or, `snapshot`, a read-only snapshot) of `source`: committed
    /// pending, its image made on the source's in-sync replicas, then served by them. A retry
    /// of one already made returns it.
    pub async fn clone_volume(&self, source: &str, name: &str, snapshot: bool) -> Result<VolumeRecord, CopyError> {
        let cmd =
            MetaCmd::CloneVolume { name: name.to_string(), source: source.to_string(), snapshot, now_ms: now_ms() };
        self.meta.write(cmd).await?;
        let vol =
            self.meta.read(|st| st.map.volume_by_name(name).cloned()).await?.ok_or_else(|| {
                CopyError::Unavailable(format!("volume {name:?} was deleted while it was being made"))
            })?;
        if !vol.pending() {
            return Ok(vol);
        }
        let made = async {
            let cfg = self.config(source, &Asker::admin("clone"))?;
            let holders = self.plane.make_image(&cfg, vol.id, vec![(0, vol.size_bytes)]).await?;
            self.meta.write(MetaCmd::FinishClone { volume: vol.id, holders }).await?;
            Ok::<_, CopyError>(())
        };
        if let Err(e) = made.await {
            let _ = self.meta.write(MetaCmd::DeleteVolume { name: name.to_string() }).await;
            return Err(e);
        }
        let vol = self.meta.read(|st| st.map.volume_by_name(name).cloned()).await?;
        let vol =
            vol.ok_or_else(|| CopyError::Unavailable(format!("volume {name:?} was deleted just after it was made")))?;
        tracing::info!(volume = %name, %source, snapshot, isr = ?vol.isr, "volume made by reference");
        Ok(vol)
    }
}

/// On the Raft leader: drops expired tokens and unfinished clones as they come due.
pub fn spawn_expiry(meta: Arc<MetaStore>, me: NodeId) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(EXPIRY_EVERY).await;
            if meta.status().leader != Some(me) {
                continue;
            }
            let now = now_ms();
            if meta.local_read(|st| st.map.anything_expired(now)) {
                if let Err(e) = meta.write(MetaCmd::Expire { now_ms: now }).await {
                    tracing::warn!(error = %e, "cannot expire copy tokens yet");
                }
            }
        }
    });
}

/// On every node: deletes the images (and leftovers) of its store that no token and no volume
/// of the map claims, once two sweeps in a row found them so.
pub fn spawn_image_sweeper(meta: Arc<MetaStore>, plane: Plane) {
    tokio::spawn(async move {
        let mut suspects: BTreeSet<VolumeId> = BTreeSet::new();
        loop {
            tokio::time::sleep(IMAGE_SWEEP_EVERY).await;
            let unclaimed: BTreeSet<VolumeId> = plane.unclaimed_store_ids().into_iter().map(|(id, _)| id).collect();
            let orphans: BTreeSet<VolumeId> = meta.local_read(|st| {
                unclaimed
                    .iter()
                    .copied()
                    .filter(|id| {
                        !st.map.volumes.contains_key(id)
                            && !st.map.tokens.contains_key(id)
                            && *id < st.map.next_volume_id
                    })
                    .collect()
            });
            for id in orphans.intersection(&suspects) {
                match plane.delete_image(*id) {
                    Ok(()) => tracing::info!(image = %id, "deleted an image no token or volume claims"),
                    Err(e) => tracing::warn!(image = %id, error = %e, "cannot delete an unclaimed image"),
                }
            }
            suspects = orphans;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::from_text(&ClusterSecret::generate_file_text()).unwrap()
    }

    #[test]
    fn a_token_value_round_trips_and_any_change_or_other_secret_is_refused() {
        let s = secret();
        let t = TokenValue { id: VolumeId(12), nonce: u128::MAX - 5, volume: VolumeId(3), len: 1 << 30 };
        let bytes = encode_token(&s, &t);
        assert_eq!(&bytes[0..8], &[0x00, 0x80, 0x00, 0x00, 0, 0, 0x01, 0xF8], "SPC-4's ROD token header");
        assert_eq!(decode_token(&s, &bytes), Ok(t));
        assert!(
            matches!(decode_token(&secret(), &bytes), Err(CopyError::Token(_, ref e)) if e.contains("not made by this cluster"))
        );
        // Every byte matters: flipping any one is refused.
        for i in 0..TOKEN_BYTES {
            let mut forged = bytes;
            forged[i] ^= 0x01;
            assert!(decode_token(&s, &forged).is_err(), "byte {i} changed and the token still decodes");
        }
        assert!(decode_token(&s, &bytes[..511]).is_err());
        assert!(decode_token(&s, &[]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn garbage_is_never_a_token(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            proptest::prop_assert!(decode_token(&secret(), &bytes).is_err());
        }
    }
}
