//! The delay proxy (being written).
