//! Tests of the NBD client against real servers (`qemu-nbd`, `nbdkit`, with
//! `nbdinfo`, `nbdcopy` and `qemu-img` as references), against a fake
//! server that misbehaves on purpose, and of the reply parsers (including
//! the replay of the fuzz corpus).
//!
//! The real-server tests need `qemu-utils`, `nbdkit` and `libnbd-bin`
//! (`scripts/install-deps.sh`); they fail, not skip, when a tool is missing.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::reply::{receive_block_status, receive_read, receive_write_reply, ReplyError};
use super::wire::*;
use super::*;

pub(super) const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Encoders for what a server sends (fake server and corpus seeds).

pub(super) fn opt_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub(super) fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    opt_reply(OPT_GO, REP_INFO, &p)
}

pub(super) fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    opt_reply(OPT_GO, REP_INFO, &p)
}

fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    opt_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &p)
}

pub(super) fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub(super) fn done(last: bool) -> u16 {
    if last {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

pub(super) fn data_chunk(cookie: u64, offset: u64, data: &[u8], last: bool) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(done(last), REPLY_TYPE_OFFSET_DATA, cookie, &p)
}

pub(super) fn hole_chunk(cookie: u64, offset: u64, len: u32, last: bool) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    chunk(done(last), REPLY_TYPE_OFFSET_HOLE, cookie, &p)
}

pub(super) fn status_chunk(cookie: u64, context: u32, desc: &[(u32, u32)], last: bool) -> Vec<u8> {
    let mut p = context.to_be_bytes().to_vec();
    for (len, flags) in desc {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    chunk(done(last), REPLY_TYPE_BLOCK_STATUS, cookie, &p)
}

pub(super) fn error_chunk(cookie: u64, errno: u32, msg: &str, last: bool) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    chunk(done(last), REPLY_TYPE_ERROR, cookie, &p)
}

pub(super) fn error_offset_chunk(
    cookie: u64,
    errno: u32,
    msg: &str,
    at: u64,
    last: bool,
) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p.extend_from_slice(&at.to_be_bytes());
    chunk(done(last), REPLY_TYPE_ERROR_OFFSET, cookie, &p)
}

pub(super) fn none_chunk(cookie: u64) -> Vec<u8> {
    chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
}

pub(super) fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

/// Input for the fuzz entry point: selector byte, then u16 offset and u16
/// length - 1 for replies to a request.
pub(super) fn fuzz_input(sel: u8, offset: u16, len: u16, body: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    if sel & 8 != 0 || sel % 4 == 1 || sel % 4 == 2 {
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&(len - 1).to_be_bytes());
    }
    v.extend_from_slice(body);
    v
}

// ---------------------------------------------------------------------------
// Parser unit tests.

fn read_reply(
    bytes: &[u8],
    offset: u64,
    len: usize,
    structured: bool,
) -> Result<Vec<u8>, ReplyError> {
    let mut buf = vec![0x55u8; len];
    let mut input = bytes;
    receive_read(&mut input, 1, offset, &mut buf, structured, &mut Vec::new())?;
    assert!(input.is_empty(), "reply not fully consumed");
    Ok(buf)
}

fn wire_err(r: Result<impl std::fmt::Debug, ReplyError>) -> WireError {
    match r {
        Err(ReplyError::Wire(e)) => e,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn structured_read_reassembles_data_and_holes_in_any_order() {
    let mut r = data_chunk(1, 3000, &[7; 1096], false);
    r.extend(hole_chunk(1, 1000, 2000, false));
    r.extend(data_chunk(1, 0, &[9; 1000], false));
    r.extend(none_chunk(1));
    let buf = read_reply(&r, 0, 4096, true).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 9));
    assert!(buf[1000..3000].iter().all(|&b| b == 0));
    assert!(buf[3000..].iter().all(|&b| b == 7));
}

#[test]
fn read_reply_defects_are_named() {
    let full = data_chunk(1, 100, &[1; 100], true);
    // Short: the connection closes mid-payload.
    let e = wire_err(read_reply(&full[..full.len() - 1], 100, 100, true));
    assert!(matches!(e, WireError::Short { .. }), "{e}");
    // Past the request.
    let e = wire_err(read_reply(
        &data_chunk(1, 150, &[1; 100], true),
        100,
        100,
        true,
    ));
    assert!(
        matches!(e, WireError::OutOfRange { .. } | WireError::TooLong { .. }),
        "{e}"
    );
    let e = wire_err(read_reply(
        &data_chunk(1, 101, &[1; 100], true),
        100,
        100,
        true,
    ));
    assert!(matches!(e, WireError::OutOfRange { .. }), "{e}");
    // Overlap and incomplete.
    let mut r = data_chunk(1, 100, &[1; 60], false);
    r.extend(hole_chunk(1, 150, 50, true));
    assert!(matches!(
        wire_err(read_reply(&r, 100, 100, true)),
        WireError::Overlap(_)
    ));
    let e = wire_err(read_reply(
        &data_chunk(1, 100, &[1; 60], true),
        100,
        100,
        true,
    ));
    assert!(
        matches!(
            e,
            WireError::Incomplete {
                covered: 60,
                len: 100
            }
        ),
        "{e}"
    );
    // Unknown type, wrong cookie, bad magic, block status to a read.
    let e = wire_err(read_reply(&chunk(1, 42, 1, &[]), 0, 10, true));
    assert_eq!(e, WireError::UnknownChunkType(42));
    let e = wire_err(read_reply(&data_chunk(2, 0, &[1; 10], true), 0, 10, true));
    assert!(
        matches!(
            e,
            WireError::UnknownCookie {
                expected: 1,
                got: 2
            }
        ),
        "{e}"
    );
    let e = wire_err(read_reply(
        &[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0],
        0,
        10,
        true,
    ));
    assert!(matches!(e, WireError::BadMagic { .. }), "{e}");
    let e = wire_err(read_reply(
        &status_chunk(1, 1, &[(10, 0)], true),
        0,
        10,
        true,
    ));
    assert!(matches!(e, WireError::ChunkForWrongCommand { .. }), "{e}");
    // A simple reply with data after structured replies were agreed.
    let mut r = simple_reply(0, 1);
    r.extend([0; 10]);
    let e = wire_err(read_reply(&r, 0, 10, true));
    assert!(matches!(e, WireError::UnexpectedSimpleReply(_)), "{e}");
    assert_eq!(read_reply(&r, 0, 10, false).unwrap(), vec![0; 10]);
    // NONE without DONE.
    let e = wire_err(read_reply(&chunk(0, REPLY_TYPE_NONE, 1, &[]), 0, 10, true));
    assert_eq!(e, WireError::NoneNotDone);
}

