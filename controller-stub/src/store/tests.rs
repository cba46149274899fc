//! Store-level tests: sessions simulated the way an agent drives them, and
//! whole images compared bit for bit after export.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;
use tideline_protocol::resize::carried_entry;
use tideline_protocol::{
    Consistency, Digest, Encoding, IndexRootHasher, PointConsistency, Position, ZeroDigests,
};

use super::*;

const BS: u32 = 4096;
const AGENT: &str = "agent-1";
const DISK: &str = "disk-a";

fn digests(image: &[u8]) -> Vec<Digest> {
    image.chunks(BS as usize).map(Digest::of).collect()
}

fn root_of(ds: &[Digest]) -> Digest {
    let mut h = IndexRootHasher::new();
    for d in ds {
        h.push(d);
    }
    h.finish()
}

/// A test image: mixed random, repetitive and zero blocks.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, block) in out.chunks_mut(BS as usize).enumerate() {
        match (i as u64 + seed) % 5 {
            0 => {} // zero block
            1 => block.fill((i % 251) as u8 + 1),
            _ => {
                for b in block.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
        }
    }
    out
}

fn put(store: &Store, block: &[u8]) -> PutOutcome {
    let z = zstd::bulk::compress(block, 1).unwrap();
    let (enc, payload) = if z.len() < block.len() {
        (Encoding::Zstd, &z[..])
    } else {
        (Encoding::Raw, block)
    };
    store
        .put_block(&Digest::of(block), enc, block.len() as u32, payload)
        .unwrap()
}

/// Drives a session like an agent: sends and records every block whose
/// digest differs from the base map carried to the new size, then commits
/// with the root of the new image.
fn sync(store: &Store, point: PointId, base: Option<(PointId, &[u8])>, img: &[u8]) -> PointInfo {
    let mut b = store
        .begin_point(AGENT, DISK, point, base.map(|b| b.0), img.len() as u64, BS)
        .unwrap();
    record_changes(store, &mut b, base.map(|b| b.1), img);
    b.commit(&root_of(&digests(img)), 0, &Default::default())
        .unwrap()
}

fn record_changes(store: &Store, b: &mut PointBuilder<'_>, base: Option<&[u8]>, img: &[u8]) {
    let zero = ZeroDigests::new(img.len() as u64, BS);
    let old = base.map(digests).unwrap_or_default();
    for (i, block) in img.chunks(BS as usize).enumerate() {
        let i = i as u64;
        if i < b.next_position().block {
            continue;
        }
        let d = Digest::of(block);
        if d != carried_entry(i, old.len() as u64, &zero, |i| old[i as usize]) {
            if !zero.is_zero(i, &d) {
                put(store, block);
            }
            b.record(i, d).unwrap();
        }
    }
}

fn export(store: &Store, point: PointId) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("disk.raw");
    let mut last = (0, 0);
    let report = store
        .export_raw(AGENT, DISK, point, &dest, &mut |d, t| last = (d, t))
        .unwrap();
    let bytes = fs::read(&dest).unwrap();
    assert_eq!(report.bytes, bytes.len() as u64);
    assert_eq!(last, (report.bytes, report.bytes));
    assert!(!dest.with_extension("raw.partial").exists());
    bytes
}

fn assert_verifies(store: &Store, point: PointId) {
    let r = store.verify_point(AGENT, DISK, point).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
}

fn disk_dir(root: &Path) -> std::path::PathBuf {
    root.join("points").join(AGENT).join(DISK)
}

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
}

#[test]
fn put_dedups_and_refuses_bad_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let block = image(BS as usize, 3);
    assert!(matches!(put(&store, &block), PutOutcome::Stored { .. }));
    assert_eq!(put(&store, &block), PutOutcome::Deduplicated);
    assert_eq!(store.stats().chunks, 1);

    let other = vec![0xabu8; BS as usize];
    let err = store
        .put_block(&Digest::of(b"lie"), Encoding::Raw, BS, &other)
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }));
    assert!(!store.has_chunk(&Digest::of(b"lie")));

    // A zstd payload that inflates past raw_len is refused, not stored.
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
    let d = Digest::of(&vec![0u8; BS as usize]);
    let err = store.put_block(&d, Encoding::Zstd, BS, &bomb).unwrap_err();
    assert!(matches!(err, StoreError::Decode { .. }), "{err}");
    let err = store.put_block(&d, Encoding::Zero, BS, &[0]).unwrap_err();
    assert!(matches!(err, StoreError::Decode { .. }));
    assert!(!store.has_chunk(&d));
    assert_eq!(store.stats().chunks, 1);
}

