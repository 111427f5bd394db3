//! A logical unit: one volume as a thin-provisioned SCSI disk, seen through one target port.
//!
//! [`LogicalUnit::plan`] takes a CDB and the state of the I_T nexus it came on and decides, in
//! SAM-5's order: a pending unit attention first (but for INQUIRY, REPORT LUNS and REQUEST
//! SENSE), then the CDB's own validity, then the port's ALUA access state, then the command
//! against the medium's size and limits. The answer is either a [`Reply`] the transport sends
//! as it is (INQUIRY, MODE SENSE, READ CAPACITY, errors...) or an [`Io`] that the transport
//! carries out against the volume (receiving the data-out the `Io` asks for first), then turns
//! into a reply with [`LogicalUnit::finish`].
//!
//! Nothing here does I/O or keeps a clock; the state that changes (unit attentions, mode
//! parameters) lives in the caller's [`Nexus`].

use tandem_frontend::{IoError, TokenFault};

use crate::alua::{self, AccessState, PortGroup};
use crate::cdb::{self, ByteCheck, Command, Extent};
use crate::inquiry;
use crate::mode::{self, BlockDescriptor, ModeState, SenseRequest};
use crate::opcodes;
use crate::sense::{asc, Asc, Sense, SenseKey, Status};

/// What identifies the volume: the same on every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub vendor: [u8; 8],
    pub product: [u8; 16],
    pub revision: [u8; 4],
    /// The 60 bits of the NAA 3 designator (see [`inquiry::naa_locally_assigned`]).
    pub naa: u64,
    /// Unit serial number (VPD 0x80), printable ASCII.
    pub serial: String,
}

impl Identity {
    /// Tandem's vendor and product strings with the given volume identifiers.
    pub fn tandem(naa: u64, serial: String) -> Identity {
        Identity { vendor: *b"TANDEM  ", product: *b"VOLUME          ", revision: *b"0001", naa, serial }
    }
}

/// This port, as VPD 0x83 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Relative target port identifier (1 to 65535).
    pub relative_port: u16,
    /// The target port group the port belongs to.
    pub group: u16,
    /// The target port's iSCSI name ("iqn...,t,0x0001"); empty to leave the designator out.
    pub name: String,
}

/// Size of the medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
    /// log2 of logical blocks per physical block (READ CAPACITY(16) LBPPBE): 3 for 512-byte
    /// blocks on a 4 KiB store.
    pub physical_exponent: u8,
}

impl Default for Geometry {
    fn default() -> Geometry {
        Geometry { block_size: 512, blocks: 0, physical_exponent: 3 }
    }
}

/// What the block limits VPD page promises, and what the planner enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub transfer_blocks_max: u32,
    pub transfer_blocks_optimal: u32,
    pub transfer_granularity_blocks: u16,
    pub compare_and_write_blocks_max: u8,
    pub unmap_blocks_max: u32,
    pub unmap_descriptors_max: u32,
    pub unmap_granularity_blocks: u32,
    pub write_same_blocks_max: u64,
}

impl Default for Limits {
    /// For 512-byte blocks: 8 MiB per READ or WRITE (the transport streams it through bounded
    /// buffers), COMPARE AND WRITE of up to 255 blocks, UNMAP of up to 512 MiB (hosts expect
    /// at most 2^20 blocks) and WRITE SAME of up to 1 GiB per command (bounded work per
    /// command), 4 KiB granularity (the store's block).
    fn default() -> Limits {
        Limits {
            transfer_blocks_max: 16384,
            transfer_blocks_optimal: 2048,
            transfer_granularity_blocks: 8,
            compare_and_write_blocks_max: 255,
            unmap_blocks_max: 1 << 20,
            unmap_descriptors_max: 256,
            unmap_granularity_blocks: 8,
            write_same_blocks_max: 1 << 21,
        }
    }
}

/// Thin provisioning as the provisioning VPD page and READ CAPACITY(16) report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provisioning {
    pub thin: bool,
    /// LBPRZ: an unmapped block reads as zeroes.
    pub unmapped_reads_zero: bool,
}

/// Unit attention conditions, highest priority first (SPC-4 5.14: a host is told of a reset
/// before anything the reset may have changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnitAttention {
    PowerOnReset,
    ItNexusLoss,
    ReservationsPreempted,
    ReservationsReleased,
    RegistrationsPreempted,
    AsymmetricAccessStateChanged,
    CapacityChanged,
    ReportedLunsChanged,
}

impl UnitAttention {
    const ALL: [UnitAttention; 8] = [
        UnitAttention::PowerOnReset,
        UnitAttention::ItNexusLoss,
        UnitAttention::ReservationsPreempted,
        UnitAttention::ReservationsReleased,
        UnitAttention::RegistrationsPreempted,
        UnitAttention::AsymmetricAccessStateChanged,
        UnitAttention::CapacityChanged,
        UnitAttention::ReportedLunsChanged,
    ];

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    pub fn asc(self) -> Asc {
        match self {
            UnitAttention::PowerOnReset => asc::POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED,
            UnitAttention::ItNexusLoss => asc::I_T_NEXUS_LOSS_OCCURRED,
            UnitAttention::ReservationsPreempted => asc::RESERVATIONS_PREEMPTED,
            UnitAttention::ReservationsReleased => asc::RESERVATIONS_RELEASED,
            UnitAttention::RegistrationsPreempted => asc::REGISTRATIONS_PREEMPTED,
            UnitAttention::AsymmetricAccessStateChanged => asc::ASYMMETRIC_ACCESS_STATE_CHANGED,
            UnitAttention::CapacityChanged => asc::CAPACITY_DATA_HAS_CHANGED,
            UnitAttention::ReportedLunsChanged => asc::REPORTED_LUNS_DATA_HAS_CHANGED,
        }
    }
}

/// The state of one I_T nexus for one logical unit: its pending unit attentions and its mode
/// parameters. A set of flags, so it is bounded whatever happens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Nexus {
    pending: u16,
    pub mode: ModeState,
}

impl Nexus {
    pub fn raise(&mut self, ua: UnitAttention) {
        self.pending |= ua.bit();
    }

    pub fn clear(&mut self, ua: UnitAttention) {
        self.pending &= !ua.bit();
    }