#[test]
fn error_chunks_end_the_reply_cleanly() {
    let mut r = error_chunk(1, 5, "medium error", false);
    r.extend(data_chunk(1, 0, &[1; 10], true));
    match read_reply(&r, 0, 10, true) {
        Err(e @ ReplyError::Server { errno: 5, .. }) => {
            assert!(e.connection_usable());
            let ReplyError::Server { message, .. } = e else {
                unreachable!()
            };
            assert_eq!(message, "medium error");
        }
        other => panic!("{other:?}"),
    }
    // A huge error message length is refused before allocation.
    let mut h = chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &[]);
    h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        wire_err(read_reply(&h, 0, 10, true)),
        WireError::TooLong { .. }
    ));
}

fn status_reply(bytes: &[u8], offset: u64, len: u32, want: u32) -> Result<Vec<Extent>, ReplyError> {
    let mut input = bytes;
    receive_block_status(&mut input, 1, offset, len, &[1, 2], want, &mut Vec::new())
}

#[test]
fn block_status_replies_are_checked() {
    let mut r = status_chunk(1, 2, &[(100, 1)], false);
    r.extend(status_chunk(1, 1, &[(30, 0), (50, 3), (1000, 0)], true));
    let ext = status_reply(&r, 1000, 100, 1).unwrap();
    // The last descriptor overhangs the request and is cut.
    let got: Vec<_> = ext.iter().map(|e| (e.start, e.end, e.flags)).collect();
    assert_eq!(got, vec![(1000, 1030, 0), (1030, 1080, 3), (1080, 1100, 0)]);
    let ext = status_reply(&r, 1000, 100, 2).unwrap();
    assert_eq!((ext[0].start, ext[0].end, ext.len()), (1000, 1100, 1));

    let e = wire_err(status_reply(
        &status_chunk(1, 9, &[(10, 0)], true),
        0,
        10,
        1,
    ));
    assert_eq!(e, WireError::UnknownContext(9));
    let e = wire_err(status_reply(&status_chunk(1, 1, &[(0, 0)], true), 0, 10, 1));
    assert!(matches!(e, WireError::ZeroLength(_)), "{e}");
    let e = wire_err(status_reply(
        &status_chunk(1, 1, &[(10, 0), (5, 0)], true),
        0,
        10,
        1,
    ));
    assert!(
        matches!(e, WireError::DescriptorPastRange { start: 10, end: 10 }),
        "{e}"
    );
    let mut dup = status_chunk(1, 1, &[(10, 0)], false);
    dup.extend(status_chunk(1, 1, &[(10, 0)], true));
    assert_eq!(
        wire_err(status_reply(&dup, 0, 10, 1)),
        WireError::DuplicateContext(1)
    );
    let e = wire_err(status_reply(
        &status_chunk(1, 2, &[(10, 0)], true),
        0,
        10,
        1,
    ));
    assert_eq!(e, WireError::MissingContext(1));
    let e = wire_err(status_reply(&data_chunk(1, 0, &[0; 10], true), 0, 10, 1));
    assert!(matches!(e, WireError::ChunkForWrongCommand { .. }), "{e}");
    // Odd payload length.
    let mut odd = status_chunk(1, 1, &[(10, 0)], true);
    odd.push(0);
    odd[16..20].copy_from_slice(&13u32.to_be_bytes());
    assert!(matches!(
        wire_err(status_reply(&odd, 0, 10, 1)),
        WireError::BadLength { .. }
    ));
}

