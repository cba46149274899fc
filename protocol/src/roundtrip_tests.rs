//! Property tests: every message survives encode → decode, and no byte
//! string makes the decoder panic.

use crate::consistency::{Consistency, PointConsistency};
use crate::digest::Digest;
use crate::encoding::Encoding;
use crate::frame::parse_frame;
use crate::limits::MAX_ROUNDS;
use crate::message::*;
use proptest::prelude::*;

fn id() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,40}"
}
fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}
fn block_size() -> impl Strategy<Value = u32> {
    (12u32..=22).prop_map(|s| 1 << s)
}
fn text() -> impl Strategy<Value = String> {
    ".{0,100}"
}
fn position() -> impl Strategy<Value = Position> {
    (0u32..MAX_ROUNDS, any::<u64>()).prop_map(|(round, block)| Position { round, block })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), text()).prop_map(|(a, b, s)| Message::Hello(Hello {
            min_version: a,
            max_version: b,
            software: s
        })),
        (any::<u16>(), text(), id()).prop_map(|(v, c, a)| Message::Welcome(Welcome {
            version: v,
            controller: c,
            agent_id: a
        })),
        (
            prop::collection::vec((id(), 0u64..1 << 50, block_size()), 0..8),
            prop::collection::vec((id(), 0u64..1 << 50), 0..4)
        )
            .prop_map(|(d, t)| {
                Message::Inventory(Inventory {
                    disks: d
                        .into_iter()
                        .map(|(id, size, block_size)| DiskInfo {
                            id,
                            size,
                            block_size,
                        })
                        .collect(),
                    targets: t
                        .into_iter()
                        .map(|(id, size)| TargetInfo { id, size })
                        .collect(),
                })
            }),
        (
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(
                (
                    id(),
                    text(),
                    any::<u64>(),
                    0u64..1 << 50,
                    block_size(),
                    digest(),
                    any::<bool>(),
                    any::<bool>()
                ),
                0..4
            )
        )
            .prop_map(|(session, pass, t)| Message::StartFailback(StartFailback {
                session,
                pass,
                targets: t
                    .into_iter()
                    .map(
                        |(target, source, point, disk_size, block_size, root, force, rescan)| {
                            FailbackTarget {
                                target,
                                source,
                                point,
                                disk_size,
                                block_size,
                                root,
                                force,
                                rescan,
                            }
                        }
                    )
                    .collect()
            })),
        (
            any::<u64>(),
            prop::collection::vec((0u64..1 << 50, any::<bool>()), 0..6)
        )
            .prop_map(|(session, t)| Message::FailbackReady(FailbackReady {
                session,
                targets: t
                    .into_iter()
                    .map(|(target_size, map)| ReadyTarget {
                        target_size,
                        described_by: if map {
                            TargetDescription::Map
                        } else {
                            TargetDescription::Scanned
                        },
                    })
                    .collect()
            })),
        (
            any::<u16>(),
            any::<u64>(),
            prop::collection::vec(digest(), 0..50)
        )
            .prop_map(
                |(slot, first_block, digests)| Message::TargetChunk(IndexChunk {
                    slot,
                    first_block,
                    digests
                })
            ),
        any::<u16>().prop_map(|slot| Message::TargetEnd { slot }),
        (any::<u16>(), any::<u64>())
            .prop_map(|(slot, sent_blocks)| Message::FailbackSent { slot, sent_blocks }),
        (any::<u16>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(slot, a, b, c)| {
            Message::FailbackProgress(FailbackProgress {
                slot,
                written_blocks: a,
                verified_blocks: b,
                written_bytes: c,
            })
        }),
        (any::<u16>(), any::<u64>(), any::<u64>(), digest()).prop_map(|(slot, a, b, root)| {
            Message::FailbackDone(FailbackDone {
                slot,
                written_blocks: a,
                verified_blocks: b,
                root,
            })
        }),
        (
            any::<u64>(),
            prop::collection::vec(
                (
                    id(),
                    any::<u64>(),
                    prop::option::of((any::<u64>(), 0u64..1 << 50, block_size(), digest())),
                    position()
                ),
                0..6
            )
        )
            .prop_map(|(session, d)| Message::StartSync(StartSync {
                session,
                disks: d
                    .into_iter()
                    .map(|(id, point, base, resume_from)| SyncDisk {
                        id,
                        point,
                        base: base.map(|(point, disk_size, block_size, root)| BaseRef {
                            point,
                            disk_size,
                            block_size,
                            root
                        }),
                        resume_from
                    })
                    .collect()
            })),
        (
            any::<u64>(),
            prop::collection::vec((0u64..1 << 50, block_size(), any::<bool>()), 0..6)
        )
            .prop_map(|(session, d)| Message::SyncReady(SyncReady {
                session,
                disks: d
                    .into_iter()
                    .map(|(disk_size, block_size, needs_index)| ReadyDisk {
                        disk_size,
                        block_size,
                        needs_index
                    })
                    .collect()
            })),
        (
            any::<u16>(),
            any::<u64>(),
            prop::collection::vec(digest(), 0..50)
        )
            .prop_map(
                |(slot, first_block, digests)| Message::IndexChunk(IndexChunk {
                    slot,
                    first_block,
                    digests
                })
            ),
        any::<u16>().prop_map(|slot| Message::IndexEnd { slot }),
        (
            any::<u16>(),
            any::<u64>(),
            digest(),
            prop::collection::vec(any::<u8>(), 1..2000),
            0u8..3
        )
            .prop_map(|(slot, block, digest, payload, enc)| {
                let encoding = Encoding::from_code(enc).unwrap_or(Encoding::Raw);
                let (raw_len, payload) = match encoding {
                    Encoding::Zero => (4096, vec![]),
                    Encoding::Raw => (payload.len() as u32, payload),
                    Encoding::Zstd => (65536, payload),
                };
                Message::Block(Block {
                    slot,
                    block,
                    encoding,
                    raw_len,
                    digest,
                    payload,
                })
            }),
        (any::<u16>(), position()).prop_map(|(slot, at)| Message::Checkpoint { slot, at }),
        (any::<u16>(), position()).prop_map(|(slot, at)| Message::Ack { slot, at }),
        (any::<u16>(), 1u32..MAX_ROUNDS).prop_map(|(slot, round)| Message::Round { slot, round }),
        (
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            digest(),
            (0u8..5, any::<u32>(), 0..=MAX_ROUNDS, text())
        )
            .prop_map(|(slot, a, b, root, (level, frozen_ms, rounds, note))| {
                Message::DiskEnd(DiskEnd {
                    slot,
                    block_count: a,
                    sent_blocks: b,
                    root,
                    consistency: PointConsistency {
                        level: Consistency::from_code(level).unwrap_or_default(),
                        frozen_ms,
                        rounds,
                        note,
                    },
                })
            }),
        (any::<u16>(), any::<u64>(), digest()).prop_map(|(slot, point, root)| {
            Message::Committed(Committed { slot, point, root })
        }),
        any::<u64>().prop_map(|session| Message::SessionEnd { session }),
        (1u16..16, any::<u64>(), any::<bool>(), text()).prop_map(|(c, session, fatal, m)| {
            Message::Error(ErrorMsg {
                code: ErrorCode::from_code(c),
                session,
                fatal,
                message: m,
            })
        }),
        any::<u64>().prop_map(|seq| Message::Heartbeat { seq }),
        any::<u64>().prop_map(|seq| Message::HeartbeatAck { seq }),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(msg in message()) {
        let bytes = msg.to_frame();
        let (frame, used) = parse_frame(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(Message::decode(frame).unwrap(), msg);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_stream(&bytes);
    }

    #[test]
    fn arbitrary_bodies_with_valid_framing_never_panic(kind in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut out = Vec::new();
        let s = crate::frame::begin_frame(&mut out, kind);
        out.extend_from_slice(&body);
        crate::frame::finish_frame(&mut out, s);
        let _ = decode_stream(&out);
    }

    #[test]
    fn a_flipped_bit_is_always_detected(msg in message(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = msg.to_frame();
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        // Either the frame is refused, or (length field hit) it is incomplete.
        if let Ok(Some((f, _))) = parse_frame(&bytes) {
            prop_assert!(Message::decode(f).map(|m| m != msg).unwrap_or(true));
        }
    }
}
