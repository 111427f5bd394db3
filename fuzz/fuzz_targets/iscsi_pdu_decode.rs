//! Any byte string given to the iSCSI decoders (the Basic Header Segment, a whole PDU with and
//! without digests, the key=value text of Login and Text PDUs, the login state machine fed a
//! stream of PDUs, and SCSI CDBs) yields a value or an error: never a panic, never a read past
//! the limits. What decodes re-encodes to a PDU that decodes to the same value.
#![no_main]

use std::num::NonZeroU16;
use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tandem_iscsi::{
    decode, parse_bhs, parse_text, DecodeLimits, Digests, Isid, LoginHooks, LoginMachine, NoAuthentication, Pdu,
    TargetConfig, TextAssembler, BHS_BYTES,
};

struct Hooks;

impl LoginHooks for Hooks {
    fn target_known(&self, target_name: &str) -> bool {
        target_name.len() % 2 == 0
    }
    fn initiator_allowed(&self, initiator_name: &str, _target_name: &str) -> bool {
        !initiator_name.is_empty()
    }
    fn allocate_tsih(&mut self, _initiator_name: &str, _isid: Isid) -> Option<NonZeroU16> {
        NonZeroU16::new(7)
    }
}

/// Decodes one PDU from the front of `data`; returns it and the bytes it used.
fn next_pdu(data: &[u8], limits: &DecodeLimits) -> Option<(Result<Pdu, tandem_iscsi::PduError>, usize)> {
    let bhs: [u8; BHS_BYTES] = data.get(..BHS_BYTES)?.try_into().ok()?;
    let info = match parse_bhs(&bhs, limits) {
        Ok(info) => info,
        Err(error) => return Some((Err(error), BHS_BYTES)),
    };
    assert!(info.data_segment_bytes <= limits.data_segment_bytes_max as usize);
    let rest = data.get(BHS_BYTES..BHS_BYTES + info.rest_bytes)?;
    Some((decode(&bhs, Bytes::copy_from_slice(rest), limits), BHS_BYTES + info.rest_bytes))
}

fuzz_target!(|data: &[u8]| {
    let digests = Digests { header: data.first().is_some_and(|b| b & 1 == 1), data: data.first().is_some_and(|b| b & 2 == 2) };
    for limits in [DecodeLimits::LOGIN, DecodeLimits { digests, data_segment_bytes_max: 262_144 }] {
        if let Some((Ok(pdu), _)) = next_pdu(data, &limits) {
            let mut wire = Vec::new();
            pdu.encode(limits.digests, &mut wire);
            let (again, used) = next_pdu(&wire, &limits).expect("an encoded PDU is whole");
            assert_eq!(used, wire.len());
            assert_eq!(again, Ok(pdu));
        }
    }

    let _ = parse_text(data);
    let mut assembler = TextAssembler::new();
    for chunk in data.chunks(97) {
        match assembler.push(chunk, chunk.len() == 97) {
            Ok(Some(text)) => assert!(text.len() <= tandem_iscsi::TEXT_BYTES_MAX),
            Ok(None) => {}
            Err(_) => break,
        }
    }

    // The login state machine, fed the bytes as a stream of PDUs.
    let mut machine = LoginMachine::new(Arc::new(TargetConfig::default()), NoAuthentication, 1);
    let mut rest = data.get(1..).unwrap_or_default();
    while let Some((pdu, used)) = next_pdu(rest, &DecodeLimits::LOGIN) {
        let response = match pdu {
            Ok(Pdu::LoginRequest(request)) => machine.on_request(&request, &mut Hooks),
            Ok(other) => machine.on_invalid_pdu(other.itt()),
            Err(_) => break,
        };
        let mut wire = Vec::new();
        Pdu::LoginResponse(response).encode(Digests::NONE, &mut wire);
        rest = &rest[used..];
    }

    let _ = tandem_scsi::cdb::decode(data);
});
