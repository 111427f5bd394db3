//! Third-party copy through one session: POPULATE TOKEN, WRITE USING TOKEN and EXTENDED COPY
//! carried out by the volume (copy by reference on every replica), and the answers of RECEIVE
//! ROD TOKEN INFORMATION and RECEIVE COPY RESULTS from the operations this session (its I_T
//! nexus) finished. Each copy completes before its status is sent.

use std::time::Duration;

use bytes::Bytes;
use tandem_frontend::{IoError, TokenRequest, Volume};
use tandem_scsi::lu::{failure_for, Direction, Failure};
use tandem_scsi::sense::{asc, SenseKey};
use tandem_scsi::tpc::{self, in_action, out_action, OpStatus, Operation};
use tandem_scsi::{Reply, Sense};
use tracing::debug;

use super::{lock, Session};

/// Carries out a THIRD-PARTY COPY OUT command with its parameter list and answers it.
pub(super) async fn copy_out<V: Volume>(session: &Session<V>, action: u8, list_id: u32, params: &[u8]) -> Reply {
    let (record, result) = match action {
        out_action::POPULATE_TOKEN => populate_token(session, list_id, params).await,
        out_action::WRITE_USING_TOKEN => write_using_token(session, list_id, params).await,
        _ => extended_copy(session, params).await,
    };
    if let Err(failure) = &result {
        debug!(action, list_id, ?failure, "third-party copy failed");
    }
    if let Some(mut op) = record {
        if let Err(Failure::Sense(sense)) = &result {
            op.status = OpStatus::Failed;
            op.sense = Some(*sense);
        }
        lock(&session.lun.copies).finish(op);
    }
    let nexus = lock(&session.lun.nexus);
    session.lun.unit.finish(result, &nexus)
}

/// What a copy command leaves for RECEIVE ... to read (if anything), and how it ended.
type Outcome = (Option<Operation>, Result<(), Failure>);

fn operation(list_id: u32, action: u8, blocks: u64, segments: u16) -> Operation {
    Operation { list_id, action, status: OpStatus::Good, blocks, segments, sense: None, token: None }
}

async fn populate_token<V: Volume>(session: &Session<V>, list_id: u32, params: &[u8]) -> Outcome {
    let unit = &session.lun.unit;
    let block = u64::from(unit.geometry.block_size);
    let request = match tpc::populate_token(params, unit.geometry.blocks) {
        Ok(request) => request,
        Err(sense) => return (None, Err(sense.into())),
    };
    let limits = tpc::CopyLimits::for_geometry(&unit.geometry);
    if request.inactivity_timeout_s > limits.inactivity_max_s {
        return (None, Err(Sense::invalid_parameter_field(4).into()));
    }
    // A token's ranges are whole store blocks (VPD 0x8F's granularity): the descriptor that
    // is not is pointed at.
    let granularity = u64::from(limits.granularity_blocks);
    if let Some(i) =
        request.ranges.iter().position(|&(lba, n)| lba % granularity != 0 || u64::from(n) % granularity != 0)
    {
        return (None, Err(Sense::invalid_parameter_field(16 + 16 * i as u16).into()));
    }
    let ranges: Vec<(u64, u64)> = request.ranges.iter().map(|&(lba, n)| (lba * block, u64::from(n) * block)).collect();
    let blocks: u64 = request.ranges.iter().map(|&(_, n)| u64::from(n)).sum();
    let mut op = operation(list_id, out_action::POPULATE_TOKEN, 0, ranges.len() as u16);
    let idle = (request.inactivity_timeout_s > 0).then(|| Duration::from_secs(u64::from(request.inactivity_timeout_s)));
    match session.lun.volume.populate_token(ranges, TokenRequest { idle }).await {
        Ok(token) => {
            op.blocks = blocks;
            op.token = Some(token.value);
            (Some(op), Ok(()))
        }
        Err(e) => (Some(op), Err(failure_for(&e, Direction::Read))),
    }
}