#[test]
fn full_point_exports_bit_for_bit_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(3 * 1024 * 1024 + 1000, 1);
    {
        let store = Store::open(dir.path()).unwrap();
        let info = sync(&store, 1, None, &img);
        assert_eq!(info.block_count, 769);
        assert_eq!(info.root, root_of(&digests(&img)).to_hex());
        assert_eq!(export(&store, 1), img);
        let r = store.verify_point(AGENT, DISK, 1).unwrap();
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.blocks, 769);
        assert_eq!(r.pages, 7);
        assert!(r.zero_blocks > 100 && r.data_blocks > 500);
        assert_eq!(r.zero_blocks + r.data_blocks, 769);
        for b in [0u64, 4, 5, 768] {
            let start = b as usize * BS as usize;
            let end = (start + BS as usize).min(img.len());
            assert_eq!(
                store.read_block(AGENT, DISK, 1, b).unwrap(),
                &img[start..end]
            );
        }
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.agents().unwrap(), vec![AGENT]);
    assert_eq!(store.disks(AGENT).unwrap(), vec![DISK]);
    assert_eq!(store.latest_point(AGENT, DISK).unwrap().unwrap().point, 1);
    assert_eq!(export(&store, 1), img);
    // The staging log went away with the commit.
    assert!(
        fsutil::list_dir(&dir.path().join("staging").join(AGENT).join(DISK))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn incremental_point_costs_only_changed_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let img1 = image(4 * 1024 * 1024, 2);
    sync(&store, 1, None, &img1);
    let before = store.stats();

    let mut img2 = img1.clone();
    // Byte values no block of `image` is filled with.
    for (block, byte) in [(5usize, 252u8), (6, 253), (300, 254)] {
        img2[block * BS as usize..(block + 1) * BS as usize].fill(byte);
    }
    let info = sync(&store, 2, Some((1, &img1)), &img2);
    assert_eq!(info.changed_blocks, 3);
    assert_eq!(info.base, Some(1));
    let after = store.stats();
    // Three data blocks and the two pages they touch (0 and 2), nothing else.
    assert_eq!(after.chunks - before.chunks, 5);
    assert!(after.stored_bytes - before.stored_bytes <= 5 * (4096 + 52));
    // The top index is 32 bytes per page.
    let index = disk_dir(dir.path()).join("0000000000000002").join("index");
    assert_eq!(fs::metadata(index).unwrap().len(), 76 + 8 * 32);

    assert_eq!(export(&store, 2), img2);
    // The older point is untouched.
    assert_eq!(export(&store, 1), img1);
    assert_verifies(&store, 1);
    assert_verifies(&store, 2);
    let ids: Vec<_> = store
        .points(AGENT, DISK)
        .unwrap()
        .iter()
        .map(|p| p.point)
        .collect();
    assert_eq!(ids, vec![1, 2]);
}

#[test]
fn root_mismatch_commits_nothing_and_log_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let img1 = image(1024 * 1024, 4);
    sync(&store, 1, None, &img1);
    let mut img2 = img1.clone();
    img2[10 * BS as usize] ^= 0xff;

    let mut b = store
        .begin_point(AGENT, DISK, 2, Some(1), img2.len() as u64, BS)
        .unwrap();
    record_changes(&store, &mut b, Some(&img1), &img2);
    let err = b
        .commit(&Digest::of(b"wrong"), 0, &Default::default())
        .unwrap_err();
    assert!(matches!(err, StoreError::IndexRootMismatch { .. }), "{err}");
    assert_eq!(store.points(AGENT, DISK).unwrap().len(), 1);
    let names: Vec<_> = fsutil::list_dir(&disk_dir(dir.path())).unwrap();
    assert_eq!(names, vec![("0000000000000001".to_string(), true)]);
    assert!(matches!(
        store.point(AGENT, DISK, 2),
        Err(StoreError::NotFound { .. })
    ));

    // The session resumes from its staging log and commits.
    let b = store
        .begin_point(AGENT, DISK, 2, Some(1), img2.len() as u64, BS)
        .unwrap();
    assert_eq!(b.recorded(), 1);
    assert_eq!(b.next_position().block, 11);
    b.commit(&root_of(&digests(&img2)), 0, &Default::default())
        .unwrap();
    assert_eq!(export(&store, 2), img2);
}

