//! The state, the operations and their results.

use std::fmt;

use serde::{Deserialize, Serialize};

/// At most this many registrations per volume (SPC-4's "insufficient registration resources"
/// beyond it). Two nodes' worth of ports for every host of a large failover cluster.
pub const REGISTRATIONS_MAX: usize = 128;
/// At most this many range reservations per volume.
pub const RANGES_MAX: usize = 128;
/// Unit attentions kept for gateways to deliver: the most recent ones. A gateway that fell
/// further behind delivers the oldest one it still finds (they are alike for a host: "look
/// again at the reservations").
pub const ATTENTIONS_MAX: usize = 64;
/// The longest initiator port name: an iSCSI name (at most 223 bytes) with `,i,0x` and the
/// 12 hex digits of its ISID; host names are far shorter.
pub const INITIATOR_BYTES_MAX: usize = 256;
/// The results of this many of the most recent commands are kept, by their id, so that a
/// command retried after its reply was lost is answered as it was the first time and not
/// applied twice (a retried REGISTER would otherwise find its own key and conflict).
pub const RECENT_MAX: usize = 64;
/// At most this many target ports in an ALL_TG_PT registration.
pub const PORTS_MAX: usize = 64;
/// At most this many initiators registered at once with SPEC_I_PT.
pub const SPEC_I_PT_MAX: usize = 16;

/// One I_T nexus: an initiator port and the target port it reaches the volume through.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Nexus {
    /// The initiator port's name: for iSCSI `iqn...,i,0x<ISID>`; for a host on Tandem's own
    /// paths (NBD, the HTTP API) [`Nexus::host`]'s `host:<name>`.
    pub initiator: String,
    /// The relative target port identifier; [`Nexus::NATIVE_PORT`] for Tandem's own paths,
    /// where a host is the same nexus through every node.
    pub port: u16,
}

impl Nexus {
    /// The target port of Tandem's own paths (NBD, the HTTP API): one for the whole cluster.
    pub const NATIVE_PORT: u16 = 0;

    pub fn new(initiator: impl Into<String>, port: u16) -> Nexus {
        Nexus { initiator: initiator.into(), port }
    }

    /// A host known by name on Tandem's own paths.
    pub fn host(name: &str) -> Nexus {
        Nexus { initiator: format!("host:{name}"), port: Nexus::NATIVE_PORT }
    }
}

impl fmt::Display for Nexus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via port {}", self.initiator, self.port)
    }
}

/// A reservation's type (SPC-4 table 200), by its code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// 1: only the holder writes; everyone reads.
    WriteExclusive,
    /// 3: only the holder reads or writes.
    ExclusiveAccess,
    /// 5: registrants write; everyone reads.
    WriteExclusiveRegistrantsOnly,
    /// 6: only registrants read or write.
    ExclusiveAccessRegistrantsOnly,
    /// 7: like 5, and every registrant holds the reservation.
    WriteExclusiveAllRegistrants,
    /// 8: like 6, and every registrant holds the reservation.
    ExclusiveAccessAllRegistrants,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::WriteExclusive,
        Kind::ExclusiveAccess,
        Kind::WriteExclusiveRegistrantsOnly,
        Kind::ExclusiveAccessRegistrantsOnly,
        Kind::WriteExclusiveAllRegistrants,
        Kind::ExclusiveAccessAllRegistrants,
    ];

    /// The TYPE code of PERSISTENT RESERVE OUT and IN.
    pub fn code(self) -> u8 {
        match self {
            Kind::WriteExclusive => 1,
            Kind::ExclusiveAccess => 3,
            Kind::WriteExclusiveRegistrantsOnly => 5,
            Kind::ExclusiveAccessRegistrantsOnly => 6,
            Kind::WriteExclusiveAllRegistrants => 7,
            Kind::ExclusiveAccessAllRegistrants => 8,
        }
    }

    pub fn from_code(code: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The short name the CLI and the HTTP API use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::WriteExclusive => "write-exclusive",
            Kind::ExclusiveAccess => "exclusive-access",
            Kind::WriteExclusiveRegistrantsOnly => "write-exclusive-registrants-only",
            Kind::ExclusiveAccessRegistrantsOnly => "exclusive-access-registrants-only",
            Kind::WriteExclusiveAllRegistrants => "write-exclusive-all-registrants",
            Kind::ExclusiveAccessAllRegistrants => "exclusive-access-all-registrants",
        }
    }

    /// The type named `name` ([`Kind::name`], or the usual abbreviations `we`, `ea`,
    /// `we-ro`, `ea-ro`, `we-ar`, `ea-ar`, or the SCSI code).
    pub fn parse(name: &str) -> Option<Kind> {
        let kind = match name {
            "we" => Kind::WriteExclusive,
            "ea" => Kind::ExclusiveAccess,
            "we-ro" => Kind::WriteExclusiveRegistrantsOnly,
            "ea-ro" => Kind::ExclusiveAccessRegistrantsOnly,
            "we-ar" => Kind::WriteExclusiveAllRegistrants,
            "ea-ar" => Kind::ExclusiveAccessAllRegistrants,
            _ => return Kind::ALL.into_iter().find(|k| k.name() == name || name.parse::<u8>().ok() == Some(k.code())),
        };
        Some(kind)
    }

    /// Every registrant holds a reservation of this type (7 and 8).
    pub fn all_registrants(self) -> bool {
        matches!(self, Kind::WriteExclusiveAllRegistrants | Kind::ExclusiveAccessAllRegistrants)
    }

    /// Registrants that do not hold it may still read and write (5 to 8).
    pub fn registrants_have_access(self) -> bool {
        !matches!(self, Kind::WriteExclusive | Kind::ExclusiveAccess)
    }

    /// Those it excludes may not read either (3, 6, 8).
    pub fn excludes_reads(self) -> bool {
        matches!(
            self,
            Kind::ExclusiveAccess | Kind::ExclusiveAccessRegistrantsOnly | Kind::ExclusiveAccessAllRegistrants
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A byte range of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

impl Range {
    pub fn new(offset: u64, len: u64) -> Range {
        Range { offset, len }
    }

    /// The first byte past the range, if it is representable.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }

    /// Whether the range shares a byte with `[offset, offset + len)`.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        len > 0
            && self.len > 0
            && offset < self.offset.saturating_add(self.len)
            && self.offset < offset.saturating_add(len)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.offset, self.len)
    }
}

