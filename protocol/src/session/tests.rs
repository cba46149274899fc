//! Both ends driven against each other in memory.

use super::agent::{AgentEvent, AgentHandshake, AgentLink};
use super::controller::{ControllerEvent, ControllerHandshake, ControllerLink};
use super::ProtocolError;
use crate::digest::{Digest, Geometry, IndexRootHasher, ZeroDigests};
use crate::encoding::Encoding;
use crate::message::{
    decode_stream, BaseRef, Committed, DiskEnd, DiskInfo, FailbackDone, FailbackReady,
    FailbackTarget, IndexChunk, Inventory, Message, Position, ReadyDisk, ReadyTarget,
    StartFailback, StartSync, SyncDisk, SyncReady, TargetDescription, TargetInfo,
};

fn connect() -> (AgentLink, ControllerLink) {
    let (hs, hello) = AgentHandshake::start("test-agent/1");
    let mut msgs = decode_stream(&hello).unwrap();
    let mut ctl = ControllerHandshake::new("test-controller/1")
        .on_message(msgs.remove(0), "agent-1")
        .unwrap();
    let mut welcome = decode_stream(&ctl.take_output()).unwrap();
    let mut agent = hs.on_message(welcome.remove(0)).unwrap();
    assert_eq!(agent.agent_id(), "agent-1");
    agent.send_inventory(&Inventory {
        disks: vec![DiskInfo {
            id: "disk0".into(),
            size: 10 * 4096,
            block_size: 4096,
        }],
        targets: vec![TargetInfo {
            id: "new-disk0".into(),
            size: 12 * 4096,
        }],
    });
    let ev = pump_to_controller(&mut agent, &mut ctl);
    assert!(matches!(ev[0], ControllerEvent::Inventory(_)));
    (agent, ctl)
}

fn pump_to_controller(agent: &mut AgentLink, ctl: &mut ControllerLink) -> Vec<ControllerEvent> {
    decode_stream(&agent.take_output())
        .unwrap()
        .into_iter()
        .filter_map(|m| ctl.handle(m).unwrap())
        .collect()
}

fn pump_to_agent(ctl: &mut ControllerLink, agent: &mut AgentLink) -> Vec<AgentEvent> {
    decode_stream(&ctl.take_output())
        .unwrap()
        .into_iter()
        .filter_map(|m| agent.handle(m).unwrap())
        .collect()
}

fn start(ctl: &mut ControllerLink, base: Option<BaseRef>, resume_from: u64) {
    let resume_from = Position::new(0, resume_from);
    ctl.start_sync(StartSync {
        session: 7,
        disks: vec![SyncDisk {
            id: "disk0".into(),
            point: 2,
            base,
            resume_from,
        }],
    })
    .unwrap();
}