#[test]
fn rounds_replace_earlier_copies_and_the_manifest_keeps_consistency() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Round 0 copies the disk as it was; while it ran, blocks 3, 9 and the
    // last one changed, and block 5 became zero: round 1 copies those again.
    let first = image(700 * 1024, 11);
    let mut now = first.clone();
    let bs = BS as usize;
    now[3 * bs..4 * bs].fill(0xa1);
    now[9 * bs..10 * bs].fill(0xb2);
    now[5 * bs..6 * bs].fill(0);
    let last = now.len() - 100;
    now[last..].fill(0xc3);
    let mut b = store
        .begin_point(AGENT, DISK, 1, None, now.len() as u64, BS)
        .unwrap();
    record_changes(&store, &mut b, None, &first);
    b.checkpoint().unwrap();
    b.begin_round(1).unwrap();
    assert!(b.begin_round(3).is_err());
    let zero = ZeroDigests::new(now.len() as u64, BS);
    let count = now.len().div_ceil(bs) as u64;
    for i in [3u64, 5, 9, count - 1] {
        let block = &now[i as usize * bs..((i as usize + 1) * bs).min(now.len())];
        let d = Digest::of(block);
        if !zero.is_zero(i, &d) {
            put(&store, block);
        }
        b.record(i, d).unwrap();
    }
    assert_eq!(b.next_position(), Position::new(1, count));
    let consistency = PointConsistency {
        level: Consistency::CrashFrozen,
        frozen_ms: 17,
        rounds: 2,
        note: "test".into(),
    };
    let info = b.commit(&root_of(&digests(&now)), 0, &consistency).unwrap();
    assert_eq!(export(&store, 1), now);
    assert_eq!(info.consistency.level, Consistency::CrashFrozen);
    // Distinct blocks, not records: round 1 re-sent four of them.
    let mut distinct: std::collections::BTreeSet<u64> = digests(&first)
        .iter()
        .enumerate()
        .filter(|(i, d)| !zero.is_zero(*i as u64, d))
        .map(|(i, _)| i as u64)
        .collect();
    distinct.extend([3, 5, 9, count - 1]);
    assert_eq!(info.changed_blocks, distinct.len() as u64);
    let again = Store::open(dir.path())
        .unwrap()
        .point(AGENT, DISK, 1)
        .unwrap();
    assert_eq!(again.consistency, info.consistency);
    assert_eq!(again.consistency.frozen_ms, 17);
}

#[test]
fn manifests_without_consistency_read_as_none() {
    let json = r#"{"agent":"a","disk":"d","point":1,"base":null,"disk_size":4096,
        "block_size":4096,"block_count":1,"root":"00","created_unix":0,"changed_blocks":0,
        "index_crc":0}"#;
    let m: point::Manifest = serde_json::from_str(json).unwrap();
    assert_eq!(m.info.consistency.level, Consistency::None);
}

#[test]
fn truncate_from_then_rerecord() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let first = image(600 * 1024, 5);
    let img = image(600 * 1024, 6);
    let mut b = store
        .begin_point(AGENT, DISK, 1, None, img.len() as u64, BS)
        .unwrap();
    // A session that recorded an older version of the disk...
    record_changes(&store, &mut b, None, &first);
    b.checkpoint().unwrap();
    let all = b.recorded();
    // ...resumes from block 40 with what the disk holds now.
    b.truncate_from(Position::new(0, 40)).unwrap();
    assert!(b.recorded() < all);
    assert!(b.next_position().block <= 40);
    // Blocks before 40 must hold the new image too: record them afresh.
    b.truncate_from(Position::default()).unwrap();
    assert_eq!(b.recorded(), 0);
    record_changes(&store, &mut b, None, &img);
    b.commit(&root_of(&digests(&img)), 123, &Default::default())
        .unwrap();
    assert_eq!(store.point(AGENT, DISK, 1).unwrap().new_bytes, 123);
    assert_eq!(export(&store, 1), img);
}

