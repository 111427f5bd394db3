//! libiscsi's conformance suite (`iscsi-test-cu`, Debian's libiscsi-bin) against the target
//! serving a memory volume: every SCSI and iSCSI family it has, with data loss allowed and a
//! second initiator name for the multi-initiator tests. Each test's verdict is parsed from the
//! suite's own output; the run fails on any failure that is not in [`KNOWN_FAILURES`] with its
//! reason, and on a family that passes nothing.
//!
//! Also CHAP against libiscsi's `iscsi-inq` and `iscsi-ls`: one-way and mutual, for normal and
//! discovery sessions, with right and wrong secrets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_frontend::{Budgets, CopyUnit, IoError, OpenError, Volume};
use tandem_iscsi::server::{serve, Lun, Targets};
use tandem_iscsi::{ChapCredentials, DiscoveryTarget, TargetConfig};
use tandem_reservations::{Access as IoAccess, Attention, Nexus, Op, Outcome, Refusal, Reservations};
use tandem_scsi::alua::{AccessState, PortGroup};
use tandem_scsi::lu::{Access, Geometry, Identity, Limits, LogicalUnit, Port, Provisioning};
use tandem_testkit::cunit::{self, Verdict};
use tandem_testkit::tools::require_tools;
use tokio::net::TcpListener;
use tokio::sync::watch;

const TARGET: &str = "iqn.2026-12.io.tandem:test:disk";
const SIZE_BYTES: u64 = 64 * 1024 * 1024;

/// Tests that fail against this target, each with the reason: both are defects of the tests
/// for a logical unit like this one, which the target answers as SBC-4 says.
const KNOWN_FAILURES: &[(&str, &str)] = &[
    (
        "GetLBAStatus.UnmapSingle",
        "with 8 logical blocks per physical block (the store's 4 KiB) the test asks GET LBA STATUS \
         for LBA i+1 and expects the first descriptor to start at i+8; SBC-4 5.7 has it start at \
         the requested LBA, as it does here",
    ),
    (
        "WriteSame16.Unmap",
        "its last step writes 65536 blocks in one WRITE(16) without reading the Block Limits \
         page's MAXIMUM TRANSFER LENGTH (16384); SBC-4 has such a command refused with \
         INVALID FIELD IN CDB, as it is here",
    ),
];

struct MemVolume {
    data: Mutex<Vec<u8>>,
    /// The persistent reservations, applied here at once (no cluster): the SCSI layer's half
    /// of PERSISTENT RESERVE IN and OUT against the pure state machine.
    reservations: Mutex<Reservations>,
}

/// The handle each session holds: the volume, and the session's I_T nexus.
#[derive(Clone)]
struct MemHandle(Arc<MemVolume>, Nexus, Arc<Mutex<u64>>);

impl MemHandle {
    fn range(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        offset as usize..offset as usize + len
    }

    /// What the primary checks in the cluster.
    fn check(&self, access: IoAccess, offset: u64, len: u64) -> Result<(), IoError> {
        let state = self.0.reservations.lock().unwrap();
        state.check(&self.1, access, offset, len).map_err(|c| IoError::ReservationConflict(c.reason))
    }
}

impl Volume for MemHandle {
    fn size_bytes(&self) -> u64 {
        SIZE_BYTES
    }

    fn multi_conn(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.check(IoAccess::Read, offset, buf.len() as u64)?;
        let data = self.0.data.lock().unwrap();
        buf.copy_from_slice(&data[self.range(offset, buf.len())]);
        Ok(())
    }