#[test]
fn full_session_with_index_download() {
    let (mut agent, mut ctl) = connect();
    let g = Geometry::new(10 * 4096, 4096);
    let zeros = ZeroDigests::new(g.disk_size, g.block_size);
    let base_digests: Vec<Digest> = (0..g.block_count).map(|i| zeros.for_block(i)).collect();
    let mut h = IndexRootHasher::new();
    base_digests.iter().for_each(|d| h.push(d));
    let base = BaseRef {
        point: 1,
        disk_size: g.disk_size,
        block_size: g.block_size,
        root: h.finish(),
    };
    start(&mut ctl, Some(base), 0);
    let ev = pump_to_agent(&mut ctl, &mut agent);
    let AgentEvent::SyncRequested(req) = &ev[0] else {
        panic!("expected a sync request, got {ev:?}")
    };
    assert_eq!(req.disks[0].base, Some(base));

    agent
        .send_ready(SyncReady {
            session: 7,
            disks: vec![ReadyDisk {
                disk_size: g.disk_size,
                block_size: g.block_size,
                needs_index: true,
            }],
        })
        .unwrap();
    assert!(!agent.streaming());
    let ev = pump_to_controller(&mut agent, &mut ctl);
    assert!(matches!(ev[0], ControllerEvent::SyncReady(_)));

    // Blocks before the index is complete are refused by the agent end.
    let d = Digest::of(&[1u8; 4096]);
    assert!(agent
        .send_block(0, 3, Encoding::Raw, 4096, &d, &[1u8; 4096])
        .is_err());

    ctl.send_index_chunk(&IndexChunk {
        slot: 0,
        first_block: 0,
        digests: base_digests.clone(),
    })
    .unwrap();
    ctl.send_index_end(0).unwrap();
    let ev = pump_to_agent(&mut ctl, &mut agent);
    assert!(matches!(ev[0], AgentEvent::IndexChunk(_)));
    assert_eq!(ev[1], AgentEvent::IndexComplete { slot: 0 });
    assert!(agent.streaming());

    agent
        .send_block(0, 3, Encoding::Raw, 4096, &d, &[1u8; 4096])
        .unwrap();
    agent.send_checkpoint(0, 5).unwrap();
    // Out of order is refused locally.
    assert!(matches!(
        agent.send_block(0, 4, Encoding::Zero, 4096, &zeros.full_for_test(), &[]),
        Err(ProtocolError::BadBlock { .. })
    ));
    let ev = pump_to_controller(&mut agent, &mut ctl);
    assert!(matches!(&ev[0], ControllerEvent::Block(b) if b.block == 3 && b.payload.len() == 4096));
    assert_eq!(
        ev[1],
        ControllerEvent::Checkpoint {
            slot: 0,
            at: Position::new(0, 5)
        }
    );
    ctl.send_ack(0, Position::new(0, 5)).unwrap();
    assert_eq!(
        pump_to_agent(&mut ctl, &mut agent),
        vec![AgentEvent::Acked {
            slot: 0,
            at: Position::new(0, 5)
        }]
    );

    let root = Digest::of(b"root");
    agent
        .send_disk_end(DiskEnd {
            slot: 0,
            block_count: g.block_count,
            sent_blocks: 1,
            root,
            consistency: Default::default(),
        })
        .unwrap();
    let ev = pump_to_controller(&mut agent, &mut ctl);
    assert!(matches!(ev[0], ControllerEvent::DiskEnd(_)));
    ctl.send_committed(Committed {
        slot: 0,
        point: 2,
        root,
    })
    .unwrap();
    ctl.end_session();
    let ev = pump_to_agent(&mut ctl, &mut agent);
    assert!(matches!(ev[0], AgentEvent::Committed(_)));
    assert_eq!(ev[1], AgentEvent::SessionEnded { session: 7 });
    assert_eq!(agent.session(), None);
    assert_eq!(ctl.session(), None);
}

impl ZeroDigests {
    fn full_for_test(&self) -> Digest {
        self.for_block(0)
    }
}

#[test]
fn controller_refuses_out_of_order_and_out_of_range_blocks() {
    let (mut agent, mut ctl) = connect();
    start(&mut ctl, None, 4);
    pump_to_agent(&mut ctl, &mut agent);
    agent
        .send_ready(SyncReady {
            session: 7,
            disks: vec![ReadyDisk {
                disk_size: 10 * 4096,
                block_size: 4096,
                needs_index: false,
            }],
        })
        .unwrap();
    pump_to_controller(&mut agent, &mut ctl);
    // A forged block before the resume position.
    let forged = |block: u64, raw_len: u32| {
        Message::Block(crate::message::Block {
            slot: 0,
            block,
            encoding: Encoding::Zero,
            raw_len,
            digest: Digest::default(),
            payload: vec![],
        })
    };
    assert!(matches!(
        ctl.handle(forged(2, 4096)),
        Err(ProtocolError::BadBlock { .. })
    ));
    assert!(matches!(
        ctl.handle(forged(10, 4096)),
        Err(ProtocolError::BadBlock { .. })
    ));
    assert!(matches!(
        ctl.handle(forged(5, 100)),
        Err(ProtocolError::BadBlock { .. })
    ));
    assert!(ctl.handle(forged(5, 4096)).is_ok());
    assert!(matches!(
        ctl.handle(forged(5, 4096)),
        Err(ProtocolError::BadBlock { .. })
    ));
    // Wrong slot.
    assert!(matches!(
        ctl.handle(Message::Checkpoint {
            slot: 3,
            at: Position::new(0, 6)
        }),
        Err(ProtocolError::NoSuchSlot { .. })
    ));
}

