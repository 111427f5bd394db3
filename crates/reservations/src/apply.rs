//! [`Reservations::apply`]: one operation, all or nothing, as SPC-4 §5.13 (and its tables for
//! PERSISTENT RESERVE OUT) says, extended to byte ranges.
//!
//! Each operation checks everything on a copy-free path first and changes the state only once
//! it cannot be refused, so a refusal leaves the state as it was.

use crate::model::*;

impl Reservations {
    /// Applies `op` made through `nexus`. `Err` changes nothing.
    pub fn apply(&mut self, nexus: &Nexus, op: &Op) -> Result<Outcome, Refusal> {
        check_initiator(&nexus.initiator)?;
        match op {
            Op::Register { key, new_key, ignore_existing, all_ports, aptpl, also } => {
                self.register(nexus, *key, *new_key, *ignore_existing, all_ports, *aptpl, also)
            }
            Op::Reserve { key, kind } => self.reserve(nexus, *key, *kind),
            Op::Release { key, kind } => self.release(nexus, *key, *kind),
            Op::Clear { key } => self.clear(nexus, *key),
            Op::Preempt { key, victim, kind, abort } => self.preempt(nexus, *key, *victim, *kind, *abort),
            Op::RegisterAndMove { key, new_key, to, unregister, aptpl } => {
                self.register_and_move(nexus, *key, *new_key, to, *unregister, *aptpl)
            }
            Op::ReserveRange { key, range, kind } => self.reserve_range(nexus, *key, *range, *kind),
            Op::ReleaseRange { key, range } => self.release_range(nexus, *key, *range),
            Op::PreemptRange { key, victim, range, kind } => self.preempt_range(nexus, *key, *victim, *range, *kind),
            Op::ClearRange { key, range } => self.clear_range(nexus, *key, *range),
            Op::MoveRange { key, from, to } => self.move_range(nexus, *key, *from, *to),
        }
    }

    /// [`Reservations::apply`] for a command identified by `id` (the same in every attempt of
    /// it): a command already applied is answered with its first result and not applied again.
    /// `id` 0 is never remembered.
    pub fn apply_once(&mut self, id: u64, nexus: &Nexus, op: &Op) -> Result<Outcome, Refusal> {
        if let Some((_, result)) = self.recent.iter().find(|(seen, _)| id != 0 && *seen == id) {
            return result.clone();
        }
        let result = self.apply(nexus, op);
        if id != 0 {
            self.recent.push((id, result.clone()));
            if self.recent.len() > RECENT_MAX {
                self.recent.drain(..1);
            }
        }
        result
    }

    /// The index of the registration of `nexus`, if its key is `key`; RESERVATION CONFLICT
    /// otherwise (SPC-4: an unregistered nexus, or the wrong key).
    fn registered(&self, nexus: &Nexus, key: u64) -> Result<usize, Refusal> {
        let Some(i) = self.registrations.iter().position(|r| r.nexus == *nexus) else {
            return Err(Refusal::Conflict(format!("{nexus} is not registered")));
        };
        if self.registrations[i].key != key {
            return Err(Refusal::Conflict(format!("{nexus} is registered with another key than {key:#x}")));
        }
        Ok(i)
    }

    /// Whether registration `i` holds the whole-volume reservation.
    fn holds_index(&self, i: usize) -> bool {
        let nexus = &self.registrations[i].nexus;
        self.reservation.as_ref().is_some_and(|res| res.kind.all_registrants() || res.holder == *nexus)
    }

    fn raise(&mut self, nexus: &Nexus, attention: Attention) {
        self.attention_seq += 1;
        self.attentions.push(PendingAttention { seq: self.attention_seq, nexus: nexus.clone(), attention });
        if self.attentions.len() > ATTENTIONS_MAX {
            let excess = self.attentions.len() - ATTENTIONS_MAX;
            self.attentions.drain(..excess);
        }
    }