    async fn write(&self, offset: u64, bytes: Bytes, _fua: bool) -> Result<(), IoError> {
        self.check(IoAccess::Write, offset, bytes.len() as u64)?;
        let mut data = self.0.data.lock().unwrap();
        let range = self.range(offset, bytes.len());
        data[range].copy_from_slice(&bytes);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), IoError> {
        self.check(IoAccess::Write, offset, len)?;
        let mut data = self.0.data.lock().unwrap();
        let range = self.range(offset, len as usize);
        data[range].fill(0);
        Ok(())
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    fn nexus(&self) -> Option<Nexus> {
        Some(self.1.clone())
    }

    async fn reservations(&self) -> Result<Reservations, IoError> {
        Ok(self.0.reservations.lock().unwrap().clone())
    }

    async fn reserve(&self, op: Op) -> Result<Result<Outcome, Refusal>, IoError> {
        Ok(self.0.reservations.lock().unwrap().apply(&self.1, &op))
    }

    fn take_attentions(&self) -> Vec<Attention> {
        let state = self.0.reservations.lock().unwrap();
        let mut seen = self.2.lock().unwrap();
        let taken = state.attentions_for(&self.1, *seen).map(|a| a.attention).collect();
        *seen = state.attention_seq;
        taken
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        expected: Bytes,
        bytes: Bytes,
        _fua: bool,
    ) -> Result<Option<u64>, IoError> {
        self.check(IoAccess::Write, offset, bytes.len() as u64)?;
        let mut data = self.0.data.lock().unwrap();
        let range = self.range(offset, expected.len());
        if let Some(at) = data[range.clone()].iter().zip(expected.iter()).position(|(a, b)| a != b) {
            return Ok(Some(at as u64));
        }
        data[range].copy_from_slice(&bytes);
        Ok(None)
    }

    /// EXTENDED COPY within the one volume (the suite names no other): a byte copy, checked
    /// as a read of the source and a write of the destination.
    async fn copy_between(
        &self,
        source: CopyUnit,
        source_offset: u64,
        destination: CopyUnit,
        destination_offset: u64,
        len: u64,
    ) -> Result<(), IoError> {
        if source != CopyUnit::This || destination != CopyUnit::This {
            return Err(IoError::CopyTarget("one volume only".into()));
        }
        if source_offset.max(destination_offset).saturating_add(len) > SIZE_BYTES {
            return Err(IoError::Invalid("past the end".into()));
        }
        self.check(IoAccess::Read, source_offset, len)?;
        self.check(IoAccess::Write, destination_offset, len)?;
        let mut data = self.0.data.lock().unwrap();
        let from = self.range(source_offset, len as usize);
        data.copy_within(from, destination_offset as usize);
        Ok(())
    }
}

struct MemTargets {
    volume: Arc<MemVolume>,
    portal: SocketAddr,
    access: watch::Receiver<Access>,
    auth: Auth,
}

/// Who must log in with CHAP.
#[derive(Default)]
struct Auth {
    /// CHAP credentials by initiator name.
    chap: Vec<(&'static str, ChapCredentials)>,
    required: bool,
}

impl Targets for MemTargets {
    type Volume = MemHandle;

    fn discovery(&self, _initiator: &str) -> Vec<DiscoveryTarget> {
        vec![DiscoveryTarget { name: TARGET.into(), addresses: vec![format!("{},1", self.portal)] }]
    }

    fn exists(&self, target: &str) -> bool {
        target == TARGET
    }

    fn chap(&self, initiator: &str) -> Option<ChapCredentials> {
        self.auth.chap.iter().find(|(name, _)| *name == initiator).map(|(_, credentials)| credentials.clone())
    }

    fn chap_required(&self) -> bool {
        self.auth.required
    }