#[test]
fn rounds_restart_the_block_order_and_order_positions() {
    let (mut agent, mut ctl) = connect();
    start(&mut ctl, None, 0);
    pump_to_agent(&mut ctl, &mut agent);
    agent
        .send_ready(SyncReady {
            session: 7,
            disks: vec![ReadyDisk {
                disk_size: 10 * 4096,
                block_size: 4096,
                needs_index: false,
            }],
        })
        .unwrap();
    let data = [7u8; 4096];
    let d = Digest::of(&data);
    agent
        .send_block(0, 8, Encoding::Raw, 4096, &d, &data)
        .unwrap();
    agent.send_checkpoint(0, 10).unwrap();
    assert_eq!(agent.send_round(0).unwrap(), 1);
    // A later round may go back to any block: it replaces earlier copies.
    agent
        .send_block(0, 2, Encoding::Raw, 4096, &d, &data)
        .unwrap();
    agent.send_checkpoint(0, 4).unwrap();
    assert_eq!(agent.position(0), Some(Position::new(1, 4)));
    let ev = pump_to_controller(&mut agent, &mut ctl);
    assert_eq!(ev.len(), 6, "{ev:?}");
    assert_eq!(ev[3], ControllerEvent::Round { slot: 0, round: 1 });
    assert_eq!(
        ev[5],
        ControllerEvent::Checkpoint {
            slot: 0,
            at: Position::new(1, 4)
        }
    );
    // An ack of round 0 is behind round 1's position; one past it is refused.
    ctl.send_ack(0, Position::new(0, 10)).unwrap();
    assert!(ctl.send_ack(0, Position::new(1, 5)).is_err());
    assert_eq!(
        pump_to_agent(&mut ctl, &mut agent),
        vec![AgentEvent::Acked {
            slot: 0,
            at: Position::new(0, 10)
        }]
    );
    // A round that skips one, or a checkpoint of an old round, is refused.
    assert!(ctl.handle(Message::Round { slot: 0, round: 3 }).is_err());
    let (mut agent, mut ctl) = connect();
    start(&mut ctl, None, 0);
    pump_to_agent(&mut ctl, &mut agent);
    agent
        .send_ready(SyncReady {
            session: 7,
            disks: vec![ReadyDisk {
                disk_size: 10 * 4096,
                block_size: 4096,
                needs_index: false,
            }],
        })
        .unwrap();
    pump_to_controller(&mut agent, &mut ctl);
    ctl.handle(Message::Round { slot: 0, round: 1 }).unwrap();
    assert!(matches!(
        ctl.handle(Message::Checkpoint {
            slot: 0,
            at: Position::new(0, 3)
        }),
        Err(ProtocolError::BadBlock { .. })
    ));
}

#[test]
fn version_mismatch_is_reported_both_ways() {
    let hello = Message::Hello(crate::message::Hello {
        min_version: 5,
        max_version: 9,
        software: "future".into(),
    });
    let Err((err, bytes)) = ControllerHandshake::new("c").on_message(hello, "a") else {
        panic!("a future-only agent must be refused")
    };
    assert!(matches!(err, ProtocolError::NoCommonVersion { .. }));
    let msg = decode_stream(&bytes).unwrap().remove(0);
    let (hs, _) = AgentHandshake::start("a");
    assert!(matches!(
        hs.on_message(msg),
        Err(ProtocolError::Peer { .. })
    ));
}

#[test]
fn start_sync_requires_inventory_and_known_disks() {
    let (hs, hello) = AgentHandshake::start("a");
    let _ = hs;
    let mut ctl = ControllerHandshake::new("c")
        .on_message(decode_stream(&hello).unwrap().remove(0), "a")
        .unwrap();
    assert!(ctl
        .start_sync(StartSync {
            session: 1,
            disks: vec![SyncDisk {
                id: "x".into(),
                point: 1,
                base: None,
                resume_from: Position::default()
            }]
        })
        .is_err());
    let (_agent, mut ctl) = connect();
    assert!(ctl
        .start_sync(StartSync {
            session: 1,
            disks: vec![SyncDisk {
                id: "nope".into(),
                point: 1,
                base: None,
                resume_from: Position::default()
            }]
        })
        .is_err());
}

