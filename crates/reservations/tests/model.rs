//! Random sequences of persistent-reservation commands, applied both to [`Reservations`] and to
//! a reference model written here from SPC-4 §5.13 (and, for Tandem's range reservations, from
//! the rules the crate's doc comments state), compared after every step.
//!
//! The model is deliberately unlike the implementation: registrations are a map from I_T nexus
//! to key, the reservation names its holder or "every registrant", range reservations are a map
//! keyed by offset, the access rules are one explicit table per type, and every command is a
//! function from the old model to a new one.
//!
//! The universe is three initiator ports and two target ports, so six I_T nexuses; REGISTER
//! with ALL_TG_PT registers an initiator port through several of them at once, after which each
//! of those I_T nexuses is a registration of its own (SPC-4 §5.13.7).
//!
//! Where the implementation departs from SPC-4 the model refuses to guess: it answers
//! [`Verdict::LeftOut`] and the step is applied to neither side (each such place is marked
//! `DISAGREEMENT:` below; at present there is none).

use std::collections::{BTreeMap, BTreeSet};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError};
use tandem_reservations::{Access, Attention, Kind, Nexus, Op, Range, Refusal, Reservations};

// ---------------------------------------------------------------------------------------------
// The universe the commands are drawn from.

const INITIATORS: [&str; 3] = [
    "iqn.2001-04.com.example:alpha,i,0x23d000000001",
    "iqn.2001-04.com.example:beta,i,0x23d000000002",
    "iqn.2001-04.com.example:gamma,i,0x23d000000003",
];
/// Two target ports (relative target port identifiers).
const PORTS: [u16; 2] = [1, 2];
const NEXUSES: usize = INITIATORS.len() * PORTS.len();
/// Reservation keys; 0 is "no key".
const KEYS: [u64; 4] = [0, 1, 2, 3];
/// Ranges the range commands name: overlapping ones, adjacent ones, and two invalid ones (empty,
/// and running past 2^64).
const RANGES: [(u64, u64); 8] =
    [(0, 100), (50, 100), (100, 50), (0, 1), (200, 10), (150, 60), (7, 0), (u64::MAX - 3, 10)];
/// The byte ranges every nexus's reads and writes are checked against after each step (a length
/// of 0 is a flush).
const PROBES: [(u64, u64); 10] =
    [(0, 0), (60, 0), (0, 1), (60, 10), (99, 2), (120, 5), (149, 2), (205, 1), (300, 5), (0, u64::MAX)];

/// The `i`-th I_T nexus of the universe: initiator `i / 2` through port `PORTS[i % 2]`.
fn nexus(i: usize) -> Nexus {
    Nexus::new(INITIATORS[i / PORTS.len()], PORTS[i % PORTS.len()])
}

// ---------------------------------------------------------------------------------------------
// The reservation types, as tables.

const HOLDER: usize = 0;
const REGISTRANT: usize = 1;
const STRANGER: usize = 2;

/// One reservation type: its code (SPC-4 table "Persistent reservation type codes"), whether
/// every registrant holds it, what the holder / a registered non-holder / an unregistered nexus
/// may do (SPC-4 table "Persistent reservation conflicts", SBC-3's READ and WRITE rows), and the
/// unit attentions its end raises.
struct TypeRow {
    kind: Kind,
    code: u8,
    all_registrants: bool,
    read: [bool; 3],
    write: [bool; 3],
    /// RELEASE (SPC-4 §5.13.11.2, Releasing): "registrants only or all registrants type" → RESERVATIONS
    /// RELEASED for every other registered I_T nexus.
    ua_on_release: bool,
    /// The holder unregistering (SPC-4 §5.13.11.3, Unregistering): only "registrants only" types raise
    /// RESERVATIONS RELEASED (an all-registrants reservation is not released by it).
    ua_on_holder_unregister: bool,
}

const Y: bool = true;
const N: bool = false;

#[rustfmt::skip]
const TYPES: [TypeRow; 6] = [
    //                                                               read: H  R  S   write: H  R  S
    TypeRow { kind: Kind::WriteExclusive, code: 1, all_registrants: N, read: [Y, Y, Y], write: [Y, N, N], ua_on_release: N, ua_on_holder_unregister: N },
    TypeRow { kind: Kind::ExclusiveAccess, code: 3, all_registrants: N, read: [Y, N, N], write: [Y, N, N], ua_on_release: N, ua_on_holder_unregister: N },
    TypeRow { kind: Kind::WriteExclusiveRegistrantsOnly, code: 5, all_registrants: N, read: [Y, Y, Y], write: [Y, Y, N], ua_on_release: Y, ua_on_holder_unregister: Y },
    TypeRow { kind: Kind::ExclusiveAccessRegistrantsOnly, code: 6, all_registrants: N, read: [Y, Y, N], write: [Y, Y, N], ua_on_release: Y, ua_on_holder_unregister: Y },
    TypeRow { kind: Kind::WriteExclusiveAllRegistrants, code: 7, all_registrants: Y, read: [Y, Y, Y], write: [Y, Y, N], ua_on_release: Y, ua_on_holder_unregister: N },
    TypeRow { kind: Kind::ExclusiveAccessAllRegistrants, code: 8, all_registrants: Y, read: [Y, Y, N], write: [Y, Y, N], ua_on_release: Y, ua_on_holder_unregister: N },
];

fn row(kind: Kind) -> &'static TypeRow {
    TYPES.iter().find(|r| r.kind == kind).expect("every type has a row")
}

// ---------------------------------------------------------------------------------------------
// The model.

/// An I_T nexus, as the model names it: the unit of registration (SPC-4 §5.13.7: "registers an
/// I_T nexus"), of holding a reservation (§5.13.10) and of unit attentions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Itn {
    initiator: String,
    port: u16,
}

impl Itn {
    fn of(n: &Nexus) -> Itn {
        Itn { initiator: n.initiator.clone(), port: n.port }
    }
}

/// The whole-volume reservation.
#[derive(Clone, Debug, PartialEq)]
struct Whole {
    kind: Kind,
    /// `None`: every registrant holds it (types 7 and 8).
    holder: Option<Itn>,
}

