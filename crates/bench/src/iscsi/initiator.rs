//! The load generator of `bench iscsi`: one iSCSI session over one TCP connection (the codec is
//! `tandem-iscsi`'s), driving a closed loop of READ(16)/WRITE(16) commands at a fixed queue depth
//! and timing each one. The same generator drives Tandem and the reference, so the ratio
//! compares the targets, not two clients.
//!
//! It negotiates what every target of the benchmark accepts: no digests, ImmediateData=Yes (a
//! write sends its first burst with the command), InitialR2T=Yes (the rest goes as R2Ts ask), and
//! it keeps within the CmdSN window the target opens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tandem_iscsi::text::encode_pair;
use tandem_iscsi::{
    decode, parse_bhs, parse_text, DataOut, DecodeLimits, Digests, Isid, LoginRequest, Pdu, ScsiCommand, Stage,
    TaskAttribute, BHS_BYTES,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

const INITIATOR: &str = "iqn.2026-12.io.tandem.bench:initiator";
/// What this side declares it receives in one PDU.
const RECV_SEGMENT_BYTES: u32 = 256 * 1024;
const BLOCK_BYTES: u64 = 512;
/// How long one command may take before the run counts as hung.
const COMMAND_WAIT: Duration = Duration::from_secs(30);

/// One job: what each command does, and how many are in flight.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    pub write: bool,
    pub random: bool,
    pub request_bytes: u64,
    pub depth: u32,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Measured {
    pub commands: u64,
    pub seconds: f64,
    /// Per-command latencies, in microseconds, sorted.
    pub latencies_us: Vec<u64>,
}

/// What the target agreed to at login.
struct Negotiated {
    /// The target's MaxRecvDataSegmentLength: the most data in one PDU we send.
    send_segment: usize,
    first_burst: usize,
    immediate_data: bool,
}

pub struct Session {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    lun: u64,
    cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    params: Negotiated,
    /// The target's LUN's size in bytes (READ CAPACITY 16).
    pub capacity: u64,
}

fn numeric(pairs: &[(String, String)], key: &str) -> Option<usize> {
    pairs.iter().rev().find(|(k, _)| k == key).and_then(|(_, v)| v.parse().ok())
}

fn flag(pairs: &[(String, String)], key: &str) -> Option<bool> {
    pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v == "Yes")
}

/// `a` comes at or after `b` in serial number arithmetic (RFC 1982, 32 bits).
fn serial_ge(a: u32, b: u32) -> bool {
    a.wrapping_sub(b) < 1 << 31
}

impl Session {
    /// Logs in to `target` at `portal` and reads the capacity of `lun`.
    pub async fn login(portal: SocketAddr, target: &str, lun: u64) -> anyhow::Result<Session> {
        let stream = TcpStream::connect(portal).await.with_context(|| format!("cannot connect to {portal}"))?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut s = Session {
            reader: BufReader::with_capacity(512 * 1024, r),
            writer: BufWriter::with_capacity(512 * 1024, w),
            lun: u64::from_be_bytes(tandem_scsi::lu::encode_lun(lun)),
            cmd_sn: 1,
            max_cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 1,
            params: Negotiated { send_segment: 8192, first_burst: 65536, immediate_data: true },
            capacity: 0,
        };
        let mut keys = Vec::new();
        let recv = RECV_SEGMENT_BYTES.to_string();
        for (key, value) in [
            ("InitiatorName", INITIATOR),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
            ("FirstBurstLength", "65536"),
            ("MaxBurstLength", "1048576"),
            ("MaxOutstandingR2T", "1"),
            ("MaxRecvDataSegmentLength", recv.as_str()),
        ] {
            encode_pair(&mut keys, key, value);
        }
        let mut data = Bytes::from(keys);
        let mut agreed: Vec<(String, String)> = Vec::new();
        let login_limits = DecodeLimits { digests: Digests::NONE, data_segment_bytes_max: RECV_SEGMENT_BYTES };
        for _ in 0..8 {
            let request = LoginRequest {
                next_stage: Some(Stage::FullFeaturePhase),
                continues: false,
                current_stage: Stage::LoginOperationalNegotiation,
                version_max: 0,
                version_min: 0,
                isid: Isid([0x80, 0, 0, 0x7a, 0x6e, 0x01]),
                tsih: 0,
                itt: 0,
                cid: 1,
                cmd_sn: s.cmd_sn,
                exp_stat_sn: s.exp_stat_sn,
                data: std::mem::take(&mut data),
            };
            s.send(&Pdu::LoginRequest(request)).await?;
            let Pdu::LoginResponse(response) = s.receive(&login_limits).await? else {
                bail!("{portal}: expected a Login Response")
            };
            if !response.status.is_success() {
                bail!("login to {target} at {portal} failed: {:?}", response.status);
            }
            s.exp_stat_sn = response.stat_sn.wrapping_add(1);
            s.max_cmd_sn = response.max_cmd_sn;
            let pairs = parse_text(&response.data).map_err(|e| anyhow!("{portal}: bad login text: {e}"))?;
            agreed.extend(pairs.iter().map(|p| (p.key.clone(), p.value.clone())));
            if response.next_stage == Some(Stage::FullFeaturePhase) {
                s.params = Negotiated {
                    send_segment: numeric(&agreed, "MaxRecvDataSegmentLength").unwrap_or(8192),
                    first_burst: numeric(&agreed, "FirstBurstLength").unwrap_or(65536),
                    immediate_data: flag(&agreed, "ImmediateData").unwrap_or(true),
                };
                // A new nexus usually starts with a unit attention (power on, reset): the
                // first commands may answer it instead.
                let mut tries = 0;
                s.capacity = loop {
                    match s.read_capacity().await {
                        Ok(capacity) => break capacity,
                        Err(e) if tries < 4 => {
                            tries += 1;
                            tracing::debug!(error = %e, "READ CAPACITY again");
                        }
                        Err(e) => return Err(e),
                    }
                };
                return Ok(s);
            }
            // The target offered keys of its own: take its values.
            let mut answer = Vec::new();
            for pair in &pairs {
                encode_pair(&mut answer, &pair.key, &pair.value);
            }
            data = Bytes::from(answer);
        }
        bail!("login to {target} at {portal} did not reach the full feature phase")
    }

