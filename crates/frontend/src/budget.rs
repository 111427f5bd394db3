//! Memory budgets that protocol servers share across connections: whoever starts the servers
//! creates them once and hands each server a clone, so the bound holds for the process (or for
//! whatever set of servers shares them) without a process global, and can be observed.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// Reservations are made in whole units of this size, so that many small requests account for
/// the bookkeeping and allocator slack they cost rather than for their payload alone.
pub const BUFFER_UNIT_BYTES: u64 = 4096;

/// The budgets given to a protocol server. Cloning shares them: every server given a clone
/// draws from the same budgets.
///
/// Per-connection limits (requests in flight, buffered write payloads) stay constants of each
/// protocol's server, next to the reasons for their values; what is shared between
/// connections lives here.
#[derive(Clone, Debug)]
pub struct Budgets {
    /// Buffers holding data read for hosts, of all connections together: many clients reading
    /// at full queue depth wait for buffers rather than multiply them.
    pub read_buffers: Arc<BufferBudget>,
}

impl Budgets {
    pub fn new(read_buffer_bytes_max: u64) -> Budgets {
        Budgets { read_buffers: Arc::new(BufferBudget::new(read_buffer_bytes_max)) }
    }
}

/// A number of bytes that buffers may take at once. A reservation waits (asynchronously, first
/// come first served) until the bytes are free, and gives them back when dropped. It records
/// the most ever reserved at once, so tests and operators can see the bound both used and kept.
#[derive(Debug)]
pub struct BufferBudget {
    bytes_max: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    reserved_bytes: u64,
    high_water_bytes: u64,
    /// Reservations waiting for bytes, in arrival order. Its length is bounded by the callers:
    /// each holds one entry at most, and servers bound their requests in flight.
    waiting: VecDeque<Waiting>,
}

#[derive(Debug)]
struct Waiting {
    ticket: Arc<Ticket>,
    waker: Waker,
}

#[derive(Debug)]
struct Ticket {
    bytes: u64,
    /// Set (under the budget's lock) when the bytes were counted as reserved for this ticket.
    granted: AtomicBool,
}

impl BufferBudget {
    /// A budget of `bytes_max` bytes; at least one unit.
    pub fn new(bytes_max: u64) -> BufferBudget {
        assert!(bytes_max >= BUFFER_UNIT_BYTES, "a buffer budget of {bytes_max} bytes cannot grant a single unit");
        BufferBudget {
            bytes_max,
            state: Mutex::new(State { reserved_bytes: 0, high_water_bytes: 0, waiting: VecDeque::new() }),
        }
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// Bytes reserved now.
    pub fn reserved_bytes(&self) -> u64 {
        self.lock().reserved_bytes
    }

    /// The most bytes ever reserved at once; never above [`BufferBudget::bytes_max`].
    pub fn high_water_bytes(&self) -> u64 {
        self.lock().high_water_bytes
    }

    /// Reserves `bytes`, rounded up to whole [`BUFFER_UNIT_BYTES`], waiting behind earlier
    /// reservations until they fit. Asking for more than the whole budget is a programmer
    /// error (it could never be granted), and panics.
    pub fn reserve(&self, bytes: u64) -> Reserve<'_> {
        let bytes = bytes.div_ceil(BUFFER_UNIT_BYTES) * BUFFER_UNIT_BYTES;
        assert!(
            bytes <= self.bytes_max,
            "a reservation of {bytes} bytes exceeds the whole budget of {}",
            self.bytes_max
        );
        Reserve { budget: self, bytes, ticket: None, done: false }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement that changes it: a panic elsewhere
        // while it was held leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, bytes: u64) {
        let woken = {
            let mut state = self.lock();
            assert!(state.reserved_bytes >= bytes, "released more bytes than were reserved");
            state.reserved_bytes -= bytes;
            state.admit(self.bytes_max)
        };
        woken.into_iter().for_each(Waker::wake);
    }
}

