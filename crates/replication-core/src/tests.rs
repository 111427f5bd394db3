//! Unit tests of the core's rules, one scenario each, through the public inputs and outputs.

use std::time::{Duration, Instant};

use tandem_types::chaos_bugs::Bugs;
use tandem_types::{Epoch, NodeId, Seq, VolumeId};

use crate::{chunks_of, Backup, MemberState, Output, Phase, Primary, PrimaryConfig, RecentLog, Refusal, CHUNK_BYTES};

fn cfg() -> PrimaryConfig {
    PrimaryConfig { ack_timeout: Duration::from_secs(1), bugs: Bugs::NONE }
}

fn drain(p: &mut Primary) -> Vec<Output> {
    std::iter::from_fn(|| p.poll_output()).collect()
}

/// A 3-replica volume whose primary (1) has reconciled with 2 and 3 (nothing recent).
fn serving() -> (Primary, Instant) {
    let now = Instant::now();
    let mut p = Primary::new(
        now,
        VolumeId(9),
        NodeId(1),
        Epoch(2),
        8 * CHUNK_BYTES,
        &[NodeId(1), NodeId(2), NodeId(3)],
        &[NodeId(1), NodeId(2), NodeId(3)],
        Some(vec![]),
        cfg(),
    );
    assert_eq!(
        drain(&mut p),
        vec![Output::Open { to: NodeId(2), start_seq: Seq(1) }, Output::Open { to: NodeId(3), start_seq: Seq(1) }]
    );
    p.on_opened(NodeId(2), Some(vec![]));
    p.on_opened(NodeId(3), Some(vec![]));
    let out = drain(&mut p);
    assert!(out.contains(&Output::Serving), "{out:?}");
    assert_eq!(p.phase(), Phase::Serving);
    (p, now)
}

#[test]
fn a_write_completes_only_when_every_isr_member_has_it() {
    let (mut p, now) = serving();
    p.on_write(now, 100, 0, 4096);
    assert_eq!(drain(&mut p), vec![Output::Write { token: 100, seq: Seq(1), to: vec![NodeId(2), NodeId(3)] }]);
    p.on_ack(NodeId(2), Seq(1));
    p.on_local_durable(Seq(1));
    assert!(drain(&mut p).is_empty());
    p.on_ack(NodeId(3), Seq(1));
    assert_eq!(drain(&mut p), vec![Output::Complete { token: 100 }]);
    assert_eq!(p.inflight(), 0);
}

#[test]
fn a_failed_backup_releases_writes_only_after_the_shrink_commits() {
    let (mut p, now) = serving();
    p.on_write(now, 1, 0, 4096);
    drain(&mut p);
    p.on_local_durable(Seq(1));
    p.on_ack(NodeId(2), Seq(1));
    p.on_tick(now + Duration::from_secs(2));
    assert_eq!(drain(&mut p), vec![Output::ProposeIsr { isr: vec![NodeId(1), NodeId(2)] }]);
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Leaving));
    // Nothing completes while the shrink is only proposed (I3).
    p.on_tick(now + Duration::from_secs(3));
    assert!(drain(&mut p).is_empty());
    p.on_isr_committed(&[NodeId(1), NodeId(2)]);
    assert_eq!(drain(&mut p), vec![Output::Complete { token: 1 }]);
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Out));
    // Later writes are not sent to 3, and its chunks are remembered as dirty.
    p.on_write(now, 2, 5 * CHUNK_BYTES, 10);
    assert_eq!(drain(&mut p), vec![Output::Write { token: 2, seq: Seq(2), to: vec![NodeId(2)] }]);
}