/// A range reservation (the map's key is its offset).
#[derive(Clone, Debug, PartialEq)]
struct Held {
    len: u64,
    by: Itn,
    kind: Kind,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    keys: BTreeMap<Itn, u64>,
    whole: Option<Whole>,
    ranges: BTreeMap<u64, Held>,
    generation: u32,
    aptpl: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ua {
    ReservationsPreempted,
    ReservationsReleased,
    RegistrationsPreempted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Res {
    Ok,
    Conflict,
    InvalidParameter,
    InvalidRelease,
    NoResources,
}

struct Done {
    res: Res,
    next: Model,
    uas: Vec<(Itn, Ua)>,
    /// I_T nexuses whose registrations PREEMPT (AND ABORT) removed.
    preempted: BTreeSet<Itn>,
}

enum Verdict {
    Done(Done),
    /// The implementation is known to differ from SPC-4 here: the step is not compared. (No
    /// step is left out at present; the variant stays for the next disagreement.)
    #[allow(dead_code)]
    LeftOut(&'static str),
}

/// A command in progress: the new model and what it raised.
struct Tx {
    m: Model,
    uas: Vec<(Itn, Ua)>,
    preempted: BTreeSet<Itn>,
}

impl Tx {
    /// `ua` for every registered I_T nexus but `me` (the sender's other ports included).
    fn tell_others(&mut self, me: &Itn, ua: Ua) {
        let others: Vec<Itn> = self.m.keys.keys().filter(|w| *w != me).cloned().collect();
        self.uas.extend(others.into_iter().map(|w| (w, ua)));
    }

    /// Removes registrations (SPC-4: a reservation of types 1 to 6 goes with its holder; an
    /// all-registrants one with the last registrant; Tandem: range reservations with their maker,
    /// with no unit attention of their own).
    fn forget(&mut self, gone: &BTreeSet<Itn>) {
        self.m.keys.retain(|w, _| !gone.contains(w));
        self.m.ranges.retain(|_, h| !gone.contains(&h.by));
        let holder_gone = matches!(&self.m.whole, Some(Whole { holder: Some(h), .. }) if gone.contains(h));
        if holder_gone || self.m.keys.is_empty() {
            self.m.whole = None;
        }
    }

    /// A registered I_T nexus unregisters itself (REGISTER with SARK 0, SPC-4 §5.13.11.3).
    fn unregister(&mut self, me: &Itn) {
        let released = match &self.m.whole {
            Some(Whole { holder: Some(h), kind }) if h == me => Some(*kind),
            _ => None,
        };
        self.forget(&BTreeSet::from([me.clone()]));
        if released.is_some_and(|k| row(k).ua_on_holder_unregister) {
            self.tell_others(me, Ua::ReservationsReleased);
        }
    }

    fn done(self) -> Verdict {
        Verdict::Done(Done { res: Res::Ok, next: self.m, uas: self.uas, preempted: self.preempted })
    }
}

/// Whether two byte ranges share a byte (lengths of 0 share none).
fn overlap(a_off: u64, a_len: u64, b_off: u64, b_len: u64) -> bool {
    let (a0, a1) = (u128::from(a_off), u128::from(a_off) + u128::from(a_len));
    let (b0, b1) = (u128::from(b_off), u128::from(b_off) + u128::from(b_len));
    a_len > 0 && b_len > 0 && a0 < b1 && b0 < a1
}

fn valid(r: Range) -> bool {
    r.len > 0 && r.offset.checked_add(r.len).is_some()
}

fn op_key(op: &Op) -> u64 {
    match op {
        Op::Register { key, .. }
        | Op::Reserve { key, .. }
        | Op::Release { key, .. }
        | Op::Clear { key }
        | Op::Preempt { key, .. }
        | Op::RegisterAndMove { key, .. }
        | Op::ReserveRange { key, .. }
        | Op::ReleaseRange { key, .. }
        | Op::PreemptRange { key, .. }
        | Op::ClearRange { key, .. }
        | Op::MoveRange { key, .. } => *key,
    }
}

impl Model {
    /// SPC-4 §5.13.10: the holder of a type 1-6 reservation (the one I_T nexus that made it, or
    /// that it was moved or preempted to), or any registered I_T nexus for 7 and 8.
    fn holds(&self, who: &Itn) -> bool {
        match &self.whole {
            Some(Whole { holder: None, .. }) => self.keys.contains_key(who),
            Some(Whole { holder: Some(h), .. }) => h == who,
            None => false,
        }
    }

    /// Tandem: a registrant may take range reservations unless another holds a whole-volume
    /// reservation whose type does not let registrants write (doc of `may_reserve_ranges`).
    fn may_take_ranges(&self, who: &Itn) -> bool {
        match &self.whole {
            Some(w) => self.holds(who) || row(w.kind).write[REGISTRANT],
            None => true,
        }
    }

    fn refuse(&self, res: Res) -> Verdict {
        Verdict::Done(Done { res, next: self.clone(), uas: Vec::new(), preempted: BTreeSet::new() })
    }

    /// REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.13.7 and the tables "Register
    /// behaviors for a REGISTER service action" and "... REGISTER AND IGNORE EXISTING KEY ...").
    fn register(&self, n: &Nexus, op: &Op) -> Verdict {
        let Op::Register { key, new_key, ignore_existing, ref all_ports, aptpl, .. } = *op else {
            unreachable!("only REGISTER comes here")
        };
        let me = Itn::of(n);
        let mut tx = Tx { m: self.clone(), uas: Vec::new(), preempted: BTreeSet::new() };
        match self.keys.get(&me).copied() {
            Some(registered) => {
                // A registered I_T nexus: the wrong key is RESERVATION CONFLICT (not with IGNORE
                // EXISTING KEY); SARK 0 unregisters it, any other SARK becomes its key. Only this
                // I_T nexus: from a registered one ALL_TG_PT is ignored.
                if !ignore_existing && key != registered {
                    return self.refuse(Res::Conflict);
                }
                if new_key == 0 {
                    tx.unregister(&me);
                } else {
                    tx.m.keys.insert(me, new_key);
                }
            }
            None => {
                // An unregistered I_T nexus must give key 0 (unless IGNORE EXISTING KEY); with
                // SARK 0 it does nothing but return GOOD (the tables' "unregistered I_T nexus,
                // SARK zero" row; with ALL_TG_PT too: there is no registration to create).
                if !ignore_existing && key != 0 {
                    return self.refuse(Res::Conflict);
                }
                if new_key == 0 {
                    return tx.done();
                }
                // ALL_TG_PT: "as if the same registration request had been received individually
                // through each target port", the listed ones and the sending one; without it,
                // the sending port alone.
                let ports: BTreeSet<u16> = all_ports.iter().copied().chain([n.port]).collect();
                for port in ports {
                    let through = Itn { initiator: n.initiator.clone(), port };
                    match tx.m.keys.get(&through) {
                        // Received through an I_T nexus registered already: IGNORE EXISTING KEY
                        // replaces its key; REGISTER's key 0 is not its key, so RESERVATION
                        // CONFLICT, and (one command) nothing at all happens.
                        Some(_) if ignore_existing => {
                            tx.m.keys.insert(through, new_key);
                        }
                        Some(_) => return self.refuse(Res::Conflict),
                        None => {
                            tx.m.keys.insert(through, new_key);
                        }
                    }
                }
                if tx.m.keys.len() > tandem_reservations::REGISTRATIONS_MAX {
                    return self.refuse(Res::NoResources);
                }
            }
        }
        tx.m.generation = tx.m.generation.wrapping_add(1);
        tx.m.aptpl = aptpl;
        tx.done()
    }

    fn apply(&self, n: &Nexus, op: &Op) -> Verdict {
        if let Op::Register { .. } = op {
            return self.register(n, op);
        }

        // Every other service action: a registered I_T nexus giving its own key, or RESERVATION
        // CONFLICT.
        let me = Itn::of(n);
        if self.keys.get(&me) != Some(&op_key(op)) {
            return self.refuse(Res::Conflict);
        }
        let mut tx = Tx { m: self.clone(), uas: Vec::new(), preempted: BTreeSet::new() };

        match *op {
            Op::Register { .. } => unreachable!("handled above"),

            Op::Reserve { kind, .. } => match &self.whole {
                // The holder asking again for the same type: nothing to do; another type, or a
                // reservation held by another: RESERVATION CONFLICT (SPC-4 §5.13.9).
                Some(w) if self.holds(&me) && w.kind == kind => {}
                Some(_) => return self.refuse(Res::Conflict),
                None => {
                    // Tandem: no whole-volume reservation over another I_T nexus's ranges (no
                    // doc comment says so; the model takes the implementation's rule).
                    if self.ranges.values().any(|h| h.by != me) {
                        return self.refuse(Res::Conflict);
                    }
                    let holder = (!row(kind).all_registrants).then(|| me.clone());
                    tx.m.whole = Some(Whole { kind, holder });
                }
            },

            Op::Release { kind, .. } => match &self.whole {
                // No reservation, or one this I_T nexus does not hold: GOOD, nothing happens.
                None => {}
                Some(_) if !self.holds(&me) => {}
                Some(w) if w.kind != kind => return self.refuse(Res::InvalidRelease),
                Some(w) => {
                    tx.m.whole = None;
                    if row(w.kind).ua_on_release {
                        tx.tell_others(&me, Ua::ReservationsReleased);
                    }
                }
            },

            Op::Clear { .. } => {
                // SPC-4 §5.13.11.6 (Clearing): RESERVATIONS PREEMPTED for every other
                // registered I_T nexus; all registrations and the reservation go.
                tx.tell_others(&me, Ua::ReservationsPreempted);
                tx.m.keys.clear();
                tx.m.whole = None;
                tx.m.ranges.clear();
                tx.m.generation = tx.m.generation.wrapping_add(1);
            }

            Op::Preempt { victim: sark, kind, .. } => {
                // SPC-4 §5.13.11.4 and its figure "Device server interpretation of PREEMPT".
                let identifies_holder = match &self.whole {
                    Some(Whole { holder: None, .. }) => sark == 0,
                    Some(Whole { holder: Some(h), .. }) => self.keys.get(h) == Some(&sark),
                    None => false,
                };
                if identifies_holder {
                    // §5.13.11.4.3 (Preempting persistent reservations): every registration with
                    // the SARK (every one, for SARK 0 of an all-registrants type) "except the
                    // I_T nexus that is being used for the PERSISTENT RESERVE OUT command" goes;
                    // the sending I_T nexus holds the new reservation.
                    let old = self.whole.as_ref().map(|w| w.kind).expect("a reservation");
                    let gone: BTreeSet<Itn> = self
                        .keys
                        .iter()
                        .filter(|(w, k)| **w != me && (sark == 0 || **k == sark))
                        .map(|(w, _)| w.clone())
                        .collect();
                    tx.forget(&gone);
                    tx.uas.extend(gone.iter().map(|w| (w.clone(), Ua::RegistrationsPreempted)));
                    tx.m.whole = Some(Whole { kind, holder: (!row(kind).all_registrants).then(|| me.clone()) });
                    if old != kind {
                        tx.tell_others(&me, Ua::ReservationsReleased);
                    }
                    tx.preempted = gone;
                } else {
                    // §5.13.11.4.4 (Removing registrations): SARK 0 is INVALID FIELD IN PARAMETER
                    // LIST, a SARK nobody is registered with RESERVATION CONFLICT; otherwise "the
                    // registrations for all I_T nexuses specified by the SERVICE ACTION
                    // RESERVATION KEY field" go, the sender's own among them if that is its key,
                    // with REGISTRATIONS PREEMPTED for each "other than the I_T nexus on which
                    // the command was received".
                    if sark == 0 {
                        return self.refuse(Res::InvalidParameter);
                    }
                    let gone: BTreeSet<Itn> =
                        self.keys.iter().filter(|(_, k)| **k == sark).map(|(w, _)| w.clone()).collect();
                    if gone.is_empty() {
                        return self.refuse(Res::Conflict);
                    }
                    tx.forget(&gone);
                    tx.uas.extend(gone.iter().filter(|w| **w != me).map(|w| (w.clone(), Ua::RegistrationsPreempted)));
                    tx.preempted = gone;
                }
                tx.m.generation = tx.m.generation.wrapping_add(1);
            }

            Op::RegisterAndMove { new_key, ref to, unregister, aptpl, .. } => {
                // SPC-4 §5.13.8 (Registering and moving the reservation).
                let Some(w) = &self.whole else { return self.refuse(Res::Conflict) };
                if row(w.kind).all_registrants || !self.holds(&me) {
                    return self.refuse(Res::Conflict);
                }
                if new_key == 0 {
                    return self.refuse(Res::InvalidParameter);
                }
                // A TransportID "that is the same as the initiator port of the I_T nexus for the
                // command received" is INVALID FIELD IN PARAMETER LIST, whatever the relative
                // target port.
                if to.initiator == n.initiator {
                    return self.refuse(Res::InvalidParameter);
                }
                let dest = Itn::of(to);
                if !self.keys.contains_key(&dest) && self.keys.len() >= tandem_reservations::REGISTRATIONS_MAX {
                    return self.refuse(Res::NoResources);
                }
                tx.m.keys.insert(dest.clone(), new_key);
                tx.m.whole = Some(Whole { kind: w.kind, holder: Some(dest) });
                if unregister {
                    tx.forget(&BTreeSet::from([me.clone()]));
                }
                tx.m.generation = tx.m.generation.wrapping_add(1);
                tx.m.aptpl = aptpl;
            }

            Op::ReserveRange { range, kind, .. } => {
                if !valid(range) {
                    return self.refuse(Res::InvalidParameter);
                }
                if !self.may_take_ranges(&me) {
                    return self.refuse(Res::Conflict);
                }
                let mut touching = self.ranges.iter().filter(|(o, h)| overlap(**o, h.len, range.offset, range.len));
                match touching.next() {
                    // Asking again for what one holds: nothing to do.
                    Some((o, h)) if *o == range.offset && h.len == range.len && h.by == me && h.kind == kind => {}
                    Some(_) => return self.refuse(Res::Conflict),
                    None => {
                        if self.ranges.len() >= tandem_reservations::RANGES_MAX {
                            return self.refuse(Res::NoResources);
                        }
                        tx.m.ranges.insert(range.offset, Held { len: range.len, by: me.clone(), kind });
                    }
                }
            }

            Op::ReleaseRange { range, .. } => {
                if !valid(range) {
                    return self.refuse(Res::InvalidParameter);
                }
                // As RELEASE: one's own reservation of exactly that range; anything else is a no-op.
                if let Some(h) = self.ranges.get(&range.offset).filter(|h| h.len == range.len && h.by == me) {
                    tx.m.ranges.remove(&range.offset);
                    if row(h.kind).ua_on_release {
                        tx.tell_others(&me, Ua::ReservationsReleased);
                    }
                }
            }

            Op::PreemptRange { victim, range, kind, .. } => {
                if !valid(range) {
                    return self.refuse(Res::InvalidParameter);
                }
                if !self.may_take_ranges(&me) {
                    return self.refuse(Res::Conflict);
                }
                let Some(h) = self
                    .ranges
                    .get(&range.offset)
                    .filter(|h| h.len == range.len && self.keys.get(&h.by) == Some(&victim))
                else {
                    return self.refuse(Res::Conflict);
                };
                // Only the one preempted is told. (`Attention::ReservationsReleased` is raised
                // when a reservation a nexus could use "was released, or its type changed", and
                // PREEMPT raises it for the other registrants when the type changes; neither the
                // implementation nor the model does so for a range.) Preempting one's own range
                // with its own type changes nothing (and `Outcome::changed` says so).
                if h.by != me {
                    tx.uas.push((h.by.clone(), Ua::ReservationsPreempted));
                }
                tx.m.ranges.insert(range.offset, Held { len: range.len, by: me.clone(), kind });
            }

            Op::ClearRange { range, .. } => {
                if !valid(range) {
                    return self.refuse(Res::InvalidParameter);
                }
                let cleared: Vec<u64> = self
                    .ranges
                    .iter()
                    .filter(|(o, h)| overlap(**o, h.len, range.offset, range.len))
                    .map(|(o, _)| *o)
                    .collect();
                for o in cleared {
                    let h = tx.m.ranges.remove(&o).expect("listed");
                    if h.by != me {
                        tx.uas.push((h.by, Ua::ReservationsPreempted));
                    }
                }
            }

            Op::MoveRange { from, to, .. } => {
                if !valid(from) || !valid(to) {
                    return self.refuse(Res::InvalidParameter);
                }
                if !self.may_take_ranges(&me) {
                    return self.refuse(Res::Conflict);
                }
                let Some(h) = self.ranges.get(&from.offset).filter(|h| h.len == from.len && h.by == me) else {
                    return self.refuse(Res::Conflict);
                };
                let blocked =
                    self.ranges.iter().any(|(o, other)| *o != from.offset && overlap(*o, other.len, to.offset, to.len));
                if blocked {
                    return self.refuse(Res::Conflict);
                }
                let moved = Held { len: to.len, ..h.clone() };
                tx.m.ranges.remove(&from.offset);
                tx.m.ranges.insert(to.offset, moved);
            }
        }
        tx.done()
    }

    /// May `n` make `access` to `len` bytes at `offset`: the whole-volume reservation by the
    /// conflict table, then every range reservation the bytes meet, by the same table. Whether
    /// `n` is registered or holds is a question about that one I_T nexus.
    fn permits(&self, n: &Nexus, access: Access, offset: u64, len: u64) -> bool {
        let me = Itn::of(n);
        let registered = self.keys.contains_key(&me);
        let class = |kind: Kind, holder: Option<&Itn>| {
            if !registered {
                STRANGER
            } else if row(kind).all_registrants || holder == Some(&me) {
                HOLDER
            } else {
                REGISTRANT
            }
        };
        let allowed = |kind: Kind, class: usize| match access {
            Access::Read => row(kind).read[class],
            Access::Write => row(kind).write[class],
        };
        if let Some(w) = &self.whole {
            if !allowed(w.kind, class(w.kind, w.holder.as_ref())) {
                return false;
            }
        }
        self.ranges
            .iter()
            .filter(|(o, h)| overlap(**o, h.len, offset, len))
            .all(|(_, h)| allowed(h.kind, class(h.kind, Some(&h.by))))
    }
}

// ---------------------------------------------------------------------------------------------
// Both sides reduced to the same plain values.

type Plain = (String, u16);
type RegSet = BTreeSet<(String, u16, u64)>;
/// `(holder, type code)`; holder `None`: every registrant.
type WholeView = Option<(Option<Plain>, u8)>;
type RangeSet = BTreeSet<(u64, u64, String, u16, u8)>;
type UaBag = Vec<(String, u16, Ua)>;

#[derive(Debug, PartialEq)]
struct View {
    registrations: RegSet,
    whole: WholeView,
    ranges: RangeSet,
    generation: u32,
    aptpl: bool,
}

fn plain_itn(w: &Itn) -> Plain {
    (w.initiator.clone(), w.port)
}

fn plain_nexus(n: &Nexus) -> Plain {
    (n.initiator.clone(), n.port)
}

fn model_view(m: &Model) -> View {
    View {
        registrations: m.keys.iter().map(|(w, k)| (w.initiator.clone(), w.port, *k)).collect(),
        whole: m.whole.as_ref().map(|w| (w.holder.as_ref().map(plain_itn), row(w.kind).code)),
        ranges: m
            .ranges
            .iter()
            .map(|(o, h)| (*o, h.len, h.by.initiator.clone(), h.by.port, row(h.kind).code))
            .collect(),
        generation: m.generation,
        aptpl: m.aptpl,
    }
}

fn real_view(r: &Reservations) -> View {
    View {
        registrations: r.registrations.iter().map(|g| (g.nexus.initiator.clone(), g.nexus.port, g.key)).collect(),
        whole: r.reservation.as_ref().map(|res| {
            let holder = (!row(res.kind).all_registrants).then(|| plain_nexus(&res.holder));
            (holder, row(res.kind).code)
        }),
        ranges: r
            .ranges
            .iter()
            .map(|g| (g.range.offset, g.range.len, g.holder.initiator.clone(), g.holder.port, row(g.kind).code))
            .collect(),
        generation: r.generation,
        aptpl: r.aptpl,
    }
}

fn res_of(r: &Result<tandem_reservations::Outcome, Refusal>) -> Res {
    match r {
        Ok(_) => Res::Ok,
        Err(Refusal::Conflict(_)) => Res::Conflict,
        Err(Refusal::InvalidParameter(_)) => Res::InvalidParameter,
        Err(Refusal::InvalidRelease(_)) => Res::InvalidRelease,
        Err(Refusal::NoResources(_)) => Res::NoResources,
    }
}

fn ua_of(a: Attention) -> Ua {
    match a {
        Attention::ReservationsPreempted => Ua::ReservationsPreempted,
        Attention::ReservationsReleased => Ua::ReservationsReleased,
        Attention::RegistrationsPreempted => Ua::RegistrationsPreempted,
    }
}

// ---------------------------------------------------------------------------------------------
// Commands, drawn abstractly and made concrete against the model's state (so that keys are
// mostly right and ranges mostly exist).

#[derive(Clone, Debug)]
enum SenderPick {
    Nexus(usize),
    /// The n-th registered I_T nexus (modulo their number; `Nexus` if none).
    Registered(usize),
    /// The n-th unregistered I_T nexus whose initiator port is registered through another target
    /// port (where ALL_TG_PT meets an existing registration; `Nexus` if none).
    Sibling(usize),
    /// The n-th I_T nexus that holds the whole-volume reservation (`Registered` if none).
    Holder(usize),
    /// The I_T nexus that holds the n-th range reservation (modulo their number; `Registered` if
    /// none).
    RangeHolder(usize),
}

#[derive(Clone, Debug)]
enum KeyPick {
    /// The key the sender is registered with (0 if none).
    Own,
    Lit(u64),
}

#[derive(Clone, Debug)]
enum VictimPick {
    /// The key that I_T nexus is registered with (0 if none).
    KeyOf(usize),
    /// The key of the holder (0 if none, or an all-registrants type).
    Holder,
    /// The key of whoever holds the n-th range reservation (0 if none).
    RangeHolder(usize),
    Lit(u64),
}

#[derive(Clone, Debug)]
enum KindPick {
    /// The type of the current reservation (write exclusive if none).
    Current,
    /// The type of the n-th range reservation (modulo their number; write exclusive if none).
    OfRange(usize),
    Lit(usize),
}

#[derive(Clone, Debug)]
enum RangePick {
    Fixed(usize),
    /// The n-th range reservation there is (modulo their number; a fixed one if none).
    Held(usize),
}

/// A command before it is made concrete (`Register`'s `all_ports`: the ALL_TG_PT port list, empty
/// without ALL_TG_PT).
#[derive(Clone, Debug)]
enum Cmd {
    Register { key: KeyPick, new_key: u64, ignore: bool, all_ports: Vec<u16>, aptpl: bool },
    Reserve { key: KeyPick, kind: KindPick },
    Release { key: KeyPick, kind: KindPick },
    Clear { key: KeyPick },
    Preempt { key: KeyPick, victim: VictimPick, kind: KindPick, abort: bool },
    Move { key: KeyPick, new_key: u64, to: usize, unregister: bool, aptpl: bool },
    ReserveRange { key: KeyPick, range: RangePick, kind: KindPick },
    ReleaseRange { key: KeyPick, range: RangePick },
    PreemptRange { key: KeyPick, victim: VictimPick, range: RangePick, kind: KindPick },
    ClearRange { key: KeyPick, range: RangePick },
    MoveRange { key: KeyPick, from: RangePick, to: RangePick },
}

fn sender(pick: &SenderPick, m: &Model) -> Nexus {
    let all: Vec<Nexus> = (0..NEXUSES).map(nexus).collect();
    let registered: Vec<&Nexus> = all.iter().filter(|n| m.keys.contains_key(&Itn::of(n))).collect();
    let siblings: Vec<&Nexus> = all
        .iter()
        .filter(|n| !m.keys.contains_key(&Itn::of(n)) && m.keys.keys().any(|w| w.initiator == n.initiator))
        .collect();
    let holding: Vec<&Nexus> = registered.iter().copied().filter(|n| m.holds(&Itn::of(n))).collect();
    match pick {
        SenderPick::RangeHolder(i) if !m.ranges.is_empty() => {
            let h = m.ranges.values().nth(i % m.ranges.len()).expect("nonempty");
            Nexus::new(h.by.initiator.clone(), h.by.port)
        }
        SenderPick::Holder(i) if !holding.is_empty() => holding[i % holding.len()].clone(),
        SenderPick::Sibling(i) if !siblings.is_empty() => siblings[i % siblings.len()].clone(),
        SenderPick::Holder(i) | SenderPick::RangeHolder(i) | SenderPick::Registered(i) if !registered.is_empty() => {
            registered[i % registered.len()].clone()
        }
        SenderPick::Holder(i)
        | SenderPick::RangeHolder(i)
        | SenderPick::Registered(i)
        | SenderPick::Sibling(i)
        | SenderPick::Nexus(i) => nexus(i % NEXUSES),
    }
}

fn sender_pick() -> impl Strategy<Value = SenderPick> {
    prop_oneof![
        1 => (0..NEXUSES).prop_map(SenderPick::Nexus),
        4 => (0..NEXUSES).prop_map(SenderPick::Registered),
        1 => (0..NEXUSES).prop_map(SenderPick::Sibling),
        2 => (0..NEXUSES).prop_map(SenderPick::Holder),
    ]
}

fn concrete(cmd: &Cmd, m: &Model, n: &Nexus) -> Op {
    let key = |p: &KeyPick| match p {
        KeyPick::Own => m.keys.get(&Itn::of(n)).copied().unwrap_or(0),
        KeyPick::Lit(k) => *k,
    };
    let victim = |p: &VictimPick| match p {
        VictimPick::KeyOf(i) => m.keys.get(&Itn::of(&nexus(*i))).copied().unwrap_or(0),
        VictimPick::Holder => match &m.whole {
            Some(Whole { holder: Some(h), .. }) => m.keys[h],
            _ => 0,
        },
        VictimPick::RangeHolder(i) if !m.ranges.is_empty() => {
            let h = m.ranges.values().nth(i % m.ranges.len()).expect("nonempty");
            m.keys.get(&h.by).copied().unwrap_or(0)
        }
        VictimPick::RangeHolder(_) => 0,
        VictimPick::Lit(k) => *k,
    };
    let kind = |p: &KindPick| match p {
        KindPick::Current => m.whole.as_ref().map_or(Kind::WriteExclusive, |w| w.kind),
        KindPick::OfRange(i) if !m.ranges.is_empty() => {
            m.ranges.values().nth(i % m.ranges.len()).expect("nonempty").kind
        }
        KindPick::OfRange(_) => Kind::WriteExclusive,
        KindPick::Lit(i) => TYPES[*i].kind,
    };
    let range = |p: &RangePick| match p {
        RangePick::Fixed(i) => Range::new(RANGES[*i].0, RANGES[*i].1),
        RangePick::Held(i) if !m.ranges.is_empty() => {
            let (o, h) = m.ranges.iter().nth(i % m.ranges.len()).expect("nonempty");
            Range::new(*o, h.len)
        }
        RangePick::Held(i) => Range::new(RANGES[i % RANGES.len()].0, RANGES[i % RANGES.len()].1),
    };
    match cmd {
        Cmd::Register { key: k, new_key, ignore, all_ports, aptpl } => Op::Register {
            key: key(k),
            new_key: *new_key,
            ignore_existing: *ignore,
            all_ports: all_ports.clone(),
            aptpl: *aptpl,
            also: Vec::new(),
        },
        Cmd::Reserve { key: k, kind: t } => Op::Reserve { key: key(k), kind: kind(t) },
        Cmd::Release { key: k, kind: t } => Op::Release { key: key(k), kind: kind(t) },
        Cmd::Clear { key: k } => Op::Clear { key: key(k) },
        Cmd::Preempt { key: k, victim: v, kind: t, abort } => {
            Op::Preempt { key: key(k), victim: victim(v), kind: kind(t), abort: *abort }
        }
        Cmd::Move { key: k, new_key, to, unregister, aptpl } => Op::RegisterAndMove {
            key: key(k),
            new_key: *new_key,
            to: nexus(*to),
            unregister: *unregister,
            aptpl: *aptpl,
        },
        Cmd::ReserveRange { key: k, range: r, kind: t } => {
            Op::ReserveRange { key: key(k), range: range(r), kind: kind(t) }
        }
        Cmd::ReleaseRange { key: k, range: r } => Op::ReleaseRange { key: key(k), range: range(r) },
        Cmd::PreemptRange { key: k, victim: v, range: r, kind: t } => {
            Op::PreemptRange { key: key(k), victim: victim(v), range: range(r), kind: kind(t) }
        }
        Cmd::ClearRange { key: k, range: r } => Op::ClearRange { key: key(k), range: range(r) },
        Cmd::MoveRange { key: k, from, to } => Op::MoveRange { key: key(k), from: range(from), to: range(to) },
    }
}

fn key_pick() -> impl Strategy<Value = KeyPick> {
    prop_oneof![6 => Just(KeyPick::Own), 1 => (0..KEYS.len()).prop_map(|i| KeyPick::Lit(KEYS[i]))]
}

fn new_key() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 3 => 1..KEYS.len() as u64]
}

/// ALL_TG_PT's port list: mostly absent; else one to three of the universe's ports, in any order
/// and possibly repeated, with or without the sending one (which the gateway adds if missing).
fn all_ports() -> impl Strategy<Value = Vec<u16>> {
    prop_oneof![3 => Just(Vec::new()), 1 => vec(select(PORTS.to_vec()), 1..=3)]
}

fn victim_pick() -> impl Strategy<Value = VictimPick> {
    prop_oneof![
        3 => (0..NEXUSES).prop_map(VictimPick::KeyOf),
        2 => Just(VictimPick::Holder),
        2 => (0..8usize).prop_map(VictimPick::RangeHolder),
        1 => (0..KEYS.len()).prop_map(|i| VictimPick::Lit(KEYS[i])),
    ]
}

fn kind_pick() -> impl Strategy<Value = KindPick> {
    prop_oneof![2 => Just(KindPick::Current), 3 => (0..TYPES.len()).prop_map(KindPick::Lit)]
}

fn range_pick() -> impl Strategy<Value = RangePick> {
    prop_oneof![2 => (0..RANGES.len()).prop_map(RangePick::Fixed), 2 => (0..8usize).prop_map(RangePick::Held)]
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        8 => (key_pick(), new_key(), proptest::bool::weighted(0.3), all_ports(), any::<bool>())
            .prop_map(|(key, new_key, ignore, all_ports, aptpl)| Cmd::Register { key, new_key, ignore, all_ports, aptpl }),
        3 => (key_pick(), kind_pick()).prop_map(|(key, kind)| Cmd::Reserve { key, kind }),
        3 => (key_pick(), kind_pick()).prop_map(|(key, kind)| Cmd::Release { key, kind }),
        1 => key_pick().prop_map(|key| Cmd::Clear { key }),
        4 => (key_pick(), victim_pick(), kind_pick(), any::<bool>())
            .prop_map(|(key, victim, kind, abort)| Cmd::Preempt { key, victim, kind, abort }),
        2 => move_cmd(),
        3 => (key_pick(), range_pick(), kind_pick()).prop_map(|(key, range, kind)| Cmd::ReserveRange { key, range, kind }),
        2 => (key_pick(), range_pick()).prop_map(|(key, range)| Cmd::ReleaseRange { key, range }),
        2 => (key_pick(), victim_pick(), range_pick(), kind_pick())
            .prop_map(|(key, victim, range, kind)| Cmd::PreemptRange { key, victim, range, kind }),
        1 => (key_pick(), range_pick()).prop_map(|(key, range)| Cmd::ClearRange { key, range }),
        2 => (key_pick(), range_pick(), range_pick()).prop_map(|(key, from, to)| Cmd::MoveRange { key, from, to }),
    ]
}

