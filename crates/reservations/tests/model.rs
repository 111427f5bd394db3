//! Random sequences of persistent-reservation commands, applied both to [`Reservations`] and to
//! a reference model written here from SPC-4 §5.13 (and, for Tandem's range reservations, from
//! the rules the crate's doc comments state), compared after every step.
//!
//! The model is deliberately unlike the implementation: registrations are a map from registrant
//! to key, the reservation names its holder or "every registrant", range reservations are a map
//! keyed by offset, the access rules are one explicit table per type, and every command is a
//! function from the old model to a new one.
//!
//! Where the implementation departs from SPC-4 the model refuses to guess: it answers
//! [`Verdict::LeftOut`] and the step is applied to neither side (each such place is marked
//! `DISAGREEMENT:` below).

use std::collections::{BTreeMap, BTreeSet};

use proptest::collection::vec;
use proptest::prelude::*;
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
    /// RELEASE (SPC-4 §5.13.11.2.2): "registrants only or all registrants type" → RESERVATIONS
    /// RELEASED for every other registered I_T nexus.
    ua_on_release: bool,
    /// The holder unregistering (SPC-4 §5.13.11.3): only "registrants only" types raise
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

/// Through which target ports a registration was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Via {
    Port(u16),
    /// ALL_TG_PT.
    AllPorts,
}

/// A registrant: an initiator port registered through one target port or all of them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Who {
    initiator: String,
    via: Via,
}

impl Who {
    fn reaches(&self, n: &Nexus) -> bool {
        self.initiator == n.initiator
            && match self.via {
                Via::AllPorts => true,
                Via::Port(p) => p == n.port,
            }
    }

    fn port(&self) -> Option<u16> {
        match self.via {
            Via::AllPorts => None,
            Via::Port(p) => Some(p),
        }
    }
}

/// The whole-volume reservation.
#[derive(Clone, Debug, PartialEq)]
struct Whole {
    kind: Kind,
    /// `None`: every registrant holds it (types 7 and 8).
    holder: Option<Who>,
}

/// A range reservation (the map's key is its offset).
#[derive(Clone, Debug, PartialEq)]
struct Held {
    len: u64,
    by: Who,
    kind: Kind,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    keys: BTreeMap<Who, u64>,
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
    uas: Vec<(Who, Ua)>,
    /// Registrants whose registrations PREEMPT (AND ABORT) removed.
    preempted: BTreeSet<Who>,
}

enum Verdict {
    Done(Done),
    /// The implementation is known to differ from SPC-4 here: the step is not compared.
    LeftOut(&'static str),
}

/// A command in progress: the new model and what it raised.
struct Tx {
    m: Model,
    uas: Vec<(Who, Ua)>,
    preempted: BTreeSet<Who>,
}

impl Tx {
    fn tell_others(&mut self, me: &Who, ua: Ua) {
        let others: Vec<Who> = self.m.keys.keys().filter(|w| *w != me).cloned().collect();
        self.uas.extend(others.into_iter().map(|w| (w, ua)));
    }

    /// Removes registrants (SPC-4: a reservation of types 1 to 6 goes with its holder; an
    /// all-registrants one with the last registrant; Tandem: range reservations with their maker).
    fn forget(&mut self, gone: &BTreeSet<Who>) {
        self.m.keys.retain(|w, _| !gone.contains(w));
        self.m.ranges.retain(|_, h| !gone.contains(&h.by));
        let holder_gone = matches!(&self.m.whole, Some(Whole { holder: Some(h), .. }) if gone.contains(h));
        if holder_gone || self.m.keys.is_empty() {
            self.m.whole = None;
        }
    }