    /// Raises `attention` for every registered nexus but `except`.
    fn raise_for_others(&mut self, except: &Nexus, attention: Attention) {
        let others: Vec<Nexus> =
            self.registrations.iter().filter(|r| r.nexus != *except).map(|r| r.nexus.clone()).collect();
        for nexus in others {
            self.raise(&nexus, attention);
        }
    }

    /// Removes the registrations at `victims` (with their range reservations, and the
    /// whole-volume reservation if one of them held it and it was not of an all-registrants
    /// type), raising REGISTRATIONS PREEMPTED for each but `quiet`. Returns who they were.
    fn remove_registrations(&mut self, victims: &[usize], quiet: Option<&Nexus>) -> Vec<Nexus> {
        let removed: Vec<Nexus> = victims.iter().map(|&i| self.registrations[i].nexus.clone()).collect();
        for nexus in &removed {
            if self.reservation.as_ref().is_some_and(|res| !res.kind.all_registrants() && res.holder == *nexus) {
                self.reservation = None;
            }
            self.ranges.retain(|r| r.holder != *nexus);
        }
        self.registrations.retain(|r| !removed.contains(&r.nexus));
        if self.registrations.is_empty() {
            // An all-registrants reservation ends with its last registrant.
            self.reservation = None;
            self.ranges.clear();
        }
        for nexus in &removed {
            if Some(nexus) != quiet {
                self.raise(nexus, Attention::RegistrationsPreempted);
            }
        }
        removed
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        nexus: &Nexus,
        key: u64,
        new_key: u64,
        ignore_existing: bool,
        all_ports: &[u16],
        aptpl: bool,
        also: &[String],
    ) -> Result<Outcome, Refusal> {
        match self.registrations.iter().position(|r| r.nexus == *nexus) {
            None => {
                if !ignore_existing && key != 0 {
                    return Err(Refusal::Conflict(format!(
                        "{nexus} is not registered, so its reservation key must be 0, not {key:#x}"
                    )));
                }
                if new_key == 0 {
                    return Ok(Outcome::default()); // Unregistering the unregistered: nothing to do.
                }
                if ignore_existing && !also.is_empty() {
                    return Err(Refusal::InvalidParameter(
                        "SPEC_I_PT is not allowed with REGISTER AND IGNORE EXISTING KEY".into(),
                    ));
                }
                if also.len() > SPEC_I_PT_MAX || all_ports.len() > PORTS_MAX {
                    return Err(Refusal::InvalidParameter(format!(
                        "at most {SPEC_I_PT_MAX} initiators (SPEC_I_PT) and {PORTS_MAX} target ports (ALL_TG_PT)"
                    )));
                }
                let mut ports: Vec<u16> = all_ports.to_vec();
                ports.push(nexus.port);
                ports.sort_unstable();
                ports.dedup();
                if all_ports.is_empty() {
                    ports = vec![nexus.port];
                }
                let mut new: Vec<Registration> = Vec::new();
                let mut rekey: Vec<usize> = Vec::new();
                for (n, initiator) in std::iter::once(&nexus.initiator).chain(also).enumerate() {
                    check_initiator(initiator)?;
                    if n > 0 && *initiator == nexus.initiator {
                        return Err(Refusal::InvalidParameter(format!(
                            "SPEC_I_PT names the sending initiator port {initiator}"
                        )));
                    }
                    for &port in &ports {
                        let target = Nexus::new(initiator.clone(), port);
                        if new.iter().any(|r| r.nexus == target) {
                            return Err(Refusal::InvalidParameter(format!("{target} is named twice")));
                        }
                        match self.registrations.iter().position(|r| r.nexus == target) {
                            // Through another port, this initiator port is registered already:
                            // as if the request came through that port too.
                            Some(j) if n == 0 && ignore_existing => rekey.push(j),
                            Some(_) if n == 0 => {
                                return Err(Refusal::Conflict(format!("{target} is already registered")))
                            }
                            Some(_) => {
                                return Err(Refusal::InvalidParameter(format!(
                                    "{target} (SPEC_I_PT) is already registered"
                                )))
                            }
                            None => new.push(Registration { nexus: target, key: new_key }),
                        }
                    }
                }
                if self.registrations.len() + new.len() > REGISTRATIONS_MAX {
                    return Err(Refusal::NoResources(format!(
                        "a volume has at most {REGISTRATIONS_MAX} registrations"
                    )));
                }
                for j in rekey {
                    self.registrations[j].key = new_key;
                }
                self.registrations.extend(new);
            }
            Some(i) => {
                if !ignore_existing && self.registrations[i].key != key {
                    return Err(Refusal::Conflict(format!("{nexus} is registered with another key than {key:#x}")));
                }
                if !also.is_empty() {
                    return Err(Refusal::InvalidParameter("SPEC_I_PT is only for an unregistered nexus".into()));
                }
                if new_key == 0 {
                    self.unregister(i);
                } else {
                    self.registrations[i].key = new_key;
                }
            }
        }
        self.aptpl = aptpl;
        self.generation = self.generation.wrapping_add(1);
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    /// A registrant unregisters itself: a reservation it held of a registrants-only type is
    /// released with RESERVATIONS RELEASED for the other registrants (SPC-4 §5.13.11.2.3).
    fn unregister(&mut self, i: usize) {
        let nexus = self.registrations[i].nexus.clone();
        let released = self.reservation.as_ref().and_then(|res| {
            let held = !res.kind.all_registrants() && res.holder == nexus;
            held.then_some(res.kind)
        });
        self.remove_registrations(&[i], Some(&nexus));
        if released.is_some_and(|kind| kind.registrants_have_access()) {
            self.raise_for_others(&nexus, Attention::ReservationsReleased);
        }
    }

    fn reserve(&mut self, nexus: &Nexus, key: u64, kind: Kind) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        match &self.reservation {
            Some(res) if self.holds_index(i) => {
                if res.kind == kind {
                    Ok(Outcome::default())
                } else {
                    Err(Refusal::Conflict(format!("{nexus} holds a reservation of another type ({})", res.kind)))
                }
            }
            Some(res) => Err(Refusal::Conflict(format!("{} holds a {} reservation", res.holder, res.kind))),
            None => {
                if let Some(other) = self.ranges.iter().find(|r| r.holder != *nexus) {
                    return Err(Refusal::Conflict(format!(
                        "{} holds a reservation of range {}",
                        other.holder, other.range
                    )));
                }
                self.reservation = Some(Reservation { holder: nexus.clone(), kind });
                Ok(Outcome { changed: true, aborted: Vec::new() })
            }
        }
    }