    pub fn pending(&self) -> impl Iterator<Item = UnitAttention> + '_ {
        UnitAttention::ALL.into_iter().filter(|ua| self.pending & ua.bit() != 0)
    }

    /// Takes the highest-priority pending unit attention.
    pub fn take(&mut self) -> Option<UnitAttention> {
        let ua = self.pending().next()?;
        self.clear(ua);
        Some(ua)
    }
}

/// The port's ALUA view of this logical unit, from the host's path map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The state of the group this command came through.
    pub state: AccessState,
    /// Every group (one per node) with its state, for REPORT TARGET PORT GROUPS.
    pub groups: Vec<PortGroup>,
    /// Longest time a failover keeps a port `transitioning` (extended RTPG header).
    pub transition_time_s: u8,
}

/// An answer the transport sends as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    /// Data-in, already cut to the command's allocation length.
    pub data: Vec<u8>,
    pub sense: Option<Sense>,
    /// Whether the sense data goes in descriptor format (the nexus's D_SENSE).
    pub descriptor_sense: bool,
}

impl Reply {
    pub fn good() -> Reply {
        Reply { status: Status::Good, data: Vec::new(), sense: None, descriptor_sense: false }
    }

    pub fn data(mut data: Vec<u8>, allocation: u32) -> Reply {
        data.truncate(allocation as usize);
        Reply { data, ..Reply::good() }
    }

    pub fn check(sense: Sense, nexus: &Nexus) -> Reply {
        Reply {
            status: Status::CheckCondition,
            data: Vec::new(),
            sense: Some(sense),
            descriptor_sense: nexus.mode.descriptor_sense,
        }
    }

    pub fn status(status: Status) -> Reply {
        Reply { status, ..Reply::good() }
    }

    /// The sense data bytes to send with the status (empty without sense).
    pub fn sense_bytes(&self) -> Vec<u8> {
        self.sense.map(|s| s.to_bytes(self.descriptor_sense)).unwrap_or_default()
    }
}

/// Work against the volume. Offsets and lengths are in bytes and already checked against the
/// medium and the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Send `len` bytes from `offset` as data-in.
    Read { offset: u64, len: u64 },
    /// Receive `len` bytes of data-out and write them at `offset`; with `verify`, read them
    /// back and compare (WRITE AND VERIFY with BYTCHK).
    Write { offset: u64, len: u64, fua: bool, verify: bool },
    /// Receive one block (none with `ndob`) and write it over `len` bytes from `offset`. With
    /// `unmap` and a block of zeroes, the range may be deallocated instead.
    WriteSame { offset: u64, len: u64, unmap: bool, ndob: bool, block_bytes: u32 },
    /// Receive the UNMAP parameter list, then [`LogicalUnit::unmap_ranges`].
    Unmap { parameter_bytes: u32 },
    /// Receive `2 * len` bytes: the data to compare with what is at `offset`, then the data to
    /// write there if it matched. Atomic against every other write to the range.
    CompareAndWrite { offset: u64, len: u64, fua: bool },
    /// Receive `len` bytes of data-out and OR them into what is at `offset`, atomically against
    /// every other write to the range (ORWRITE; at most [`ORWRITE_BYTES_MAX`]).
    OrWrite { offset: u64, len: u64, fua: bool },
    /// Read `len` bytes from `offset` (the store checks its checksums), and compare them with
    /// the data-out: `len` bytes with [`ByteCheck::Compare`], one block repeated with
    /// [`ByteCheck::CompareOne`], nothing with [`ByteCheck::None`].
    Verify { offset: u64, len: u64, check: ByteCheck, block_bytes: u32 },
    /// Make every acknowledged write durable.
    Flush,
    /// Receive the parameter list, then [`LogicalUnit::mode_select`].
    ModeSelect { ten: bool, parameter_bytes: u32 },
    /// Read the volume's reservations and answer with [`crate::pr::read`] of `action`.
    PersistentReserveIn { action: u8, allocation: u32 },
    /// Receive the parameter list, make the command of [`crate::pr::command`] through this
    /// nexus, and answer with its outcome ([`crate::pr::refused`] when refused).
    PersistentReserveOut { action: u8, scope: u8, kind: u8, parameter_bytes: u32 },
    /// Receive the parameter list of EXTENDED COPY, POPULATE TOKEN or WRITE USING TOKEN
    /// (`action`), read it with [`crate::tpc`], carry the copy out, and record the operation
    /// under its list identifier for this nexus.
    CopyOut { action: u8, list_id: u32, parameter_bytes: u32 },
    /// Answer RECEIVE COPY RESULTS (COPY STATUS) or RECEIVE ROD TOKEN INFORMATION from the
    /// operations this nexus finished.
    CopyIn { action: u8, list_id: u32, allocation: u32 },
}

impl Io {
    /// Bytes of data-out the transport must receive before carrying the work out.
    pub fn data_out_bytes(&self) -> u64 {
        match *self {
            Io::Write { len, .. } => len,
            Io::WriteSame { ndob: true, .. } => 0,
            Io::WriteSame { block_bytes, .. } => u64::from(block_bytes),
            Io::Unmap { parameter_bytes }
            | Io::ModeSelect { parameter_bytes, .. }
            | Io::PersistentReserveOut { parameter_bytes, .. }
            | Io::CopyOut { parameter_bytes, .. } => u64::from(parameter_bytes),
            Io::CompareAndWrite { len, .. } => 2 * len,
            Io::OrWrite { len, .. } => len,
            Io::Verify { check: ByteCheck::Compare, len, .. } => len,
            Io::Verify { check: ByteCheck::CompareOne, block_bytes, .. } => u64::from(block_bytes),
            Io::Read { .. }
            | Io::Verify { check: ByteCheck::None, .. }
            | Io::Flush
            | Io::PersistentReserveIn { .. }
            | Io::CopyIn { .. } => 0,
        }
    }

    /// Bytes of data-in the work produces.
    pub fn data_in_bytes(&self) -> u64 {
        match *self {
            Io::Read { len, .. } => len,
            _ => 0,
        }
    }
}

/// What to do with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Reply(Reply),
    Io(Io),
}

