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
                self.register(nexus, *key, *new_key, *ignore_existing, *all_ports, *aptpl, also)
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

    /// The index of the registration covering `nexus`, if its key is `key`; RESERVATION
    /// CONFLICT otherwise (SPC-4: an unregistered nexus, or the wrong key).
    fn registered(&self, nexus: &Nexus, key: u64) -> Result<usize, Refusal> {
        let Some(i) = self.registrations.iter().position(|r| r.covers(nexus)) else {
            return Err(Refusal::Conflict(format!("{nexus} is not registered")));
        };
        if self.registrations[i].key != key {
            return Err(Refusal::Conflict(format!("{nexus} is registered with another key than {key:#x}")));
        }
        Ok(i)
    }

    /// Whether registration `i` holds the whole-volume reservation.
    fn holds_index(&self, i: usize) -> bool {
        let reg = &self.registrations[i];
        self.reservation
            .as_ref()
            .is_some_and(|res| res.kind.all_registrants() || reg.same_registrant(&res.initiator, res.port))
    }

    fn raise(&mut self, initiator: &str, port: Option<u16>, attention: Attention) {
        self.attention_seq += 1;
        self.attentions.push(PendingAttention {
            seq: self.attention_seq,
            initiator: initiator.to_owned(),
            port,
            attention,
        });
        if self.attentions.len() > ATTENTIONS_MAX {
            let excess = self.attentions.len() - ATTENTIONS_MAX;
            self.attentions.drain(..excess);
        }
    }

    /// Raises `attention` for every registration but `except`.
    fn raise_for_others(&mut self, except: (&str, Option<u16>), attention: Attention) {
        let others: Vec<(String, Option<u16>)> = self
            .registrations
            .iter()
            .filter(|r| !r.same_registrant(except.0, except.1))
            .map(|r| (r.initiator.clone(), r.port))
            .collect();
        for (initiator, port) in others {
            self.raise(&initiator, port, attention);
        }
    }

    /// Removes the registrations at `victims` (with their range reservations, and the
    /// whole-volume reservation if one of them held it and it was not of an all-registrants
    /// type), raising REGISTRATIONS PREEMPTED for each when `attention`. Returns who they were.
    fn remove_registrations(&mut self, victims: &[usize], attention: bool) -> Vec<(String, Option<u16>)> {
        let removed: Vec<(String, Option<u16>)> =
            victims.iter().map(|&i| (self.registrations[i].initiator.clone(), self.registrations[i].port)).collect();
        for (initiator, port) in &removed {
            if let Some(res) = &self.reservation {
                if !res.kind.all_registrants() && &res.initiator == initiator && res.port == *port {
                    self.reservation = None;
                }
            }
            self.ranges.retain(|r| !(&r.initiator == initiator && r.port == *port));
        }
        let mut index = 0;
        self.registrations.retain(|_| {
            let keep = !victims.contains(&index);
            index += 1;
            keep
        });
        if self.registrations.is_empty() {
            // An all-registrants reservation ends with its last registrant.
            self.reservation = None;
            self.ranges.clear();
        }
        if attention {
            for (initiator, port) in &removed {
                self.raise(initiator, *port, Attention::RegistrationsPreempted);
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
        all_ports: bool,
        aptpl: bool,
        also: &[String],
    ) -> Result<Outcome, Refusal> {
        let existing = self.registrations.iter().position(|r| r.covers(nexus));
        match existing {
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
                if also.len() > SPEC_I_PT_MAX {
                    return Err(Refusal::InvalidParameter(format!(
                        "SPEC_I_PT names {} initiators; at most {SPEC_I_PT_MAX}",
                        also.len()
                    )));
                }
                let port = if all_ports { None } else { Some(nexus.port) };
                let mut new: Vec<Registration> = Vec::with_capacity(1 + also.len());
                for initiator in std::iter::once(&nexus.initiator).chain(also) {
                    check_initiator(initiator)?;
                    let clash =
                        self.registrations.iter().chain(&new).any(|r| {
                            r.initiator == *initiator && (port.is_none() || r.port.is_none() || r.port == port)
                        });
                    if clash {
                        return Err(if initiator == &nexus.initiator {
                            Refusal::Conflict(format!("{initiator} is already registered through another target port"))
                        } else {
                            Refusal::InvalidParameter(format!("{initiator} (SPEC_I_PT) is already registered"))
                        });
                    }
                    new.push(Registration { initiator: initiator.clone(), port, key: new_key });
                }
                if self.registrations.len() + new.len() > REGISTRATIONS_MAX {
                    return Err(Refusal::NoResources(format!(
                        "a volume has at most {REGISTRATIONS_MAX} registrations"
                    )));
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
        let reg = self.registrations[i].clone();
        let released = self.reservation.as_ref().and_then(|res| {
            let held = !res.kind.all_registrants() && reg.same_registrant(&res.initiator, res.port);
            held.then_some(res.kind)
        });
        self.remove_registrations(&[i], false);
        if released.is_some_and(|kind| kind.registrants_have_access()) {
            self.raise_for_others((&reg.initiator, reg.port), Attention::ReservationsReleased);
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
            Some(res) => Err(Refusal::Conflict(format!("{} holds a {} reservation", res.initiator, res.kind))),
            None => {
                let reg = &self.registrations[i];
                if let Some(other) = self.ranges.iter().find(|r| !reg.same_registrant(&r.initiator, r.port)) {
                    return Err(Refusal::Conflict(format!(
                        "{} holds a reservation of range {}",
                        other.initiator, other.range
                    )));
                }
                self.reservation = Some(Reservation { initiator: reg.initiator.clone(), port: reg.port, kind });
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
            let reg = self.registrations[i].clone();
            self.raise_for_others((&reg.initiator, reg.port), Attention::ReservationsReleased);
        }
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    fn clear(&mut self, nexus: &Nexus, key: u64) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        let reg = self.registrations[i].clone();
        self.raise_for_others((&reg.initiator, reg.port), Attention::ReservationsPreempted);
        self.registrations.clear();
        self.reservation = None;
        self.ranges.clear();
        self.generation = self.generation.wrapping_add(1);
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    fn preempt(&mut self, nexus: &Nexus, key: u64, victim: u64, kind: Kind, abort: bool) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        let me = self.registrations[i].clone();
        let victims_of = |this: &Reservations, k: u64| -> Vec<usize> {
            (0..this.registrations.len()).filter(|&j| j != i && this.registrations[j].key == k).collect()
        };
        let held = self.reservation.clone();
        let removed = match held {
            Some(res) if res.kind.all_registrants() && victim == 0 => {
                // Every other registration goes; the preemptor holds the reservation alone.
                let victims: Vec<usize> = (0..self.registrations.len()).filter(|&j| j != i).collect();
                let removed = self.remove_registrations(&victims, true);
                self.reservation = Some(Reservation { initiator: me.initiator.clone(), port: me.port, kind });
                removed
            }
            Some(res) if !res.kind.all_registrants() && self.holder_key() == Some(victim) => {
                // The holder is preempted: its registrations go, the preemptor holds.
                let victims = victims_of(self, victim);
                let removed = self.remove_registrations(&victims, true);
                self.reservation = Some(Reservation { initiator: me.initiator.clone(), port: me.port, kind });
                if res.kind != kind {
                    self.raise_for_others((&me.initiator, me.port), Attention::ReservationsReleased);
                }
                removed
            }
            _ => {
                // Registrations only (no reservation, or one the victim does not hold).
                if victim == 0 {
                    return Err(Refusal::InvalidParameter(
                        "the service action reservation key must not be 0 here".into(),
                    ));
                }
                let victims = victims_of(self, victim);
                if victims.is_empty() {
                    return Err(Refusal::Conflict(format!("no other registrant has key {victim:#x}")));
                }
                self.remove_registrations(&victims, true)
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
        if self.registrations[i].covers(to) {
            return Err(Refusal::InvalidParameter("the destination is the nexus that sent the command".into()));
        }
        let dest = match self.registrations.iter().position(|r| r.covers(to)) {
            Some(j) => j,
            None => {
                if self.registrations.len() >= REGISTRATIONS_MAX {
                    return Err(Refusal::NoResources(format!(
                        "a volume has at most {REGISTRATIONS_MAX} registrations"
                    )));
                }
                self.registrations.push(Registration {
                    initiator: to.initiator.clone(),
                    port: Some(to.port),
                    key: new_key,
                });
                self.registrations.len() - 1
            }
        };
        self.registrations[dest].key = new_key;
        let dest_reg = self.registrations[dest].clone();
        self.reservation = Some(Reservation { initiator: dest_reg.initiator, port: dest_reg.port, kind: res.kind });
        if unregister {
            self.remove_registrations(&[i], false);
        }
        self.aptpl = aptpl;
        self.generation = self.generation.wrapping_add(1);
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    /// Whether registration `i` may reserve ranges under the whole-volume reservation: it holds
    /// it, or the type lets registrants write.
    fn may_reserve_ranges(&self, i: usize) -> Result<(), Refusal> {
        match &self.reservation {
            Some(res) if !self.holds_index(i) && !res.kind.registrants_have_access() => Err(Refusal::Conflict(
                format!("{} holds a {} reservation of the whole volume", res.initiator, res.kind),
            )),
            _ => Ok(()),
        }
    }

    fn reserve_range(&mut self, nexus: &Nexus, key: u64, range: Range, kind: Kind) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        check_range(range)?;
        self.may_reserve_ranges(i)?;
        let reg = self.registrations[i].clone();
        if let Some(other) = self.ranges.iter().find(|r| r.range.overlaps(range.offset, range.len)) {
            if other.range == range && other.kind == kind && reg.same_registrant(&other.initiator, other.port) {
                return Ok(Outcome::default());
            }
            return Err(Refusal::Conflict(format!(
                "range {range} overlaps range {} reserved by {}",
                other.range, other.initiator
            )));
        }
        if self.ranges.len() >= RANGES_MAX {
            return Err(Refusal::NoResources(format!("a volume has at most {RANGES_MAX} range reservations")));
        }
        self.ranges.push(RangeReservation { range, initiator: reg.initiator, port: reg.port, kind });
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    /// The index of the range reservation of exactly `range` made by registration `i`.
    fn own_range(&self, i: usize, range: Range) -> Option<usize> {
        let reg = &self.registrations[i];
        self.ranges.iter().position(|r| r.range == range && reg.same_registrant(&r.initiator, r.port))
    }

    fn release_range(&mut self, nexus: &Nexus, key: u64, range: Range) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        check_range(range)?;
        let Some(r) = self.own_range(i, range) else {
            return Ok(Outcome::default()); // As RELEASE: what one does not hold stays.
        };
        let released = self.ranges.remove(r);
        if released.kind.registrants_have_access() {
            self.raise_for_others((&released.initiator, released.port), Attention::ReservationsReleased);
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
        let holder_key = |r: &RangeReservation| {
            self.registrations.iter().find(|g| g.same_registrant(&r.initiator, r.port)).map(|g| g.key)
        };
        let Some(r) = self.ranges.iter().position(|r| r.range == range && holder_key(r) == Some(victim)) else {
            return Err(Refusal::Conflict(format!("no registrant with key {victim:#x} holds range {range}")));
        };
        let me = self.registrations[i].clone();
        let old = std::mem::replace(
            &mut self.ranges[r],
            RangeReservation { range, initiator: me.initiator.clone(), port: me.port, kind },
        );
        if !me.same_registrant(&old.initiator, old.port) {
            self.raise(&old.initiator, old.port, Attention::ReservationsPreempted);
        }
        Ok(Outcome { changed: true, aborted: Vec::new() })
    }

    fn clear_range(&mut self, nexus: &Nexus, key: u64, range: Range) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        check_range(range)?;
        let me = self.registrations[i].clone();
        let (cleared, kept): (Vec<RangeReservation>, Vec<RangeReservation>) =
            std::mem::take(&mut self.ranges).into_iter().partition(|r| r.range.overlaps(range.offset, range.len));
        self.ranges = kept;
        for r in &cleared {
            if !me.same_registrant(&r.initiator, r.port) {
                self.raise(&r.initiator, r.port, Attention::ReservationsPreempted);
            }
        }
        Ok(Outcome { changed: !cleared.is_empty(), aborted: Vec::new() })
    }

    fn move_range(&mut self, nexus: &Nexus, key: u64, from: Range, to: Range) -> Result<Outcome, Refusal> {
        let i = self.registered(nexus, key)?;
        check_range(from)?;
        check_range(to)?;
        self.may_reserve_ranges(i)?;
        let Some(r) = self.own_range(i, from) else {
            return Err(Refusal::Conflict(format!("{nexus} holds no reservation of range {from}")));
        };
        let clash = self.ranges.iter().enumerate().find(|(j, o)| *j != r && o.range.overlaps(to.offset, to.len));
        if let Some((_, other)) = clash {
            return Err(Refusal::Conflict(format!(
                "range {to} overlaps range {} reserved by {}",
                other.range, other.initiator
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
