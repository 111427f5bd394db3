//! Copy by reference (docs/PROTOCOL.md, "Copy by reference"): copy tokens, and volumes made
//! from another volume by reference (clones and read-only snapshots).
//!
//! Both rest on an *image*, a frozen copy by reference of ranges of a volume, which the data
//! plane makes on the volume's in-sync replicas under a store id the map allocates from the
//! volume ids. A token is made in two steps: [`MetaCmd::CreateToken`] allocates its id (which is
//! its image's id) and records it *pending*; once the image is made,
//! [`MetaCmd::TokenReady`] records the nodes that hold it. A clone or snapshot likewise:
//! [`MetaCmd::CloneVolume`] records the new volume *pending* (no node serves it), and
//! [`MetaCmd::FinishClone`] makes it a volume like any other, its in-sync set the image's
//! holders. Times (creation, expiry, use) are carried in the commands: apply reads no clock.
//!
//! [`MetaCmd::CreateToken`]: crate::MetaCmd::CreateToken
//! [`MetaCmd::TokenReady`]: crate::MetaCmd::TokenReady
//! [`MetaCmd::CloneVolume`]: crate::MetaCmd::CloneVolume
//! [`MetaCmd::FinishClone`]: crate::MetaCmd::FinishClone

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tandem_types::{validate_name, Epoch, NodeId, VolumeId};

use crate::key::ObjectKey;
use crate::map::ClusterMap;
use crate::volumes::{VolumeRecord, VOLUMES_MAX};
use crate::MetaReply;

/// Tokens one volume may have at once.
pub const TOKENS_PER_VOLUME_MAX: usize = 128;
/// Tokens the cluster may have at once.
pub const TOKENS_MAX: usize = 4096;
/// Ranges one token stands for at most.
pub const TOKEN_RANGES_MAX: usize = tandem_types::COPY_RANGES_MAX;
/// The longest a token may live (its maximum lifetime).
pub const TOKEN_LIFETIME_MAX_MS: u64 = 24 * 3600 * 1000;
/// A token still pending this long after its creation (its maker died) is dropped.
pub const TOKEN_PENDING_MAX_MS: u64 = 10 * 60 * 1000;
/// A clone or snapshot still pending this long after its creation is dropped.
pub const CLONE_PENDING_MAX_MS: u64 = 60 * 60 * 1000;

/// A copy token: it stands for ranges of a volume as they were when it was made (its image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's id, which is also its image's store id.
    pub id: VolumeId,
    /// The random part of the token's value, chosen by the node that made it: a value naming
    /// this id with another nonce is not this token.
    pub nonce: u128,
    /// The source volume and its ranges (whole sectors), which the token's bytes concatenate.
    /// Its image holds the whole store blocks that cover each range, concatenated
    /// ([`tandem_types::covering_blocks`]).
    pub volume: VolumeId,
    pub ranges: Vec<(u64, u64)>,
    /// The nodes holding the image, sorted; empty while the token is being made.
    pub holders: Vec<NodeId>,
    /// The host that made it (`None`: an administrator).
    pub host: Option<String>,
    pub created_ms: u64,
    /// The token is void from this time on, used or not (its maximum lifetime).
    pub expires_ms: u64,
    /// The token is void once it has not been used for this long (its inactivity timeout).
    pub idle_ms: u64,
    pub last_used_ms: u64,
}

impl TokenRecord {
    /// Whether [`MetaCmd::Expire`](crate::MetaCmd::Expire) at `now_ms` drops the token: void
    /// once made, or never made within [`TOKEN_PENDING_MAX_MS`].
    pub fn expired_at(&self, now_ms: u64) -> bool {
        if self.ready() {
            self.void_at(now_ms).is_some()
        } else {
            now_ms >= self.created_ms.saturating_add(TOKEN_PENDING_MAX_MS)
        }
    }