/// One volume as a SCSI logical unit through one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalUnit {
    pub identity: Identity,
    pub port: Port,
    pub geometry: Geometry,
    pub limits: Limits,
    pub provisioning: Provisioning,
    pub read_only: bool,
}

/// Commands served whatever the port's access state (SPC-4 5.15.2.4.5 and .6: the unavailable
/// and transitioning states serve these, so a host can still find the other paths).
fn allowed_without_access(command: &Command) -> bool {
    matches!(
        command,
        Command::Inquiry { .. }
            | Command::ReportLuns { .. }
            | Command::ReportTargetPortGroups { .. }
            | Command::ReportSupportedOperationCodes { .. }
            | Command::RequestSense { .. }
    )
}

/// Sense for a port that cannot serve I/O in `state`.
fn access_sense(state: AccessState) -> Sense {
    match state {
        AccessState::Transitioning => Sense::not_ready(asc::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION),
        AccessState::Standby => Sense::not_ready(asc::NOT_READY_TARGET_PORT_IN_STANDBY_STATE),
        _ => Sense::not_ready(asc::NOT_READY_TARGET_PORT_IN_UNAVAILABLE_STATE),
    }
}

impl LogicalUnit {
    /// Decides what to do with `cdb` arriving on `nexus` through a port in `access`. `luns` is
    /// the target's LUN list (for REPORT LUNS).
    pub fn plan(&self, cdb: &[u8], nexus: &mut Nexus, access: &Access, luns: &[u64]) -> Plan {
        let opcode = cdb.first().copied().unwrap_or(0xFF);
        let exempt = matches!(opcode, cdb::op::INQUIRY | cdb::op::REPORT_LUNS | cdb::op::REQUEST_SENSE);
        if !exempt {
            if let Some(ua) = nexus.take() {
                return Plan::Reply(Reply::check(Sense::unit_attention(ua.asc()), nexus));
            }
        }
        let command = match cdb::decode(cdb) {
            Ok(command) => command,
            Err(sense) => return Plan::Reply(Reply::check(sense, nexus)),
        };
        if !access.state.serves_io() && !allowed_without_access(&command) {
            return Plan::Reply(Reply::check(access_sense(access.state), nexus));
        }
        match self.plan_command(command, nexus, access, luns) {
            Ok(plan) => plan,
            Err(sense) => Plan::Reply(Reply::check(sense, nexus)),
        }
    }