#[test]
fn option_replies_and_infos_are_bounded_and_checked() {
    let mut huge = opt_reply(OPT_GO, REP_ACK, &[]);
    huge[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    assert!(matches!(
        parse_option_reply_header(&huge, OPT_GO),
        Err(WireError::TooLong { .. })
    ));
    assert!(matches!(
        parse_option_reply_header(&opt_reply(OPT_GO, REP_ACK, &[]), OPT_STRUCTURED_REPLY),
        Err(WireError::WrongOption { .. })
    ));
    let ok = info_block_size(512, 4096, 1 << 25);
    assert_eq!(
        parse_info(&ok[20..]).unwrap(),
        Info::BlockSize {
            min: 512,
            preferred: 4096,
            max: 1 << 25
        }
    );
    for (min, pref, max) in [
        (3, 4096, 8192),
        (512, 256, 8192),
        (512, 4096, 1000),
        (0, 1, 1),
    ] {
        let b = info_block_size(min, pref, max);
        assert!(
            matches!(parse_info(&b[20..]), Err(WireError::BadBlockSizes { .. })),
            "{min} {pref} {max}"
        );
    }
    let b = info_export(1 << 30, 3);
    assert_eq!(
        parse_info(&b[20..]).unwrap(),
        Info::Export {
            size: 1 << 30,
            flags: 3
        }
    );
    assert!(matches!(
        parse_info(&b[20..29]),
        Err(WireError::BadLength { .. })
    ));
    assert_eq!(option_error_name(REP_ERR_BIT | 6), "NBD_REP_ERR_UNKNOWN");
}

proptest! {
    /// Any split of a read into data and hole pieces, sent in any order,
    /// reassembles to the same bytes.
    #[test]
    fn any_chunking_reassembles(
        cuts in proptest::collection::btree_set(1u64..4095, 0..12),
        holes in proptest::collection::vec(any::<bool>(), 13),
        order in any::<u64>(),
    ) {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut bounds: Vec<u64> = vec![0];
        bounds.extend(cuts.iter().copied());
        bounds.push(4096);
        let mut pieces: Vec<(u64, u64, bool)> = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[0], w[1], holes[i]))
            .collect();
        let n = pieces.len();
        pieces.rotate_left((order % n as u64) as usize);
        if order & 1 == 1 {
            pieces.reverse();
        }
        let mut expected = data.clone();
        let mut reply = Vec::new();
        for (i, &(s, e, hole)) in pieces.iter().enumerate() {
            let last = i == n - 1;
            if hole {
                expected[s as usize..e as usize].fill(0);
                reply.extend(hole_chunk(1, 8192 + s, (e - s) as u32, last));
            } else {
                reply.extend(data_chunk(1, 8192 + s, &data[s as usize..e as usize], last));
            }
        }
        let got = read_reply(&reply, 8192, 4096, true).unwrap();
        prop_assert_eq!(got, expected);
    }

    /// The parsers never panic on arbitrary bytes.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        fuzzing::check_reply_bytes(&data);
    }
}

// ---------------------------------------------------------------------------
// Fuzz corpus: seeds, and the replay on stable.

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nbd_reply")
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut go = info_export(1 << 20, TFLAG_HAS_FLAGS | TFLAG_CAN_MULTI_CONN);
    go.extend(info_block_size(1, 4096, 1 << 25));
    go.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    let mut meta = meta_context(1, "base:allocation");
    meta.extend(meta_context(2, "qemu:dirty-bitmap:b0"));
    meta.extend(opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    let mut huge_opt = opt_reply(OPT_GO, REP_ACK, &[]);
    huge_opt[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    let unknown = opt_reply(OPT_GO, REP_ERR_BIT | 6, b"no such export");

    let mut split = data_chunk(1, 3000, &[7; 1096], false);
    split.extend(hole_chunk(1, 1000, 2000, false));
    split.extend(data_chunk(1, 0, &[9; 1000], false));
    split.extend(none_chunk(1));
    let mut simple = simple_reply(0, 1);
    simple.extend([0xab; 512]);
    let mut err = error_chunk(1, 5, "I/O error", false);
    err.extend(none_chunk(1));
    let mut overlap = data_chunk(1, 0, &[1; 600], false);
    overlap.extend(hole_chunk(1, 500, 524, true));
    let whole = data_chunk(1, 0, &[3; 1024], true);

    let mut status = status_chunk(1, 1, &[(4096, 3), (4096, 0), (8192, 2)], false);
    status.extend(status_chunk(1, 2, &[(16384, 1)], true));
    let mut dup = status_chunk(1, 1, &[(16384, 0)], false);
    dup.extend(status_chunk(1, 1, &[(16384, 0)], true));
    let mut chunks = data_chunk(1, 0, &[1; 100], false);
    chunks.extend(hole_chunk(1, 100, 100, false));
    chunks.extend(error_chunk(1, 22, "bad", false));
    chunks.extend(none_chunk(1));
    let mut werr = error_offset_chunk(1, 28, "no space", 200, false);
    werr.extend(none_chunk(1));
    let mut werr_outside = error_offset_chunk(1, 28, "no space", 5000, false);
    werr_outside.extend(none_chunk(1));
    let mut ferr = error_offset_chunk(1, 5, "flush failed", 77, false);
    ferr.extend(none_chunk(1));

    vec![
        ("opt-go", fuzz_input(0, 0, 0, &go)),
        ("opt-meta", fuzz_input(4, 0, 0, &meta)),
        ("opt-huge-length", fuzz_input(0, 0, 0, &huge_opt)),
        ("opt-err-unknown", fuzz_input(0, 0, 0, &unknown)),
        ("read-whole", fuzz_input(5, 0, 1024, &whole)),
        ("read-split", fuzz_input(5, 0, 4096, &split)),
        ("read-simple", fuzz_input(1, 512, 512, &simple)),
        ("read-error", fuzz_input(5, 0, 4096, &err)),
        ("read-overlap", fuzz_input(5, 0, 1024, &overlap)),
        ("read-past-request", fuzz_input(5, 0, 512, &whole)),
        ("read-short", fuzz_input(5, 0, 1024, &whole[..600])),
        (
            "read-unknown-type",
            fuzz_input(5, 0, 16, &chunk(1, 42, 1, &[0; 8])),
        ),
        (
            "read-wrong-cookie",
            fuzz_input(5, 0, 1024, &data_chunk(9, 0, &[3; 1024], true)),
        ),
        ("status", fuzz_input(2, 0, 16384, &status)),
        ("status-bitmap", fuzz_input(6, 0, 16384, &status)),
        (
            "status-wrong-context",
            fuzz_input(2, 0, 16, &status_chunk(1, 7, &[(16, 0)], true)),
        ),
        (
            "status-zero-length",
            fuzz_input(2, 0, 16, &status_chunk(1, 1, &[(0, 0)], true)),
        ),
        (
            "status-past-range",
            fuzz_input(2, 0, 16, &status_chunk(1, 1, &[(16, 0), (16, 0)], true)),
        ),
        ("status-duplicate", fuzz_input(2, 0, 16384, &dup)),
        ("chunks-read", fuzz_input(3, 0, 0, &chunks)),
        ("chunks-status", fuzz_input(7, 0, 0, &status)),
        // Replies to writes (bit 3), write zeroes (+1) and flushes (+2),
        // structured when bit 2 is set.
        ("write-none", fuzz_input(12, 100, 512, &none_chunk(1))),
        ("write-simple", fuzz_input(8, 100, 512, &simple_reply(0, 1))),
        ("zeroes-none", fuzz_input(13, 0, 4096, &none_chunk(1))),
        ("write-error-offset", fuzz_input(12, 100, 512, &werr)),
        (
            "write-error-offset-outside",
            fuzz_input(12, 100, 512, &werr_outside),
        ),
        (
            "write-data-chunk",
            fuzz_input(12, 0, 16, &data_chunk(1, 0, &[1; 16], true)),
        ),
        (
            "write-none-payload",
            fuzz_input(
                12,
                0,
                16,
                &chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[0; 4]),
            ),
        ),
        (
            "write-chunk-unnegotiated",
            fuzz_input(8, 0, 16, &none_chunk(1)),
        ),
        (
            "flush-simple-error",
            fuzz_input(10, 0, 1, &simple_reply(5, 1)),
        ),
        ("flush-error-offset", fuzz_input(14, 0, 1, &ferr)),
    ]
}