    /// The number of bytes the token stands for.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// The ranges of its image to make: the whole store blocks covering each range.
    pub fn image_ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|&r| tandem_types::covering_blocks(r)).collect()
    }

    /// Where `len` bytes of the token's data from `token_offset` are in its image: (image
    /// offset, length) pieces in order, one per range they cross. Empty if they are not all in
    /// the token.
    pub fn image_pieces(&self, token_offset: u64, len: u64) -> Vec<(u64, u64)> {
        if token_offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Vec::new();
        }
        let mut pieces = Vec::new();
        let (mut at, mut left) = (token_offset, len);
        let (mut range_start, mut image_start) = (0u64, 0u64);
        for &(offset, range_len) in &self.ranges {
            let (cover_offset, cover_len) = tandem_types::covering_blocks((offset, range_len));
            let range_end = range_start + range_len;
            if left > 0 && at < range_end {
                let n = (range_end - at).min(left);
                pieces.push((image_start + (offset - cover_offset) + (at - range_start), n));
                at += n;
                left -= n;
            }
            range_start = range_end;
            image_start += cover_len;
        }
        pieces
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the image is made (the token can be used).
    pub fn ready(&self) -> bool {
        !self.holders.is_empty()
    }

    /// Why the token cannot be used at `now_ms`, if it cannot.
    pub fn void_at(&self, now_ms: u64) -> Option<&'static str> {
        if !self.ready() {
            Some("it is still being made")
        } else if now_ms >= self.expires_ms {
            Some("it expired (its lifetime is over)")
        } else if now_ms >= self.last_used_ms.saturating_add(self.idle_ms) {
            Some("it expired (unused for longer than its inactivity timeout)")
        } else {
            None
        }
    }
}

impl VolumeRecord {
    /// A clone or snapshot whose maker did not finish it within [`CLONE_PENDING_MAX_MS`].
    pub fn abandoned_at(&self, now_ms: u64) -> bool {
        self.origin.as_ref().is_some_and(|o| !o.made && now_ms >= o.created_ms.saturating_add(CLONE_PENDING_MAX_MS))
    }
}

/// Where a volume made by reference comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub source: VolumeId,
    pub source_name: String,
    /// A read-only snapshot (else a writable clone).
    pub snapshot: bool,
    /// False while the image is being made: no node serves the volume yet.
    pub made: bool,
    pub created_ms: u64,
}