    fn plan_command(&self, command: Command, nexus: &mut Nexus, access: &Access, luns: &[u64]) -> Result<Plan, Sense> {
        let reply = |data: Vec<u8>, allocation: u32| Ok(Plan::Reply(Reply::data(data, allocation)));
        match command {
            Command::TestUnitReady | Command::StartStopUnit { .. } | Command::PreventAllowMediumRemoval { .. } => {
                Ok(Plan::Reply(Reply::good()))
            }
            Command::RequestSense { descriptor, allocation } => {
                // Sense of the last failure travels with its response (autosense); what is
                // left to report is a unit attention, or why this port cannot serve I/O.
                let sense = match nexus.take() {
                    Some(ua) => Sense::unit_attention(ua.asc()),
                    None if !access.state.serves_io() => access_sense(access.state),
                    None => Sense::new(SenseKey::NoSense, asc::NO_ADDITIONAL_SENSE),
                };
                reply(sense.to_bytes(descriptor), allocation)
            }
            Command::Inquiry { vpd: None, allocation } => reply(inquiry::standard(&self.identity), allocation),
            Command::Inquiry { vpd: Some(page), allocation } => {
                let data =
                    inquiry::vpd(page, &self.identity, &self.port, &self.geometry, &self.limits, &self.provisioning)
                        .ok_or(Sense::invalid_cdb_field(2, None))?;
                reply(data, allocation)
            }
            Command::ModeSense { ten, dbd, llbaa, control, page, subpage, allocation } => {
                let request = SenseRequest { ten, dbd, llbaa, control, page, subpage };
                let geometry = BlockDescriptor { blocks: self.geometry.blocks, block_size: self.geometry.block_size };
                reply(mode::sense(request, nexus.mode, self.read_only, geometry)?, allocation)
            }
            Command::PersistentReserveIn { action, allocation } => {
                Ok(Plan::Io(Io::PersistentReserveIn { action, allocation }))
            }
            Command::PersistentReserveOut { action, scope, kind, parameter_bytes } => {
                if parameter_bytes > crate::pr::PARAMETER_BYTES_MAX {
                    return Err(Sense::invalid_cdb_field(5, None));
                }
                Ok(Plan::Io(Io::PersistentReserveOut { action, scope, kind, parameter_bytes }))
            }
            Command::ModeSelect { ten, page_format, save, parameter_bytes } => {
                if save {
                    return Err(Sense::invalid_cdb_field(1, Some(0)));
                }
                if !page_format && parameter_bytes > 0 {
                    return Err(Sense::invalid_cdb_field(1, Some(4)));
                }
                Ok(Plan::Io(Io::ModeSelect { ten, parameter_bytes }))
            }
            Command::ReadCapacity10 { .. } => {
                let last = self.geometry.blocks.saturating_sub(1);
                let mut data = Vec::with_capacity(8);
                data.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
                data.extend_from_slice(&self.geometry.block_size.to_be_bytes());
                reply(data, 8)
            }
            Command::ReadCapacity16 { allocation } => reply(self.read_capacity_16(), allocation),
            Command::GetLbaStatus { lba, allocation } => {
                if lba >= self.geometry.blocks {
                    return Err(Sense::lba_out_of_range());
                }
                // Until extents are tracked (copy by reference), every block is reported
                // mapped: provisioning status 0 means "mapped or unknown".
                let blocks = u32::try_from(self.geometry.blocks - lba).unwrap_or(u32::MAX);
                let mut data = Vec::with_capacity(24);
                data.extend_from_slice(&20u32.to_be_bytes());
                data.extend_from_slice(&[0; 4]);
                data.extend_from_slice(&lba.to_be_bytes());
                data.extend_from_slice(&blocks.to_be_bytes());
                data.extend_from_slice(&[0; 4]);
                reply(data, allocation)
            }
            Command::Read { extent, .. } => {
                let (offset, len) = self.transfer(extent, cdb_length_byte(&command))?;
                Ok(Plan::Io(Io::Read { offset, len }))
            }
            Command::Write { extent, fua, .. } => {
                self.writable()?;
                let (offset, len) = self.transfer(extent, cdb_length_byte(&command))?;
                Ok(Plan::Io(Io::Write { offset, len, fua, verify: false }))
            }
            Command::WriteAndVerify { extent, check } => {
                self.writable()?;
                let (offset, len) = self.transfer(extent, cdb_length_byte(&command))?;
                Ok(Plan::Io(Io::Write { offset, len, fua: false, verify: check != ByteCheck::None }))
            }
            Command::Verify { extent, check } => {
                let (offset, len) = self.transfer(extent, cdb_length_byte(&command))?;
                Ok(Plan::Io(Io::Verify { offset, len, check, block_bytes: self.geometry.block_size }))
            }
            Command::PreFetch { extent, .. } => {
                self.range(extent)?;
                // Nothing to stage: every read goes to the store. SBC-3 answers GOOD when the
                // blocks cannot be (or need not be) held in a cache.
                Ok(Plan::Reply(Reply::good()))
            }
            Command::SynchronizeCache { extent, .. } => {
                self.range(extent)?;
                Ok(Plan::Io(Io::Flush))
            }
            Command::WriteSame { extent, unmap, anchor, ndob, ten } => {
                self.writable()?;
                let length_byte = if ten { 7 } else { 10 };
                if anchor || (unmap && !self.provisioning.thin) {
                    return Err(Sense::invalid_cdb_field(1, Some(if anchor { 4 } else { 3 })));
                }
                if extent.blocks == 0 || u64::from(extent.blocks) > self.limits.write_same_blocks_max {
                    return Err(Sense::invalid_cdb_field(length_byte, None));
                }
                self.range(extent)?;
                let bs = u64::from(self.geometry.block_size);
                Ok(Plan::Io(Io::WriteSame {
                    offset: extent.lba * bs,
                    len: u64::from(extent.blocks) * bs,
                    unmap,
                    ndob,
                    block_bytes: self.geometry.block_size,
                }))
            }
            Command::Unmap { anchor, parameter_bytes } => {
                self.writable()?;
                if anchor || !self.provisioning.thin {
                    return Err(Sense::invalid_cdb_field(1, Some(0)));
                }
                if parameter_bytes == 0 {
                    return Ok(Plan::Reply(Reply::good()));
                }
                if parameter_bytes < 8 {
                    return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
                }
                let bound = 8 + 16 * self.limits.unmap_descriptors_max;
                Ok(Plan::Io(Io::Unmap { parameter_bytes: parameter_bytes.min(bound) }))
            }
            Command::CompareAndWrite { lba, blocks, fua } => {
                self.writable()?;
                // SBC-4 lets a 0-block COMPARE AND WRITE do nothing; Linux's target refuses it,
                // and libiscsi's suite expects that (a 256-block request wraps to 0 in the
                // one-byte field). Nothing sends it for real: refused like Linux.
                if blocks == 0 || blocks > self.limits.compare_and_write_blocks_max {
                    return Err(Sense::invalid_cdb_field(13, None));
                }
                let extent = Extent { lba, blocks: u32::from(blocks) };
                self.range(extent)?;
                let bs = u64::from(self.geometry.block_size);
                Ok(Plan::Io(Io::CompareAndWrite { offset: lba * bs, len: u64::from(blocks) * bs, fua }))
            }
            Command::OrWrite { extent, fua } => {
                self.writable()?;
                self.range(extent)?;
                let bs = u64::from(self.geometry.block_size);
                if u64::from(extent.blocks) * bs > ORWRITE_BYTES_MAX {
                    return Err(Sense::invalid_cdb_field(10, None));
                }
                let (offset, len) = self.transfer(extent, 10)?;
                if len == 0 {
                    // SBC-4: no blocks is not an error.
                    return Ok(Plan::Reply(Reply::good()));
                }
                Ok(Plan::Io(Io::OrWrite { offset, len, fua }))
            }
            Command::ReadDefectData { twelve, lists, format, allocation } => {
                // A virtual disk has no defects: both lists, if asked for, are valid and empty.
                let flags = lists | format;
                let header = if twelve { vec![0, flags, 0, 0, 0, 0, 0, 0] } else { vec![0, flags, 0, 0] };
                reply(header, allocation)
            }
            Command::ReportLuns { select, allocation } => {
                if allocation < 16 {
                    return Err(Sense::invalid_cdb_field(6, None));
                }
                let listed: &[u64] = match select {
                    0x00 | 0x02 => luns,
                    0x01 => &[], // well-known logical units: none
                    _ => return Err(Sense::invalid_cdb_field(2, None)),
                };
                nexus.clear(UnitAttention::ReportedLunsChanged);
                reply(report_luns(listed), allocation)
            }
            Command::ReportSupportedOperationCodes { rctd, options, opcode, service_action, allocation } => {
                reply(opcodes::report(rctd, options, opcode, service_action)?, allocation)
            }
            Command::CopyOut { action, list_id, parameter_bytes } => {
                if action != crate::tpc::out_action::POPULATE_TOKEN {
                    // EXTENDED COPY may name other units as its destination, but a unit that
                    // cannot be written is not a copy manager for writes at all.
                    self.writable()?;
                }
                if parameter_bytes == 0 {
                    return Ok(Plan::Reply(Reply::good()));
                }
                if parameter_bytes > crate::tpc::PARAMETER_BYTES_MAX {
                    return Err(Sense::invalid_cdb_field(10, None));
                }
                Ok(Plan::Io(Io::CopyOut { action, list_id, parameter_bytes }))
            }
            Command::CopyIn { action: crate::tpc::in_action::OPERATING_PARAMETERS, allocation, .. } => {
                reply(crate::tpc::operating_parameters(self.geometry.block_size), allocation)
            }
            Command::CopyIn { action, list_id, allocation } => Ok(Plan::Io(Io::CopyIn { action, list_id, allocation })),
            Command::ReportTargetPortGroups { extended, allocation } => {
                reply(alua::report_target_port_groups(&access.groups, extended, access.transition_time_s), allocation)
            }
        }
    }