#[test]
fn fuzz_corpus_replays_through_the_fuzz_checks() {
    let dir = corpus_dir();
    if std::env::var_os("TIDELINE_WRITE_CORPUS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).expect("create corpus directory");
        for (name, bytes) in seeds() {
            let tmp = dir.join(format!(".tmp-{name}"));
            std::fs::write(&tmp, bytes).expect("write seed");
            std::fs::rename(&tmp, dir.join(name)).expect("rename seed");
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} unreadable: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus {} is empty: run with TIDELINE_WRITE_CORPUS=1",
        dir.display()
    );
    for path in &files {
        let data = std::fs::read(path).expect("read corpus file");
        let outcome = std::panic::catch_unwind(|| fuzzing::check_reply_bytes(&data));
        assert!(outcome.is_ok(), "fuzz checks failed on {}", path.display());
    }
    for (name, bytes) in seeds() {
        let on_disk = std::fs::read(dir.join(name)).unwrap_or_else(|e| {
            panic!("seed {name} missing ({e}): run with TIDELINE_WRITE_CORPUS=1")
        });
        assert_eq!(on_disk, bytes, "seed {name} differs from the generator");
    }
}

#[test]
fn seeds_reach_the_outcomes_their_names_promise() {
    for (name, b) in seeds() {
        let (sel, rest) = (b[0], &b[1..]);
        let good = !name.contains('-')
            || [
                "read-whole",
                "read-split",
                "read-simple",
                "status-bitmap",
                "write-none",
                "write-simple",
                "zeroes-none",
            ]
            .contains(&name);
        if sel & 8 != 0 {
            let command = fuzzing::write_command(sel);
            let (off, len) = match command {
                wire::Command::Flush => (0, 0),
                _ => (
                    u64::from(u16::from_be_bytes([rest[0], rest[1]])),
                    u32::from(u16::from_be_bytes([rest[2], rest[3]])) + 1,
                ),
            };
            let mut input = &rest[4..];
            let r = receive_write_reply(
                &mut input,
                1,
                command,
                off,
                len,
                sel & 4 != 0,
                &mut Vec::new(),
            );
            assert_eq!(r.is_ok(), good, "seed {name}: {r:?}");
            continue;
        }
        let ok = match sel % 4 {
            1 => {
                let off = u64::from(u16::from_be_bytes([rest[0], rest[1]]));
                let len = usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1;
                read_reply(&rest[4..], off, len, sel & 4 != 0).is_ok()
            }
            2 => {
                let off = u64::from(u16::from_be_bytes([rest[0], rest[1]]));
                let len = u32::from(u16::from_be_bytes([rest[2], rest[3]])) + 1;
                let want = if sel & 4 != 0 { 2 } else { 1 };
                status_reply(&rest[4..], off, len, want).is_ok()
            }
            _ => continue,
        };
        assert_eq!(ok, good, "seed {name}");
    }
}

// ---------------------------------------------------------------------------
// A fake server that completes the handshake, then misbehaves.

pub(super) fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("fake server read");
    b
}

/// Server side of the handshake: structured replies, `base:allocation` as
/// context 7, an export of `size` bytes. `go_reply` replaces the normal
/// answer to `NBD_OPT_GO` when given.
pub(super) fn fake_handshake(s: &mut UnixStream, size: u64, go_reply: Option<Vec<u8>>) {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).unwrap();
    read_exact(s, 4);
    loop {
        let h = read_exact(s, 16);
        let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
        read_exact(s, len);
        match option {
            OPT_STRUCTURED_REPLY => s.write_all(&opt_reply(option, REP_ACK, &[])).unwrap(),
            OPT_SET_META_CONTEXT => {
                let mut r = meta_context(7, "base:allocation");
                r.extend(opt_reply(option, REP_ACK, &[]));
                s.write_all(&r).unwrap();
            }
            OPT_GO => {
                let r = go_reply.unwrap_or_else(|| {
                    let mut r = info_export(size, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY);
                    r.extend(opt_reply(OPT_GO, REP_ACK, &[]));
                    r
                });
                s.write_all(&r).unwrap();
                return;
            }
            _ => s
                .write_all(&opt_reply(option, REP_ERR_BIT | 1, &[]))
                .unwrap(),
        }
    }
}

