//! The budget of changes not yet durable ([`PENDING_BYTES_MAX`]): a change takes the store's
//! lock only when there is room, writers block until there is, and async callers wait for room
//! without blocking ([`BlockStore::admit`](crate::BlockStore::admit)) and then write without
//! waiting.

use std::future::Future;
use std::sync::{MutexGuard, PoisonError};

use super::{lock, Core, SledStore, State, PENDING_BYTES_MAX};
use crate::{Admission, StoreError};

impl Core {
    /// Wakes the writers and admissions that wait for budget.
    pub(super) fn budget_freed(&self) {
        self.budget_cv.notify_all();
        self.room_tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl SledStore {
    /// Takes the lock for a change: waits while the pending budget is used up, refuses if the
    /// store failed.
    /// With an admission, the room it reserved is taken and nothing waits. Room reserved by
    /// admissions not yet used counts as used for everyone else.
    pub(super) fn lock_for_change(&self, admission: Option<Admission>) -> Result<MutexGuard<'_, State>, StoreError> {
        let core = self.core();
        let mut st = lock(&core.st);
        let admitted_now = admission.is_some();
        if let Some(a) = admission {
            st.admitted -= a.consume();
            // Room given back (an admission reserves an estimate) may let others in.
            core.budget_freed();
        }
        loop {
            if let Some(f) = &st.failed {
                return Err(StoreError::Failed(f.clone()));
            }
            if st.shutdown {
                return Err(StoreError::Failed("the store is closed".into()));
            }
            if admitted_now || st.pending_cost() + st.admitted < PENDING_BYTES_MAX {
                return Ok(st);
            }
            core.commit_cv.notify_one();
            st = core.budget_cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// [`BlockStore::admit`](crate::BlockStore::admit).
    pub(super) fn admit_room(&self, bytes: u64) -> impl Future<Output = Result<Admission, StoreError>> + Send {
        let core = self.handle.core.clone();
        async move {
            let mut room = core.room_tx.subscribe();
            loop {
                {
                    let mut st = lock(&core.st);
                    if let Some(f) = &st.failed {
                        return Err(StoreError::Failed(f.clone()));
                    }
                    if st.shutdown {
                        return Err(StoreError::Failed("the store is closed".into()));
                    }
                    if st.pending_cost() + st.admitted < PENDING_BYTES_MAX {
                        st.admitted += bytes;
                        let c = core.clone();
                        return Ok(Admission::new(
                            bytes,
                            Box::new(move |b| {
                                lock(&c.st).admitted -= b;
                                c.budget_freed();
                            }),
                        ));
                    }
                    core.commit_cv.notify_one();
                }
                room.changed().await.map_err(|_| StoreError::Failed("the store is closed".into()))?;
            }
        }
    }
}

impl State {
    /// Changes not yet durable (see [`PENDING_BYTES_MAX`]).
    pub(super) fn pending_cost(&self) -> u64 {
        self.active.cost + self.flushing.iter().map(|g| g.cost).sum::<u64>()
    }
}