    fn writable(&self) -> Result<(), Sense> {
        if self.read_only {
            return Err(Sense::new(SenseKey::DataProtect, asc::WRITE_PROTECTED));
        }
        Ok(())
    }

    /// LBA OUT OF RANGE unless every block of `extent` is on the medium.
    fn range(&self, extent: Extent) -> Result<(), Sense> {
        match extent.lba.checked_add(u64::from(extent.blocks)) {
            Some(end) if end <= self.geometry.blocks => Ok(()),
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    /// The byte range of a READ, WRITE or VERIFY, within the medium and the transfer limit.
    fn transfer(&self, extent: Extent, length_byte: u16) -> Result<(u64, u64), Sense> {
        self.range(extent)?;
        if extent.blocks > self.limits.transfer_blocks_max {
            return Err(Sense::invalid_cdb_field(length_byte, None));
        }
        let bs = u64::from(self.geometry.block_size);
        Ok((extent.lba * bs, u64::from(extent.blocks) * bs))
    }

    fn read_capacity_16(&self) -> Vec<u8> {
        let mut b = vec![0u8; 32];
        b[0..8].copy_from_slice(&self.geometry.blocks.saturating_sub(1).to_be_bytes());
        b[8..12].copy_from_slice(&self.geometry.block_size.to_be_bytes());
        b[13] = self.geometry.physical_exponent & 0x0F;
        if self.provisioning.thin {
            b[14] |= 0x80; // LBPME
            if self.provisioning.unmapped_reads_zero {
                b[14] |= 0x40; // LBPRZ
            }
        }
        b
    }

    /// The byte ranges of an UNMAP parameter list (SBC-3 5.28.2), each checked against the
    /// medium, at most [`Limits::unmap_descriptors_max`] of them and
    /// [`Limits::unmap_blocks_max`] blocks in all.
    pub fn unmap_ranges(&self, data: &[u8]) -> Result<Vec<(u64, u64)>, Sense> {
        if data.len() < 8 {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let declared = usize::from(u16::from_be_bytes([data[2], data[3]]));
        if declared % 16 != 0 {
            return Err(Sense::invalid_parameter_field(2));
        }
        let available = (data.len() - 8) / 16 * 16;
        let count = declared.min(available) / 16;
        if count > self.limits.unmap_descriptors_max as usize {
            return Err(Sense::invalid_parameter_field(2));
        }
        let bs = u64::from(self.geometry.block_size);
        let mut ranges = Vec::with_capacity(count);
        let mut total: u64 = 0;
        for i in 0..count {
            let d = &data[8 + 16 * i..24 + 16 * i];
            let lba = cdb::be64(&d[0..8]);
            let blocks = cdb::be32(&d[8..12]);
            self.range(Extent { lba, blocks })?;
            total += u64::from(blocks);
            if total > u64::from(self.limits.unmap_blocks_max) {
                return Err(Sense::invalid_parameter_field((8 + 16 * i + 8) as u16));
            }
            if blocks > 0 {
                ranges.push((lba * bs, u64::from(blocks) * bs));
            }
        }
        Ok(ranges)
    }

    /// Applies a MODE SELECT parameter list to the nexus's mode parameters.
    pub fn mode_select(&self, ten: bool, data: &[u8], nexus: &mut Nexus) -> Result<(), Sense> {
        mode::select(ten, data, self.geometry.block_size, &mut nexus.mode)
    }

    /// The reply to work that ended with `result`.
    pub fn finish(&self, result: Result<(), Failure>, nexus: &Nexus) -> Reply {
        match result {
            Ok(()) => Reply::good(),
            Err(Failure::Sense(sense)) => Reply::check(sense, nexus),
            Err(Failure::Status(status)) => Reply::status(status),
        }
    }
}

/// How an [`Io`] failed: sense data, or a status without sense (RESERVATION CONFLICT, BUSY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Sense(Sense),
    Status(Status),
}

impl From<Sense> for Failure {
    fn from(sense: Sense) -> Failure {
        Failure::Sense(sense)
    }
}

/// Which way the data was going when a volume call failed: it picks the ASC of a medium error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// What a host is told when the volume fails a call. A volume going away on this node (lease
/// lost, node stopping) is NOT READY / ASYMMETRIC ACCESS STATE TRANSITION: multipath stacks
/// retry that on another path, which is what a failover needs, never an I/O error for the
/// application.
pub fn failure_for(error: &IoError, direction: Direction) -> Failure {
    match error {
        IoError::Io(_) => Failure::Sense(Sense::new(
            SenseKey::MediumError,
            match direction {
                Direction::Read => asc::UNRECOVERED_READ_ERROR,
                Direction::Write => asc::WRITE_ERROR,
            },
        )),
        IoError::Invalid(_) => Failure::Sense(Sense::illegal(asc::INVALID_FIELD_IN_CDB)),
        IoError::NoSpace(_) => {
            Failure::Sense(Sense::new(SenseKey::DataProtect, asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT))
        }
        IoError::NotPermitted(_) => Failure::Sense(Sense::new(SenseKey::DataProtect, asc::WRITE_PROTECTED)),
        IoError::ReservationConflict(_) => Failure::Status(Status::ReservationConflict),
        IoError::NotSupported(_) => Failure::Sense(Sense::illegal(asc::INVALID_FIELD_IN_CDB)),
        IoError::NoMemory(_) => Failure::Status(Status::Busy),
        IoError::Shutdown(_) => Failure::Sense(access_sense(AccessState::Transitioning)),
        IoError::Token(fault, _) => Failure::Sense(Sense::illegal(match fault {
            TokenFault::Corrupt => asc::INVALID_TOKEN_OPERATION_TOKEN_CORRUPT,
            TokenFault::Unknown => asc::INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN,
            TokenFault::TooShort => asc::INVALID_TOKEN_OPERATION_CAUSE_NOT_REPORTABLE,
        })),
        IoError::CopyTarget(_) => {
            Failure::Sense(Sense::new(SenseKey::CopyAborted, asc::COPY_TARGET_DEVICE_NOT_REACHABLE))
        }
    }
}

/// MISCOMPARE DURING VERIFY OPERATION with the offset of the first differing byte in the
/// data-out (SBC-3 5.2, 5.31), or `Ok` if `expected` and `actual` agree.
pub fn compare(expected: &[u8], actual: &[u8], data_out_offset: u64) -> Result<(), Sense> {
    match expected.iter().zip(actual).position(|(a, b)| a != b) {
        None if expected.len() == actual.len() => Ok(()),
        first => {
            let at = first.unwrap_or(expected.len().min(actual.len())) as u64;
            Err(Sense::new(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY_OPERATION)
                .with_information(data_out_offset + at))
        }
    }
}

/// Where a block command's transfer length sits in its CDB (for the field pointer).
fn cdb_length_byte(command: &Command) -> u16 {
    let len = match command {
        Command::Read { cdb_len, .. } | Command::Write { cdb_len, .. } => *cdb_len,
        _ => 0,
    };
    match len {
        6 => 4,
        10 => 7,
        12 => 6,
        _ => 10,
    }
}

/// REPORT LUNS parameter data (SPC-4 6.33).
pub fn report_luns(luns: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 8 * luns.len());
    out.extend_from_slice(&((8 * luns.len()) as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for &lun in luns {
        out.extend_from_slice(&encode_lun(lun));
    }
    out
}

/// The largest ORWRITE: the cluster runs one as a compare and write of what it read (retried
/// when another write came between), which is atomic up to this size.
pub const ORWRITE_BYTES_MAX: u64 = 1024 * 1024;

/// A LUN in SAM-5's single-level format: peripheral device addressing up to 255, flat space
/// addressing up to 16383.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        let lun = (lun & 0x3FFF) as u16;
        b[0] = 0x40 | (lun >> 8) as u8;
        b[1] = lun as u8;
    }
    b
}

/// The LUN a SCSI command addresses, or `None` for a format this target does not use.
pub fn decode_lun(b: [u8; 8]) -> Option<u64> {
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0b00 if b[0] & 0x3F == 0 => Some(u64::from(b[1])),
        0b01 => Some(u64::from(u16::from_be_bytes([b[0] & 0x3F, b[1]]))),
        _ => None,
    }
}