fn move_cmd() -> impl Strategy<Value = Cmd> {
    (key_pick(), new_key(), 0..NEXUSES, any::<bool>(), any::<bool>())
        .prop_map(|(key, new_key, to, unregister, aptpl)| Cmd::Move { key, new_key, to, unregister, aptpl })
}

/// REGISTER with ALL_TG_PT (the sender is mostly one whose initiator port is registered through
/// the other target port).
fn all_tg_pt_register() -> impl Strategy<Value = Cmd> {
    (key_pick(), new_key(), any::<bool>(), vec(select(PORTS.to_vec()), 1..=3), any::<bool>())
        .prop_map(|(key, new_key, ignore, all_ports, aptpl)| Cmd::Register { key, new_key, ignore, all_ports, aptpl })
}

/// PREEMPT RANGE of a range by the I_T nexus holding it, often with its own type.
fn own_range_preempt() -> impl Strategy<Value = (SenderPick, Cmd)> {
    (0..8usize, prop_oneof![Just(None), kind_pick().prop_map(Some)]).prop_map(|(i, kind)| {
        let cmd = Cmd::PreemptRange {
            key: KeyPick::Own,
            victim: VictimPick::RangeHolder(i),
            range: RangePick::Held(i),
            kind: kind.unwrap_or(KindPick::OfRange(i)),
        };
        (SenderPick::RangeHolder(i), cmd)
    })
}