    async fn send(&mut self, pdu: &Pdu) -> anyhow::Result<()> {
        let mut wire = Vec::new();
        pdu.encode(Digests::NONE, &mut wire);
        self.writer.write_all(&wire).await.context("send")?;
        Ok(())
    }

    async fn receive(&mut self, limits: &DecodeLimits) -> anyhow::Result<Pdu> {
        self.writer.flush().await.context("send")?;
        let mut bhs = [0u8; BHS_BYTES];
        self.reader.read_exact(&mut bhs).await.context("the target closed the connection")?;
        let info = parse_bhs(&bhs, limits).map_err(|e| anyhow!("bad PDU from the target: {e}"))?;
        let mut rest = vec![0u8; info.rest_bytes];
        self.reader.read_exact(&mut rest).await.context("the target closed the connection")?;
        decode(&bhs, Bytes::from(rest), limits).map_err(|e| anyhow!("bad PDU from the target: {e}"))
    }

    fn limits() -> DecodeLimits {
        DecodeLimits { digests: Digests::NONE, data_segment_bytes_max: RECV_SEGMENT_BYTES }
    }

    async fn read_capacity(&mut self) -> anyhow::Result<u64> {
        let mut cdb = vec![0u8; 16];
        cdb[0] = 0x9E;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let itt = self.start(cdb, 32, None).await?;
        let mut data = Vec::new();
        loop {
            match self.receive(&Self::limits()).await? {
                Pdu::DataIn(d) if d.itt == itt => {
                    data.extend_from_slice(&d.data);
                    self.max_cmd_sn = d.max_cmd_sn;
                    if let Some(status) = d.status {
                        self.exp_stat_sn = d.stat_sn.wrapping_add(1);
                        if status != 0 {
                            bail!("READ CAPACITY(16): status {status}");
                        }
                        break;
                    }
                }
                Pdu::ScsiResponse(r) if r.itt == itt => {
                    self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                    self.max_cmd_sn = r.max_cmd_sn;
                    if r.status != 0 {
                        bail!("READ CAPACITY(16): status {} (the LUN may be answering a unit attention)", r.status);
                    }
                    break;
                }
                Pdu::NopIn(_) => {}
                other => bail!("unexpected PDU during READ CAPACITY: {other:?}"),
            }
        }
        if data.len() < 12 {
            bail!("READ CAPACITY(16) returned {} bytes", data.len());
        }
        let last = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
        let block = u32::from_be_bytes(data[8..12].try_into().expect("4 bytes"));
        if u64::from(block) != BLOCK_BYTES {
            bail!("the LUN has {block}-byte blocks; the generator sends 512-byte ones");
        }
        Ok((last + 1) * BLOCK_BYTES)
    }