/// A request: (type, cookie, offset, length).
fn fake_request(s: &mut UnixStream) -> (u16, u64, u64, u32) {
    let b = read_exact(s, 28);
    (
        u16::from_be_bytes([b[6], b[7]]),
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
        u64::from_be_bytes(b[16..24].try_into().unwrap()),
        u32::from_be_bytes(b[24..28].try_into().unwrap()),
    )
}

pub(super) struct FakeServer {
    pub(super) uri: String,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl FakeServer {
    /// Serves one connection: handshake, then `script`.
    pub(super) fn start(
        size: u64,
        go_reply: Option<Vec<u8>>,
        script: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> FakeServer {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let thread = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            fake_handshake(&mut s, size, go_reply);
            script(&mut s);
            // Keep the socket open until the client is done with it.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        FakeServer {
            uri: format!("nbd+unix:///?socket={}", sock.display()),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Waits for the server thread; a panic there fails the test.
    pub(super) fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().expect("fake server panicked");
        }
    }
}

/// Runs one read against a server that answers it with `reply(cookie)`;
/// returns the error message.
fn misbehaving_read(
    len: usize,
    reply: impl FnOnce(u64, u64) -> Vec<u8> + Send + 'static,
) -> String {
    let server = FakeServer::start(MIB, None, move |s| {
        let (kind, cookie, offset, _) = fake_request(s);
        assert_eq!(kind, CMD_READ);
        s.write_all(&reply(cookie, offset)).unwrap();
        // Whatever the defect, the reply ends here.
        let _ = s.shutdown(std::net::Shutdown::Write);
    });
    let disk = NbdDisk::connect(&server.uri).unwrap();
    assert_eq!(disk.size(), MIB);
    let mut buf = vec![0u8; len];
    let err = disk.read_exact_at(&mut buf, 4096).unwrap_err().to_string();
    assert!(err.contains(&server.uri), "{err}");
    // The broken connection was dropped, not kept.
    assert_eq!(disk.connections(), 0, "{err}");
    drop(disk);
    server.join();
    err
}

#[test]
fn fake_server_short_reply() {
    let err = misbehaving_read(4096, |cookie, off| {
        let r = data_chunk(cookie, off, &[1; 4096], true);
        r[..100].to_vec()
    });
    assert!(err.contains("short read data"), "{err}");
}

#[test]
fn fake_server_unknown_reply_type() {
    let err = misbehaving_read(4096, |cookie, _| {
        chunk(REPLY_FLAG_DONE, 77, cookie, &[0; 4])
    });
    assert!(err.contains("unknown structured reply type 77"), "{err}");
}

#[test]
fn fake_server_length_past_the_request() {
    let err = misbehaving_read(4096, |cookie, off| {
        data_chunk(cookie, off + 8192, &[1; 4096], true)
    });
    assert!(err.contains("outside the request"), "{err}");
    let err = misbehaving_read(4096, |cookie, off| hole_chunk(cookie, off, 1 << 30, true));
    assert!(err.contains("outside the request"), "{err}");
}

#[test]
fn fake_server_unknown_magic_and_cookie() {
    let err = misbehaving_read(512, |_, _| vec![0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0]);
    assert!(err.contains("bad magic"), "{err}");
    let err = misbehaving_read(512, |cookie, off| {
        data_chunk(cookie + 1000, off, &[1; 512], true)
    });
    assert!(err.contains("matches no request"), "{err}");
}

#[test]
fn fake_server_block_status_for_the_wrong_context() {
    let server = FakeServer::start(MIB, None, |s| {
        let (kind, cookie, _, _) = fake_request(s);
        assert_eq!(kind, CMD_BLOCK_STATUS);
        s.write_all(&status_chunk(cookie, 8, &[(4096, 0)], true))
            .unwrap();
    });
    let disk = NbdDisk::connect(&server.uri).unwrap();
    assert!(disk.has_block_status());
    let err = disk.next_data(0).unwrap_err().to_string();
    assert!(
        err.contains(&server.uri) && err.contains("context id 8"),
        "{err}"
    );
    drop(disk);
    server.join();
}

#[test]
fn fake_server_server_errors_keep_the_connection() {
    let server = FakeServer::start(MIB, None, |s| {
        let (_, cookie, off, _) = fake_request(s);
        let mut r = error_chunk(cookie, 5, "disk on fire", false);
        r.extend(none_chunk(cookie));
        s.write_all(&r).unwrap();
        let (_, cookie, off2, len) = fake_request(s);
        assert_eq!(off, off2);
        s.write_all(&data_chunk(cookie, off2, &vec![0x42; len as usize], true))
            .unwrap();
        let (kind, ..) = fake_request(s);
        assert_eq!(kind, CMD_DISC, "NBD_CMD_DISC on drop");
    });
    let disk = NbdDisk::connect(&server.uri).unwrap();
    let mut buf = vec![0u8; 1000];
    let err = disk.read_exact_at(&mut buf, 10).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("EIO") && msg.contains("disk on fire") && msg.contains(&server.uri),
        "{msg}"
    );
    assert_eq!(disk.connections(), 1);
    disk.read_exact_at(&mut buf, 10).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    drop(disk);
    server.join();
}