#[test]
fn partial_truncate_keeps_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let img = image(600 * 1024, 7);
    let wrong = image(600 * 1024, 8);
    let mut b = store
        .begin_point(AGENT, DISK, 1, None, img.len() as u64, BS)
        .unwrap();
    // Blocks 0..40 from the right image, the rest from a stale one.
    let split = 40 * BS as usize;
    let mut mixed = img[..split].to_vec();
    mixed.extend_from_slice(&wrong[split..]);
    record_changes(&store, &mut b, None, &mixed);
    b.truncate_from(Position::new(0, 40)).unwrap();
    record_changes(&store, &mut b, None, &img);
    b.commit(&root_of(&digests(&img)), 0, &Default::default())
        .unwrap();
    assert_eq!(export(&store, 1), img);
}

#[test]
fn resume_after_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(800 * 1024, 9);
    {
        let store = Store::open(dir.path()).unwrap();
        let mut b = store
            .begin_point(AGENT, DISK, 1, None, img.len() as u64, BS)
            .unwrap();
        // Only the first half, then the "connection drops".
        record_changes(&store, &mut b, None, &img[..400 * 1024]);
        b.checkpoint().unwrap();
        assert!(matches!(
            store.begin_point(AGENT, DISK, 1, None, img.len() as u64, BS),
            Err(StoreError::PointBusy { .. })
        ));
    }
    let store = Store::open(dir.path()).unwrap();
    let mut b = store
        .begin_point(AGENT, DISK, 1, None, img.len() as u64, BS)
        .unwrap();
    assert!(b.recorded() > 0);
    record_changes(&store, &mut b, None, &img);
    b.commit(&root_of(&digests(&img)), 0, &Default::default())
        .unwrap();
    assert_eq!(export(&store, 1), img);
}

#[test]
fn interrupted_commits_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(512 * 1024, 10);
    {
        let store = Store::open(dir.path()).unwrap();
        sync(&store, 1, None, &img);
    }
    let dd = disk_dir(dir.path());
    // Killed while writing the point directory...
    fs::create_dir(dd.join("0000000000000002.tmp")).unwrap();
    fs::write(dd.join("0000000000000002.tmp").join("index"), b"partial").unwrap();
    // ...or a point directory that never got its manifest.
    fs::create_dir(dd.join("0000000000000003")).unwrap();
    fs::write(dd.join("0000000000000003").join("index"), b"partial").unwrap();
    let store = Store::open(dir.path()).unwrap();
    let names: Vec<_> = fsutil::list_dir(&dd).unwrap();
    assert_eq!(names, vec![("0000000000000001".to_string(), true)]);
    assert_verifies(&store, 1);
    assert_eq!(export(&store, 1), img);
    // The id is free again.
    sync(&store, 3, Some((1, &img)), &img);
    assert_verifies(&store, 3);
}

#[test]
fn torn_pack_tail_keeps_earlier_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(512 * 1024, 11);
    // Random (hence unique) blocks: seeds with (0 + seed) % 5 >= 2.
    let x = image(BS as usize, 102);
    let y = image(BS as usize, 103);
    {
        let store = Store::open(dir.path()).unwrap();
        sync(&store, 1, None, &img);
        assert!(matches!(put(&store, &x), PutOutcome::Stored { .. }));
        assert!(matches!(put(&store, &y), PutOutcome::Stored { .. }));
        store.sync().unwrap();
    }
    let pack = dir.path().join("packs").join("00000000.pack");
    let len = fs::metadata(&pack).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let store = Store::open(dir.path()).unwrap();
    assert!(store.has_chunk(&Digest::of(&x)));
    assert!(!store.has_chunk(&Digest::of(&y)));
    assert!(dir.path().join("packs").join("00000000.idx").exists());
    assert_verifies(&store, 1);
    // New writes go to a fresh pack.
    assert!(matches!(put(&store, &y), PutOutcome::Stored { .. }));
    assert!(dir.path().join("packs").join("00000001.pack").exists());
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(store.has_chunk(&Digest::of(&y)));
}