    /// A registrant unregisters itself (REGISTER with SARK 0, SPC-4 §5.13.11.3).
    fn unregister(&mut self, me: &Who) {
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
    fn registrant(&self, n: &Nexus) -> Option<(&Who, u64)> {
        self.keys.iter().find(|(w, _)| w.reaches(n)).map(|(w, k)| (w, *k))
    }

    /// SPC-4 §5.13.10: the holder of a type 1-6 reservation, or any registrant for 7 and 8.
    fn holds(&self, who: &Who) -> bool {
        match &self.whole {
            Some(Whole { holder: None, .. }) => self.keys.contains_key(who),
            Some(Whole { holder: Some(h), .. }) => h == who,
            None => false,
        }
    }

    /// Tandem: a registrant may take range reservations unless another holds a whole-volume
    /// reservation whose type does not let registrants write (doc of `may_reserve_ranges`).
    fn may_take_ranges(&self, who: &Who) -> bool {
        match &self.whole {
            Some(w) => self.holds(who) || row(w.kind).write[REGISTRANT],
            None => true,
        }
    }

    fn refuse(&self, res: Res) -> Verdict {
        Verdict::Done(Done { res, next: self.clone(), uas: Vec::new(), preempted: BTreeSet::new() })
    }

    fn apply(&self, n: &Nexus, op: &Op) -> Verdict {
        let me = self.registrant(n).map(|(w, k)| (w.clone(), k));
        let mut tx = Tx { m: self.clone(), uas: Vec::new(), preempted: BTreeSet::new() };

        if let Op::Register { key, new_key, ignore_existing, all_ports, aptpl, .. } = *op {
            match me {
                None => {
                    // SPC-4 table "Register behaviors for a REGISTER service action": an
                    // unregistered nexus must give key 0 (unless IGNORE EXISTING KEY); SARK 0
                    // then does nothing.
                    if !ignore_existing && key != 0 {
                        return self.refuse(Res::Conflict);
                    }
                    let elsewhere = self.keys.keys().any(|w| w.initiator == n.initiator);
                    if all_ports && elsewhere && (ignore_existing || new_key == 0) {
                        // DISAGREEMENT: (ALL_TG_PT, see `Who`) ALL_TG_PT is "as if the same
                        // registration request had been received individually through each
                        // target port": through the port where this initiator is already
                        // registered, REGISTER AND IGNORE EXISTING KEY replaces (or with SARK 0
                        // removes) that registration, and REGISTER with key 0 is the wrong key.
                        // The implementation refuses the first and ignores the second.
                        return Verdict::LeftOut("ALL_TG_PT over an existing registration");
                    }
                    if new_key == 0 {
                        return tx.done();
                    }
                    if all_ports && elsewhere {
                        // Through the registered port key 0 is the wrong key.
                        return self.refuse(Res::Conflict);
                    }
                    if self.keys.len() >= tandem_reservations::REGISTRATIONS_MAX {
                        return self.refuse(Res::NoResources);
                    }
                    let via = if all_ports { Via::AllPorts } else { Via::Port(n.port) };
                    tx.m.keys.insert(Who { initiator: n.initiator.clone(), via }, new_key);
                }
                Some((who, registered)) => {
                    if !ignore_existing && key != registered {
                        return self.refuse(Res::Conflict);
                    }
                    if who.via == Via::AllPorts {
                        // DISAGREEMENT: (ALL_TG_PT, see `Who`) each I_T nexus registered by
                        // ALL_TG_PT is its own registration: REGISTER through one of them changes
                        // or removes that one only. The implementation changes or removes them all.
                        return Verdict::LeftOut("REGISTER through one port of an ALL_TG_PT registration");
                    }
                    if all_ports {
                        // DISAGREEMENT: (ALL_TG_PT) from a registered nexus, ALL_TG_PT would apply
                        // the request through every other port too (where this nexus's key is
                        // not registered); the implementation ignores the bit.
                        return Verdict::LeftOut("ALL_TG_PT from a registered nexus");
                    }
                    if new_key == 0 {
                        tx.unregister(&who);
                    } else {
                        tx.m.keys.insert(who, new_key);
                    }
                }
            }
            tx.m.generation = tx.m.generation.wrapping_add(1);
            tx.m.aptpl = aptpl;
            return tx.done();
        }

        // Every other service action: a registered nexus giving its own key, or RESERVATION
        // CONFLICT.
        let Some((me, _)) = me.filter(|(_, k)| *k == op_key(op)) else {
            return self.refuse(Res::Conflict);
        };

        match *op {
            Op::Register { .. } => unreachable!(),

            Op::Reserve { kind, .. } => match &self.whole {
                // The holder asking again for the same type: nothing to do; another type, or a
                // reservation held by another: RESERVATION CONFLICT (SPC-4 §5.13.9).
                Some(w) if self.holds(&me) && w.kind == kind => {}
                Some(_) => return self.refuse(Res::Conflict),
                None => {
                    // Tandem: no whole-volume reservation over another registrant's ranges.
                    if self.ranges.values().any(|h| h.by != me) {
                        return self.refuse(Res::Conflict);
                    }
                    let holder = (!row(kind).all_registrants).then(|| me.clone());
                    if me.via == Via::AllPorts && holder.is_some() {
                        // DISAGREEMENT: (ALL_TG_PT, see `Who`) the holder is the one I_T nexus
                        // that reserved; the implementation makes every port of the ALL_TG_PT
                        // registration a holder.
                        return Verdict::LeftOut("RESERVE through an ALL_TG_PT registration");
                    }
                    tx.m.whole = Some(Whole { kind, holder });
                }
            },

            Op::Release { kind, .. } => match &self.whole {
                // No reservation, or one this nexus does not hold: GOOD, nothing happens.
                None => {}
                Some(_) if !self.holds(&me) => {}
                Some(w) if w.kind != kind => return self.refuse(Res::InvalidRelease),
                Some(w) => {
                    if me.via == Via::AllPorts && row(w.kind).ua_on_release {
                        // DISAGREEMENT: (ALL_TG_PT) the other I_T nexuses of the releasing
                        // initiator are "every registered I_T nexus other than" the sender and
                        // get RESERVATIONS RELEASED; the implementation tells none of them.
                        return Verdict::LeftOut("RELEASE through an ALL_TG_PT registration");
                    }
                    tx.m.whole = None;
                    if row(w.kind).ua_on_release {
                        tx.tell_others(&me, Ua::ReservationsReleased);
                    }
                }
            },

            Op::Clear { .. } => {
                if me.via == Via::AllPorts {
                    // DISAGREEMENT: (ALL_TG_PT) as for RELEASE: the sender's other I_T nexuses
                    // should get RESERVATIONS PREEMPTED.
                    return Verdict::LeftOut("CLEAR through an ALL_TG_PT registration");
                }
                // SPC-4 §5.13.11.2.? (Clearing): RESERVATIONS PREEMPTED for every other
                // registered nexus; all registrations and the reservation go.
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
                    if me.via == Via::AllPorts {
                        // DISAGREEMENT: (ALL_TG_PT) the sender's other I_T nexuses are removed
                        // too (SARK 0 of an all-registrants type, or their key is the SARK) and
                        // only the sending I_T nexus would hold a type 1-6 reservation.
                        return Verdict::LeftOut("PREEMPT of the holder through an ALL_TG_PT registration");
                    }
                    let old = self.whole.as_ref().map(|w| w.kind).expect("a reservation");
                    // Every other registrant (all registrants, SARK 0), or every registrant
                    // with the SARK but the sender.
                    let gone: BTreeSet<Who> = self
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
                    if sark == 0 {
                        return self.refuse(Res::InvalidParameter);
                    }
                    let gone: BTreeSet<Who> =
                        self.keys.iter().filter(|(_, k)| **k == sark).map(|(w, _)| w.clone()).collect();
                    if gone.is_empty() {
                        return self.refuse(Res::Conflict);
                    }
                    if gone.contains(&me) {
                        // DISAGREEMENT: SPC-4 §5.13.11.4.4 (Removing registrations): "remove the
                        // registrations for all I_T nexuses specified by the SERVICE ACTION
                        // RESERVATION KEY field" (unlike §5.13.11.4.3 there is no "except the
                        // I_T nexus that is being used for the PERSISTENT RESERVE OUT command",
                        // and the unit attention goes to each that lost its registration "other
                        // than the I_T nexus on which the command was received"): a sender whose
                        // own key is the SARK loses its registration too, and it is no conflict
                        // when no other registrant has that key. The implementation keeps the
                        // sender registered, and answers RESERVATION CONFLICT when only the
                        // sender has the key.
                        return Verdict::LeftOut("PREEMPT of registrations with the sender's own key");
                    }
                    tx.forget(&gone);
                    tx.uas.extend(gone.iter().map(|w| (w.clone(), Ua::RegistrationsPreempted)));
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
                if to.initiator == n.initiator {
                    if me.reaches(to) {
                        return self.refuse(Res::InvalidParameter);
                    }
                    // DISAGREEMENT: SPC-4 §5.13.8 / §6.15.4: a TransportID "that is the same as
                    // the initiator port of the I_T nexus for the command received" is INVALID
                    // FIELD IN PARAMETER LIST, whatever the relative target port. The
                    // implementation only refuses the very nexus that sent the command and
                    // moves the reservation to the same initiator port through another port.
                    return Verdict::LeftOut("REGISTER AND MOVE to the sender's initiator port");
                }
                let dest = self
                    .keys
                    .keys()
                    .find(|w| w.reaches(to))
                    .cloned()
                    .unwrap_or_else(|| Who { initiator: to.initiator.clone(), via: Via::Port(to.port) });
                if dest.via == Via::AllPorts {
                    // DISAGREEMENT: (ALL_TG_PT) the reservation moves to the one I_T nexus named;
                    // the implementation gives it to every port of the ALL_TG_PT registration
                    // (and sets the key of all of them).
                    return Verdict::LeftOut("REGISTER AND MOVE to an ALL_TG_PT registration");
                }
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
    /// conflict table, then every range reservation the bytes meet, by the same table.
    fn permits(&self, n: &Nexus, access: Access, offset: u64, len: u64) -> bool {
        let mine = self.registrant(n).map(|(w, _)| w);
        let class = |kind: Kind, holder: Option<&Who>| match mine {
            None => STRANGER,
            Some(m) if row(kind).all_registrants || holder == Some(m) => HOLDER,
            Some(_) => REGISTRANT,
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

type RegSet = BTreeSet<(String, Option<u16>, u64)>;
/// `(holder, type code)`; holder `None`: every registrant.
type WholeView = Option<(Option<(String, Option<u16>)>, u8)>;
type RangeSet = BTreeSet<(u64, u64, String, Option<u16>, u8)>;
type UaBag = Vec<(String, Option<u16>, Ua)>;

#[derive(Debug, PartialEq)]
struct View {
    registrations: RegSet,
    whole: WholeView,
    ranges: RangeSet,
    generation: u32,
    aptpl: bool,
}

fn model_view(m: &Model) -> View {
    View {
        registrations: m.keys.iter().map(|(w, k)| (w.initiator.clone(), w.port(), *k)).collect(),
        whole: m.whole.as_ref().map(|w| (w.holder.as_ref().map(|h| (h.initiator.clone(), h.port())), row(w.kind).code)),
        ranges: m
            .ranges
            .iter()
            .map(|(o, h)| (*o, h.len, h.by.initiator.clone(), h.by.port(), row(h.kind).code))
            .collect(),
        generation: m.generation,
        aptpl: m.aptpl,
    }
}

fn real_view(r: &Reservations) -> View {
    View {
        registrations: r.registrations.iter().map(|g| (g.initiator.clone(), g.port, g.key)).collect(),
        whole: r.reservation.as_ref().map(|res| {
            let holder = (!row(res.kind).all_registrants).then(|| (res.initiator.clone(), res.port));
            (holder, row(res.kind).code)
        }),
        ranges: r
            .ranges
            .iter()
            .map(|g| (g.range.offset, g.range.len, g.initiator.clone(), g.port, row(g.kind).code))
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
    /// The n-th nexus some registration reaches (modulo their number; `Nexus` if none).
    Registered(usize),
    /// The n-th nexus that holds the whole-volume reservation (`Registered` if none).
    Holder(usize),
}

#[derive(Clone, Debug)]
enum KeyPick {
    /// The key the sender is registered with (0 if none).
    Own,
    Lit(u64),
}

#[derive(Clone, Debug)]
enum VictimPick {
    /// The key of whoever is registered through that nexus (0 if none).
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
    Lit(usize),
}

#[derive(Clone, Debug)]
enum RangePick {
    Fixed(usize),
    /// The n-th range reservation there is (modulo their number; a fixed one if none).
    Held(usize),
}

#[derive(Clone, Debug)]
enum Cmd {
    Register { key: KeyPick, new_key: u64, ignore: bool, all_ports: bool, aptpl: bool },
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
    let registered: Vec<Nexus> = (0..NEXUSES).map(nexus).filter(|n| m.registrant(n).is_some()).collect();
    let holding: Vec<Nexus> =
        registered.iter().filter(|n| m.registrant(n).is_some_and(|(w, _)| m.holds(w))).cloned().collect();
    match pick {
        SenderPick::Holder(i) if !holding.is_empty() => holding[i % holding.len()].clone(),
        SenderPick::Holder(i) | SenderPick::Registered(i) if !registered.is_empty() => {
            registered[i % registered.len()].clone()
        }
        SenderPick::Holder(i) | SenderPick::Registered(i) | SenderPick::Nexus(i) => nexus(i % NEXUSES),
    }
}

fn sender_pick() -> impl Strategy<Value = SenderPick> {
    prop_oneof![
        1 => (0..NEXUSES).prop_map(SenderPick::Nexus),
        4 => (0..NEXUSES).prop_map(SenderPick::Registered),
        2 => (0..NEXUSES).prop_map(SenderPick::Holder),
    ]
}

fn concrete(cmd: &Cmd, m: &Model, n: &Nexus) -> Op {
    let key = |p: &KeyPick| match p {
        KeyPick::Own => m.registrant(n).map_or(0, |(_, k)| k),
        KeyPick::Lit(k) => *k,
    };
    let victim = |p: &VictimPick| match p {
        VictimPick::KeyOf(i) => m.registrant(&nexus(*i)).map_or(0, |(_, k)| k),
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
            all_ports: *all_ports,
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
        8 => (key_pick(), new_key(), proptest::bool::weighted(0.3), proptest::bool::weighted(0.15), any::<bool>())
            .prop_map(|(key, new_key, ignore, all_ports, aptpl)| Cmd::Register { key, new_key, ignore, all_ports, aptpl }),
        3 => (key_pick(), kind_pick()).prop_map(|(key, kind)| Cmd::Reserve { key, kind }),
        3 => (key_pick(), kind_pick()).prop_map(|(key, kind)| Cmd::Release { key, kind }),
        1 => key_pick().prop_map(|key| Cmd::Clear { key }),
        4 => (key_pick(), victim_pick(), kind_pick(), any::<bool>())
            .prop_map(|(key, victim, kind, abort)| Cmd::Preempt { key, victim, kind, abort }),
        2 => (key_pick(), new_key(), 0..NEXUSES, any::<bool>(), any::<bool>())
            .prop_map(|(key, new_key, to, unregister, aptpl)| Cmd::Move { key, new_key, to, unregister, aptpl }),
        3 => (key_pick(), range_pick(), kind_pick()).prop_map(|(key, range, kind)| Cmd::ReserveRange { key, range, kind }),
        2 => (key_pick(), range_pick()).prop_map(|(key, range)| Cmd::ReleaseRange { key, range }),
        2 => (key_pick(), victim_pick(), range_pick(), kind_pick())
            .prop_map(|(key, victim, range, kind)| Cmd::PreemptRange { key, victim, range, kind }),
        1 => (key_pick(), range_pick()).prop_map(|(key, range)| Cmd::ClearRange { key, range }),
        2 => (key_pick(), range_pick(), range_pick()).prop_map(|(key, from, to)| Cmd::MoveRange { key, from, to }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The test.

fn config() -> Config {
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { Config::default().cases } else { 1000 };
    // No regression files: nothing but this file belongs to the test.
    Config { cases, failure_persistence: None, ..Config::default() }
}

fn run(steps: &[(SenderPick, Cmd)]) -> Result<(), TestCaseError> {
    let mut real = Reservations::default();
    let mut model = Model::default();
    for (number, (sender_pick, cmd)) in steps.iter().enumerate() {
        let n = sender(sender_pick, &model);
        let op = concrete(cmd, &model, &n);
        // A step the implementation is known to get wrong is applied to neither.
        let want = match model.apply(&n, &op) {
            Verdict::Done(want) => want,
            Verdict::LeftOut(_why) => continue,
        };
        let before = real.clone();
        let got = real.apply(&n, &op);
        let at = format!("step {number}: {n} {op:?}");

        prop_assert_eq!(res_of(&got), want.res, "result of {}: {:?}", at, got);
        prop_assert_eq!(real_view(&real), model_view(&want.next), "state after {}", at);
        match &got {
            Err(_) => prop_assert_eq!(&real, &before, "a refusal changed the state at {}", at),
            Ok(outcome) => {
                let changed = model_view(&want.next) != model_view(&model);
                // DISAGREEMENT: (the crate's own rule, not SPC-4) `Outcome::changed` is "whether
                // anything changed"; PREEMPT RANGE of one's own range with its own type changes
                // nothing, but the implementation says `changed: true`. Not compared there.
                let own_same = matches!(op, Op::PreemptRange { .. }) && !changed && want.uas.is_empty();
                if !own_same {
                    prop_assert_eq!(outcome.changed, changed, "Outcome::changed at {}", at);
                }
                let aborted: BTreeSet<(String, Option<u16>)> = outcome.aborted.iter().cloned().collect();
                let expected: BTreeSet<(String, Option<u16>)> = match op {
                    Op::Preempt { abort: true, .. } => {
                        want.preempted.iter().map(|w| (w.initiator.clone(), w.port())).collect()
                    }
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
            .map(|a| (a.initiator.clone(), a.port, ua_of(a.attention)))
            .collect();
        prop_assert_eq!(got_uas.len() as u64, raised, "attention numbering at {}", at);
        prop_assert!(real.attentions.len() <= tandem_reservations::ATTENTIONS_MAX);
        let mut want_uas: UaBag = want.uas.iter().map(|(w, ua)| (w.initiator.clone(), w.port(), *ua)).collect();
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

        model = want.next;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn reservations_follow_the_model(steps in vec((sender_pick(), cmd()), 1..=40)) {
        run(&steps)?;
    }
}
