//! The seed corpus of the `frame_decoder` fuzz target, replayed on stable.
//!
//! * With `TIDELINE_WRITE_CORPUS=1` the seeds are (re)written into
//!   `fuzz/corpus/frame_decoder/`: one valid frame per message kind, a few
//!   multi-frame streams as each end would send them, and damaged streams
//!   (truncated, bad checksum, oversized length, reserved bits, unknown
//!   kind, malformed body).
//! * Always, every file in that directory goes through the fuzz target's
//!   own checks (`fuzz/src/lib.rs`, included below), so CI exercises the
//!   corpus, including inputs the fuzzer added, without cargo-fuzz.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod fuzz_checks;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use tideline_protocol::digest::Digest;
use tideline_protocol::encoding::Encoding;
use tideline_protocol::frame::{begin_frame, finish_frame};
use tideline_protocol::limits::MAX_BODY_LEN;
use tideline_protocol::message::{
    kind, BaseRef, Block, Committed, DiskEnd, DiskInfo, ErrorCode, ErrorMsg, FailbackDone,
    FailbackProgress, FailbackReady, FailbackTarget, Hello, IndexChunk, Inventory, Message,
    ReadyDisk, ReadyTarget, StartFailback, StartSync, SyncDisk, SyncReady, TargetDescription,
    TargetInfo, Welcome,
};
use tideline_protocol::{Consistency, PointConsistency, Position};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decoder")
}

fn d(tag: &str) -> Digest {
    Digest::of(tag.as_bytes())
}

/// One message of every kind, with plausible field values.
fn one_of_each() -> Vec<(&'static str, Message)> {
    let zero_4k = Digest::of_zeros(4096);
    vec![
        (
            "hello",
            Message::Hello(Hello {
                min_version: 2,
                max_version: 2,
                software: "tideline-agent/0.1.0".into(),
            }),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                version: 2,
                controller: "tideline-controller/0.1.0".into(),
                agent_id: "web-01.example".into(),
            }),
        ),
        (
            "inventory",
            Message::Inventory(Inventory {
                disks: vec![
                    DiskInfo {
                        id: "root".into(),
                        size: 10 * 1024 * 1024 * 1024,
                        block_size: 64 * 1024,
                    },
                    DiskInfo {
                        id: "data_1".into(),
                        size: 3 * 4096 + 512,
                        block_size: 4096,
                    },
                ],
                targets: vec![TargetInfo {
                    id: "new-web-01-disk0".into(),
                    size: 10 * 1024 * 1024 * 1024,
                }],
            }),
        ),
        (
            "start_failback",
            Message::StartFailback(StartFailback {
                session: 43,
                pass: 2,
                targets: vec![FailbackTarget {
                    target: "new-web-01-disk0".into(),
                    source: "cloud-web-01/root".into(),
                    point: 9,
                    disk_size: 10 * 1024 * 1024 * 1024,
                    block_size: 64 * 1024,
                    root: d("root@9"),
                    force: false,
                    rescan: true,
                }],
            }),
        ),
        (
            "failback_ready",
            Message::FailbackReady(FailbackReady {
                session: 43,
                targets: vec![ReadyTarget {
                    target_size: 10 * 1024 * 1024 * 1024,
                    described_by: TargetDescription::Map,
                }],
            }),
        ),
        (
            "target_chunk",
            Message::TargetChunk(IndexChunk {
                slot: 0,
                first_block: 0,
                digests: vec![d("t0"), zero_4k],
            }),
        ),
        ("target_end", Message::TargetEnd { slot: 0 }),
        (
            "failback_sent",
            Message::FailbackSent {
                slot: 0,
                sent_blocks: 17,
            },
        ),
        (
            "failback_progress",
            Message::FailbackProgress(FailbackProgress {
                slot: 0,
                written_blocks: 10,
                verified_blocks: 8,
                written_bytes: 655360,
            }),
        ),
        (
            "failback_done",
            Message::FailbackDone(FailbackDone {
                slot: 0,
                written_blocks: 17,
                verified_blocks: 17,
                root: d("root@9"),
            }),
        ),
        (
            "start_sync",
            Message::StartSync(StartSync {
                session: 42,
                disks: vec![
                    SyncDisk {
                        id: "root".into(),
                        point: 7,
                        base: Some(BaseRef {
                            point: 6,
                            disk_size: 10 * 1024 * 1024 * 1024,
                            block_size: 64 * 1024,
                            root: d("root@6"),
                        }),
                        resume_from: Position::default(),
                    },
                    SyncDisk {
                        id: "data_1".into(),
                        point: 1,
                        base: None,
                        resume_from: Position::new(1, 2),
                    },
                ],
            }),
        ),
        (
            "sync_ready",
            Message::SyncReady(SyncReady {
                session: 42,
                disks: vec![
                    ReadyDisk {
                        disk_size: 10 * 1024 * 1024 * 1024,
                        block_size: 64 * 1024,
                        needs_index: true,
                    },
                    ReadyDisk {
                        disk_size: 3 * 4096 + 512,
                        block_size: 4096,
                        needs_index: false,
                    },
                ],
            }),
        ),
        (
            "index_chunk",
            Message::IndexChunk(IndexChunk {
                slot: 0,
                first_block: 128,
                digests: vec![d("a"), d("b"), zero_4k],
            }),
        ),
        ("index_end", Message::IndexEnd { slot: 0 }),
        (
            "block_zero",
            Message::Block(Block {
                slot: 1,
                block: 2,
                encoding: Encoding::Zero,
                raw_len: 4096,
                digest: zero_4k,
                payload: Vec::new(),
            }),
        ),
        (
            "block_raw",
            Message::Block(Block {
                slot: 1,
                block: 3,
                encoding: Encoding::Raw,
                raw_len: 512,
                digest: Digest::of(&[0xa5; 512]),
                payload: vec![0xa5; 512],
            }),
        ),
        (
            "block_zstd",
            Message::Block(Block {
                slot: 0,
                block: 9,
                encoding: Encoding::Zstd,
                raw_len: 64 * 1024,
                digest: d("compressed block"),
                // The codec does not look inside the payload; any non-empty
                // bytes are a valid Zstd-encoded Block frame.
                payload: vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0x58, 1, 2, 3],
            }),
        ),
        (
            "checkpoint",
            Message::Checkpoint {
                slot: 0,
                at: Position::new(0, 4096),
            },
        ),
        (
            "ack",
            Message::Ack {
                slot: 0,
                at: Position::new(2, 2048),
            },
        ),
        ("round", Message::Round { slot: 1, round: 3 }),
        (
            "disk_end",
            Message::DiskEnd(DiskEnd {
                slot: 1,
                block_count: 4,
                sent_blocks: 2,
                root: d("data_1@1"),
                consistency: PointConsistency {
                    level: Consistency::CrashFrozen,
                    frozen_ms: 41,
                    rounds: 3,
                    note: String::new(),
                },
            }),
        ),
        (
            "committed",
            Message::Committed(Committed {
                slot: 1,
                point: 1,
                root: d("data_1@1"),
            }),
        ),
        ("session_end", Message::SessionEnd { session: 42 }),
        (
            "error",
            Message::Error(ErrorMsg {
                code: ErrorCode::IndexMismatch,
                session: 42,
                fatal: false,
                message: "disk data_1: index root differs from the agent's".into(),
            }),
        ),
        (
            "error_unknown_code",
            Message::Error(ErrorMsg {
                code: ErrorCode::Unknown(999),
                session: 0,
                fatal: true,
                message: String::new(),
            }),
        ),
        ("heartbeat", Message::Heartbeat { seq: 1 }),
        ("heartbeat_ack", Message::HeartbeatAck { seq: 1 }),
    ]
}

