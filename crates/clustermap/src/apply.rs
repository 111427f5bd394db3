//! The dispatcher: [`ClusterMap::apply`] takes one command and returns its reply. Each command
//! is handled next to the records it changes; batches apply their commands in order.

use crate::map::ClusterMap;
use crate::{MetaCmd, MetaReply, ResyncProgress};

impl ClusterMap {
    /// Applies one committed command. Deterministic: the same commands in the same order give
    /// the same map and the same replies on every node. A refused command changes nothing.
    pub fn apply(&mut self, cmd: MetaCmd) -> MetaReply {
        match cmd {
            MetaCmd::RegisterNode(rec) => self.register_node(rec),
            MetaCmd::RemoveNode { id } => self.remove_node(id),
            MetaCmd::PutSetting { key, value } => self.put_setting(key, value),
            MetaCmd::DeleteSetting { key } => self.delete_setting(key),
            MetaCmd::SetTransport { layer, kind } => self.set_transport(layer, kind),
            MetaCmd::CreateDataset { name, replicas, preferred_site } => {
                self.create_dataset(name, replicas, preferred_site)
            }
            MetaCmd::DeleteDataset { name } => self.delete_dataset(&name),
            MetaCmd::CreateVolume { name, dataset, size_bytes } => self.create_volume(name, dataset, size_bytes),
            MetaCmd::DeleteVolume { name } => self.delete_volume(&name),
            MetaCmd::SetVolumeIsr { volume, epoch, isr_version, isr } => {
                self.set_volume_isr(volume, epoch, isr_version, isr)
            }
            MetaCmd::Failover { volume, epoch, primary, isr } => self.failover(volume, epoch, primary, isr),
            MetaCmd::ClaimPrimary { volume, epoch, primary, nonce } => {
                self.claim_primary(volume, epoch, primary, nonce)
            }
            MetaCmd::SetResyncProgress { volume, node, done_bytes, total_bytes } => {
                self.set_resync_progress(volume, node, ResyncProgress { done_bytes, total_bytes })
            }
            MetaCmd::ClearResync { volume, node } => self.clear_resync(volume, node),
            MetaCmd::AddHost { name, site, iqns } => self.add_host(name, site, iqns),
            MetaCmd::RemoveHost { name } => self.remove_host(name),
            MetaCmd::ConnectHost { host, volume } => self.connect_host(&host, &volume, true),
            MetaCmd::DisconnectHost { host, volume } => self.connect_host(&host, &volume, false),
            MetaCmd::PublishPaths { host, generation, paths } => self.publish_paths(&host, generation, paths),
            MetaCmd::CasSetting { key, expect, value } => self.cas_setting(key, expect, value),
            MetaCmd::SetHostCredential { host, credential } => self.set_host_credential(&host, credential),
            MetaCmd::SetHostChap { host, chap } => self.set_host_chap(&host, chap),
            MetaCmd::Reserve { volume, epoch, id, nexus, op } => self.reserve(volume, epoch, id, &nexus, &op),
            MetaCmd::CreateToken { volume, ranges, host, nonce, now_ms, lifetime_ms, idle_ms } => {
                self.create_token(volume, ranges, host, nonce, now_ms, lifetime_ms, idle_ms)
            }
            MetaCmd::TokenReady { id, holders } => self.token_ready(id, holders),
            MetaCmd::TouchToken { id, now_ms } => self.touch_token(id, now_ms),
            MetaCmd::RevokeToken { id } => self.revoke_token(id),
            MetaCmd::Expire { now_ms } => self.expire(now_ms),
            MetaCmd::CloneVolume { name, source, snapshot, now_ms } => {
                self.clone_volume(name, &source, snapshot, now_ms)
            }
            MetaCmd::FinishClone { volume, holders } => self.finish_clone(volume, holders),
            MetaCmd::Batch(cmds) => MetaReply::Batch(
                cmds.into_iter()
                    .map(|c| match c {
                        MetaCmd::Batch(_) => MetaReply::Invalid("batches do not nest".into()),
                        c => self.apply(c),
                    })
                    .collect(),
            ),
        }
    }
}