/// The answer for a LUN that does not exist (SPC-4 4.6.4): INQUIRY says "no device here"
/// (peripheral qualifier 011b, type 1Fh), REPORT LUNS and REQUEST SENSE work as for LUN 0, and
/// anything else is LOGICAL UNIT NOT SUPPORTED.
pub fn absent_lun(cdb: &[u8], luns: &[u64]) -> Reply {
    match cdb::decode(cdb) {
        Ok(Command::Inquiry { vpd: None, allocation }) => {
            let mut data = vec![0u8; 36];
            data[0] = 0x7F;
            data[2] = 0x06;
            data[3] = 0x02;
            data[4] = 31;
            Reply::data(data, allocation)
        }
        Ok(Command::ReportLuns { allocation, .. }) if allocation >= 16 => Reply::data(report_luns(luns), allocation),
        Ok(Command::RequestSense { descriptor, allocation }) => {
            let sense = Sense::illegal(asc::LOGICAL_UNIT_NOT_SUPPORTED);
            Reply::data(sense.to_bytes(descriptor), allocation)
        }
        _ => Reply::check(Sense::illegal(asc::LOGICAL_UNIT_NOT_SUPPORTED), &Nexus::default()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cdb::op;

    pub(crate) fn identity() -> Identity {
        Identity::tandem(0x0123_4567_89AB_CDEF, "tandem-vol-0001".to_string())
    }

    pub(crate) fn port(relative_port: u16, group: u16) -> Port {
        Port { relative_port, group, name: format!("iqn.2026-12.io.tandem:cluster,t,{relative_port:#06x}") }
    }

    fn lu() -> LogicalUnit {
        LogicalUnit {
            identity: identity(),
            port: port(1, 1),
            geometry: Geometry { block_size: 512, blocks: 1 << 21, physical_exponent: 3 },
            limits: Limits::default(),
            provisioning: Provisioning { thin: true, unmapped_reads_zero: false },
            read_only: false,
        }
    }

    fn optimized() -> Access {
        Access {
            state: AccessState::ActiveOptimized,
            groups: vec![
                PortGroup { id: 1, state: AccessState::ActiveOptimized, ports: vec![1] },
                PortGroup { id: 2, state: AccessState::ActiveNonOptimized, ports: vec![2] },
            ],
            transition_time_s: 10,
        }
    }

    fn sense_of(plan: Plan) -> Sense {
        match plan {
            Plan::Reply(Reply { status: Status::CheckCondition, sense: Some(sense), .. }) => sense,
            other => panic!("expected CHECK CONDITION, got {other:?}"),
        }
    }

    fn cdb16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = opcode;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    #[test]
    fn a_unit_attention_is_reported_once_and_not_to_inquiry() {
        let lu = lu();
        let mut nexus = Nexus::default();
        nexus.raise(UnitAttention::AsymmetricAccessStateChanged);
        nexus.raise(UnitAttention::PowerOnReset);
        let inquiry = lu.plan(&[op::INQUIRY, 0, 0, 0, 96, 0], &mut nexus, &optimized(), &[0]);
        assert!(matches!(inquiry, Plan::Reply(Reply { status: Status::Good, .. })));
        let tur = [op::TEST_UNIT_READY, 0, 0, 0, 0, 0];
        assert_eq!(
            sense_of(lu.plan(&tur, &mut nexus, &optimized(), &[0])).asc,
            asc::POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED
        );
        let second = sense_of(lu.plan(&tur, &mut nexus, &optimized(), &[0]));
        assert_eq!((second.key, second.asc), (SenseKey::UnitAttention, asc::ASYMMETRIC_ACCESS_STATE_CHANGED));
        assert_eq!(lu.plan(&tur, &mut nexus, &optimized(), &[0]), Plan::Reply(Reply::good()));
    }

    #[test]
    fn request_sense_returns_and_clears_a_unit_attention() {
        let lu = lu();
        let mut nexus = Nexus::default();
        nexus.raise(UnitAttention::CapacityChanged);
        let Plan::Reply(reply) = lu.plan(&[op::REQUEST_SENSE, 0, 0, 0, 252, 0], &mut nexus, &optimized(), &[0]) else {
            panic!("REQUEST SENSE is answered directly");
        };
        assert_eq!(Sense::decode(&reply.data).map(|s| s.asc), Some(asc::CAPACITY_DATA_HAS_CHANGED));
        assert_eq!(nexus.pending().count(), 0);
    }

    #[test]
    fn an_unavailable_port_refuses_io_but_answers_inquiry_and_rtpg() {
        let lu = lu();
        let mut nexus = Nexus::default();
        let access = Access { state: AccessState::Unavailable, ..optimized() };
        let read = cdb16(op::READ_16, 0, 8);
        let sense = sense_of(lu.plan(&read, &mut nexus, &access, &[0]));
        assert_eq!((sense.key, sense.asc), (SenseKey::NotReady, asc::NOT_READY_TARGET_PORT_IN_UNAVAILABLE_STATE));
        let transitioning = Access { state: AccessState::Transitioning, ..optimized() };
        let tur = [op::TEST_UNIT_READY, 0, 0, 0, 0, 0];
        assert_eq!(
            sense_of(lu.plan(&tur, &mut nexus, &transitioning, &[0])).asc,
            asc::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION
        );
        let rtpg = [op::MAINTENANCE_IN, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let Plan::Reply(reply) = lu.plan(&rtpg, &mut nexus, &access, &[0]) else { panic!() };
        assert_eq!(reply.status, Status::Good);
        let groups = alua::parse_report(&reply.data, false).unwrap();
        assert_eq!(groups.len(), 2);
        assert!(matches!(
            lu.plan(&[op::INQUIRY, 1, 0x83, 0, 255, 0], &mut nexus, &access, &[0]),
            Plan::Reply(Reply { status: Status::Good, .. })
        ));
    }

    #[test]
    fn reads_and_writes_become_byte_ranges_within_the_medium() {
        let lu = lu();
        let mut nexus = Nexus::default();
        let plan = lu.plan(&cdb16(op::WRITE_16, 8, 16), &mut nexus, &optimized(), &[0]);
        let io = Io::Write { offset: 4096, len: 8192, fua: false, verify: false };
        assert_eq!(plan, Plan::Io(io));
        assert_eq!(io.data_out_bytes(), 8192);
        let last = (1u64 << 21) - 1;
        assert_eq!(
            lu.plan(&cdb16(op::READ_16, last, 1), &mut nexus, &optimized(), &[0]),
            Plan::Io(Io::Read { offset: last * 512, len: 512 })
        );
        assert_eq!(
            sense_of(lu.plan(&cdb16(op::READ_16, last, 2), &mut nexus, &optimized(), &[0])).asc,
            asc::LBA_OUT_OF_RANGE
        );
        assert_eq!(
            sense_of(lu.plan(&cdb16(op::READ_16, u64::MAX, 2), &mut nexus, &optimized(), &[0])).asc,
            asc::LBA_OUT_OF_RANGE
        );
        let too_long = sense_of(lu.plan(&cdb16(op::READ_16, 0, 16385), &mut nexus, &optimized(), &[0]));
        assert_eq!((too_long.asc, too_long.field.map(|f| f.byte)), (asc::INVALID_FIELD_IN_CDB, Some(10)));
    }

    #[test]
    fn a_read_only_unit_refuses_every_write_kind() {
        let lu = LogicalUnit { read_only: true, ..lu() };
        let mut nexus = Nexus::default();
        for opcode in [op::WRITE_16, op::WRITE_SAME_16, op::COMPARE_AND_WRITE] {
            let mut cdb = cdb16(opcode, 0, 1);
            cdb[13] = 1;
            let sense = sense_of(lu.plan(&cdb, &mut nexus, &optimized(), &[0]));
            assert_eq!((sense.key, sense.asc), (SenseKey::DataProtect, asc::WRITE_PROTECTED), "opcode {opcode:#x}");
        }
    }

    #[test]
    fn write_same_needs_blocks_and_unmap_needs_thin_provisioning() {
        let lu = lu();
        let mut nexus = Nexus::default();
        assert_eq!(
            sense_of(lu.plan(&cdb16(op::WRITE_SAME_16, 0, 0), &mut nexus, &optimized(), &[0])).asc,
            asc::INVALID_FIELD_IN_CDB
        );
        let mut unmap = cdb16(op::WRITE_SAME_16, 0, 8);
        unmap[1] = 0x08;
        assert_eq!(
            lu.plan(&unmap, &mut nexus, &optimized(), &[0]),
            Plan::Io(Io::WriteSame { offset: 0, len: 4096, unmap: true, ndob: false, block_bytes: 512 })
        );
        let thick = LogicalUnit { provisioning: Provisioning::default(), ..lu };
        assert_eq!(sense_of(thick.plan(&unmap, &mut nexus, &optimized(), &[0])).asc, asc::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn unmap_parameter_list_is_checked_against_the_medium_and_the_limits() {
        let lu = lu();
        let mut data = vec![0, 22, 0, 16, 0, 0, 0, 0];
        data.extend_from_slice(&8u64.to_be_bytes());
        data.extend_from_slice(&8u32.to_be_bytes());
        data.extend_from_slice(&[0; 4]);
        assert_eq!(lu.unmap_ranges(&data), Ok(vec![(4096, 4096)]));
        data[8..16].copy_from_slice(&(1u64 << 21).to_be_bytes());
        assert_eq!(lu.unmap_ranges(&data).unwrap_err().asc, asc::LBA_OUT_OF_RANGE);
        assert_eq!(lu.unmap_ranges(&data[..7]).unwrap_err().asc, asc::PARAMETER_LIST_LENGTH_ERROR);
        let mut odd = data.clone();
        odd[3] = 15;
        assert_eq!(lu.unmap_ranges(&odd).unwrap_err().asc, asc::INVALID_FIELD_IN_PARAMETER_LIST);
    }

    #[test]
    fn orwrite_is_bounded_and_zero_blocks_do_nothing() {
        let lu = lu();
        let mut nexus = Nexus::default();
        assert_eq!(
            lu.plan(&cdb16(op::ORWRITE_16, 8, 2), &mut nexus, &optimized(), &[0]),
            Plan::Io(Io::OrWrite { offset: 4096, len: 1024, fua: false })
        );
        assert_eq!(Io::OrWrite { offset: 0, len: 1024, fua: false }.data_out_bytes(), 1024);
        assert!(matches!(
            lu.plan(&cdb16(op::ORWRITE_16, 8, 0), &mut nexus, &optimized(), &[0]),
            Plan::Reply(Reply { status: Status::Good, .. })
        ));
        let last = (1u64 << 21) - 1;
        assert_eq!(
            sense_of(lu.plan(&cdb16(op::ORWRITE_16, last, 2), &mut nexus, &optimized(), &[0])).asc,
            asc::LBA_OUT_OF_RANGE
        );
        let blocks = (ORWRITE_BYTES_MAX / 512) as u32;
        assert!(matches!(lu.plan(&cdb16(op::ORWRITE_16, 0, blocks), &mut nexus, &optimized(), &[0]), Plan::Io(_)));
        let too_long = sense_of(lu.plan(&cdb16(op::ORWRITE_16, 0, blocks + 1), &mut nexus, &optimized(), &[0]));
        assert_eq!((too_long.asc, too_long.field.map(|f| f.byte)), (asc::INVALID_FIELD_IN_CDB, Some(10)));
        let mut protect = cdb16(op::ORWRITE_16, 0, 1);
        protect[1] = 0x20;
        assert_eq!(sense_of(lu.plan(&protect, &mut nexus, &optimized(), &[0])).asc, asc::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn defect_data_is_an_empty_list_in_the_format_asked_for() {
        let lu = lu();
        let mut nexus = Nexus::default();
        let ten = [op::READ_DEFECT_DATA_10, 0, 0x18 | 0x05, 0, 0, 0, 0, 0, 255, 0];
        let Plan::Reply(reply) = lu.plan(&ten, &mut nexus, &optimized(), &[0]) else { panic!() };
        assert_eq!(reply.data, vec![0, 0x1D, 0, 0]);
        let twelve = [op::READ_DEFECT_DATA_12, 0x08 | 0x04, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let Plan::Reply(reply) = lu.plan(&twelve, &mut nexus, &optimized(), &[0]) else { panic!() };
        assert_eq!(reply.data, vec![0, 0x0C, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn compare_reports_the_first_differing_byte() {
        assert_eq!(compare(b"abcd", b"abcd", 0), Ok(()));
        let sense = compare(b"abcd", b"abXd", 0).unwrap_err();
        assert_eq!(
            (sense.key, sense.asc, sense.information),
            (SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY_OPERATION, Some(2))
        );
        assert_eq!(compare(b"ab", b"abc", 512).unwrap_err().information, Some(514));
    }

    #[test]
    fn read_capacity_reports_the_last_lba_and_thin_provisioning() {
        let lu = lu();
        let mut nexus = Nexus::default();
        let mut rc16 = [0u8; 16];
        rc16[0] = op::SERVICE_ACTION_IN_16;
        rc16[1] = 0x10;
        rc16[13] = 32;
        let Plan::Reply(reply) = lu.plan(&rc16, &mut nexus, &optimized(), &[0]) else { panic!() };
        assert_eq!(&reply.data[0..8], &((1u64 << 21) - 1).to_be_bytes());
        assert_eq!(&reply.data[8..12], &512u32.to_be_bytes());
        assert_eq!(reply.data[13], 3);
        assert_eq!(reply.data[14] & 0xC0, 0x80);
        let Plan::Reply(reply) =
            lu.plan(&[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut nexus, &optimized(), &[0])
        else {
            panic!()
        };
        assert_eq!(reply.data, [0x00, 0x1F, 0xFF, 0xFF, 0, 0, 2, 0]);
    }

    #[test]
    fn report_luns_needs_sixteen_bytes_and_lists_the_luns() {
        let lu = lu();
        let mut nexus = Nexus::default();
        let mut cdb = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0];
        assert_eq!(sense_of(lu.plan(&cdb, &mut nexus, &optimized(), &[0])).asc, asc::INVALID_FIELD_IN_CDB);
        cdb[9] = 64;
        let Plan::Reply(reply) = lu.plan(&cdb, &mut nexus, &optimized(), &[0, 300]) else { panic!() };
        assert_eq!(reply.data, [0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn luns_round_trip_and_bad_formats_are_refused() {
        for lun in [0u64, 1, 255, 256, 16383] {
            assert_eq!(decode_lun(encode_lun(lun)), Some(lun));
        }
        assert_eq!(decode_lun([0x80, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode_lun([0, 1, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn an_absent_lun_answers_inquiry_with_no_device() {
        let reply = absent_lun(&[op::INQUIRY, 0, 0, 0, 36, 0], &[0]);
        assert_eq!(reply.data[0], 0x7F);
        let reply = absent_lun(&[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], &[0]);
        assert_eq!(reply.sense.map(|s| s.asc), Some(asc::LOGICAL_UNIT_NOT_SUPPORTED));
    }

    #[test]
    fn descriptor_sense_follows_the_nexus_mode() {
        let lu = lu();
        let mut nexus = Nexus::default();
        nexus.mode.descriptor_sense = true;
        let Plan::Reply(reply) = lu.plan(&cdb16(op::READ_16, 1 << 30, 1), &mut nexus, &optimized(), &[0]) else {
            panic!()
        };
        assert_eq!(reply.sense_bytes()[0], 0x72);
    }

    #[test]
    fn volume_errors_map_to_what_hosts_retry_or_report() {
        assert_eq!(
            failure_for(&IoError::ReservationConflict("x".into()), Direction::Write),
            Failure::Status(Status::ReservationConflict)
        );
        let Failure::Sense(sense) = failure_for(&IoError::Shutdown("lease".into()), Direction::Write) else { panic!() };
        assert_eq!((sense.key, sense.asc), (SenseKey::NotReady, asc::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION));
        let Failure::Sense(sense) = failure_for(&IoError::Io("disk".into()), Direction::Read) else { panic!() };
        assert_eq!(sense.asc, asc::UNRECOVERED_READ_ERROR);
    }

    proptest::proptest! {
        #[test]
        fn planning_arbitrary_cdbs_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20)) {
            let lu = lu();
            let mut nexus = Nexus::default();
            let _ = lu.plan(&bytes, &mut nexus, &optimized(), &[0]);
            let _ = lu.unmap_ranges(&bytes);
            let _ = absent_lun(&bytes, &[0]);
        }
    }
}