    async fn open(&self, target: &str, _initiator: &str, port: &str) -> Result<Lun<Self::Volume>, OpenError> {
        if target != TARGET {
            return Err(OpenError::NotFound(target.into()));
        }
        let geometry = Geometry { blocks: SIZE_BYTES / 512, ..Geometry::default() };
        let unit = LogicalUnit {
            identity: Identity::tandem(0x3000_0000_0000_0001, "tandem-test-disk".into()),
            port: Port { relative_port: 1, group: 1, name: format!("{TARGET},t,0x0001") },
            geometry,
            limits: Limits::default(),
            provisioning: Provisioning { thin: true, unmapped_reads_zero: true },
            read_only: false,
        };
        let seen = self.volume.reservations.lock().unwrap().attention_seq;
        let handle = MemHandle(Arc::clone(&self.volume), Nexus::new(port, 1), Arc::new(Mutex::new(seen)));
        Ok(Lun { volume: handle, unit, access: self.access.clone() })
    }
}

/// Starts the target on a free loopback port; it runs until the runtime is dropped.
fn start(runtime: &tokio::runtime::Runtime) -> SocketAddr {
    start_with(runtime, Auth::default())
}

fn start_with(runtime: &tokio::runtime::Runtime, auth: Auth) -> SocketAddr {
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let portal = listener.local_addr().unwrap();
        let access = Access {
            state: AccessState::ActiveOptimized,
            groups: vec![PortGroup { id: 1, state: AccessState::ActiveOptimized, ports: vec![1] }],
            transition_time_s: 10,
        };
        let (_tx, rx) = watch::channel(access);
        std::mem::forget(_tx);
        let targets = Arc::new(MemTargets {
            volume: Arc::new(MemVolume {
                data: Mutex::new(vec![0; SIZE_BYTES as usize]),
                reservations: Mutex::default(),
            }),
            portal,
            access: rx,
            auth,
        });
        let config = Arc::new(TargetConfig { target_portal_group_tag: 1, ..TargetConfig::default() });
        tokio::spawn(serve(
            listener,
            targets,
            config,
            Budgets::new(8 * 1024 * 1024),
            Default::default(),
            std::future::pending(),
        ));
        portal
    })
}