#[test]
fn packs_rotate_and_reload_from_idx() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(1024 * 1024, 12);
    {
        let store = Store::open(dir.path()).unwrap();
        store.set_pack_target(64 * 1024);
        sync(&store, 1, None, &img);
    }
    let idx = fs::read_dir(dir.path().join("packs"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "idx")
        })
        .count();
    assert!(idx > 5, "only {idx} sealed packs");
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(export(&store, 1), img);
    assert_verifies(&store, 1);
}

#[test]
fn grow_and_shrink_between_points() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let img1 = image(3 * 1024 * 1024 + 1000, 13);
    sync(&store, 1, None, &img1);
    // Grow: the old short tail becomes a full block, new data after it.
    let mut img2 = img1.clone();
    img2.extend_from_slice(&image(300 * 1024 + 77, 14));
    sync(&store, 2, Some((1, &img1)), &img2);
    // Shrink to an odd size.
    let img3 = img2[..1024 * 1024 + 123].to_vec();
    sync(&store, 3, Some((2, &img2)), &img3);
    // Grow with zeros only: nothing to send past the old end.
    let mut img4 = img3.clone();
    img4.resize(2 * 1024 * 1024, 0);
    sync(&store, 4, Some((3, &img3)), &img4);
    for (p, img) in [(1, &img1), (2, &img2), (3, &img3), (4, &img4)] {
        assert_eq!(&export(&store, p), img, "point {p}");
        assert_verifies(&store, p);
    }
}

#[test]
fn verify_detects_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let img = image(512 * 1024, 15);
    sync(&store, 1, None, &img);
    assert_verifies(&store, 1);
    // Flip a payload byte of the chunk of data block 2.
    let d = Digest::of(&img[2 * BS as usize..3 * BS as usize]);
    let loc = lock(&store.state).catalogue.get(&d).unwrap();
    let pack = dir
        .path()
        .join("packs")
        .join(format!("{:08x}.pack", loc.pack));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(pack)
        .unwrap();
    let at = loc.offset + pack::RECORD_HEADER_LEN as u64 + 3;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();

    let r = store.verify_point(AGENT, DISK, 1).unwrap();
    assert!(!r.ok());
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert!(r.problems[0].starts_with("block 2:"), "{:?}", r.problems);
    assert_eq!(r.blocks, 128);

    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("x.raw");
    let err = store
        .export_raw(AGENT, DISK, 1, &dest, &mut |_, _| {})
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(fsutil::list_dir(out.path()).unwrap().is_empty());
}

#[test]
fn builder_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let size = 10 * BS as u64 + 100;
    assert!(matches!(
        store.begin_point("../etc", DISK, 1, None, size, BS),
        Err(StoreError::InvalidId(_))
    ));
    assert!(matches!(
        store.begin_point(AGENT, DISK, 1, None, size, 1000),
        Err(StoreError::InvalidGeometry { .. })
    ));
    assert!(matches!(
        store.begin_point(AGENT, DISK, 2, Some(1), size, BS),
        Err(StoreError::NotFound { .. })
    ));
    let full = image(BS as usize, 20);
    put(&store, &full);
    let mut b = store.begin_point(AGENT, DISK, 1, None, size, BS).unwrap();
    b.record(3, Digest::of(&full)).unwrap();
    assert!(matches!(
        b.record(3, Digest::of(&full)),
        Err(StoreError::BlockOrder { block: 3, last: 3 })
    ));
    assert!(matches!(
        b.record(11, Digest::of(&full)),
        Err(StoreError::BlockOutOfRange {
            block: 11,
            block_count: 11
        })
    ));
    assert!(matches!(
        b.record(5, Digest::of(b"never stored")),
        Err(StoreError::MissingChunk { .. })
    ));
    // A full-size chunk cannot stand for the 100-byte tail block.
    assert!(matches!(
        b.record(10, Digest::of(&full)),
        Err(StoreError::BlockLength {
            block: 10,
            expected: 100,
            actual: 4096
        })
    ));
    // The tail's own zero digest is fine.
    b.record(10, Digest::of_zeros(100)).unwrap();
    let mut ds = vec![Digest::of_zeros(BS as usize); 10];
    ds[3] = Digest::of(&full);
    ds.push(Digest::of_zeros(100));
    b.commit(&root_of(&ds), 0, &Default::default()).unwrap();
    assert!(matches!(
        store.begin_point(AGENT, DISK, 1, None, size, BS),
        Err(StoreError::PointExists { .. })
    ));
    assert!(matches!(
        store.begin_point(AGENT, DISK, 2, Some(1), size, 8192),
        Err(StoreError::CannotCarry { .. })
    ));
    let aborted = store
        .begin_point(AGENT, DISK, 2, Some(1), size, BS)
        .unwrap();
    aborted.abort().unwrap();
    assert_eq!(store.points(AGENT, DISK).unwrap().len(), 1);
}