#[test]
fn fake_server_handshake_defects() {
    // Unknown export.
    let server = FakeServer::start(
        MIB,
        Some(opt_reply(OPT_GO, REP_ERR_BIT | 6, b"export nope not found")),
        |_| {},
    );
    let err = NbdDisk::connect(&server.uri).unwrap_err().to_string();
    assert!(
        err.contains("NBD_REP_ERR_UNKNOWN") && err.contains("export nope not found"),
        "{err}"
    );
    server.join();
    // Absurd option reply length.
    let mut huge = opt_reply(OPT_GO, REP_INFO, &[]);
    huge[16..20].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    let server = FakeServer::start(MIB, Some(huge), |_| {});
    let err = NbdDisk::connect(&server.uri).unwrap_err().to_string();
    assert!(
        err.contains("option reply length 2147483647 exceeds"),
        "{err}"
    );
    server.join();
    // GO without the export size.
    let server = FakeServer::start(MIB, Some(opt_reply(OPT_GO, REP_ACK, &[])), |_| {});
    let err = NbdDisk::connect(&server.uri).unwrap_err().to_string();
    assert!(err.contains("without sending the export size"), "{err}");
    server.join();
    // Not an NBD server at all.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let err = NbdDisk::connect(&uri).unwrap_err().to_string();
    assert!(err.contains("bad magic in server greeting"), "{err}");
    t.join().unwrap();
    // Nobody listening; bad URI.
    let err = NbdDisk::connect(&format!(
        "nbd+unix:///?socket={}",
        dir.path().join("none").display()
    ))
    .unwrap_err();
    assert!(matches!(err, NbdError::Connect { .. }), "{err}");
    let err = NbdDisk::connect("nbd+unix:///x").unwrap_err();
    assert!(matches!(err, NbdError::InvalidUri { .. }), "{err}");
}

#[test]
fn reads_past_the_export_are_refused_locally() {
    let server = FakeServer::start(8192, None, |_| {});
    let disk = NbdDisk::connect(&server.uri).unwrap();
    let mut buf = [0u8; 100];
    let err = disk.read_exact_at(&mut buf, 8150).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::ShortRead {
                offset: 8150,
                size: 8192,
                ..
            }
        ),
        "{err}"
    );
    assert!(disk.read_exact_at(&mut buf, u64::MAX - 5).is_err());
    assert_eq!(disk.next_data(8192).unwrap(), None);
    let err = disk.dirty_extents("b0", 0, 8192).unwrap_err();
    assert!(matches!(err, NbdError::BitmapUnavailable { .. }), "{err}");
    drop(disk);
    server.join();
}

// ---------------------------------------------------------------------------
// Real servers.

pub(super) fn need_tool(name: &str) {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(found, "{name} not found: run scripts/install-deps.sh");
}

pub(super) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A server process, killed when dropped.
pub(super) struct Server {
    pub(super) child: Child,
    pub(super) uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn wait_listening(child: &mut Child, sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if UnixStream::connect(sock).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("server did not listen on {}", sock.display());
}

/// `qemu-nbd` serving `image` read-only on a Unix socket in `dir`.
fn qemu_nbd(dir: &Path, image: &Path, extra: &[&str]) -> Server {
    need_tool("qemu-nbd");
    let sock = dir.join("qemu-nbd.sock");
    let mut child = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--read-only",
            "--shared=8",
            "--format=qcow2",
        ])
        .arg(format!("--socket={}", sock.display()))
        .args(extra)
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    wait_listening(&mut child, &sock);
    Server {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    }
}

/// `nbdkit` in the foreground on a Unix socket in `dir`.
pub(super) fn nbdkit(dir: &Path, args: &[&str]) -> Server {
    need_tool("nbdkit");
    let sock = dir.join("nbdkit.sock");
    let mut child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(&sock)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    wait_listening(&mut child, &sock);
    Server {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    }
}

/// `nbdinfo --map` of a context: (offset, length, type).
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    need_tool("nbdinfo");
    let mut cmd = Command::new("nbdinfo");
    match context {
        Some(c) => cmd.arg(format!("--map={c}")),
        None => cmd.arg("--map"),
    };
    run(cmd.arg(uri))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

fn merge(extents: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in extents {
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// Extents of a map whose type matches `pick`, merged.
fn map_extents(map: &[(u64, u64, u32)], pick: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    merge(
        map.iter()
            .filter(|m| pick(m.2))
            .map(|&(o, l, _)| (o, o + l)),
    )
}

fn data_extents(disk: &NbdDisk) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some((s, e)) = disk.next_data(off).unwrap() {
        assert!(
            s >= off && e > s && e <= disk.size(),
            "{s}..{e} after {off}"
        );
        out.push((s, e));
        off = e;
    }
    merge(out)
}

/// The whole export, read by four threads in 3 MiB + 1 pieces (not
/// aligned to anything).
fn read_all(disk: Arc<NbdDisk>) -> Vec<u8> {
    let size = disk.size();
    let piece = 3 * MIB + 1;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                let mut parts = Vec::new();
                let mut off = t * piece;
                while off < size {
                    let mut buf = vec![0u8; piece.min(size - off) as usize];
                    disk.read_exact_at(&mut buf, off).unwrap();
                    parts.push((off, buf));
                    off += 4 * piece;
                }
                parts
            })
        })
        .collect();
    let mut all = vec![0u8; size as usize];
    for t in threads {
        for (off, buf) in t.join().unwrap() {
            all[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        }
    }
    all
}