/// One registration: an I_T nexus registered with a key. ALL_TG_PT registers the initiator port
/// through every target port as if it had registered through each ([`Op::Register`]), so each
/// is a registration of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub nexus: Nexus,
    pub key: u64,
}

/// The reservation of the whole volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The nexus that holds it (for types 7 and 8, the one that made it; every registrant
    /// holds those).
    pub holder: Nexus,
    pub kind: Kind,
}

/// A reservation of a byte range of the volume, by one registrant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeReservation {
    pub range: Range,
    pub holder: Nexus,
    pub kind: Kind,
}

/// A unit attention condition an operation raised (SPC-4 §5.13.11, additional sense code 2Ah).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Attention {
    /// 2Ah/03h: the nexus's reservation was taken over, or cleared.
    ReservationsPreempted,
    /// 2Ah/04h: a reservation the nexus could use was released, or its type changed.
    ReservationsReleased,
    /// 2Ah/05h: the nexus's registration was removed by another.
    RegistrationsPreempted,
}

impl Attention {
    /// The additional sense code qualifier (the code is 2Ah).
    pub fn ascq(self) -> u8 {
        match self {
            Attention::ReservationsPreempted => 0x03,
            Attention::ReservationsReleased => 0x04,
            Attention::RegistrationsPreempted => 0x05,
        }
    }
}

/// A unit attention waiting for one nexus (a registrant, or a former one), numbered in the
/// volume's order so a gateway delivers each once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAttention {
    pub seq: u64,
    pub nexus: Nexus,
    pub attention: Attention,
}

/// One persistent-reservation command, made through a nexus (the argument of
/// [`Reservations::apply`]). `key` is always the reservation key the nexus says it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// REGISTER (`ignore_existing`: REGISTER AND IGNORE EXISTING KEY): registers `new_key`,
    /// changes the key to it, or unregisters (`new_key` 0). `all_ports` is ALL_TG_PT: the
    /// relative identifiers of every target port of the volume (the gateway knows them; the
    /// sending port is added if missing), through each of which an unregistered initiator
    /// port registers; empty: only the sending port. `also` names the initiator ports of
    /// SPEC_I_PT, registered through the same ports.
    Register {
        key: u64,
        new_key: u64,
        ignore_existing: bool,
        all_ports: Vec<u16>,
        aptpl: bool,
        also: Vec<String>,
    },
    Reserve {
        key: u64,
        kind: Kind,
    },
    Release {
        key: u64,
        kind: Kind,
    },
    Clear {
        key: u64,
    },
    /// PREEMPT (`abort`: PREEMPT AND ABORT): removes the registrations of `victim`, and takes
    /// over the reservation if `victim` holds it.
    Preempt {
        key: u64,
        victim: u64,
        kind: Kind,
        abort: bool,
    },
    /// REGISTER AND MOVE: registers `to` with `new_key` and moves the reservation to it;
    /// `unregister` drops the mover's own registration.
    RegisterAndMove {
        key: u64,
        new_key: u64,
        to: Nexus,
        unregister: bool,
        aptpl: bool,
    },
    /// Reserves a byte range.
    ReserveRange {
        key: u64,
        range: Range,
        kind: Kind,
    },
    /// Releases the nexus's reservation of exactly `range`.
    ReleaseRange {
        key: u64,
        range: Range,
    },
    /// Takes over the reservation of exactly `range` held by the registrant of `victim`.
    PreemptRange {
        key: u64,
        victim: u64,
        range: Range,
        kind: Kind,
    },
    /// Removes every range reservation that overlaps `range`, whoever holds it.
    ClearRange {
        key: u64,
        range: Range,
    },
    /// Moves the nexus's reservation of exactly `from` to `to`, in one step.
    MoveRange {
        key: u64,
        from: Range,
        to: Range,
    },
}