/// One step: a command and the nexus that sends it (REGISTER AND MOVE also from the holder, which
/// alone may send it; ALL_TG_PT also from the other port of a registered initiator port; PREEMPT
/// RANGE also from the range's holder).
fn step() -> impl Strategy<Value = (SenderPick, Cmd)> {
    prop_oneof![
        24 => (sender_pick(), cmd()),
        2 => ((0..NEXUSES).prop_map(SenderPick::Holder), move_cmd()),
        2 => ((0..NEXUSES).prop_map(SenderPick::Sibling), all_tg_pt_register()),
        1 => own_range_preempt(),
    ]
}

// ---------------------------------------------------------------------------------------------
// The test.

fn config() -> Config {
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { Config::default().cases } else { 1000 };
    // No regression files: nothing but this file belongs to the test.
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// Applies `steps` to both sides, comparing after each; returns the implementation's results
/// (`None` for a step left out) and its final state.
type Ran = (Vec<Option<Result<tandem_reservations::Outcome, Refusal>>>, Reservations);

fn run(steps: &[(SenderPick, Cmd)]) -> Result<Ran, TestCaseError> {
    let mut real = Reservations::default();
    let mut model = Model::default();
    let mut results = Vec::new();
    for (number, (sender_pick, cmd)) in steps.iter().enumerate() {
        let n = sender(sender_pick, &model);
        let op = concrete(cmd, &model, &n);
        // A step the implementation is known to get wrong is applied to neither.
        let want = match model.apply(&n, &op) {
            Verdict::Done(want) => want,
            Verdict::LeftOut(_why) => {
                results.push(None);
                continue;
            }
        };
        let before = real.clone();
        let got = real.apply(&n, &op);
        let at = format!("step {number}: {n} {op:?}");

        prop_assert_eq!(res_of(&got), want.res, "result of {}: {:?}", at, got);
        prop_assert_eq!(real_view(&real), model_view(&want.next), "state after {}", at);
        prop_assert_eq!(real.registrations.len(), want.next.keys.len(), "a registration twice after {}", at);
        prop_assert_eq!(real.ranges.len(), want.next.ranges.len(), "a range twice after {}", at);
        match &got {
            Err(_) => prop_assert_eq!(&real, &before, "a refusal changed the state at {}", at),
            Ok(outcome) => {
                let changed = model_view(&want.next) != model_view(&model);
                prop_assert_eq!(outcome.changed, changed, "Outcome::changed at {}", at);
                let aborted: BTreeSet<Plain> = outcome.aborted.iter().map(plain_nexus).collect();
                prop_assert_eq!(aborted.len(), outcome.aborted.len(), "a nexus aborted twice at {}", at);
                let expected: BTreeSet<Plain> = match op {
                    Op::Preempt { abort: true, .. } => want.preempted.iter().map(plain_itn).collect(),
                    _ => BTreeSet::new(),
                };
                prop_assert_eq!(aborted, expected, "Outcome::aborted at {}", at);
            }
        }

        // The unit attentions this step raised.
        let raised = real.attention_seq - before.attention_seq;
        let mut got_uas: UaBag = real
            .attentions
            .iter()
            .filter(|a| a.seq > before.attention_seq)
            .map(|a| (a.nexus.initiator.clone(), a.nexus.port, ua_of(a.attention)))
            .collect();
        prop_assert_eq!(got_uas.len() as u64, raised, "attention numbering at {}", at);
        prop_assert!(real.attentions.len() <= tandem_reservations::ATTENTIONS_MAX);
        let mut want_uas: UaBag = want.uas.iter().map(|(w, ua)| (w.initiator.clone(), w.port, *ua)).collect();
        got_uas.sort();
        want_uas.sort();
        prop_assert_eq!(got_uas, want_uas, "unit attentions of {}", at);

        // Every nexus's reads and writes.
        for i in 0..NEXUSES {
            let probe = nexus(i);
            for access in [Access::Read, Access::Write] {
                for (offset, len) in PROBES {
                    let got = real.check(&probe, access, offset, len);
                    let want_ok = want.next.permits(&probe, access, offset, len);
                    prop_assert_eq!(
                        got.is_ok(),
                        want_ok,
                        "check({}, {:?}, {}, {}) after {}: {:?}",
                        probe,
                        access,
                        offset,
                        len,
                        at,
                        got
                    );
                }
            }
        }

        // The state survives the map's encoding.
        let bytes = bincode::serde::encode_to_vec(&real, bincode::config::standard()).expect("encodes");
        let (back, used): (Reservations, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decodes");
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&back, &real, "bincode round trip after {}", at);

        results.push(Some(got));
        model = want.next;
    }
    Ok((results, real))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn reservations_follow_the_model(steps in vec(step(), 1..=40)) {
        run(&steps)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed sequences through the rules the random ones reach less often, compared with the model
// like them, and their results checked besides (so that the model too says what SPC-4 says).

/// Alpha, beta through ports 1 and 2 (indices into the universe, see [`nexus`]).
const A1: usize = 0;
const A2: usize = 1;
const B1: usize = 2;

fn at(i: usize) -> SenderPick {
    SenderPick::Nexus(i)
}

fn register(key: u64, new_key: u64, ignore: bool, all_ports: &[u16]) -> Cmd {
    Cmd::Register { key: KeyPick::Lit(key), new_key, ignore, all_ports: all_ports.to_vec(), aptpl: false }
}

fn reserve(key: u64, kind: usize) -> Cmd {
    Cmd::Reserve { key: KeyPick::Lit(key), kind: KindPick::Lit(kind) }
}

/// The result kinds of a run's steps.
fn verdicts(ran: &Ran) -> Vec<Res> {
    ran.0.iter().map(|r| res_of(r.as_ref().expect("no step left out"))).collect()
}

fn keys_of(r: &Reservations) -> BTreeSet<(String, u16, u64)> {
    r.registrations.iter().map(|g| (g.nexus.initiator.clone(), g.nexus.port, g.key)).collect()
}

fn reg(i: usize, key: u64) -> (String, u16, u64) {
    let n = nexus(i);
    (n.initiator, n.port, key)
}

#[test]
fn all_tg_pt_registers_each_nexus_and_one_holds() {
    let ran = run(&[
        (at(A1), register(0, 1, false, &[1, 2])),
        (at(A1), reserve(1, 0)), // write exclusive
        (at(A2), register(1, 0, false, &[])),
    ])
    .expect("agrees with the model");
    assert_eq!(verdicts(&ran), [Res::Ok, Res::Ok, Res::Ok]);
    // Port 2 unregistered alone; port 1 still holds.
    assert_eq!(keys_of(&ran.1), BTreeSet::from([reg(A1, 1)]));
    assert_eq!(ran.1.reservation.as_ref().map(|r| r.holder.clone()), Some(nexus(A1)));

    let ran = run(&[(at(A1), register(0, 1, false, &[2])), (at(A1), reserve(1, 0))]).expect("agrees with the model");
    // The other port of the holder's initiator is a registered non-holder of WRITE EXCLUSIVE.
    assert!(ran.1.check(&nexus(A2), Access::Write, 0, 1).is_err());
    assert!(ran.1.check(&nexus(A1), Access::Write, 0, 1).is_ok());
}

#[test]
fn all_tg_pt_over_an_existing_registration() {
    let ran = run(&[
        (at(A1), register(0, 1, false, &[])),
        (at(A2), register(0, 2, false, &[1, 2])), // REGISTER through port 1 too: key 0 is not 1
        (at(A2), register(7, 2, true, &[2, 1])),  // IGNORE EXISTING KEY: both get 2
        (at(A2), register(0, 0, false, &[1, 2])), // from a registered nexus with the wrong key
        (at(A2), register(2, 3, false, &[1, 2])), // from a registered nexus: ALL_TG_PT ignored
    ])
    .expect("agrees with the model");
    assert_eq!(verdicts(&ran), [Res::Ok, Res::Conflict, Res::Ok, Res::Conflict, Res::Ok]);
    assert_eq!(keys_of(&ran.1), BTreeSet::from([reg(A1, 2), reg(A2, 3)]));
    assert_eq!(ran.1.generation, 3);
}

#[test]
fn preempt_of_registrations_removes_the_senders_own() {
    let ran = run(&[
        (at(A1), register(0, 1, false, &[1, 2])),
        (at(B1), register(0, 1, false, &[])),
        (
            at(A1),
            Cmd::Preempt { key: KeyPick::Lit(1), victim: VictimPick::Lit(1), kind: KindPick::Lit(0), abort: true },
        ),
    ])
    .expect("agrees with the model");
    assert_eq!(verdicts(&ran), [Res::Ok, Res::Ok, Res::Ok]);
    assert!(ran.1.registrations.is_empty());
    let told: BTreeSet<Plain> = ran.1.attentions.iter().map(|a| plain_nexus(&a.nexus)).collect();
    assert_eq!(told, BTreeSet::from([plain_nexus(&nexus(A2)), plain_nexus(&nexus(B1))]));
    let aborted = ran.0[2].as_ref().and_then(|r| r.as_ref().ok()).map(|o| o.aborted.len());
    assert_eq!(aborted, Some(3));
}

#[test]
fn preempt_of_the_holder_keeps_the_senders_own() {
    let ran = run(&[
        (at(A1), register(0, 1, false, &[1, 2])),
        (at(A2), reserve(1, 1)), // exclusive access, held by alpha through port 2
        (
            at(A1),
            Cmd::Preempt { key: KeyPick::Lit(1), victim: VictimPick::Lit(1), kind: KindPick::Lit(1), abort: false },
        ),
    ])
    .expect("agrees with the model");
    assert_eq!(verdicts(&ran), [Res::Ok, Res::Ok, Res::Ok]);
    assert_eq!(keys_of(&ran.1), BTreeSet::from([reg(A1, 1)]));
    assert_eq!(ran.1.reservation.as_ref().map(|r| r.holder.clone()), Some(nexus(A1)));
}

#[test]
fn register_and_move_to_the_senders_initiator_port_is_invalid() {
    let ran = run(&[
        (at(A1), register(0, 1, false, &[])),
        (at(A1), reserve(1, 0)),
        (at(A1), Cmd::Move { key: KeyPick::Lit(1), new_key: 2, to: A2, unregister: false, aptpl: false }),
        (at(A1), Cmd::Move { key: KeyPick::Lit(1), new_key: 2, to: B1, unregister: true, aptpl: false }),
    ])
    .expect("agrees with the model");
    assert_eq!(verdicts(&ran), [Res::Ok, Res::Ok, Res::InvalidParameter, Res::Ok]);
    assert_eq!(ran.1.reservation.as_ref().map(|r| r.holder.clone()), Some(nexus(B1)));
}

#[test]
fn preempt_range_of_ones_own_with_its_type_changes_nothing() {
    let range = RangePick::Fixed(0);
    let preempt = |kind| Cmd::PreemptRange {
        key: KeyPick::Lit(1),
        victim: VictimPick::Lit(1),
        range: range.clone(),
        kind: KindPick::Lit(kind),
    };
    let ran = run(&[
        (at(A1), register(0, 1, false, &[])),
        (at(A1), Cmd::ReserveRange { key: KeyPick::Lit(1), range: range.clone(), kind: KindPick::Lit(0) }),
        (at(A1), preempt(0)),
        (at(A1), preempt(1)),
    ])
    .expect("agrees with the model");
    let changed: Vec<bool> =
        ran.0.iter().map(|r| r.as_ref().and_then(|r| r.as_ref().ok()).expect("ok").changed).collect();
    assert_eq!(changed, [true, true, false, true]);
}