fn stream(msgs: &[&Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out);
    }
    out
}

/// A frame with a correct checksum around an arbitrary kind and body.
fn raw_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let start = begin_frame(&mut out, kind);
    out.extend_from_slice(body);
    finish_frame(&mut out, start);
    out
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let each = one_of_each();
    let by_name = |name: &str| -> &Message {
        &each
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no seed message {name}"))
            .1
    };
    let mut out: Vec<(String, Vec<u8>)> = each
        .iter()
        .map(|(name, m)| (format!("kind-{name}"), m.to_frame()))
        .collect();

    let agent = stream(&[
        by_name("hello"),
        by_name("inventory"),
        by_name("sync_ready"),
        by_name("block_zero"),
        by_name("block_raw"),
        by_name("checkpoint"),
        by_name("disk_end"),
        by_name("heartbeat"),
    ]);
    let controller = stream(&[
        by_name("welcome"),
        by_name("start_sync"),
        by_name("index_chunk"),
        by_name("index_end"),
        by_name("ack"),
        by_name("committed"),
        by_name("session_end"),
        by_name("heartbeat_ack"),
    ]);
    out.push(("stream-agent".into(), agent.clone()));
    out.push(("stream-controller".into(), controller.clone()));

    // Truncated streams: mid-header, mid-body, mid-trailer.
    out.push(("trunc-header".into(), agent[..5].to_vec()));
    let first = by_name("hello").to_frame().len();
    out.push(("trunc-body".into(), agent[..first + 20].to_vec()));
    out.push((
        "trunc-trailer".into(),
        controller[..by_name("welcome").to_frame().len() - 2].to_vec(),
    ));

    // Frame-level damage.
    let mut bad_crc = by_name("checkpoint").to_frame();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x40;
    out.push(("bad-crc".into(), bad_crc));
    let mut too_long = by_name("heartbeat").to_frame();
    too_long[..4].copy_from_slice(&(MAX_BODY_LEN + 1).to_le_bytes());
    out.push(("bad-length".into(), too_long));
    let mut reserved = by_name("index_end").to_frame();
    reserved[6] = 1;
    out.push(("bad-reserved".into(), reserved));

    // Well-framed but undecodable bodies (correct checksums).
    out.push(("bad-kind".into(), raw_frame(0x7f, &[1, 2, 3])));
    out.push((
        "bad-magic".into(),
        raw_frame(kind::HELLO, b"TIDELIN\0\x01\0\x01\0\0\0"),
    ));
    let mut huge_count = Vec::new();
    huge_count.extend_from_slice(&0u16.to_le_bytes());
    huge_count.extend_from_slice(&0u64.to_le_bytes());
    huge_count.extend_from_slice(&u32::MAX.to_le_bytes());
    out.push((
        "bad-count".into(),
        raw_frame(kind::INDEX_CHUNK, &huge_count),
    ));
    let mut trailing = by_name("ack").to_frame();
    trailing.truncate(trailing.len() - 4);
    let body = trailing[8..].to_vec();
    let mut with_extra = body;
    with_extra.push(0);
    out.push(("bad-trailing".into(), raw_frame(kind::ACK, &with_extra)));
    // A bad body in the middle does not stop framing: the next frame decodes.
    let mut mixed = raw_frame(kind::BLOCK, &[0; 10]);
    mixed.extend(by_name("heartbeat").to_frame());
    out.push(("stream-bad-then-good".into(), mixed));
    out
}

