//! The power-loss FUSE layer (being written).