/// A raw image with data, written zeros and holes at known places, and its
/// qcow2 conversion.
fn make_qcow2(dir: &Path) -> (PathBuf, PathBuf) {
    need_tool("qemu-img");
    let raw = dir.join("disk.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(96 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    let pattern: Vec<u8> = (0..5 * MIB + 4096).map(|i| (i * 7 % 253) as u8).collect();
    f.write_all_at(&pattern, 0).unwrap();
    f.write_all_at(&vec![0u8; 2 * MIB as usize], 20 * MIB)
        .unwrap();
    f.write_all_at(&pattern[..777_777], 40 * MIB + 12345)
        .unwrap();
    f.write_all_at(&[0xff; 512], 96 * MIB - 512).unwrap();
    drop(f);
    let qcow2 = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2));
    // Reference content, exactly as qemu reads the image.
    let reference = dir.join("reference.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow2)
        .arg(&reference));
    (qcow2, reference)
}

#[test]
fn qemu_nbd_qcow2_reads_bit_identical_and_block_status_matches_nbdinfo() {
    let dir = tempfile::tempdir().unwrap();
    let (qcow2, reference) = make_qcow2(dir.path());
    let server = qemu_nbd(dir.path(), &qcow2, &[]);
    let disk = Arc::new(NbdDisk::connect(&server.uri).unwrap());
    assert_eq!(disk.describe(), server.uri);
    assert_eq!(disk.size(), 96 * MIB);
    assert!(disk.has_block_status());
    assert!(!disk.has_bitmap());

    let all = read_all(Arc::clone(&disk));
    assert!(
        all == std::fs::read(&reference).unwrap(),
        "content differs from qemu-img convert"
    );
    assert!(disk.connections() >= 1 && disk.connections() <= MAX_CONNECTIONS);

    let map = nbdinfo_map(&server.uri, None);
    let expected = map_extents(&map, |t| t & STATE_ZERO == 0);
    let got = data_extents(&disk);
    assert_eq!(got, expected, "next_data differs from nbdinfo --map");
    // The written zeros and the holes are not data; every written byte is.
    assert!(
        !got.iter().any(|&(s, e)| s < 40 * MIB && e > 6 * MIB),
        "{got:?}"
    );
    for (off, len) in [
        (0, 5 * MIB + 4096),
        (40 * MIB + 12345, 777_777),
        (96 * MIB - 512, 512),
    ] {
        assert!(
            got.iter().any(|&(s, e)| s <= off && off + len <= e),
            "{off}+{len} not in {got:?}"
        );
    }
    // next_data from the middle of an extent starts there.
    assert_eq!(disk.next_data(4096).unwrap().map(|d| d.0), Some(4096));
    assert_eq!(disk.next_data(96 * MIB).unwrap(), None);
}

#[test]
fn qemu_nbd_over_tcp_with_an_export_name() {
    let dir = tempfile::tempdir().unwrap();
    let (qcow2, reference) = make_qcow2(dir.path());
    need_tool("qemu-nbd");
    // A free port: bind, read it, release; qemu-nbd binds it right after.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--read-only",
            "--shared=8",
            "--format=qcow2",
            "--bind=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .args(["--export-name=vm-disk"])
        .arg(&qcow2)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "qemu-nbd did not listen on {port}"
        );
        assert!(child.try_wait().unwrap().is_none(), "qemu-nbd exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let server = Server {
        child,
        uri: format!("nbd://127.0.0.1:{port}/vm-disk"),
    };
    let disk = Arc::new(NbdDisk::connect(&server.uri).unwrap());
    assert!(read_all(Arc::clone(&disk)) == std::fs::read(&reference).unwrap());
    let err = NbdDisk::connect(&format!("nbd://127.0.0.1:{port}/no-such-disk")).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            NbdError::OptionRefused {
                reply: "NBD_REP_ERR_UNKNOWN",
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("no-such-disk"), "{msg}");
}

#[test]
fn qemu_dirty_bitmap_covers_exactly_the_writes_after_it_was_added() {
    need_tool("qemu-io");
    need_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bitmap.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 4M",
            "-c",
            "write -P 0x22 16M 1M",
        ])
        .arg(&img));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable", "-f", "qcow2"])
        .arg(&img)
        .arg("b0"));
    // Writes after the bitmap: 64 KiB aligned (the bitmap's granularity).
    let changed = [
        (MIB, 64 * 1024),
        (16 * MIB + 128 * 1024, 256 * 1024),
        (60 * MIB, 2 * MIB),
    ];
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for (off, len) in changed {
        io.arg("-c").arg(format!("write -P 0xcd {off} {len}"));
    }
    run(io.arg(&img));

    let server = qemu_nbd(dir.path(), &img, &["--bitmap=b0"]);
    let disk = NbdDisk::connect_with_bitmap(&server.uri, Some("b0")).unwrap();
    assert!(disk.has_bitmap());
    let dirty = disk.dirty_extents("b0", 0, u64::MAX).unwrap();
    let expected: Vec<(u64, u64)> = changed.iter().map(|&(o, l)| (o, o + l)).collect();
    assert_eq!(dirty, expected);
    let reference = map_extents(
        &nbdinfo_map(&server.uri, Some("qemu:dirty-bitmap:b0")),
        |t| t & 1 != 0,
    );
    assert_eq!(
        dirty, reference,
        "differs from nbdinfo --map=qemu:dirty-bitmap:b0"
    );
    // A sub-range is cut to the range.
    assert_eq!(
        disk.dirty_extents(
            "b0",
            16 * MIB + 256 * 1024,
            61 * MIB - (16 * MIB + 256 * 1024)
        )
        .unwrap(),
        vec![
            (16 * MIB + 256 * 1024, 16 * MIB + 384 * 1024),
            (60 * MIB, 61 * MIB)
        ]
    );
    // Allocation status still works alongside the bitmap context.
    let data = data_extents(&disk);
    assert_eq!(
        data,
        map_extents(&nbdinfo_map(&server.uri, None), |t| t & STATE_ZERO == 0)
    );
    let err = disk.dirty_extents("other", 0, MIB).unwrap_err();
    assert!(matches!(err, NbdError::BitmapUnavailable { .. }), "{err}");

    // Not asked for at connect time, or not exported: unavailable.
    let plain = NbdDisk::connect(&server.uri).unwrap();
    assert!(!plain.has_bitmap());
    let err = plain.dirty_extents("b0", 0, MIB).unwrap_err();
    assert!(
        err.to_string().contains("b0") && err.to_string().contains(&server.uri),
        "{err}"
    );
    let missing = NbdDisk::connect_with_bitmap(&server.uri, Some("nope")).unwrap();
    assert!(!missing.has_bitmap());
    assert!(matches!(
        missing.dirty_extents("nope", 0, MIB),
        Err(NbdError::BitmapUnavailable { .. })
    ));
}

