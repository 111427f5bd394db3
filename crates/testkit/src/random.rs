//! Seeded pseudo-random data: every randomized test prints its seed, and the same seed replays
//! the same bytes and choices.

/// A small seeded generator (splitmix64): fast, and the same sequence for the same seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// `len` deterministic pseudo-random bytes of `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// The `len` bytes that write number `value` puts in block `block`: every write of a test's
/// history has its own content, and a read tells which write it returned.
pub fn block_version(block: u64, value: u64, len: usize) -> Vec<u8> {
    random_bytes(block.wrapping_mul(1_000_003) ^ value, len)
}

/// A seed for a randomized test: `$env_var` when set (to replay a run), else one from the
/// clock. It is printed, with how to replay it, before the test uses it.
pub fn seed(env_var: &str) -> u64 {
    let seed = std::env::var(env_var).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64 | 1
    });
    println!("seed {seed} (replay with {env_var}={seed})");
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_bytes_and_another_differs() {
        assert_eq!(random_bytes(7, 100), random_bytes(7, 100));
        assert_ne!(random_bytes(7, 100), random_bytes(8, 100));
        assert_eq!(random_bytes(7, 13).len(), 13);
        assert_eq!(&random_bytes(7, 100)[..13], &random_bytes(7, 13)[..]);
    }
}
