//! Walk-throughs of SPC-4's rules; `tests/model.rs` checks random sequences against a model.
