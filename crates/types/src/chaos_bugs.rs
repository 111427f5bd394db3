//! Known defects, planted again behind switches, so the chaos suite can prove that its checker
//! catches them (docs/ARCHITECTURE.md, "Planted bugs (chaos-bugs)").
//!
//! Without the `chaos-bugs` feature [`on`] and [`Bugs::has`] are `const false`: the compiler
//! drops every planted branch, and no switch name is in the binary. With it (debug builds
//! only), each switch is off until [`set`] (the node's `TANDEM_CHAOS_BUGS` and
//! `PUT /v1/debug/bugs/{name}`) turns it on. Pure cores take a [`Bugs`] set in their
//! configuration instead of reading the registry.

#[cfg(all(feature = "chaos-bugs", not(debug_assertions)))]
compile_error!("chaos-bugs plants known bugs: debug builds only");

/// One planted defect. Each re-opens a hole a fix closed; off, the fixed code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bug {
    /// A primary completes a host write once it is durable locally, before the ISR backups
    /// have it (I1).
    AckBeforeBackups,
    /// A backup acknowledges a record before its store made it durable.
    BackupAckBeforeFsync,
    /// A primary serves reads without its lease (stale reads from a deposed primary).
    ReadWithoutLease,
    /// A replica accepts records and opens from an older epoch's primary (I2).
    AcceptOlderEpoch,
    /// A new primary declares the ISR level without reconciling their recent writes (I4).
    SkipReconciliation,
    /// A new start of a primary reuses the epoch an earlier start ran in, without claiming a
    /// new one: the earlier start's late ISR change still commits.
    LateIsrChange,
    /// A read returns overlapping writes still in flight, before every ISR member has them (I6).
    ReadUnacknowledged,
    /// A primary sequences a proxied write however long it waited at the primary, even across
    /// a pause, and even when an earlier attempt of it already took effect there: a write
    /// parked at a stopped or dead primary, or re-routed late, executes (again) later.
    ParkAtStoppedPrimary,
}

impl Bug {
    pub const ALL: [Bug; 8] = [
        Bug::AckBeforeBackups,
        Bug::BackupAckBeforeFsync,
        Bug::ReadWithoutLease,
        Bug::AcceptOlderEpoch,
        Bug::SkipReconciliation,
        Bug::LateIsrChange,
        Bug::ReadUnacknowledged,
        Bug::ParkAtStoppedPrimary,
    ];

    const fn bit(self) -> u16 {
        1 << self as u16
    }

    /// The switch's name (`TANDEM_CHAOS_BUGS`, the debug route).
    #[cfg(feature = "chaos-bugs")]
    pub fn name(self) -> &'static str {
        match self {
            Bug::AckBeforeBackups => "ack-before-backups",
            Bug::BackupAckBeforeFsync => "backup-ack-before-fsync",
            Bug::ReadWithoutLease => "read-without-lease",
            Bug::AcceptOlderEpoch => "accept-older-epoch",
            Bug::SkipReconciliation => "skip-reconciliation",
            Bug::LateIsrChange => "late-isr-change",
            Bug::ReadUnacknowledged => "read-unacknowledged",
            Bug::ParkAtStoppedPrimary => "park-at-stopped-primary",
        }
    }

    #[cfg(feature = "chaos-bugs")]
    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }
}

// One bit per bug.
const _: () = assert!(Bug::ALL.len() <= u16::BITS as usize);

/// A set of planted bugs, for pure cores (passed in their configuration). Empty by default;
/// without the feature it can hold nothing and [`Bugs::has`] is `false`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs(u16);

impl Bugs {
    pub const NONE: Bugs = Bugs(0);

    #[inline(always)]
    pub const fn has(self, bug: Bug) -> bool {
        cfg!(feature = "chaos-bugs") && self.0 & bug.bit() != 0
    }

    /// The set with `bug` too.
    #[cfg(feature = "chaos-bugs")]
    pub const fn with(self, bug: Bug) -> Bugs {
        Bugs(self.0 | bug.bit())
    }

    /// The bugs the registry has on now.
    #[inline(always)]
    pub fn current() -> Bugs {
        #[cfg(feature = "chaos-bugs")]
        return Bugs(registry::ON.load(std::sync::atomic::Ordering::Relaxed));
        #[cfg(not(feature = "chaos-bugs"))]
        Bugs::NONE
    }

    /// The bugs in the set, in [`Bug::ALL`] order.
    pub fn list(self) -> Vec<Bug> {
        Bug::ALL.into_iter().filter(|&b| self.has(b)).collect()
    }

    /// Parses `name,name` (blanks around names and empty names are ignored).
    #[cfg(feature = "chaos-bugs")]
    pub fn parse(list: &str) -> Result<Bugs, String> {
        let mut set = Bugs::NONE;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let bug = Bug::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
                format!("no planted bug named {name:?} (known: {})", known.join(", "))
            })?;
            set = set.with(bug);
        }
        Ok(set)
    }
}

/// Whether `bug` is planted and switched on. A `const false` without the feature.
#[cfg(not(feature = "chaos-bugs"))]
#[inline(always)]
pub const fn on(_bug: Bug) -> bool {
    false
}

/// Whether `bug` is planted and switched on.
#[cfg(feature = "chaos-bugs")]
#[inline(always)]
pub fn on(bug: Bug) -> bool {
    Bugs::current().has(bug)
}

/// Switches `bug` on or off for the whole process.
#[cfg(feature = "chaos-bugs")]
pub fn set(bug: Bug, on: bool) {
    use std::sync::atomic::Ordering;
    if on {
        registry::ON.fetch_or(bug.bit(), Ordering::Relaxed);
    } else {
        registry::ON.fetch_and(!bug.bit(), Ordering::Relaxed);
    }
}

#[cfg(feature = "chaos-bugs")]
mod registry {
    use std::sync::atomic::AtomicU16;

    /// The process's switches, one bit per [`super::Bug`].
    pub(super) static ON: AtomicU16 = AtomicU16::new(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default() {
        assert!(Bug::ALL.into_iter().all(|b| !Bugs::NONE.has(b)));
        assert!(Bugs::default().list().is_empty());
    }

    #[cfg(feature = "chaos-bugs")]
    #[test]
    fn names_parse_and_switches_toggle() {
        for b in Bug::ALL {
            assert_eq!(Bug::from_name(b.name()), Some(b));
        }
        let parsed = Bugs::parse(" ack-before-backups, late-isr-change,,").expect("known names");
        assert_eq!(parsed.list(), vec![Bug::AckBeforeBackups, Bug::LateIsrChange]);
        assert!(Bugs::parse("").expect("empty").list().is_empty());
        let e = Bugs::parse("ack-before-backups,nope").expect_err("unknown name");
        assert!(e.contains("\"nope\"") && e.contains("park-at-stopped-primary"), "{e}");

        // The only test touching the registry: tests run in parallel.
        assert!(!on(Bug::ReadWithoutLease));
        set(Bug::ReadWithoutLease, true);
        assert!(on(Bug::ReadWithoutLease) && Bugs::current().list() == vec![Bug::ReadWithoutLease]);
        set(Bug::ReadWithoutLease, false);
        assert!(!on(Bug::ReadWithoutLease) && Bugs::current() == Bugs::NONE);
    }
}
