//! Any byte string given to the metadata RPC decoder (what a peer's control-channel request
//! payload becomes) yields a message or an error, never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_meta::network::MetaRpc;

fuzz_target!(|data: &[u8]| {
    let _ = tandem_wire::decode::<MetaRpc>(data);
    let _ = tandem_wire::decode::<tandem_meta::MetaCmd>(data);
});