#[test]
fn resync_copies_only_dirty_chunks_and_then_rejoins() {
    let (mut p, now) = serving();
    p.on_member_failed(NodeId(3));
    drain(&mut p);
    p.on_isr_committed(&[NodeId(1), NodeId(2)]);
    p.on_write(now, 1, 2 * CHUNK_BYTES, 4096);
    p.on_write(now, 2, 6 * CHUNK_BYTES + 10, 4096);
    drain(&mut p);
    for s in [1, 2] {
        p.on_local_durable(Seq(s));
        p.on_ack(NodeId(2), Seq(s));
    }
    drain(&mut p);
    p.start_resync(NodeId(3));
    assert_eq!(drain(&mut p), vec![Output::Open { to: NodeId(3), start_seq: Seq(3) }]);
    p.on_opened(NodeId(3), None);
    let out = drain(&mut p);
    assert!(out.contains(&Output::Copy { to: NodeId(3), chunk: 2 }), "{out:?}");
    // A write to the chunk being copied waits; one elsewhere goes through, to 3 as well.
    p.on_write(now, 3, 2 * CHUNK_BYTES, 512);
    p.on_write(now, 4, 0, 512);
    assert_eq!(drain(&mut p), vec![Output::Write { token: 4, seq: Seq(3), to: vec![NodeId(2), NodeId(3)] }]);
    p.on_copied(NodeId(3), 2);
    let out = drain(&mut p);
    assert!(out.contains(&Output::Write { token: 3, seq: Seq(4), to: vec![NodeId(2), NodeId(3)] }), "{out:?}");
    assert!(out.contains(&Output::Copy { to: NodeId(3), chunk: 6 }), "{out:?}");
    p.on_copied(NodeId(3), 6);
    let out = drain(&mut p);
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Joining), "nothing left to copy: new writes wait for 3");
    assert!(
        !out.iter().any(|o| matches!(o, Output::ProposeIsr { .. })),
        "no grow while writes sent to 3 are unacknowledged: {out:?}"
    );
    // A new write gates on 3 now: it completes only with 3's ack.
    p.on_write(now, 5, 0, 512);
    assert_eq!(drain(&mut p), vec![Output::Write { token: 5, seq: Seq(5), to: vec![NodeId(2), NodeId(3)] }]);
    p.on_local_durable(Seq(5));
    p.on_ack(NodeId(2), Seq(5));
    assert!(!drain(&mut p).contains(&Output::Complete { token: 5 }), "write 5 waits for the joining member");
    for s in [3, 4] {
        p.on_local_durable(Seq(s));
        p.on_ack(NodeId(2), Seq(s));
        p.on_ack(NodeId(3), Seq(s));
    }
    let out = drain(&mut p);
    assert!(out.contains(&Output::ProposeIsr { isr: vec![NodeId(1), NodeId(2), NodeId(3)] }), "{out:?}");
    p.on_ack(NodeId(3), Seq(5));
    assert!(drain(&mut p).contains(&Output::Complete { token: 5 }));
    p.on_isr_committed(&[NodeId(1), NodeId(2), NodeId(3)]);
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::InSync));
}

#[test]
fn a_refusal_of_a_record_from_before_the_current_open_does_not_fail_the_member() {
    let (mut p, now) = serving();
    p.on_write(now, 1, 0, 4096);
    assert_eq!(drain(&mut p), vec![Output::Write { token: 1, seq: Seq(1), to: vec![NodeId(2), NodeId(3)] }]);
    // 3 stops answering and leaves; the shrink commits.
    p.on_member_failed(NodeId(3));
    drain(&mut p);
    p.on_isr_committed(&[NodeId(1), NodeId(2)]);
    p.on_local_durable(Seq(1));
    p.on_ack(NodeId(2), Seq(1));
    drain(&mut p);
    p.start_resync(NodeId(3));
    assert_eq!(drain(&mut p), vec![Output::Open { to: NodeId(3), start_seq: Seq(2) }]);
    p.on_opened(NodeId(3), None);
    drain(&mut p);
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Syncing));
    // The old record 1 reaches 3 after the Open and is refused: the new session goes on.
    p.on_member_refused(NodeId(3), Seq(1));
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Syncing));
    // A refusal within the new session does fail it.
    p.on_write(now, 2, 0, 4096);
    drain(&mut p);
    p.on_member_refused(NodeId(3), Seq(2));
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Out));
}

#[test]
fn a_new_primary_reconciles_the_union_of_recent_writes_before_serving() {
    let mut p = Primary::new(
        Instant::now(),
        VolumeId(9),
        NodeId(2),
        Epoch(3),
        8 * CHUNK_BYTES,
        &[NodeId(1), NodeId(2), NodeId(3)],
        &[NodeId(2), NodeId(3)],
        Some(vec![(0, 4096)]),
        cfg(),
    );
    assert_eq!(drain(&mut p), vec![Output::Open { to: NodeId(3), start_seq: Seq(1) }]);
    assert_eq!(p.member_state(NodeId(1)), Some(MemberState::Out));
    p.on_opened(NodeId(3), Some(vec![(3 * CHUNK_BYTES, 8192)]));
    let out = drain(&mut p);
    assert!(out.contains(&Output::Copy { to: NodeId(3), chunk: 0 }), "{out:?}");
    assert!(!out.contains(&Output::Serving));
    p.on_copied(NodeId(3), 0);
    let out = drain(&mut p);
    assert!(out.contains(&Output::Copy { to: NodeId(3), chunk: 3 }), "{out:?}");
    p.on_copied(NodeId(3), 3);
    let out = drain(&mut p);
    assert!(out.contains(&Output::Serving), "{out:?}");
}