impl State {
    fn take(&mut self, bytes: u64, bytes_max: u64) {
        self.reserved_bytes += bytes;
        assert!(self.reserved_bytes <= bytes_max, "buffer budget overdrawn");
        self.high_water_bytes = self.high_water_bytes.max(self.reserved_bytes);
    }

    /// Grants waiting reservations in order while the first one fits; returns their wakers, to
    /// be woken once the lock is released.
    fn admit(&mut self, bytes_max: u64) -> Vec<Waker> {
        let mut woken = Vec::new();
        while let Some(first) = self.waiting.front() {
            let bytes = first.ticket.bytes;
            if self.reserved_bytes + bytes > bytes_max {
                break;
            }
            let Some(granted) = self.waiting.pop_front() else { break };
            self.take(bytes, bytes_max);
            granted.ticket.granted.store(true, Ordering::Relaxed);
            woken.push(granted.waker);
        }
        woken
    }
}

/// The future of [`BufferBudget::reserve`]. Dropping it before it completes gives up its place
/// (or its bytes, if they were granted meanwhile).
#[derive(Debug)]
pub struct Reserve<'a> {
    budget: &'a BufferBudget,
    bytes: u64,
    /// Our place in the queue, once we had to wait.
    ticket: Option<Arc<Ticket>>,
    done: bool,
}

impl<'a> Future for Reserve<'a> {
    type Output = BufferReservation<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BufferReservation<'a>> {
        let this = self.get_mut();
        assert!(!this.done, "a buffer reservation polled after it completed");
        let budget = this.budget;
        let mut state = budget.lock();
        let granted = match &this.ticket {
            // Nobody may overtake a waiting reservation (a large one would starve otherwise);
            // nothing, though, waits for zero bytes.
            None if this.bytes == 0
                || (state.waiting.is_empty() && state.reserved_bytes + this.bytes <= budget.bytes_max) =>
            {
                state.take(this.bytes, budget.bytes_max);
                true
            }
            None => {
                let ticket = Arc::new(Ticket { bytes: this.bytes, granted: AtomicBool::new(false) });
                state.waiting.push_back(Waiting { ticket: Arc::clone(&ticket), waker: cx.waker().clone() });
                this.ticket = Some(ticket);
                false
            }
            Some(ticket) if ticket.granted.load(Ordering::Relaxed) => {
                this.ticket = None;
                true
            }
            Some(ticket) => {
                if let Some(waiting) = state.waiting.iter_mut().find(|w| Arc::ptr_eq(&w.ticket, ticket)) {
                    waiting.waker.clone_from(cx.waker());
                }
                false
            }
        };
        if !granted {
            return Poll::Pending;
        }
        this.done = true;
        Poll::Ready(BufferReservation { budget, bytes: this.bytes })
    }
}

impl Drop for Reserve<'_> {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket.take() else { return };
        let woken = {
            let mut state = self.budget.lock();
            if ticket.granted.load(Ordering::Relaxed) {
                state.reserved_bytes -= ticket.bytes;
            } else {
                state.waiting.retain(|w| !Arc::ptr_eq(&w.ticket, &ticket));
            }
            // Leaving the head of the queue may let the ones behind in.
            state.admit(self.budget.bytes_max)
        };
        woken.into_iter().for_each(Waker::wake);
    }
}

/// Bytes of a [`BufferBudget`], given back when dropped.
#[derive(Debug)]
pub struct BufferReservation<'a> {
    budget: &'a BufferBudget,
    bytes: u64,
}