#[test]
fn heartbeats_are_answered() {
    let (mut agent, mut ctl) = connect();
    ctl.send_heartbeat(42);
    assert!(pump_to_agent(&mut ctl, &mut agent).is_empty());
    let back = decode_stream(&agent.take_output()).unwrap();
    assert_eq!(back, vec![Message::HeartbeatAck { seq: 42 }]);
}

#[test]
fn frames_in_flight_after_an_error_are_dropped_not_fatal() {
    let (mut agent, mut ctl) = connect();
    start(&mut ctl, None, 0);
    pump_to_agent(&mut ctl, &mut agent);
    agent
        .send_ready(SyncReady {
            session: 7,
            disks: vec![ReadyDisk {
                disk_size: 10 * 4096,
                block_size: 4096,
                needs_index: false,
            }],
        })
        .unwrap();
    pump_to_controller(&mut agent, &mut ctl);
    let d = Digest::of(&[1u8; 4096]);
    agent
        .send_block(0, 0, Encoding::Raw, 4096, &d, &[1u8; 4096])
        .unwrap();
    // The controller fails the session while the block is in flight.
    ctl.send_error(
        crate::message::ErrorCode::StoreFailure,
        false,
        "disk full".into(),
    );
    assert!(pump_to_controller(&mut agent, &mut ctl).is_empty());
    let ev = pump_to_agent(&mut ctl, &mut agent);
    assert!(matches!(ev[0], AgentEvent::PeerError(_)));
    assert_eq!(agent.session(), None);
    // A new session works normally afterwards.
    start(&mut ctl, None, 0);
    assert!(matches!(
        pump_to_agent(&mut ctl, &mut agent)[0],
        AgentEvent::SyncRequested(_)
    ));
}

fn failback_request(disk_size: u64) -> StartFailback {
    StartFailback {
        session: 9,
        pass: 1,
        targets: vec![FailbackTarget {
            target: "new-disk0".into(),
            source: "cloud/disk0".into(),
            point: 3,
            disk_size,
            block_size: 4096,
            root: Digest([7; 32]),
            force: false,
            rescan: false,
        }],
    }
}

/// Runs a failback pass up to the point where the controller may send.
fn described_pass(agent: &mut AgentLink, ctl: &mut ControllerLink) {
    ctl.start_failback(failback_request(10 * 4096)).unwrap();
    let ev = pump_to_agent(ctl, agent);
    assert!(matches!(&ev[0], AgentEvent::FailbackRequested(r) if r.targets.len() == 1));
    agent
        .send_failback_ready(FailbackReady {
            session: 9,
            targets: vec![ReadyTarget {
                target_size: 12 * 4096,
                described_by: TargetDescription::Scanned,
            }],
        })
        .unwrap();
    for first in [0u64, 6] {
        let n = if first == 0 { 6 } else { 4 };
        agent
            .send_target_chunk(IndexChunk {
                slot: 0,
                first_block: first,
                digests: vec![Digest([1; 32]); n],
            })
            .unwrap();
    }
    assert!(!ctl.failback_sending());
    agent.send_target_end(0).unwrap();
    let ev = pump_to_controller(agent, ctl);
    assert!(matches!(ev[0], ControllerEvent::FailbackReady(_)));
    assert!(matches!(
        ev.last(),
        Some(ControllerEvent::TargetEnd { slot: 0 })
    ));
    assert!(ctl.failback_sending());
    assert!(agent.failback_receiving());
}