#[test]
fn nbdkit_sparse_random_matches_nbdcopy_and_nbdinfo_with_several_connections() {
    need_tool("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(
        dir.path(),
        &["sparse-random", "size=256M", "seed=7", "percent=20"],
    );
    let disk = Arc::new(NbdDisk::connect(&server.uri).unwrap());
    assert_eq!(disk.size(), 256 * MIB);

    let map = nbdinfo_map(&server.uri, None);
    let data = data_extents(&disk);
    assert_eq!(data, map_extents(&map, |t| t & STATE_ZERO == 0));
    assert!(!data.is_empty());

    let reference = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(&server.uri).arg(&reference));
    let expected = std::fs::read(&reference).unwrap();
    // Read only the data extents, from several threads at once: the rest
    // must be zeros in the reference.
    let mut got = vec![0u8; disk.size() as usize];
    let chunks: Vec<(u64, u64)> = data
        .iter()
        .flat_map(|&(s, e)| {
            (s..e)
                .step_by(8 * MIB as usize)
                .map(move |o| (o, (o + 8 * MIB).min(e)))
        })
        .collect();
    let results: Vec<_> = chunks
        .chunks(chunks.len().div_ceil(6))
        .map(|part| {
            let disk = Arc::clone(&disk);
            let part = part.to_vec();
            std::thread::spawn(move || {
                part.into_iter()
                    .map(|(s, e)| {
                        let mut b = vec![0u8; (e - s) as usize];
                        disk.read_exact_at(&mut b, s).unwrap();
                        (s, b)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in results {
        for (s, b) in t.join().unwrap() {
            got[s as usize..s as usize + b.len()].copy_from_slice(&b);
        }
    }
    assert!(got == expected, "content differs from nbdcopy");
    // nbdkit allows multi-conn: more than one connection, never above the cap.
    let n = disk.connections();
    assert!((1..=MAX_CONNECTIONS).contains(&n), "{n} connections");
}

#[test]
fn nbdkit_block_size_constraints_are_honoured() {
    // The server refuses requests that are unaligned to 4 KiB or longer
    // than 64 KiB: reads of any shape must still succeed.
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(
        dir.path(),
        &[
            "--filter=blocksize-policy",
            "pattern",
            "size=1M",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let disk = NbdDisk::connect(&server.uri).unwrap();
    // The pattern plugin: each 8-byte word holds its own offset, big-endian.
    let expected = |off: u64, len: usize| -> Vec<u8> {
        (off..off + len as u64)
            .map(|i| ((i & !7) >> (8 * (7 - (i & 7)))) as u8)
            .collect()
    };
    for (off, len) in [
        (0u64, 1usize),
        (1, 4095),
        (4095, 2),
        (1000, 200_000),
        (MIB - 3, 3),
        (12_288, 65_536 * 3),
    ] {
        let mut buf = vec![0u8; len];
        disk.read_exact_at(&mut buf, off).unwrap();
        assert!(buf == expected(off, len), "at {off}+{len}");
    }
}

#[test]
fn nbdkit_memory_and_data_plugins() {
    // An all-hole export has no data; a small data export reads exactly.
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(dir.path(), &["memory", "64M"]);
    let disk = NbdDisk::connect(&server.uri).unwrap();
    assert_eq!(disk.next_data(0).unwrap(), None);
    drop(disk);
    drop(server);

    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(
        dir.path(),
        &["data", "data=1 2 3 @1048576 4 5 6", "size=2M"],
    );
    let disk = NbdDisk::connect(&server.uri).unwrap();
    assert_eq!(disk.size(), 2 * MIB);
    let mut buf = [0u8; 4];
    disk.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [1, 2, 3, 0]);
    disk.read_exact_at(&mut buf, MIB - 1).unwrap();
    assert_eq!(buf, [0, 4, 5, 6]);
    let data = data_extents(&disk);
    assert_eq!(
        data,
        map_extents(&nbdinfo_map(&server.uri, None), |t| t & STATE_ZERO == 0)
    );
    assert!(
        data.iter().any(|&(s, e)| s <= MIB && MIB + 3 <= e),
        "{data:?}"
    );
}