impl BufferReservation<'_> {
    /// The bytes held: the request rounded up to whole units.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for BufferReservation<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::task::Wake;
    use std::thread;

    const UNIT: u64 = BUFFER_UNIT_BYTES;

    fn poll<'a>(reserve: &mut Reserve<'a>) -> Option<BufferReservation<'a>> {
        match Pin::new(reserve).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    /// Wakes a parked thread: enough of an executor to wait on one reservation.
    struct Unpark(thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
            thread::park();
        }
    }

    #[test]
    fn reservations_round_up_to_units_and_record_the_high_water_mark() {
        let budget = BufferBudget::new(8 * UNIT);
        let a = poll(&mut budget.reserve(1)).expect("fits");
        assert_eq!(a.bytes(), UNIT);
        let b = poll(&mut budget.reserve(3 * UNIT + 1)).expect("fits");
        assert_eq!(budget.reserved_bytes(), 5 * UNIT);
        drop(a);
        drop(b);
        assert_eq!(budget.reserved_bytes(), 0);
        assert_eq!(budget.high_water_bytes(), 5 * UNIT, "the mark stays after release");
    }

    #[test]
    fn a_reservation_waits_for_bytes_and_nobody_overtakes_it() {
        let budget = BufferBudget::new(4 * UNIT);
        let held = poll(&mut budget.reserve(3 * UNIT)).expect("fits");
        let mut big = budget.reserve(2 * UNIT);
        assert!(poll(&mut big).is_none(), "does not fit yet");
        let mut small = budget.reserve(UNIT);
        assert!(poll(&mut small).is_none(), "fits, but must not overtake the waiting one");
        drop(held);
        let big = poll(&mut big).expect("granted on release");
        let small = poll(&mut small).expect("granted behind it");
        assert_eq!(budget.reserved_bytes(), 3 * UNIT);
        assert_eq!(budget.high_water_bytes(), 3 * UNIT);
        drop((big, small));
        assert_eq!(budget.reserved_bytes(), 0);
    }

    #[test]
    fn giving_up_a_place_lets_the_next_in_and_returns_granted_bytes() {
        let budget = BufferBudget::new(4 * UNIT);
        let held = poll(&mut budget.reserve(3 * UNIT)).expect("fits");
        let mut big = budget.reserve(4 * UNIT);
        assert!(poll(&mut big).is_none());
        let mut small = budget.reserve(UNIT);
        assert!(poll(&mut small).is_none());
        drop(big);
        let small = poll(&mut small).expect("the head left the queue");
        // Granted while its owner was not looking, then abandoned: the bytes come back.
        let mut late = budget.reserve(2 * UNIT);
        assert!(poll(&mut late).is_none());
        drop(held);
        assert_eq!(budget.reserved_bytes(), 3 * UNIT, "granted to the waiter on release");
        drop(late);
        assert_eq!(budget.reserved_bytes(), UNIT);
        drop(small);
        assert_eq!(budget.reserved_bytes(), 0);
    }

    #[test]
    #[should_panic(expected = "exceeds the whole budget")]
    fn asking_for_more_than_the_budget_is_a_bug() {
        drop(BufferBudget::new(UNIT).reserve(UNIT + 1));
    }

    #[test]
    fn many_threads_never_overdraw_the_budget_and_reach_it() {
        let budget = Arc::new(BufferBudget::new(16 * UNIT));
        let all_in = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let budget = Arc::clone(&budget);
                let all_in = Arc::clone(&all_in);
                thread::spawn(move || {
                    // All eight hold a share at once, so together they reach the whole
                    // budget whatever the scheduler does.
                    let share = block_on(budget.reserve(2 * UNIT));
                    all_in.wait();
                    drop(share);
                    for i in 0..500u64 {
                        let bytes = (t * 7 + i * 13) % (8 * UNIT) + 1;
                        let held = block_on(budget.reserve(bytes));
                        assert!(budget.reserved_bytes() <= budget.bytes_max());
                        if i % 16 == 0 {
                            thread::yield_now();
                        }
                        drop(held);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("worker");
        }
        assert_eq!(budget.reserved_bytes(), 0);
        assert!(budget.high_water_bytes() <= budget.bytes_max());
        assert_eq!(budget.high_water_bytes(), budget.bytes_max(), "eight threads together reached the whole budget");
    }
}