#[test]
fn a_member_that_cannot_tell_what_it_wrote_is_compared_everywhere() {
    let mut p = Primary::new(
        Instant::now(),
        VolumeId(9),
        NodeId(2),
        Epoch(3),
        3 * CHUNK_BYTES,
        &[NodeId(2), NodeId(3)],
        &[NodeId(2), NodeId(3)],
        Some(vec![]),
        cfg(),
    );
    drain(&mut p);
    p.on_opened(NodeId(3), None);
    let mut copied = Vec::new();
    loop {
        let out = drain(&mut p);
        if out.contains(&Output::Serving) {
            break;
        }
        let Some(Output::Copy { chunk, .. }) = out.into_iter().find(|o| matches!(o, Output::Copy { .. })) else {
            panic!("reconciliation stalled")
        };
        copied.push(chunk);
        p.on_copied(NodeId(3), chunk);
    }
    assert_eq!(copied, vec![0, 1, 2]);
}

#[test]
fn a_refused_proposal_deposes_and_fails_what_is_in_flight() {
    let (mut p, now) = serving();
    p.on_write(now, 7, 0, 1);
    p.on_member_failed(NodeId(2));
    drain(&mut p);
    p.on_isr_refused("epoch 3 exists");
    assert_eq!(p.phase(), Phase::Deposed);
    let out = drain(&mut p);
    assert!(matches!(out.as_slice(), [Output::Fail { token: 7, .. }]), "{out:?}");
}

#[test]
fn backups_fence_older_epochs_and_foreign_primaries() {
    let mut b = Backup::default();
    b.on_epoch(Epoch(2));
    assert!(matches!(b.on_open(NodeId(1), Epoch(1), Seq(1)), Err(Refusal::StaleEpoch { .. })));
    b.on_open(NodeId(3), Epoch(2), Seq(5)).expect("opens");
    b.check(NodeId(3), Epoch(2), Some(Seq(5))).expect("in order");
    assert!(matches!(b.check(NodeId(3), Epoch(2), Some(Seq(5))), Err(Refusal::OutOfOrder { .. })));
    assert!(matches!(b.check(NodeId(1), Epoch(2), Some(Seq(6))), Err(Refusal::NoSession { .. })));
    b.on_epoch(Epoch(3));
    assert!(matches!(b.check(NodeId(3), Epoch(2), Some(Seq(6))), Err(Refusal::StaleEpoch { .. })));
}

#[test]
fn a_member_failing_during_reconciliation_leaves_only_through_a_committed_shrink() {
    let now = Instant::now();
    let mut p = Primary::new(
        now,
        VolumeId(9),
        NodeId(1),
        Epoch(2),
        8 * CHUNK_BYTES,
        &[NodeId(1), NodeId(2), NodeId(3)],
        &[NodeId(1), NodeId(2), NodeId(3)],
        Some(vec![]),
        cfg(),
    );
    drain(&mut p);
    // Reconciling members are not proposed out on a tick.
    p.on_tick(now + Duration::from_secs(5));
    assert!(drain(&mut p).is_empty());
    p.on_opened(NodeId(2), Some(vec![]));
    p.on_member_failed(NodeId(3));
    let out = drain(&mut p);
    assert!(out.contains(&Output::ProposeIsr { isr: vec![NodeId(1), NodeId(2)] }), "{out:?}");
    assert!(!out.contains(&Output::Serving), "{out:?}");
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Leaving));
    assert_eq!(p.phase(), Phase::Reconciling);
    p.on_isr_committed(&[NodeId(1), NodeId(2)]);
    assert!(drain(&mut p).contains(&Output::Serving));
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Out));
}