#[test]
fn iscsi_test_cu_passes_against_a_memory_volume() {
    require_tools(&["iscsi-test-cu"]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let portal = start(&runtime);
    let url = format!("iscsi://{portal}/{TARGET}/0");
    // TANDEM_ISCSI_TEST_CU=FAMILY[.SUITE[.TEST]] narrows the run when chasing one failure.
    let mut args = vec!["--dataloss".to_string(), "--verbose".into(), url.clone(), url.clone()];
    if let Ok(only) = std::env::var("TANDEM_ISCSI_TEST_CU") {
        args.push(format!("--test={only}"));
        args.push("-V".into());
    }
    let output = Command::new("iscsi-test-cu").args(&args).output().expect("iscsi-test-cu runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    // By name: the suite runs some tests in more than one family, with one verdict.
    let verdicts: BTreeMap<String, Verdict> = cunit::verdicts(&text).into_iter().collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for verdict in verdicts.values() {
        *counts.entry(verdict.as_str()).or_default() += 1;
    }
    println!("iscsi-test-cu: {counts:?} of {} tests", verdicts.len());
    let failed: Vec<&String> = verdicts.iter().filter(|(_, v)| **v == Verdict::Fail).map(|(name, _)| name).collect();
    for name in &failed {
        println!("FAIL {name}");
    }
    let whole = std::env::var_os("TANDEM_ISCSI_TEST_CU").is_none();
    assert!(!whole || verdicts.len() > 200, "the suite ran only {} tests:\n{text}", verdicts.len());
    let unexpected: Vec<&&String> =
        failed.iter().filter(|name| !KNOWN_FAILURES.iter().any(|(known, _)| *known == name.as_str())).collect();
    if !unexpected.is_empty() {
        std::fs::write(std::env::temp_dir().join("iscsi-test-cu.log"), &text).unwrap();
    }
    assert!(
        unexpected.is_empty(),
        "failed: {unexpected:?} (log in {})",
        std::env::temp_dir().join("iscsi-test-cu.log").display()
    );
}

/// A server waiting for connections stops when told to (a node's graceful shutdown waits for
/// it), and so does one with a session open.
#[tokio::test]
async fn the_server_stops_when_told_with_or_without_sessions() {
    for with_session in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let portal = listener.local_addr().unwrap();
        let access = Access { state: AccessState::ActiveOptimized, groups: Vec::new(), transition_time_s: 10 };
        let (_keep, rx) = watch::channel(access);
        let targets = Arc::new(MemTargets {
            volume: Arc::new(MemVolume {
                data: Mutex::new(vec![0; SIZE_BYTES as usize]),
                reservations: Mutex::default(),
            }),
            portal,
            access: rx,
            auth: Auth::default(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = Arc::new(TargetConfig::default());
        let server = tokio::spawn(serve(
            listener,
            targets,
            config,
            Budgets::new(8 * 1024 * 1024),
            Default::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        let _client = if with_session { Some(tokio::net::TcpStream::connect(portal).await.unwrap()) } else { None };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stop.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .unwrap_or_else(|_| panic!("the server did not stop (session open: {with_session})"))
            .unwrap();
    }
}

const CHAP_INITIATOR: &str = "iqn.2026-12.io.tandem:test:chap-host";
const OTHER_INITIATOR: &str = "iqn.2026-12.io.tandem:test:other-host";
const CHAP_USER: &str = "tandem-user";
const CHAP_SECRET: &str = "tandem-chap-secret";
const TARGET_USER: &str = "tandem-target";
const TARGET_SECRET: &str = "tandem-target-secret";
/// How long one libiscsi tool may take: a login and an INQUIRY, or a discovery.
const TOOL_TIMEOUT_MS: u64 = 30_000;

fn credentials(mutual: bool) -> ChapCredentials {
    ChapCredentials {
        user: CHAP_USER.into(),
        secret: CHAP_SECRET.into(),
        mutual: mutual.then(|| (TARGET_USER.into(), TARGET_SECRET.into())),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Runs a libiscsi tool as `initiator`, with the target credentials of mutual CHAP in the
/// environment when given (libiscsi's URL parser reads LIBISCSI_CHAP_TARGET_USERNAME and
/// LIBISCSI_CHAP_TARGET_PASSWORD) and nothing of the caller's environment's CHAP. Whether it
/// succeeded, and its output.
fn libiscsi(tool: &str, initiator: &str, args: &[&str], target_credentials: Option<(&str, &str)>) -> (bool, String) {
    let mut command = Command::new(tool);
    command.arg("-i").arg(initiator).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for var in [
        "LIBISCSI_CHAP_USERNAME",
        "LIBISCSI_CHAP_PASSWORD",
        "LIBISCSI_CHAP_TARGET_USERNAME",
        "LIBISCSI_CHAP_TARGET_PASSWORD",
    ] {
        command.env_remove(var);
    }
    if let Some((user, password)) = target_credentials {
        command.env("LIBISCSI_CHAP_TARGET_USERNAME", user).env("LIBISCSI_CHAP_TARGET_PASSWORD", password);
    }
    let mut child = command.spawn().unwrap_or_else(|err| panic!("{tool} runs: {err}"));
    let deadline = Instant::now() + Duration::from_millis(TOOL_TIMEOUT_MS);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{tool} {args:?} still runs after {TOOL_TIMEOUT_MS} ms");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// `iscsi-inq` of LUN 0 through `url_credentials` (`USER%SECRET@` or nothing).
fn inquiry(portal: SocketAddr, initiator: &str, url_credentials: &str, target: Option<(&str, &str)>) -> (bool, String) {
    let url = format!("iscsi://{url_credentials}{portal}/{TARGET}/0");
    libiscsi("iscsi-inq", initiator, &[&url], target)
}

/// `iscsi-ls -s`: a discovery session, then a normal session to each target it reports.
fn discovery(portal: SocketAddr, initiator: &str, url_credentials: &str) -> (bool, String) {
    let url = format!("iscsi://{url_credentials}{portal}");
    libiscsi("iscsi-ls", initiator, &["-s", &url], None)
}

#[test]
fn libiscsi_logs_in_with_chap() {
    require_tools(&["iscsi-inq", "iscsi-ls"]);
    let runtime = runtime();
    let portal = start_with(&runtime, Auth { chap: vec![(CHAP_INITIATOR, credentials(false))], required: false });
    let right = format!("{CHAP_USER}%{CHAP_SECRET}@");

    let (ok, out) = inquiry(portal, CHAP_INITIATOR, &right, None);
    assert!(ok && out.contains("Vendor:TANDEM"), "CHAP with the right secret:\n{out}");
    let (ok, out) = discovery(portal, CHAP_INITIATOR, &right);
    assert!(ok && out.contains(TARGET) && out.contains("Lun:0"), "discovery with CHAP:\n{out}");

    let refusals = [
        ("a wrong secret", format!("{CHAP_USER}%tandem-chap-secreT@")),
        ("a wrong user", format!("someone-else%{CHAP_SECRET}@")),
        ("no credentials", String::new()),
    ];
    for (what, url_credentials) in &refusals {
        let (ok, out) = inquiry(portal, CHAP_INITIATOR, url_credentials, None);
        assert!(!ok, "a login with {what} succeeded:\n{out}");
        assert!(out.contains("Authentication failure"), "a login with {what}:\n{out}");
        let (ok, out) = discovery(portal, CHAP_INITIATOR, url_credentials);
        assert!(!ok && !out.contains(TARGET), "a discovery with {what} succeeded:\n{out}");
    }

    // CHAP is not required: an initiator without credentials logs in without.
    let (ok, out) = inquiry(portal, OTHER_INITIATOR, "", None);
    assert!(ok, "an initiator without credentials:\n{out}");
    let (ok, out) = discovery(portal, OTHER_INITIATOR, "");
    assert!(ok && out.contains(TARGET), "a discovery without credentials:\n{out}");
}

#[test]
fn libiscsi_logs_in_with_mutual_chap() {
    require_tools(&["iscsi-inq", "iscsi-ls"]);
    let runtime = runtime();
    let portal = start_with(&runtime, Auth { chap: vec![(CHAP_INITIATOR, credentials(true))], required: false });
    let right = format!("{CHAP_USER}%{CHAP_SECRET}@");

    let (ok, out) = inquiry(portal, CHAP_INITIATOR, &right, Some((TARGET_USER, TARGET_SECRET)));
    assert!(ok && out.contains("Vendor:TANDEM"), "mutual CHAP:\n{out}");
    // libiscsi also takes them from the URL.
    let url = format!("iscsi://{right}{portal}/{TARGET}/0?target_user={TARGET_USER}&target_password={TARGET_SECRET}");
    let (ok, out) = libiscsi("iscsi-inq", CHAP_INITIATOR, &[&url], None);
    assert!(ok, "mutual CHAP, target credentials in the URL:\n{out}");
    // Not asking the target to authenticate itself is the initiator's choice.
    let (ok, out) = inquiry(portal, CHAP_INITIATOR, &right, None);
    assert!(ok, "one-way CHAP with mutual credentials configured:\n{out}");

    // The initiator refuses a target that does not know the secret it expects.
    let (ok, out) = inquiry(portal, CHAP_INITIATOR, &right, Some((TARGET_USER, "tandem-target-secreT")));
    assert!(!ok && out.contains("Invalid CHAP_R"), "mutual CHAP with a wrong target secret:\n{out}");
    let (ok, out) = inquiry(portal, CHAP_INITIATOR, &right, Some(("someone-else", TARGET_SECRET)));
    assert!(!ok && out.contains("Wrong CHAP targetname"), "mutual CHAP with a wrong target user:\n{out}");
    // And the target answers nobody who has not proved who it is.
    let wrong = format!("{CHAP_USER}%tandem-chap-secreT@");
    let (ok, out) = inquiry(portal, CHAP_INITIATOR, &wrong, Some((TARGET_USER, TARGET_SECRET)));
    assert!(!ok && out.contains("Authentication failure"), "mutual CHAP with a wrong initiator secret:\n{out}");
}

#[test]
fn libiscsi_without_credentials_is_refused_when_chap_is_required() {
    require_tools(&["iscsi-inq", "iscsi-ls"]);
    let runtime = runtime();
    let portal = start_with(&runtime, Auth { chap: vec![(CHAP_INITIATOR, credentials(false))], required: true });
    for url_credentials in ["", "tandem-user%tandem-chap-secret@"] {
        let (ok, out) = inquiry(portal, OTHER_INITIATOR, url_credentials, None);
        assert!(!ok && out.contains("Authentication failure"), "{url_credentials:?}:\n{out}");
        let (ok, out) = discovery(portal, OTHER_INITIATOR, url_credentials);
        assert!(!ok && !out.contains(TARGET), "{url_credentials:?}:\n{out}");
    }
    let (ok, out) = inquiry(portal, CHAP_INITIATOR, &format!("{CHAP_USER}%{CHAP_SECRET}@"), None);
    assert!(ok, "{out}");
}