#[test]
fn corpus_replays_through_fuzz_checks() {
    let dir = corpus_dir();
    if std::env::var_os("TIDELINE_WRITE_CORPUS").is_some_and(|v| v == "1") {
        fs::create_dir_all(&dir).expect("create corpus directory");
        for (name, bytes) in seeds() {
            // Temp file and rename: the other tests here may be reading.
            let tmp = dir.join(format!(".tmp-{name}"));
            fs::write(&tmp, bytes).expect("write seed");
            fs::rename(&tmp, dir.join(name)).expect("rename seed");
        }
    }

    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} unreadable: {e}", dir.display()))
        .map(|e| e.expect("read corpus entry").path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus {} is empty: run with TIDELINE_WRITE_CORPUS=1",
        dir.display()
    );

    let mut kinds_seen = BTreeSet::new();
    for path in &files {
        let data = fs::read(path).expect("read corpus file");
        let outcome = std::panic::catch_unwind(|| fuzz_checks::check_input(&data));
        assert!(outcome.is_ok(), "fuzz checks failed on {}", path.display());
        for m in fuzz_checks::decode_contiguous(&data)
            .frames
            .into_iter()
            .flatten()
        {
            kinds_seen.insert(m.name());
        }
    }
    // The seeds must reach every message decoder, not only the framing.
    let all: BTreeSet<&str> = one_of_each().iter().map(|(_, m)| m.name()).collect();
    let missing: Vec<_> = all.difference(&kinds_seen).collect();
    assert!(missing.is_empty(), "no corpus file decodes to {missing:?}");
}

#[test]
fn seeds_are_what_the_corpus_holds() {
    // Guards against a seed generator that drifted from the committed files
    // (e.g. after a wire change): regenerate with TIDELINE_WRITE_CORPUS=1.
    let dir = corpus_dir();
    for (name, bytes) in seeds() {
        let path = dir.join(&name);
        let on_disk =
            fs::read(&path).unwrap_or_else(|e| panic!("seed {} missing: {e}", path.display()));
        assert_eq!(on_disk, bytes, "seed {name} differs from the generator");
    }
}

#[test]
fn damaged_seeds_are_refused() {
    // The damaged seeds exercise error paths only if they really are errors.
    for (name, bytes) in seeds() {
        let outcome = fuzz_checks::decode_contiguous(&bytes);
        let errors = outcome.frames.iter().filter(|f| f.is_err()).count();
        if name.starts_with("bad-") {
            assert!(
                outcome.stopped_by.is_some() || errors > 0,
                "{name} decoded cleanly"
            );
        } else if name.starts_with("trunc-") {
            assert!(
                outcome.stopped_by.is_none() && outcome.pending > 0,
                "{name} is not a clean truncation"
            );
        } else if name == "stream-bad-then-good" {
            assert_eq!(errors, 1);
            assert_eq!(outcome.frames.len(), 2);
        } else {
            assert_eq!(errors, 0, "{name} has an undecodable frame");
            assert!(outcome.stopped_by.is_none() && outcome.pending == 0);
        }
    }
}