#[test]
fn concurrent_puts_store_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| image(BS as usize, 200 + i % 16)).collect();
    let distinct: std::collections::HashSet<Digest> =
        blocks.iter().map(|b| Digest::of(b)).collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for b in &blocks {
                    put(&store, b);
                }
            });
        }
    });
    assert_eq!(store.stats().chunks, distinct.len() as u64);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// A chain of points with random sizes and random edits exports every
    /// image exactly.
    #[test]
    fn chains_of_points_export_exactly(
        steps in prop::collection::vec(
            (1usize..400 * 1024, prop::collection::vec((0usize..400 * 1024, any::<u8>(), 1usize..9000), 0..6)),
            1..4,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut prev: Option<(PointId, Vec<u8>)> = None;
        let mut images = Vec::new();
        for (n, (size, edits)) in steps.into_iter().enumerate() {
            let mut img = prev.as_ref().map(|p| p.1.clone()).unwrap_or_default();
            img.resize(size, 0);
            for (at, byte, len) in edits {
                let at = at % size;
                let end = (at + len).min(size);
                img[at..end].fill(byte);
            }
            let point = n as PointId + 1;
            sync(&store, point, prev.as_ref().map(|p| (p.0, &p.1[..])), &img);
            images.push((point, img.clone()));
            prev = Some((point, img));
        }
        for (p, img) in &images {
            prop_assert_eq!(&export(&store, *p), img);
        }
    }
}

/// Image of point `p` in the crash test: each point changes a few blocks of
/// the previous one and sometimes the size.
fn crash_image(p: PointId) -> Vec<u8> {
    let mut img = image(256 * 1024 + (p as usize % 3) * 4096 + 7, 50);
    for q in 1..=p {
        let at = (q as usize * 37 % 60) * BS as usize;
        img[at..at + 100].fill(q as u8);
    }
    img
}

const CRASH_DIR_ENV: &str = "TIDELINE_STORE_CRASH_DIR";

/// The child half of `sigkill_at_any_instant_keeps_points_whole`: commits
/// points forever until killed. Ignored unless run by that test.
#[test]
#[ignore = "run as a child process by sigkill_at_any_instant_keeps_points_whole"]
fn crash_child_commits_forever() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&dir)).unwrap();
    store.set_pack_target(256 * 1024);
    let mut latest = store.latest_point(AGENT, DISK).unwrap().map(|p| p.point);
    loop {
        let p = latest.map_or(1, |l| l + 1);
        let base_img = latest.map(crash_image);
        let img = crash_image(p);
        sync(&store, p, latest.zip(base_img.as_deref()), &img);
        latest = Some(p);
    }
}

#[test]
fn sigkill_at_any_instant_keeps_points_whole() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut seen = 0;
    for (round, delay_ms) in [40u64, 75, 110, 160, 230].into_iter().enumerate() {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "store::tests::crash_child_commits_forever",
            ])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let store = Store::open(dir.path()).unwrap();
        let points = store.points(AGENT, DISK).unwrap();
        // Ids are consecutive: every point before the newest is whole.
        for (i, info) in points.iter().enumerate() {
            assert_eq!(info.point, i as PointId + 1, "round {round}");
        }
        for info in &points {
            assert_verifies(&store, info.point);
        }
        if let Some(last) = points.last() {
            assert_eq!(
                export(&store, last.point),
                crash_image(last.point),
                "round {round}"
            );
        }
        assert!(points.len() >= seen, "points disappeared");
        seen = points.len();
    }
    assert!(seen > 0, "the child never committed a point");
}