    /// Sends a command (with its immediate data, if it writes `write`); its ITT.
    async fn start(&mut self, cdb: Vec<u8>, read_bytes: u32, write: Option<&Bytes>) -> anyhow::Result<u32> {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1).max(1);
        let (len, immediate) = match write {
            Some(data) => {
                let n = if self.params.immediate_data {
                    data.len().min(self.params.first_burst).min(self.params.send_segment)
                } else {
                    0
                };
                (data.len() as u32, data.slice(..n))
            }
            None => (read_bytes, Bytes::new()),
        };
        let command = ScsiCommand {
            immediate: false,
            is_final: true,
            read: write.is_none() && read_bytes > 0,
            write: write.is_some(),
            attribute: TaskAttribute::Simple,
            lun: self.lun,
            itt,
            expected_data_transfer_length: len,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb,
            bidi_read_expected_data_transfer_length: None,
            data: immediate,
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&Pdu::ScsiCommand(command)).await?;
        Ok(itt)
    }

    /// Runs `pattern` for `runtime`, over the first `span` bytes of the LUN, from `seed`.
    pub async fn run(&mut self, pattern: Pattern, span: u64, runtime: Duration, seed: u64) -> anyhow::Result<Measured> {
        let blocks = (pattern.request_bytes / BLOCK_BYTES) as u32;
        let slots = span / pattern.request_bytes;
        if slots == 0 || span > self.capacity {
            bail!("a span of {span} bytes does not fit the LUN of {} bytes", self.capacity);
        }
        let payload = Bytes::from((0..pattern.request_bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let mut rng = seed | 1;
        let mut next_seq = 0u64;
        let mut next_offset = move || {
            let slot = if pattern.random {
                // xorshift64*
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % slots
            } else {
                let s = next_seq % slots;
                next_seq += 1;
                s
            };
            slot * pattern.request_bytes
        };
        let limits = Self::limits();
        let started = Instant::now();
        let end = started + runtime;
        let mut in_flight: HashMap<u32, Instant> = HashMap::new();
        let mut latencies = Vec::new();
        let mut stopping = false;
        loop {
            // Keep the queue full, within the CmdSN window.
            while !stopping && in_flight.len() < pattern.depth as usize && serial_ge(self.max_cmd_sn, self.cmd_sn) {
                let lba = next_offset() / BLOCK_BYTES;
                let mut cdb = vec![0u8; 16];
                cdb[0] = if pattern.write { 0x8A } else { 0x88 };
                cdb[2..10].copy_from_slice(&lba.to_be_bytes());
                cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
                let itt = if pattern.write {
                    self.start(cdb, 0, Some(&payload)).await?
                } else {
                    self.start(cdb, pattern.request_bytes as u32, None).await?
                };
                in_flight.insert(itt, Instant::now());
            }
            if in_flight.is_empty() {
                break;
            }
            let pdu = tokio::time::timeout(COMMAND_WAIT, self.receive(&limits))
                .await
                .map_err(|_| anyhow!("no answer from the target for {COMMAND_WAIT:?}"))??;
            let done = match pdu {
                Pdu::DataIn(d) => {
                    self.max_cmd_sn = d.max_cmd_sn;
                    match d.status {
                        Some(status) => {
                            self.exp_stat_sn = d.stat_sn.wrapping_add(1);
                            Some((d.itt, status))
                        }
                        None => None,
                    }
                }
                Pdu::ScsiResponse(r) => {
                    self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                    self.max_cmd_sn = r.max_cmd_sn;
                    Some((r.itt, r.status))
                }
                Pdu::R2t(r2t) => {
                    self.max_cmd_sn = r2t.max_cmd_sn;
                    let (mut at, end) =
                        (r2t.buffer_offset as usize, (r2t.buffer_offset + r2t.desired_data_transfer_length) as usize);
                    if end > payload.len() {
                        bail!("an R2T asks for bytes {at}..{end} of a {}-byte write", payload.len());
                    }
                    let mut data_sn = 0;
                    while at < end {
                        let n = (end - at).min(self.params.send_segment);
                        let out = DataOut {
                            is_final: at + n == end,
                            lun: self.lun,
                            itt: r2t.itt,
                            ttt: r2t.ttt,
                            exp_stat_sn: self.exp_stat_sn,
                            data_sn,
                            buffer_offset: at as u32,
                            data: payload.slice(at..at + n),
                        };
                        self.send(&Pdu::DataOut(out)).await?;
                        data_sn += 1;
                        at += n;
                    }
                    None
                }
                Pdu::NopIn(ping) => {
                    if ping.ttt != tandem_iscsi::RESERVED_TAG {
                        let pong = tandem_iscsi::NopOut {
                            immediate: true,
                            lun: 0,
                            itt: tandem_iscsi::RESERVED_TAG,
                            ttt: ping.ttt,
                            cmd_sn: self.cmd_sn,
                            exp_stat_sn: self.exp_stat_sn,
                            data: Bytes::new(),
                        };
                        self.send(&Pdu::NopOut(pong)).await?;
                    }
                    None
                }
                Pdu::AsyncMessage(_) => None,
                other => bail!("unexpected PDU from the target: {other:?}"),
            };
            if let Some((itt, status)) = done {
                let Some(sent) = in_flight.remove(&itt) else { bail!("an answer for a command not sent (ITT {itt})") };
                if status != 0 {
                    bail!("a {} failed with SCSI status {status}", if pattern.write { "write" } else { "read" });
                }
                latencies.push(sent.elapsed().as_micros() as u64);
                if Instant::now() >= end {
                    stopping = true;
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        latencies.sort_unstable();
        Ok(Measured { commands: latencies.len() as u64, seconds, latencies_us: latencies })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_window_wraps_around() {
        assert!(serial_ge(5, 5));
        assert!(serial_ge(6, 5));
        assert!(!serial_ge(4, 5));
        assert!(serial_ge(2, u32::MAX - 1));
        assert!(!serial_ge(u32::MAX - 1, 2));
    }
}
