//! What a link does to the traffic that crosses it, as plain values: [`Link`] (the knobs),
//! [`Schedule`] (seeded samples of delay and loss) and [`release_at`] (when a TCP chunk may
//! go, keeping order). No sockets, no clock: `now` is an argument.

use std::time::{Duration, Instant};

use tandem_testkit::Rng;

/// A link's behaviour. `Link::default()` is a clean link (no delay, no loss).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// Added to every chunk (TCP) or datagram (UDP), in each direction.
    pub delay: Duration,
    /// A uniform extra delay in `[0, jitter]` on top of `delay`, drawn per chunk or datagram.
    pub jitter: Duration,
    /// Datagrams (UDP only) dropped, in percent (0..=100); TCP never loses bytes.
    pub udp_loss_percent: u8,
}

impl Link {
    /// Whether traffic crosses untouched (the proxy then forwards without a timer).
    pub fn is_clean(&self) -> bool {
        *self == Link::default()
    }
}

/// The seeded draws of one proxy: the same seed and the same sequence of calls give the same
/// delays and losses (which packet gets which draw still depends on arrival order).
pub struct Schedule {
    rng: Rng,
}

impl Schedule {
    pub fn new(seed: u64) -> Schedule {
        Schedule { rng: Rng::new(seed) }
    }

    /// The delay of one chunk or datagram: `delay` plus a uniform draw in `[0, jitter]`.
    pub fn delay(&mut self, link: &Link) -> Duration {
        let jitter_ns = u64::try_from(link.jitter.as_nanos()).unwrap_or(u64::MAX);
        if jitter_ns == 0 {
            return link.delay;
        }
        link.delay + Duration::from_nanos(self.rng.below(jitter_ns.saturating_add(1).max(1)))
    }

    /// Whether one datagram is lost.
    pub fn lose(&mut self, link: &Link) -> bool {
        assert!(link.udp_loss_percent <= 100, "loss {}% is not a percentage", link.udp_loss_percent);
        link.udp_loss_percent > 0 && self.rng.below(100) < u64::from(link.udp_loss_percent)
    }
}

/// When a TCP chunk read at `now` with `delay` may be written: never before the chunk before
/// it (`previous`), so a stream stays in order even when a later chunk draws a shorter delay.
pub fn release_at(previous: Option<Instant>, now: Instant, delay: Duration) -> Instant {
    let at = now + delay;
    match previous {
        Some(p) if p > at => p,
        _ => at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_link_adds_nothing_and_loses_nothing() {
        let mut s = Schedule::new(1);
        let link = Link::default();
        assert!(link.is_clean());
        for _ in 0..100 {
            assert_eq!(s.delay(&link), Duration::ZERO);
            assert!(!s.lose(&link));
        }
    }

    #[test]
    fn delays_stay_within_delay_plus_jitter_and_replay_from_the_seed() {
        let link = Link { delay: Duration::from_millis(50), jitter: Duration::from_millis(20), udp_loss_percent: 30 };
        let draw = |seed| {
            let mut s = Schedule::new(seed);
            (0..1000).map(|_| (s.delay(&link), s.lose(&link))).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7), "same seed, same draws");
        assert_ne!(a, draw(8));
        for (d, _) in &a {
            assert!(*d >= link.delay && *d <= link.delay + link.jitter, "{d:?}");
        }
        let lost = a.iter().filter(|(_, l)| *l).count();
        assert!((200..400).contains(&lost), "30% of 1000 lost, roughly: {lost}");
        assert!(a.iter().any(|(d, _)| *d > link.delay + Duration::from_millis(10)));
    }

    #[test]
    fn all_loss_loses_everything() {
        let mut s = Schedule::new(3);
        let link = Link { udp_loss_percent: 100, ..Link::default() };
        assert!((0..100).all(|_| s.lose(&link)));
    }

    #[test]
    fn chunks_keep_their_order() {
        let t0 = Instant::now();
        let first = release_at(None, t0, Duration::from_millis(100));
        assert_eq!(first, t0 + Duration::from_millis(100));
        // A later chunk with a shorter delay waits for the earlier one.
        let second = release_at(Some(first), t0 + Duration::from_millis(10), Duration::from_millis(20));
        assert_eq!(second, first);
        let third = release_at(Some(second), t0 + Duration::from_millis(200), Duration::ZERO);
        assert_eq!(third, t0 + Duration::from_millis(200));
    }
}