#[test]
fn a_reconciled_member_is_declared_level_only_when_reconciliation_finishes() {
    let now = Instant::now();
    let mut p = Primary::new(
        now,
        VolumeId(9),
        NodeId(1),
        Epoch(2),
        2 * CHUNK_BYTES,
        &[NodeId(1), NodeId(2), NodeId(3)],
        &[NodeId(1), NodeId(2), NodeId(3)],
        None,
        cfg(),
    );
    drain(&mut p);
    p.on_opened(NodeId(2), Some(vec![]));
    p.on_opened(NodeId(3), Some(vec![]));
    let out = drain(&mut p);
    assert!(out.contains(&Output::Copy { to: NodeId(2), chunk: 0 }), "{out:?}");
    // 3 fails: its removal is proposed. 2 receives every chunk meanwhile.
    p.on_member_failed(NodeId(3));
    assert!(drain(&mut p).contains(&Output::ProposeIsr { isr: vec![NodeId(1), NodeId(2)] }));
    p.on_copied(NodeId(2), 0);
    drain(&mut p);
    p.on_copied(NodeId(2), 1);
    let out = drain(&mut p);
    assert!(
        !out.iter().any(|o| matches!(o, Output::Progress { node: NodeId(2), total_chunks: 0, .. })),
        "2 is not declared level while 3, still in the committed ISR, may differ from it: {out:?}"
    );
    assert_eq!(p.member_state(NodeId(2)), Some(MemberState::Syncing));
    p.on_isr_committed(&[NodeId(1), NodeId(2)]);
    let out = drain(&mut p);
    let level = out.iter().position(|o| *o == Output::Progress { node: NodeId(2), done_chunks: 0, total_chunks: 0 });
    let serving = out.iter().position(|o| *o == Output::Serving);
    assert!(level.is_some() && serving.is_some() && level < serving, "{out:?}");
    assert_eq!(p.member_state(NodeId(2)), Some(MemberState::InSync));
}

#[test]
fn a_grow_waits_until_writes_sequenced_before_the_member_gated_writes_are_complete() {
    let (mut p, now) = serving();
    p.on_member_failed(NodeId(3));
    drain(&mut p);
    p.on_isr_committed(&[NodeId(1), NodeId(2)]);
    p.on_write(now, 1, 5 * CHUNK_BYTES, 4096);
    assert_eq!(drain(&mut p), vec![Output::Write { token: 1, seq: Seq(1), to: vec![NodeId(2)] }]);
    p.on_local_durable(Seq(1));
    p.on_ack(NodeId(2), Seq(1));
    drain(&mut p);
    p.start_resync(NodeId(3));
    p.on_opened(NodeId(3), Some(vec![]));
    assert!(drain(&mut p).contains(&Output::Copy { to: NodeId(3), chunk: 5 }));
    // Sent to 3 while it resyncs; 2 has not acknowledged it yet.
    p.on_write(now, 2, 6 * CHUNK_BYTES, 4096);
    assert_eq!(drain(&mut p), vec![Output::Write { token: 2, seq: Seq(2), to: vec![NodeId(2), NodeId(3)] }]);
    p.on_local_durable(Seq(2));
    p.on_ack(NodeId(3), Seq(2));
    p.on_copied(NodeId(3), 5);
    let out = drain(&mut p);
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Joining));
    assert!(
        !out.iter().any(|o| matches!(o, Output::ProposeIsr { .. })),
        "write 2 is not on 2 yet, and 3's log may have lost it: no grow: {out:?}"
    );
    p.on_ack(NodeId(2), Seq(2));
    let out = drain(&mut p);
    assert!(out.contains(&Output::ProposeIsr { isr: vec![NodeId(1), NodeId(2), NodeId(3)] }), "{out:?}");
}

#[test]
fn a_member_that_skipped_a_chunk_gets_it_when_the_member_copying_it_fails() {
    let mut p = Primary::new(
        Instant::now(),
        VolumeId(9),
        NodeId(1),
        Epoch(2),
        2 * CHUNK_BYTES,
        &[NodeId(1), NodeId(2), NodeId(3)],
        &[NodeId(1), NodeId(2), NodeId(3)],
        None,
        cfg(),
    );
    drain(&mut p);
    p.on_opened(NodeId(2), Some(vec![]));
    p.on_opened(NodeId(3), Some(vec![]));
    drain(&mut p);
    p.on_copied(NodeId(3), 0);
    assert!(drain(&mut p).contains(&Output::Copy { to: NodeId(3), chunk: 1 }));
    p.on_copied(NodeId(2), 0);
    let out = drain(&mut p);
    assert!(!out.iter().any(|o| matches!(o, Output::Copy { to: NodeId(2), .. })), "3 holds chunk 1: {out:?}");
    // 3 fails holding the chunk: nothing else (no write, no ack) will come to move 2 on.
    p.on_member_failed(NodeId(3));
    let out = drain(&mut p);
    assert!(out.contains(&Output::Copy { to: NodeId(2), chunk: 1 }), "{out:?}");
    p.on_copied(NodeId(2), 1);
    p.on_isr_committed(&[NodeId(1), NodeId(2)]);
    assert!(drain(&mut p).contains(&Output::Serving));
}

