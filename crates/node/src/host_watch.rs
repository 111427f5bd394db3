//! Wakes the path-map long-polls (`GET /v1/hosts/{name}/paths?since=G`) of one host when that
//! host's record changes, and no others; and the host connections whose access hangs on a
//! host's record or on the access setting. Every host's agent keeps such a poll open, so a poll
//! that woke on every applied write would make each write cost as much as there are hosts; one
//! task here reads the change feed and wakes only the watchers of the hosts it names.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tandem_clustermap::ObjectKey;
use tandem_meta::state_machine::Changed;
use tandem_meta::store::MetaStore;
use tokio::sync::watch;

/// One wake-up signal per watched object (a host's record, or a setting).
pub struct HostWatches {
    hosts: Mutex<HashMap<ObjectKey, watch::Sender<u64>>>,
}

impl HostWatches {
    /// Starts the task that follows `meta`'s change feed, for as long as the store runs.
    pub fn spawn(meta: &MetaStore) -> Arc<HostWatches> {
        let watches = Arc::new(HostWatches { hosts: Mutex::new(HashMap::new()) });
        let mut changes = meta.changes();
        let w = watches.clone();
        tokio::spawn(async move {
            while let Some(changed) = changes.next().await {
                w.wake(&changed);
            }
            // The store stopped: dropping the senders ends every wait.
            w.hosts.lock().expect("watches lock").clear();
        });
        watches
    }

    /// A signal that changes whenever `host`'s record may have changed. Take it before reading
    /// the record, so that no change falls between the read and the wait.
    pub fn watch(&self, host: &str) -> watch::Receiver<u64> {
        self.watch_key(ObjectKey::Host(host.to_string()))
    }

    /// A signal that changes whenever the object `key` may have changed (read it after taking
    /// the signal, as for [`HostWatches::watch`]).
    pub fn watch_key(&self, key: ObjectKey) -> watch::Receiver<u64> {
        let mut hosts = self.hosts.lock().expect("watches lock");
        hosts.entry(key).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    fn wake(&self, changed: &Changed) {
        let mut hosts = self.hosts.lock().expect("watches lock");
        let bump = |tx: &watch::Sender<u64>| tx.send_modify(|n| *n = n.wrapping_add(1));
        match changed {
            Changed::All => {
                hosts.retain(|_, tx| tx.receiver_count() > 0);
                hosts.values().for_each(bump);
            }
            Changed::Keys(keys) => {
                for key in keys {
                    let Some(tx) = hosts.get(key) else { continue };
                    if tx.receiver_count() == 0 {
                        // Nobody waits any more: forget the object.
                        hosts.remove(key);
                    } else {
                        bump(tx);
                    }
                }
            }
        }
    }

    /// Hosts with a signal (watched now, or since their record last changed).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.hosts.lock().expect("watches lock").len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn watches() -> HostWatches {
        HostWatches { hosts: Mutex::new(HashMap::new()) }
    }

    fn keys(keys: &[ObjectKey]) -> Changed {
        Changed::Keys(keys.iter().cloned().collect::<BTreeSet<_>>())
    }

    #[test]
    fn only_the_named_hosts_watchers_wake() {
        let w = watches();
        let mut a = w.watch("a");
        let b = w.watch("b");
        w.wake(&keys(&[ObjectKey::Host("a".into()), ObjectKey::Setting("x".into())]));
        assert!(a.has_changed().expect("open"));
        assert!(!b.has_changed().expect("open"));
        a.borrow_and_update();
        w.wake(&keys(&[ObjectKey::Volume(tandem_types::VolumeId(1)), ObjectKey::Setting("y".into())]));
        assert!(!a.has_changed().expect("open"));
        assert!(!b.has_changed().expect("open"));
        w.wake(&Changed::All);
        assert!(a.has_changed().expect("open"));
        assert!(b.has_changed().expect("open"));
    }

    #[test]
    fn hosts_nobody_watches_are_forgotten() {
        let w = watches();
        let a = w.watch("a");
        let b = w.watch("b");
        drop(a);
        w.wake(&keys(&[ObjectKey::Host("a".into())]));
        assert_eq!(w.len(), 1, "a, unwatched and changed, is forgotten");
        drop(b);
        w.wake(&Changed::All);
        assert_eq!(w.len(), 0);
    }
}