#[test]
fn failback_pass_runs_both_ends() {
    let (mut agent, mut ctl) = connect();
    described_pass(&mut agent, &mut ctl);
    ctl.send_failback_block(0, 2, Encoding::Raw, 4096, &Digest([2; 32]), &[5u8; 4096])
        .unwrap();
    ctl.send_failback_block(0, 9, Encoding::Zero, 4096, &Digest([3; 32]), &[])
        .unwrap();
    ctl.send_failback_sent(0, 2).unwrap();
    let ev = pump_to_agent(&mut ctl, &mut agent);
    assert!(
        matches!(&ev[0], AgentEvent::FailbackBlock(b) if b.block == 2 && b.payload.len() == 4096)
    );
    assert!(matches!(&ev[1], AgentEvent::FailbackBlock(b) if b.block == 9));
    assert_eq!(
        ev[2],
        AgentEvent::FailbackSent {
            slot: 0,
            sent_blocks: 2
        }
    );
    let done = FailbackDone {
        slot: 0,
        written_blocks: 2,
        verified_blocks: 2,
        root: Digest([7; 32]),
    };
    agent.send_failback_done(done).unwrap();
    let ev = pump_to_controller(&mut agent, &mut ctl);
    assert_eq!(ev, vec![ControllerEvent::FailbackDone(done)]);
    assert!(ctl.failback_done());
    ctl.end_session();
    let ev = pump_to_agent(&mut ctl, &mut agent);
    assert_eq!(ev, vec![AgentEvent::SessionEnded { session: 9 }]);
    assert!(!agent.in_failback());
    // The link is idle again: a sync may start.
    start(&mut ctl, None, 0);
}

#[test]
fn failback_refuses_what_the_pass_does_not_allow() {
    let (mut agent, mut ctl) = connect();
    // A target the agent does not offer, or one smaller than the point.
    let mut unknown = failback_request(10 * 4096);
    unknown.targets[0].target = "elsewhere".into();
    assert!(ctl.start_failback(unknown).is_err());
    assert!(ctl.start_failback(failback_request(13 * 4096)).is_err());

    ctl.start_failback(failback_request(10 * 4096)).unwrap();
    pump_to_agent(&mut ctl, &mut agent);
    // No second session while the pass runs.
    assert!(ctl
        .start_sync(StartSync {
            session: 10,
            disks: vec![]
        })
        .is_err());
    // Digests before the pass is accepted, then out of order.
    let chunk = |first_block| IndexChunk {
        slot: 0,
        first_block,
        digests: vec![Digest([1; 32]); 2],
    };
    assert!(agent.send_target_chunk(chunk(0)).is_err());
    agent
        .send_failback_ready(FailbackReady {
            session: 9,
            targets: vec![ReadyTarget {
                target_size: 12 * 4096,
                described_by: TargetDescription::Map,
            }],
        })
        .unwrap();
    assert!(agent.send_target_chunk(chunk(4)).is_err());
    agent.send_target_chunk(chunk(0)).unwrap();
    // Ending the description early, and the controller sending too soon.
    assert!(agent.send_target_end(0).is_err());
    pump_to_controller(&mut agent, &mut ctl);
    assert!(ctl
        .send_failback_block(0, 0, Encoding::Zero, 4096, &Digest([0; 32]), &[])
        .is_err());
    // A chunk the agent did not send in order is a violation at the
    // controller too.
    let forged = Message::TargetChunk(chunk(8));
    assert!(ctl.handle(forged).is_err());
}

#[test]
fn failback_blocks_are_checked_by_the_agent() {
    let (mut agent, mut ctl) = connect();
    described_pass(&mut agent, &mut ctl);
    let block = |block, raw_len| {
        Message::Block(crate::message::Block {
            slot: 0,
            block,
            encoding: Encoding::Zero,
            raw_len,
            digest: Digest([0; 32]),
            payload: Vec::new(),
        })
    };
    // Past the end of the point, and a wrong length.
    assert!(agent.handle(block(10, 4096)).is_err());
    assert!(agent.handle(block(3, 512)).is_err());
    agent.handle(block(3, 4096)).unwrap();
    // Backwards.
    assert!(agent.handle(block(3, 4096)).is_err());
    // Done before everything was sent.
    assert!(agent
        .send_failback_done(FailbackDone {
            slot: 0,
            written_blocks: 1,
            verified_blocks: 1,
            root: Digest([0; 32]),
        })
        .is_err());
    // The controller may not send past the end, backwards, or after Sent.
    ctl.send_failback_block(0, 4, Encoding::Zero, 4096, &Digest([0; 32]), &[])
        .unwrap();
    assert!(ctl
        .send_failback_block(0, 4, Encoding::Zero, 4096, &Digest([0; 32]), &[])
        .is_err());
    ctl.send_failback_sent(0, 1).unwrap();
    assert!(ctl
        .send_failback_block(0, 8, Encoding::Zero, 4096, &Digest([0; 32]), &[])
        .is_err());
}
