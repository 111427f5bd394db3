//! The identifiers: distinct types over `u64`, so a node id can never be passed where an epoch
//! or a volume id is expected. On the wire (bincode) and in JSON each is its bare number.

use std::fmt;
use std::str::FromStr;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The number behind the id.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// The id after this one, if there is one.
            pub const fn checked_next(self) -> Option<$name> {
                match self.0.checked_add(1) {
                    Some(v) => Some($name(v)),
                    None => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        /// Printed as the bare number, as logs and error messages always showed it.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<$name, Self::Err> {
                s.parse().map($name)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> $name {
                $name(v)
            }
        }

        impl From<$name> for u64 {
            fn from(v: $name) -> u64 {
                v.0
            }
        }
    };
}

id_type! {
    /// A node's identity in the cluster. Raft needs a plain integer id; `0` is never a valid node.
    NodeId
}

id_type! {
    /// A volume's identity, assigned by the metadata store when the volume is created and never
    /// reused. Names can be reused after a delete; ids cannot, so a late message about a deleted
    /// volume can never touch its successor.
    VolumeId
}

id_type! {
    /// A volume's configuration generation: it grows every time the volume's primary changes.
    /// Replicas reject replication messages from an older epoch, which fences a deposed primary.
    Epoch
}

id_type! {
    /// The position of a write in a volume's order of writes, assigned by the primary.
    Seq
}

impl Epoch {
    /// The epoch that follows this one.
    pub const fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl NodeId {
    /// The id after this one (a new node's id when ids are handed out in order).
    pub const fn next(self) -> NodeId {
        NodeId(self.0 + 1)
    }
}

impl Seq {
    /// The position after this one.
    pub const fn next(self) -> Seq {
        Seq(self.0 + 1)
    }

    /// The position before this one (`Seq(0)` stays `Seq(0)`: nothing comes before the start).
    pub const fn prev(self) -> Seq {
        Seq(self.0.saturating_sub(1))
    }
}

/// `seq + n`: the position `n` writes later.
impl std::ops::Add<u64> for Seq {
    type Output = Seq;
    fn add(self, n: u64) -> Seq {
        Seq(self.0 + n)
    }
}

/// `seq += n`: moves `n` writes on.
impl std::ops::AddAssign<u64> for Seq {
    fn add_assign(&mut self, n: u64) {
        self.0 += n;
    }
}

/// `later - earlier`: how many writes lie between two positions.
impl std::ops::Sub<Seq> for Seq {
    type Output = u64;
    fn sub(self, earlier: Seq) -> u64 {
        self.0 - earlier.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_parse_and_encode_as_their_number() {
        assert_eq!(NodeId(7).to_string(), "7");
        assert_eq!(format!("{:?}", Epoch(3)), "3");
        assert_eq!("42".parse::<VolumeId>(), Ok(VolumeId(42)));
        assert!("x".parse::<Seq>().is_err());
        assert_eq!(Seq(5) + 2, Seq(7));
        assert_eq!(Seq(7) - Seq(5), 2);
        assert_eq!(Seq(0).prev(), Seq(0));
        assert_eq!(Epoch(1).next(), Epoch(2));
    }
}