impl Op {
    /// The operation's name (the CLI's verb, SCSI's service action in words).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Register { ignore_existing: false, .. } => "register",
            Op::Register { ignore_existing: true, .. } => "register-and-ignore-existing-key",
            Op::Reserve { .. } => "reserve",
            Op::Release { .. } => "release",
            Op::Clear { .. } => "clear",
            Op::Preempt { abort: false, .. } => "preempt",
            Op::Preempt { abort: true, .. } => "preempt-and-abort",
            Op::RegisterAndMove { .. } => "register-and-move",
            Op::ReserveRange { .. } => "reserve-range",
            Op::ReleaseRange { .. } => "release-range",
            Op::PreemptRange { .. } => "preempt-range",
            Op::ClearRange { .. } => "clear-range",
            Op::MoveRange { .. } => "move-range",
        }
    }
}

/// What an applied operation did besides changing the state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Whether anything changed (a no-op such as releasing what one does not hold is `false`).
    pub changed: bool,
    /// PREEMPT AND ABORT: the nexuses whose commands in progress must end without effect.
    pub aborted: Vec<Nexus>,
}

/// Why an operation was refused; the state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// RESERVATION CONFLICT status: the nexus is not registered, gave the wrong key, or the
    /// reservation belongs to another.
    Conflict(String),
    /// CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST.
    InvalidParameter(String),
    /// CHECK CONDITION, ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION.
    InvalidRelease(String),
    /// CHECK CONDITION, ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES.
    NoResources(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Conflict(why) => write!(f, "reservation conflict: {why}"),
            Refusal::InvalidParameter(why) => write!(f, "invalid: {why}"),
            Refusal::InvalidRelease(why) => write!(f, "invalid release: {why}"),
            Refusal::NoResources(why) => write!(f, "too many: {why}"),
        }
    }
}

impl std::error::Error for Refusal {}

/// The persistent reservations of one volume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservations {
    /// PRgeneration: counts the changes of registrations (SPC-4: not RESERVE or RELEASE).
    pub generation: u32,
    /// Activate Persist Through Power Loss, as the last registration set it.
    pub aptpl: bool,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    pub ranges: Vec<RangeReservation>,
    /// The most recent unit attentions, oldest first ([`ATTENTIONS_MAX`]).
    pub attentions: Vec<PendingAttention>,
    /// The number of the last attention raised.
    pub attention_seq: u64,
    /// The results of the most recent commands by id ([`Reservations::apply_once`]), oldest
    /// first ([`RECENT_MAX`]).
    pub recent: Vec<(u64, Result<Outcome, Refusal>)>,
}

impl Reservations {
    /// Nothing registered, reserved or pending: the state of a volume that never saw a
    /// reservation command (the map keeps no record of it).
    pub fn is_empty(&self) -> bool {
        self.registrations.is_empty()
            && self.reservation.is_none()
            && self.ranges.is_empty()
            && self.attentions.is_empty()
            && self.recent.is_empty()
    }

    /// The registration of `nexus`.
    pub fn registration(&self, nexus: &Nexus) -> Option<&Registration> {
        self.registrations.iter().find(|r| r.nexus == *nexus)
    }

    /// The key `nexus` is registered with.
    pub fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registration(nexus).map(|r| r.key)
    }

    /// Whether `nexus` holds the whole-volume reservation (for types 7 and 8: is registered).
    pub fn holds(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some(res) => self.registration(nexus).is_some() && (res.kind.all_registrants() || res.holder == *nexus),
            None => false,
        }
    }

    /// The key of the nexus holding the whole-volume reservation (0 for types 7 and 8, as
    /// READ RESERVATION reports it).
    pub fn holder_key(&self) -> Option<u64> {
        let res = self.reservation.as_ref()?;
        if res.kind.all_registrants() {
            return Some(0);
        }
        self.key_of(&res.holder)
    }

    /// The attentions for `nexus` numbered after `after`.
    pub fn attentions_for<'a>(
        &'a self,
        nexus: &'a Nexus,
        after: u64,
    ) -> impl Iterator<Item = &'a PendingAttention> + 'a {
        self.attentions.iter().filter(move |a| a.seq > after && a.nexus == *nexus)
    }
}
