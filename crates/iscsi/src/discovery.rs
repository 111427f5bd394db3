//! Text Requests of a discovery session, target side: `SendTargets` answered from a list the
//! caller supplies (RFC 7143 §13.3, appendix C), with long answers split over several Text
//! Responses (F=0, C=1 and a target transfer tag the initiator echoes to get the next piece)
//! and long requests joined from PDUs with the C bit. Sans-IO.
//!
//! Driver: for each Text Request of a discovery session in the Full Feature Phase, call
//! [`DiscoveryResponder::on_request`] with the current targets and the sequence numbers the
//! response must carry, and send what it returns (then advance StatSN); on error, send a
//! Reject with [`DiscoveryError::reject_reason`].
//!
//! It does not renegotiate operational keys in the Full Feature Phase: RFC 7143 keys other
//! than SendTargets are answered Reject, unknown keys NotUnderstood.

use bytes::Bytes;
use thiserror::Error;

use crate::login::{is_known_key, ISCSI_NAME_BYTES_MAX};
use crate::pdu::{reject_reason, TextRequest, TextResponse, RESERVED_TAG};
use crate::text::{encode_pair, parse_text, TextAssembler, TextError, NOT_UNDERSTOOD, REJECT, VALUE_BYTES_MAX};

/// Largest SendTargets answer kept for sending. Targets past it are left out whole, so that a
/// configuration with very many targets costs bounded memory per discovery connection.
pub const SEND_TARGETS_BYTES_MAX: usize = 1024 * 1024;

/// One target as SendTargets reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryTarget {
    /// Its iSCSI name (iqn./eui./naa. form), at most [`ISCSI_NAME_BYTES_MAX`] bytes.
    pub name: String,
    /// Its portals as `TargetAddress` values: `ip:port,tpgt` (IPv6 in brackets).
    pub addresses: Vec<String>,
}

/// StatSN, ExpCmdSN and MaxCmdSN for a response: the session's business, passed in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqNumbers {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Why a Text Request could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DiscoveryError {
    #[error("text request {itt:#x}: {source}")]
    Text { itt: u32, source: TextError },
    #[error("text request {itt:#x} has both F and C set")]
    FinalAndContinue { itt: u32 },
    #[error("text request {itt:#x} carries target transfer tag {ttt:#x}, which is not outstanding")]
    UnknownTtt { itt: u32, ttt: u32 },
    #[error("text request {itt:#x} asks for the rest of a response but carries data")]
    DataWithContinuation { itt: u32 },
}

impl DiscoveryError {
    /// The Reject reason to answer with (RFC 7143 §11.17.1).
    pub fn reject_reason(&self) -> u8 {
        match self {
            DiscoveryError::Text { .. } | DiscoveryError::UnknownTtt { .. } => reject_reason::INVALID_PDU_FIELD,
            DiscoveryError::FinalAndContinue { .. } | DiscoveryError::DataWithContinuation { .. } => {
                reject_reason::PROTOCOL_ERROR
            }
        }
    }
}

/// A response being sent in pieces.
#[derive(Debug)]
struct Pending {
    itt: u32,
    ttt: u32,
    rest: Bytes,
}

/// Answers the Text Requests of one discovery connection.
#[derive(Debug)]
pub struct DiscoveryResponder {
    /// The initiator's MaxRecvDataSegmentLength: the largest piece we may send.
    piece_bytes: usize,
    assembler: TextAssembler,
    /// (ITT, TTT) of a request text being received in pieces.
    partial: Option<(u32, u32)>,
    pending: Option<Pending>,
    next_ttt: u32,
}

impl DiscoveryResponder {
    /// `initiator_max_recv_data_segment_bytes` comes from the login's [`crate::SessionParams`].
    pub fn new(initiator_max_recv_data_segment_bytes: u32) -> Self {
        DiscoveryResponder {
            piece_bytes: (initiator_max_recv_data_segment_bytes as usize).max(1),
            assembler: TextAssembler::new(),
            partial: None,
            pending: None,
            next_ttt: 1,
        }
    }