    fn release(&mut self, nexus: &Nexus, key: u64, kind: Kind) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        let Some(res) = &self.reservation else {
            return Ok(Outcome::default());
        };
        if !self.holds_index(i) {
            return Ok(Outcome::default()); // Releasing what another holds does nothing (SPC-4).
        }
        if res.kind != kind {
            return Err(Refusal::InvalidRelease(format!("the reservation is {}, not {kind}", res.kind)));
        }
        self.reservation = None;
        if kind.registrants_have_access() {
            self.raise_for_others(nexus, Attention::ReservationsReleased);
        }
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    fn clear(&mut self, nexus: &Nexus, key: u64) -> Result<Outcome, Refusal> {
        self.registered(nexus, key)?;
        self.raise_for_others(nexus, Attention::ReservationsPreempted);
        self.registrations.clear();
        self.reservation = None;
        self.ranges.clear();
        self.generation = self.generation.wrapping_add(1);
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    fn preempt(&mut self, nexus: &Nexus, key: u64, victim: u64, kind: Kind, abort: bool) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        let with_key = |this: &Reservations, k: u64, except: Option<usize>| -> Vec<usize> {
            (0..this.registrations.len()).filter(|&j| Some(j) != except && this.registrations[j].key == k).collect()
        };
        let held = self.reservation.clone();
        let removed = match held {
            Some(res) if res.kind.all_registrants() && victim == 0 => {
                // Every other registration goes; the preemptor holds the reservation alone.
                let victims: Vec<usize> = (0..self.registrations.len()).filter(|&j| j != i).collect();
                let removed = self.remove_registrations(&victims, None);
                self.reservation = Some(Reservation { holder: nexus.clone(), kind });
                removed
            }
            Some(res) if !res.kind.all_registrants() && self.holder_key() == Some(victim) => {
                // The holder is preempted (SPC-4 §5.13.11.4.3): the registrations of its key
                // but the preemptor's go, and the preemptor holds.
                let victims = with_key(self, victim, Some(i));
                let removed = self.remove_registrations(&victims, None);
                self.reservation = Some(Reservation { holder: nexus.clone(), kind });
                if res.kind != kind {
                    self.raise_for_others(nexus, Attention::ReservationsReleased);
                }
                removed
            }
            _ => {
                // Registrations only (§5.13.11.4.4): no reservation, or one the victim does
                // not hold. Every registration of the key goes, the preemptor's too.
                if victim == 0 {
                    return Err(Refusal::InvalidParameter(
                        "the service action reservation key must not be 0 here".into(),
                    ));
                }
                let victims = with_key(self, victim, None);
                if victims.is_empty() {
                    return Err(Refusal::Conflict(format!("no registrant has key {victim:#x}")));
                }
                self.remove_registrations(&victims, Some(nexus))
            }
        };
        self.generation = self.generation.wrapping_add(1);
        Ok(Outcome { changed: true, aborted: if abort { removed } else { Vec::new() } })
    }