#[test]
fn a_joining_member_that_fails_before_its_grow_commits_stops_gating_writes() {
    let (mut p, now) = serving();
    p.on_member_failed(NodeId(3));
    drain(&mut p);
    p.on_isr_committed(&[NodeId(1), NodeId(2)]);
    p.start_resync(NodeId(3));
    p.on_opened(NodeId(3), Some(vec![]));
    assert!(drain(&mut p).contains(&Output::ProposeIsr { isr: vec![NodeId(1), NodeId(2), NodeId(3)] }));
    p.on_isr_unavailable();
    p.on_member_failed(NodeId(3));
    assert_eq!(p.member_state(NodeId(3)), Some(MemberState::Out));
    p.on_write(now, 1, 0, 4096);
    assert_eq!(drain(&mut p), vec![Output::Write { token: 1, seq: Seq(1), to: vec![NodeId(2)] }]);
    p.on_local_durable(Seq(1));
    p.on_ack(NodeId(2), Seq(1));
    assert_eq!(drain(&mut p), vec![Output::Complete { token: 1 }]);
}

#[test]
fn recent_log_keeps_entries_when_marked_complete_and_copies_never_push_out_silently() {
    let mut log = RecentLog::after_restart().with_entries_max(2);
    log.record(0, 4096);
    log.mark_complete();
    assert_eq!(log.ranges(), Some(vec![(0, 4096)]));
    log.record(8192, 4096);
    log.record(16384, 4096);
    assert_eq!(log.ranges(), Some(vec![(8192, 4096), (16384, 4096)]), "writes age out");
    log.record_copy(CHUNK_BYTES, CHUNK_BYTES);
    assert_eq!(log.ranges(), None, "a copy pushed out an entry");
    log.mark_complete();
    log.record_copy(2 * CHUNK_BYTES, CHUNK_BYTES);
    log.record(0, 1);
    assert_eq!(log.ranges(), None, "a copy entry was pushed out");
}

/// The pieces of host writes a copy applied: noted per (write, offset), never for a write
/// without an identity, bounded like the log, and forgotten when a primary opens the copy.
#[test]
fn recent_log_notes_applied_write_pieces_until_an_open() {
    let mut log = RecentLog::fresh().with_entries_max(2);
    log.note_applied(0, 0);
    assert!(!log.holds_write(0, 0), "a write without an identity is never taken as done");
    log.note_applied(7, 0);
    log.note_applied(7, 1 << 20);
    assert!(log.holds_write(7, 0) && log.holds_write(7, 1 << 20));
    assert!(!log.holds_write(7, 4096) && !log.holds_write(8, 0), "another piece or write");
    log.note_applied(7, 0);
    log.note_applied(9, 0);
    assert!(!log.holds_write(7, 0) && log.holds_write(7, 1 << 20) && log.holds_write(9, 0), "bounded, oldest out");
    let taken = log.applied_writes();
    log.forget_applied();
    assert!(!log.holds_write(9, 0), "forgotten at an open");
    assert_eq!(taken.len(), 2, "what a primary took at its start stays with it");
}

#[test]
fn chunk_ranges() {
    assert_eq!(chunks_of(0, 1), 0..1);
    assert_eq!(chunks_of(CHUNK_BYTES - 1, 2), 0..2);
    assert_eq!(chunks_of(CHUNK_BYTES, CHUNK_BYTES), 1..2);
    let mut log = RecentLog::fresh();
    log.record(100, 10);
    assert_eq!(log.ranges(), Some(vec![(0, 4096)]));
    assert_eq!(RecentLog::after_restart().ranges(), None);
}

/// Planted `accept-older-epoch` (chaos-bugs): the replica follows an older epoch's primary it
/// refuses without the bug.
#[cfg(feature = "chaos-bugs")]
#[test]
fn planted_accept_older_epoch_follows_an_older_primary() {
    use tandem_types::chaos_bugs::Bug;
    let mut b = Backup::default();
    b.on_epoch(Epoch(3));
    assert!(matches!(b.on_open(NodeId(1), Epoch(2), Seq(1)), Err(Refusal::StaleEpoch { .. })));
    b.set_bugs(Bugs::NONE.with(Bug::AcceptOlderEpoch));
    b.on_open(NodeId(1), Epoch(2), Seq(1)).expect("planted: an older epoch is followed");
    b.check(NodeId(1), Epoch(2), Some(Seq(1))).expect("planted: its records too");
    assert_eq!(b.known_epoch(), Epoch(3), "the newest epoch known stays");
}