    /// Handles one Text Request and returns the Text Response to send.
    pub fn on_request(
        &mut self,
        req: &TextRequest,
        targets: &[DiscoveryTarget],
        seq: SeqNumbers,
    ) -> Result<TextResponse, DiscoveryError> {
        let itt = req.itt;
        if req.is_final && req.continues {
            return Err(DiscoveryError::FinalAndContinue { itt });
        }
        if req.ttt == RESERVED_TAG {
            // A new exchange: RFC 7143 §11.10.4 lets the initiator abandon the previous one.
            self.pending = None;
            self.partial = None;
            self.assembler.reset();
        } else if self.pending.as_ref().is_some_and(|p| p.itt == itt && p.ttt == req.ttt) {
            if !req.data.is_empty() || req.continues {
                return Err(DiscoveryError::DataWithContinuation { itt });
            }
            return Ok(self.next_piece(seq));
        } else if self.partial != Some((itt, req.ttt)) {
            return Err(DiscoveryError::UnknownTtt { itt, ttt: req.ttt });
        }

        let text = match self.assembler.push(&req.data, req.continues) {
            Err(source) => {
                self.partial = None;
                return Err(DiscoveryError::Text { itt, source });
            }
            Ok(None) => {
                // Acknowledge a piece of the request: empty, not final, with a tag to echo.
                let ttt = match self.partial {
                    Some((_, ttt)) => ttt,
                    None => self.allocate_ttt(),
                };
                self.partial = Some((itt, ttt));
                return Ok(response(itt, false, false, ttt, Bytes::new(), seq));
            }
            Ok(Some(text)) => text,
        };
        self.partial = None;
        let pairs = parse_text(&text).map_err(|source| DiscoveryError::Text { itt, source })?;
        let mut answer = Vec::new();
        for pair in &pairs {
            match pair.key.as_str() {
                "SendTargets" => send_targets(&pair.value, targets, &mut answer),
                key if is_known_key(key) => encode_pair(&mut answer, key, REJECT),
                key => encode_pair(&mut answer, key, NOT_UNDERSTOOD),
            }
        }
        let answer = Bytes::from(answer);
        if answer.len() <= self.piece_bytes {
            return Ok(response(itt, true, false, RESERVED_TAG, answer, seq));
        }
        let ttt = self.allocate_ttt();
        self.pending = Some(Pending { itt, ttt, rest: answer });
        Ok(self.next_piece(seq))
    }

    fn next_piece(&mut self, seq: SeqNumbers) -> TextResponse {
        let Some(mut pending) = self.pending.take() else {
            return response(0, true, false, RESERVED_TAG, Bytes::new(), seq);
        };
        if pending.rest.len() <= self.piece_bytes {
            return response(pending.itt, true, false, RESERVED_TAG, pending.rest, seq);
        }
        let piece = pending.rest.split_to(self.piece_bytes);
        let (itt, ttt) = (pending.itt, pending.ttt);
        self.pending = Some(pending);
        response(itt, false, true, ttt, piece, seq)
    }

    /// A target transfer tag for the next multi-PDU exchange (never the reserved value).
    fn allocate_ttt(&mut self) -> u32 {
        let ttt = self.next_ttt;
        self.next_ttt = match self.next_ttt.wrapping_add(1) {
            RESERVED_TAG => 1,
            next => next,
        };
        ttt
    }
}

fn response(itt: u32, is_final: bool, continues: bool, ttt: u32, data: Bytes, seq: SeqNumbers) -> TextResponse {
    TextResponse {
        is_final,
        continues,
        lun: 0,
        itt,
        ttt,
        stat_sn: seq.stat_sn,
        exp_cmd_sn: seq.exp_cmd_sn,
        max_cmd_sn: seq.max_cmd_sn,
        data,
    }
}

/// `SendTargets=All` lists every target, `SendTargets=<name>` that target only, an empty
/// value nothing (it would mean "this session's target", and a discovery session has none).
/// Targets whose name or addresses cannot be encoded are skipped rather than sent malformed.
fn send_targets(value: &str, targets: &[DiscoveryTarget], out: &mut Vec<u8>) {
    let wanted = targets.iter().filter(|target| value == "All" || (!value.is_empty() && target.name == value));
    for target in wanted {
        let encodable = |s: &str| !s.is_empty() && !s.contains('\0');
        if !encodable(&target.name)
            || target.name.len() > ISCSI_NAME_BYTES_MAX
            || !target.addresses.iter().all(|a| encodable(a) && a.len() <= VALUE_BYTES_MAX)
        {
            continue;
        }
        let mut entry = Vec::new();
        encode_pair(&mut entry, "TargetName", &target.name);
        for address in &target.addresses {
            encode_pair(&mut entry, "TargetAddress", address);
        }
        if out.len() + entry.len() > SEND_TARGETS_BYTES_MAX {
            break;
        }
        out.extend_from_slice(&entry);
    }
}