async fn write_using_token<V: Volume>(session: &Session<V>, list_id: u32, params: &[u8]) -> Outcome {
    let unit = &session.lun.unit;
    let block = u64::from(unit.geometry.block_size);
    let request = match tpc::write_using_token(params, unit.geometry.blocks) {
        Ok(request) => request,
        Err(sense) => return (None, Err(sense.into())),
    };
    let ranges: Vec<(u64, u64)> = request.ranges.iter().map(|&(lba, n)| (lba * block, u64::from(n) * block)).collect();
    let mut op = operation(list_id, out_action::WRITE_USING_TOKEN, 0, ranges.len() as u16);
    let volume = &session.lun.volume;
    let written = if request.rod_type() == tpc::ROD_TYPE_BLOCK_ZERO {
        // The block device zero token: every range reads as zeroes afterwards.
        let mut done = 0;
        let mut result = Ok(0);
        for (offset, len) in ranges {
            if let Err(e) = volume.write_zeroes(offset, len, false).await {
                result = Err((done, e));
                break;
            }
            done += len;
        }
        result.map(|_| done)
    } else {
        let Some(offset) = request.offset_blocks.checked_mul(block) else {
            return (Some(op), Err(Sense::invalid_parameter_field(8).into()));
        };
        volume.write_using_token(Bytes::from(request.token), offset, ranges).await
    };
    match written {
        Ok(bytes) => {
            op.blocks = bytes / block;
            (Some(op), Ok(()))
        }
        Err((bytes, e)) => {
            op.blocks = bytes / block;
            (Some(op), Err(failure_for(&e, Direction::Write)))
        }
    }
}

async fn extended_copy<V: Volume>(session: &Session<V>, params: &[u8]) -> Outcome {
    let unit = &session.lun.unit;
    let request = match tpc::extended_copy(params, unit.identity.naa, unit.geometry.block_size) {
        Ok(request) => request,
        Err(sense) => return (None, Err(sense.into())),
    };
    let medium = unit.geometry.blocks * u64::from(unit.geometry.block_size);
    // Every segment on this unit is checked before any is copied.
    for s in &request.segments {
        for (unit_of, offset) in [(s.source, s.source_offset), (s.destination, s.destination_offset)] {
            if unit_of == tandem_frontend::CopyUnit::This && offset.checked_add(s.len).is_none_or(|end| end > medium) {
                return (None, Err(Sense::new(SenseKey::CopyAborted, asc::NO_ADDITIONAL_SENSE).into()));
            }
        }
    }
    let mut op = operation(u32::from(request.list_id), out_action::EXTENDED_COPY_LID1, 0, 0);
    let block = u64::from(unit.geometry.block_size);
    let mut result = Ok(());
    for s in &request.segments {
        if s.len == 0 {
            op.segments += 1;
            continue;
        }
        let copied = session
            .lun
            .volume
            .copy_between(s.source, s.source_offset, s.destination, s.destination_offset, s.len)
            .await;
        if let Err(e) = copied {
            result = Err(segment_failure(&e));
            break;
        }
        op.segments += 1;
        op.blocks += s.len / block;
    }
    (request.hold.then_some(op), result)
}

/// How a segment's failure is reported: COPY ABORTED for what concerns the copy's units (one
/// that cannot be reached, a range it does not have), the usual sense otherwise.
fn segment_failure(e: &IoError) -> Failure {
    match e {
        IoError::CopyTarget(_) => Sense::new(SenseKey::CopyAborted, asc::COPY_TARGET_DEVICE_NOT_REACHABLE).into(),
        IoError::Invalid(_) => Sense::new(SenseKey::CopyAborted, asc::NO_ADDITIONAL_SENSE).into(),
        other => failure_for(other, Direction::Write),
    }
}

/// Answers RECEIVE COPY RESULTS (COPY STATUS) or RECEIVE ROD TOKEN INFORMATION for `list_id`.
pub(super) fn copy_in<V: Volume>(session: &Session<V>, action: u8, list_id: u32, allocation: u32) -> Reply {
    let nexus = *lock(&session.lun.nexus);
    let ops = lock(&session.lun.copies);
    let Some(op) = ops.get(list_id) else {
        // No operation of that list identifier on this nexus (the field starts at byte 2).
        return Reply::check(Sense::invalid_cdb_field(2, None), &nexus);
    };
    let data = match action {
        in_action::COPY_STATUS => tpc::copy_status(op, session.lun.unit.geometry.block_size),
        _ => tpc::rod_token_information(op, nexus.mode.descriptor_sense),
    };
    Reply::data(data, allocation)
}