impl ClusterMap {
    /// The tokens of a volume.
    pub fn tokens_of(&self, volume: VolumeId) -> impl Iterator<Item = &TokenRecord> {
        self.tokens.values().filter(move |t| t.volume == volume)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create_token(
        &mut self,
        volume: VolumeId,
        ranges: Vec<(u64, u64)>,
        host: Option<String>,
        nonce: u128,
        now_ms: u64,
        lifetime_ms: u64,
        idle_ms: u64,
    ) -> MetaReply {
        // A retry of a creation that took effect (its reply was lost) gets the same token.
        if let Some(t) = self.tokens.values().find(|t| t.nonce == nonce && t.volume == volume) {
            return MetaReply::Token(Box::new(t.clone()));
        }
        let Some(vol) = self.volumes.get(&volume) else {
            return MetaReply::NotFound(format!("no volume with id {volume}"));
        };
        if vol.pending() {
            return MetaReply::Invalid(format!("volume {:?} is still being made", vol.name));
        }
        if let Err(e) = tandem_types::copy_ranges_len_in(&ranges, vol.size_bytes, tandem_types::TOKEN_GRANULE_BYTES) {
            return MetaReply::Invalid(e);
        }
        if lifetime_ms == 0 || lifetime_ms > TOKEN_LIFETIME_MAX_MS || idle_ms == 0 || idle_ms > lifetime_ms {
            return MetaReply::Invalid(format!(
                "a token lives 1 ms to {TOKEN_LIFETIME_MAX_MS} ms ({lifetime_ms} asked), and its inactivity \
                 timeout is at most its lifetime ({idle_ms} asked)"
            ));
        }
        if self.tokens_of(volume).count() >= TOKENS_PER_VOLUME_MAX {
            return MetaReply::Invalid(format!(
                "volume {:?} already has the maximum of {TOKENS_PER_VOLUME_MAX} tokens",
                vol.name
            ));
        }
        if self.tokens.len() >= TOKENS_MAX {
            return MetaReply::Invalid(format!("the cluster already holds the maximum of {TOKENS_MAX} tokens"));
        }
        let id = self.next_volume_id;
        self.next_volume_id = id.checked_next().expect("volume ids exhausted");
        let token = TokenRecord {
            id,
            nonce,
            volume,
            ranges,
            holders: Vec::new(),
            host,
            created_ms: now_ms,
            expires_ms: now_ms.saturating_add(lifetime_ms),
            idle_ms,
            last_used_ms: now_ms,
        };
        self.tokens.insert(id, token.clone());
        self.touched.push(ObjectKey::Token(id));
        self.touched.push(ObjectKey::NextVolumeId);
        MetaReply::Token(Box::new(token))
    }

    pub(crate) fn token_ready(&mut self, id: VolumeId, holders: Vec<NodeId>) -> MetaReply {
        let mut holders = holders;
        holders.sort();
        holders.dedup();
        if holders.is_empty() {
            return MetaReply::Invalid("a token's image is held by at least one node".into());
        }
        if let Some(n) = holders.iter().find(|n| !self.nodes.contains_key(n)) {
            return MetaReply::Invalid(format!("node {n} is not in the cluster"));
        }
        let Some(t) = self.tokens.get_mut(&id) else {
            return MetaReply::NotFound(format!("no token {id}"));
        };
        if t.holders == holders {
            return MetaReply::Token(Box::new(t.clone()));
        }
        if t.ready() {
            return MetaReply::Conflict(format!("token {id} is already made, held by {:?}", t.holders));
        }
        t.holders = holders;
        self.touched.push(ObjectKey::Token(id));
        MetaReply::Token(Box::new(t.clone()))
    }

    pub(crate) fn touch_token(&mut self, id: VolumeId, now_ms: u64) -> MetaReply {
        let Some(t) = self.tokens.get_mut(&id) else {
            return MetaReply::NotFound(format!("no token {id}"));
        };
        if let Some(why) = t.void_at(now_ms) {
            return MetaReply::Invalid(format!("token {id} cannot be used: {why}"));
        }
        if now_ms > t.last_used_ms {
            t.last_used_ms = now_ms;
            self.touched.push(ObjectKey::Token(id));
        }
        MetaReply::Token(Box::new(t.clone()))
    }

    pub(crate) fn revoke_token(&mut self, id: VolumeId) -> MetaReply {
        if self.tokens.remove(&id).is_none() {
            return MetaReply::NotFound(format!("no token {id}"));
        }
        self.touched.push(ObjectKey::Token(id));
        MetaReply::Done { changed: true }
    }

    /// Whether [`MetaCmd::Expire`](crate::MetaCmd::Expire) at `now_ms` would drop anything: the
    /// leader proposes it only then.
    pub fn anything_expired(&self, now_ms: u64) -> bool {
        self.tokens.values().any(|t| t.expired_at(now_ms)) || self.volumes.values().any(|v| v.abandoned_at(now_ms))
    }

    /// Drops what has expired at `now_ms`: tokens past their lifetime or inactivity timeout,
    /// tokens and clones whose maker never finished them.
    pub(crate) fn expire(&mut self, now_ms: u64) -> MetaReply {
        let gone: Vec<VolumeId> = self.tokens.values().filter(|t| t.expired_at(now_ms)).map(|t| t.id).collect();
        for id in &gone {
            self.tokens.remove(id);
            self.touched.push(ObjectKey::Token(*id));
        }
        let stale: Vec<String> =
            self.volumes.values().filter(|v| v.abandoned_at(now_ms)).map(|v| v.name.clone()).collect();
        for name in &stale {
            self.delete_volume(name);
        }
        MetaReply::Done { changed: !gone.is_empty() || !stale.is_empty() }
    }

    /// Drops the tokens of a deleted volume.
    pub(crate) fn drop_tokens_of(&mut self, volume: VolumeId) {
        let gone: Vec<VolumeId> = self.tokens_of(volume).map(|t| t.id).collect();
        for id in gone {
            self.tokens.remove(&id);
            self.touched.push(ObjectKey::Token(id));
        }
    }

    pub(crate) fn clone_volume(&mut self, name: String, source: &str, snapshot: bool, now_ms: u64) -> MetaReply {
        if let Err(e) = validate_name(&name) {
            return MetaReply::Invalid(format!("volume name {name:?} {e}"));
        }
        let Some(src) = self.volume_by_name(source) else {
            return MetaReply::NotFound(format!("no volume named {source:?}"));
        };
        if let Some(existing) = self.volume_by_name(&name) {
            let same = existing.origin.as_ref().is_some_and(|o| o.source == src.id && o.snapshot == snapshot);
            if same {
                return MetaReply::Done { changed: false };
            }
            return MetaReply::Invalid(format!("volume {name:?} already exists (id {})", existing.id));
        }
        if src.pending() {
            return MetaReply::Invalid(format!("volume {source:?} is still being made"));
        }
        if self.volumes.len() >= VOLUMES_MAX {
            return MetaReply::Invalid(format!("the cluster already holds the maximum of {VOLUMES_MAX} volumes"));
        }
        let id = self.next_volume_id;
        let vol = VolumeRecord {
            id,
            name,
            dataset: src.dataset.clone(),
            size_bytes: src.size_bytes,
            replicas: src.replicas.clone(),
            primary: src.primary,
            isr: src.isr.clone(),
            epoch: Epoch(1),
            isr_version: 1,
            resync: BTreeMap::new(),
            claim: None,
            origin: Some(Origin {
                source: src.id,
                source_name: src.name.clone(),
                snapshot,
                made: false,
                created_ms: now_ms,
            }),
        };
        self.insert_new_volume(vol)
    }

    pub(crate) fn finish_clone(&mut self, id: VolumeId, holders: Vec<NodeId>) -> MetaReply {
        let Some(vol) = self.volumes.get_mut(&id) else {
            return MetaReply::NotFound(format!("no volume with id {id}"));
        };
        let Some(origin) = vol.origin.as_mut() else {
            return MetaReply::Invalid(format!("volume {:?} was not made by reference", vol.name));
        };
        let mut isr: Vec<NodeId> = holders.into_iter().filter(|n| vol.replicas.contains(n)).collect();
        isr.sort();
        isr.dedup();
        if origin.made {
            return MetaReply::Done { changed: false };
        }
        if isr.is_empty() {
            return MetaReply::Invalid(format!("no replica of volume {:?} holds its image", vol.name));
        }
        origin.made = true;
        if !isr.contains(&vol.primary) {
            vol.primary = isr[0];
        }
        vol.isr = isr;
        vol.isr_version += 1;
        vol.assert_shape();
        self.touched.push(ObjectKey::Volume(id));
        MetaReply::Done { changed: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(ranges: Vec<(u64, u64)>) -> TokenRecord {
        TokenRecord {
            id: VolumeId(9),
            nonce: 1,
            volume: VolumeId(1),
            ranges,
            holders: Vec::new(),
            host: None,
            created_ms: 0,
            expires_ms: 1,
            idle_ms: 1,
            last_used_ms: 0,
        }
    }

    #[test]
    fn a_tokens_bytes_map_to_its_image_of_covering_blocks() {
        // Sectors 1..8 of block 0, then 2 blocks and a sector from 8 KiB + 512.
        let t = token(vec![(512, 3584), (8192 + 512, 8192 + 512)]);
        assert_eq!(t.len(), 3584 + 8704);
        assert_eq!(t.image_ranges(), vec![(0, 4096), (8192, 12288)]);
        // All of it: the first range from 512 in the image, the second from 4096 + 512.
        assert_eq!(t.image_pieces(0, t.len()), vec![(512, 3584), (4096 + 512, 8704)]);
        // Across the seam, and within the second range.
        assert_eq!(t.image_pieces(3584 - 512, 1024), vec![(3584, 512), (4608, 512)]);
        assert_eq!(t.image_pieces(3584 + 100, 10), vec![(4096 + 512 + 100, 10)]);
        // Past the end: nothing.
        assert!(t.image_pieces(t.len() - 1, 2).is_empty());
        // Aligned ranges map one to one.
        let aligned = token(vec![(4096, 8192), (65536, 4096)]);
        assert_eq!(aligned.image_pieces(0, 12288), vec![(0, 8192), (8192, 4096)]);
    }
}