    fn register_and_move(
        &mut self,
        nexus: &Nexus,
        key: u64,
        new_key: u64,
        to: &Nexus,
        unregister: bool,
        aptpl: bool,
    ) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        let Some(res) = self.reservation.clone() else {
            return Err(Refusal::Conflict("there is no reservation to move".into()));
        };
        if res.kind.all_registrants() {
            return Err(Refusal::Conflict(format!("a {} reservation cannot be moved", res.kind)));
        }
        if !self.holds_index(i) {
            return Err(Refusal::Conflict(format!("{nexus} does not hold the reservation")));
        }
        if new_key == 0 {
            return Err(Refusal::InvalidParameter("the destination's reservation key must not be 0".into()));
        }
        check_initiator(&to.initiator)?;
        if to.initiator == nexus.initiator {
            return Err(Refusal::InvalidParameter(
                "the destination is the initiator port that sent the command".into(),
            ));
        }
        match self.registrations.iter().position(|r| r.nexus == *to) {
            Some(j) => self.registrations[j].key = new_key,
            None => {
                if self.registrations.len() >= REGISTRATIONS_MAX {
                    return Err(Refusal::NoResources(format!(
                        "a volume has at most {REGISTRATIONS_MAX} registrations"
                    )));
                }
                self.registrations.push(Registration { nexus: to.clone(), key: new_key });
            }
        }
        self.reservation = Some(Reservation { holder: to.clone(), kind: res.kind });
        if unregister {
            self.remove_registrations(&[i], Some(nexus));
        }
        self.aptpl = aptpl;
        self.generation = self.generation.wrapping_add(1);
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    /// Whether registration `i` may reserve ranges under the whole-volume reservation: it holds
    /// it, or the type lets registrants write.
    fn may_reserve_ranges(&self, i: usize) -> Result<(), Refusal> {
        match &self.reservation {
            Some(res) if !self.holds_index(i) && !res.kind.registrants_have_access() => {
                Err(Refusal::Conflict(format!("{} holds a {} reservation of the whole volume", res.holder, res.kind)))
            }
            _ => Ok(()),
        }
    }

