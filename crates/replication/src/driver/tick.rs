//! The ticker: drives time for every primary on this node (ack timeouts, retried proposals,
//! resyncs of members that are back, the lease and the hold time) and (re)starts primaries.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use tandem_storage::BlockStore;
use tandem_types::VolumeId;

use super::primary::confirm_primary;
use super::{Inner, Vol, RESYNC_RETRY, TICK};
use tandem_replication_core::Phase;

/// Drives time: timeouts, retried proposals, resyncs, the lease, and primaries to (re)start.
pub(super) async fn tick<S: BlockStore>(inner: Weak<Inner<S>>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let lease = inner.coord.lease_valid();
        if lease {
            *inner.lease_lost_at.lock().expect("lease lock") = None;
        }
        let cut_off_for = inner.cut_off_for(now);
        let hold = inner.config.hold_time;
        let vols: Vec<(VolumeId, Arc<Vol>)> =
            inner.volumes.lock().expect("volumes lock").iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, vol) in vols {
            let p = vol.primary.lock().expect("primary lock").clone();
            if let Some(p) = p {
                if cut_off_for.is_some() {
                    p.paused.store(true, Ordering::Release);
                } else if p.paused.load(Ordering::Acquire) && !p.confirming.swap(true, Ordering::AcqRel) {
                    tokio::spawn(confirm_primary(inner.clone(), p.clone()));
                }
                let mut st = p.st.lock().expect("core lock");
                match cut_off_for {
                    // Paused: `route` admits no new I/O without a lease, and nothing times a
                    // member out (its acks may be waiting behind this node's own stall). Writes
                    // already sent complete if every gating member acknowledges them: that
                    // keeps I1, and they were ordered before any failover could begin.
                    Some(d) if d < hold => {}
                    Some(d) => st.core.depose(&format!(
                        "this node has been cut off from the metadata majority for {:.1} s (hold time {:.0} s)",
                        d.as_secs_f64(),
                        hold.as_secs_f64()
                    )),
                    None => {
                        let out_before = st.core.out_members();
                        st.core.on_tick(now);
                        for n in st.core.out_members().into_iter().filter(|n| !out_before.contains(n)) {
                            tracing::info!(volume = %id, member = %n, "member timed out (no ack within the ack timeout)");
                        }
                        if st.core.phase() == Phase::Serving {
                            for n in st.core.out_members() {
                                let due =
                                    st.resync_tried.get(&n).is_none_or(|t| now.duration_since(*t) >= RESYNC_RETRY);
                                if due {
                                    st.resync_tried.insert(n, now);
                                    st.core.start_resync(n);
                                }
                            }
                        }
                    }
                }
                p.pump(&inner, &mut st);
            }
            inner.reconcile_role(id, &vol);
        }
    }
}