    fn reserve_range(&mut self, nexus: &Nexus, key: u64, range: Range, kind: Kind) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        check_range(range)?;
        self.may_reserve_ranges(i)?;
        if let Some(other) = self.ranges.iter().find(|r| r.range.overlaps(range.offset, range.len)) {
            if other.range == range && other.kind == kind && other.holder == *nexus {
                return Ok(Outcome::default());
            }
            return Err(Refusal::Conflict(format!(
                "range {range} overlaps range {} reserved by {}",
                other.range, other.holder
            )));
        }
        if self.ranges.len() >= RANGES_MAX {
            return Err(Refusal::NoResources(format!("a volume has at most {RANGES_MAX} range reservations")));
        }
        self.ranges.push(RangeReservation { range, holder: nexus.clone(), kind });
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    /// The index of the range reservation of exactly `range` that `nexus` holds.
    fn own_range(&self, nexus: &Nexus, range: Range) -> Option<usize> {
        self.ranges.iter().position(|r| r.range == range && r.holder == *nexus)
    }

    fn release_range(&mut self, nexus: &Nexus, key: u64, range: Range) -> Result<Outcome, Refusal> {
        self.registered(nexus, key)?;
        check_range(range)?;
        let Some(r) = self.own_range(nexus, range) else {
            return Ok(Outcome::default()); // As RELEASE: what one does not hold stays.
        };
        let released = self.ranges.remove(r);
        if released.kind.registrants_have_access() {
            self.raise_for_others(nexus, Attention::ReservationsReleased);
        }
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    fn preempt_range(
        &mut self,
        nexus: &Nexus,
        key: u64,
        victim: u64,
        range: Range,
        kind: Kind,
    ) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        check_range(range)?;
        self.may_reserve_ranges(i)?;
        let Some(r) = self.ranges.iter().position(|r| r.range == range && self.key_of(&r.holder) == Some(victim))
        else {
            return Err(Refusal::Conflict(format!("no registrant with key {victim:#x} holds range {range}")));
        };
        let new = RangeReservation { range, holder: nexus.clone(), kind };
        if self.ranges[r] == new {
            return Ok(Outcome::default());
        }
        let old = std::mem::replace(&mut self.ranges[r], new);
        if old.holder != *nexus {
            self.raise(&old.holder, Attention::ReservationsPreempted);
        }
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    fn clear_range(&mut self, nexus: &Nexus, key: u64, range: Range) -> Result<Outcome, Refusal> {
        self.registered(nexus, key)?;
        check_range(range)?;
        let (cleared, kept): (Vec<RangeReservation>, Vec<RangeReservation>) =
            std::mem::take(&mut self.ranges).into_iter().partition(|r| r.range.overlaps(range.offset, range.len));
        self.ranges = kept;
        for r in &cleared {
            if r.holder != *nexus {
                self.raise(&r.holder, Attention::ReservationsPreempted);
            }
        }
        Ok(Outcome { changed: !cleared.is_empty(), aborted: Vec::new() })
    }

    fn move_range(&mut self, nexus: &Nexus, key: u64, from: Range, to: Range) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        check_range(from)?;
        check_range(to)?;
        self.may_reserve_ranges(i)?;
        let Some(r) = self.own_range(nexus, from) else {
            return Err(Refusal::Conflict(format!("{nexus} holds no reservation of range {from}")));
        };
        let clash = self.ranges.iter().enumerate().find(|(j, o)| *j != r && o.range.overlaps(to.offset, to.len));
        if let Some((_, other)) = clash {
            return Err(Refusal::Conflict(format!(
                "range {to} overlaps range {} reserved by {}",
                other.range, other.holder
            )));
        }
        self.ranges[r].range = to;
        Ok(Outcome { changed: from != to, aborted: Vec::new() })
    }
}

fn check_initiator(initiator: &str) -> Result<(), Refusal> {
    if initiator.is_empty() || initiator.len() > INITIATOR_BYTES_MAX || initiator.chars().any(char::is_control) {
        return Err(Refusal::InvalidParameter(format!(
            "an initiator port name has 1 to {INITIATOR_BYTES_MAX} bytes and no control characters"
        )));
    }
    Ok(())
}

fn check_range(range: Range) -> Result<(), Refusal> {
    if range.len == 0 || range.end().is_none() {
        return Err(Refusal::InvalidParameter(format!("range {range} is empty or runs past 2^64")));
    }
    Ok(())
}
