//! VMDK reader tests. qemu-img is the oracle: a raw image converted to each
//! subformat it writes must read back bit for bit. Corrupted copies of its
//! output must fail with errors that name the file and the defect.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const GRAIN: u64 = 64 * KIB;

/// Deterministic bytes: half incompressible, half text.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (out.len() / 8192) % 2 == 0 {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(b"tideline grain ");
        }
    }
    out.truncate(len);
    out
}

/// A sparse raw image of `size` bytes with `writes` (offset, len) filled.
fn make_raw(path: &Path, size: u64, writes: &[(u64, u64)]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in writes.iter().enumerate() {
        f.write_all_at(&pattern(i as u64 + 1, len as usize), off)
            .unwrap();
    }
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed by the VMDK tests (apt install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn convert(raw: &Path, vmdk: &Path, subformat: &str) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        &format!("subformat={subformat}"),
        raw.to_str().unwrap(),
        vmdk.to_str().unwrap(),
    ]);
}

/// The data extents of a disk, checked for order and bounds.
fn extents(disk: &VmdkDisk) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some((start, end)) = disk.next_data(off).unwrap() {
        assert!(
            start >= off && end > start && end <= disk.size(),
            "{start}..{end} after {off}"
        );
        out.push((start, end));
        off = end;
    }
    out
}

/// Reads the whole disk in 4 MiB chunks and compares it with `raw`; checks
/// that bytes outside the reported data extents are zeros. Returns the
/// bytes reported as data.
fn assert_reads_as(disk: &VmdkDisk, raw: &Path) -> u64 {
    let raw_file = File::open(raw).unwrap();
    let size = raw_file.metadata().unwrap().len();
    assert_eq!(disk.size(), size, "{}", disk.describe());
    let ext = extents(disk);
    let chunk = 4 * MIB;
    let (mut got, mut want) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        disk.read_exact_at(&mut got[..n], off).unwrap();
        raw_file.read_exact_at(&mut want[..n], off).unwrap();
        assert!(
            got[..n] == want[..n],
            "{}: differs in [{off}, +{n})",
            disk.describe()
        );
        off += n as u64;
    }
    // Holes between data extents are zeros in the raw image.
    let mut prev = 0;
    for &(start, end) in ext.iter().chain([(size, size)].iter()) {
        let mut at = prev;
        while at < start {
            let n = chunk.min(start - at) as usize;
            raw_file.read_exact_at(&mut want[..n], at).unwrap();
            assert!(
                want[..n].iter().all(|&b| b == 0),
                "data in reported hole at {at}"
            );
            at += n as u64;
        }
        prev = end;
    }
    // Unaligned small reads agree with the raw image too.
    for &(off, len) in &[(1, 4096), (GRAIN - 100, 300), (size - 513, 513)] {
        let mut a = vec![0u8; len];
        let mut b = vec![0u8; len];
        disk.read_exact_at(&mut a, off).unwrap();
        raw_file.read_exact_at(&mut b, off).unwrap();
        assert!(a == b, "small read at {off}");
    }
    let mut one = [0u8; 1];
    assert!(disk.read_exact_at(&mut one, size).is_err());
    ext.iter().map(|(s, e)| e - s).sum()
}

/// 5 MiB + 3 sectors (not a multiple of the grain), data at the start, in
/// the middle across grain boundaries, and in the last partial grain.
fn small_image(dir: &Path) -> (PathBuf, u64) {
    let raw = dir.join("small.raw");
    let size = 5 * MIB + 3 * 512;
    make_raw(
        &raw,
        size,
        &[(0, 10_000), (2 * MIB + 12_345, 70_000), (size - 1000, 1000)],
    );
    (raw, size)
}

fn converted(subformat: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = small_image(dir.path());
    let vmdk = dir.path().join(format!("{subformat}.vmdk"));
    convert(&raw, &vmdk, subformat);
    (dir, raw, vmdk)
}

#[test]
fn every_qemu_subformat_reads_bit_identical() {
    for subformat in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        let (_dir, raw, vmdk) = converted(subformat);
        let disk = VmdkDisk::open(&vmdk).unwrap();
        let data = assert_reads_as(&disk, &raw);
        if subformat.contains("Sparse") || subformat == "streamOptimized" {
            // Three written areas: at most 5 grains are allocated.
            assert!(
                data <= 5 * GRAIN,
                "{subformat}: {data} bytes reported as data"
            );
        }
    }
}

#[test]
fn two_gb_layouts_over_2_gib_read_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("big.raw");
    let size = 2 * GIB + GIB / 2 + 1536;
    make_raw(
        &raw,
        size,
        &[
            (0, 4096),
            (GIB + 777 * 512, 100_000),
            (2 * GIB - 5000, 10_000),
            (size - 4096, 4096),
        ],
    );
    for subformat in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let vmdk = dir.path().join(format!("{subformat}.vmdk"));
        convert(&raw, &vmdk, subformat);
        let disk = VmdkDisk::open(&vmdk).unwrap();
        assert!(disk.extents.len() >= 2, "{subformat}: one extent");
        let data = assert_reads_as(&disk, &raw);
        assert!(
            data < 64 * MIB,
            "{subformat}: {data} bytes reported as data"
        );
    }
}

/// Rewrites a qemu streamOptimized file the way VMware exports it: the
/// header says GD_AT_END and a footer (marker, header copy, end marker)
/// replaces the final end-of-stream marker.
fn move_gd_to_footer(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header: Vec<u8> = bytes[..512].to_vec();
    let eos = bytes.split_off(bytes.len() - 512);
    assert!(
        eos.iter().all(|&b| b == 0),
        "qemu's file does not end in an EOS marker"
    );
    bytes[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut marker = [0u8; 512];
    marker[0..8].copy_from_slice(&1u64.to_le_bytes());
    marker[12..16].copy_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&marker);
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&eos);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn stream_optimized_with_grain_directory_at_the_end() {
    let (_dir, raw, vmdk) = converted("streamOptimized");
    move_gd_to_footer(&vmdk);
    let disk = VmdkDisk::open(&vmdk).unwrap();
    assert_reads_as(&disk, &raw);

    // Without the footer marker the footer is not trusted.
    let f = OpenOptions::new().write(true).open(&vmdk).unwrap();
    let len = f.metadata().unwrap().len();
    f.write_all_at(&[0; 4], len - 1536 + 12).unwrap();
    let err = VmdkDisk::open(&vmdk).err().unwrap();
    assert!(err.to_string().contains("no footer marker"), "{err}");
}

#[test]
fn stream_optimized_reads_agree_across_threads() {
    let (_dir, raw, vmdk) = converted("streamOptimized");
    let disk = std::sync::Arc::new(VmdkDisk::open(&vmdk).unwrap());
    let want = std::fs::read(&raw).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (disk, want) = (disk.clone(), &want);
            s.spawn(move || {
                // Small reads in different orders share the grain cache.
                let mut buf = vec![0u8; 4096 + 512 * t as usize];
                let mut off = (t * 7919 * 512) % (want.len() as u64 - buf.len() as u64);
                for _ in 0..300 {
                    disk.read_exact_at(&mut buf, off).unwrap();
                    assert!(
                        buf[..] == want[off as usize..off as usize + buf.len()],
                        "at {off}"
                    );
                    off = (off + 37 * 512) % (want.len() as u64 - buf.len() as u64);
                }
            });
        }
    });
}

#[test]
fn vmfs_descriptor_with_flat_file() {
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("web 01-flat.vmdk");
    let size = 3 * MIB + 512;
    make_raw(
        &flat,
        size,
        &[(0, 512), (MIB + 3, 200_000), (size - 512, 512)],
    );
    let desc = dir.path().join("web 01.vmdk");
    std::fs::write(
        &desc,
        format!(
            "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\nparentCID=ffffffff\r\ncreateType=\"vmfs\"\r\n\r\n# Extent description\r\nRW {} VMFS \"web 01-flat.vmdk\"\r\n\r\n# The Disk Data Base\r\n#DDB\r\n\r\nddb.adapterType = \"lsilogic\"\r\nddb.thinProvisioned = \"1\"\r\n",
            size / 512
        ),
    )
    .unwrap();
    let disk = VmdkDisk::open(&desc).unwrap();
    let data = assert_reads_as(&disk, &flat);
    // SEEK_DATA skips the flat file's holes (where the filesystem can tell).
    assert!(data <= size);
}

#[test]
fn flat_extent_offsets_and_zero_extents() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(9, (2 * MIB) as usize);
    // The flat file holds 8 sectors of something else, then the extent.
    let mut file = vec![0xeeu8; 4096];
    file.extend_from_slice(&content[..MIB as usize]);
    std::fs::write(dir.path().join("a.bin"), &file).unwrap();
    std::fs::write(dir.path().join("b.bin"), &content[MIB as usize..]).unwrap();
    let desc = dir.path().join("multi.vmdk");
    let sectors = MIB / 512;
    std::fs::write(
        &desc,
        format!(
            "createType=\"twoGbMaxExtentFlat\"\nRW {sectors} FLAT \"a.bin\" 8\nRW 4 ZERO\nRDONLY {sectors} FLAT \"./b.bin\" 0\n"
        ),
    )
    .unwrap();
    let disk = VmdkDisk::open(&desc).unwrap();
    assert_eq!(disk.size(), 2 * MIB + 2048);
    let mut want = content[..MIB as usize].to_vec();
    want.extend_from_slice(&[0; 2048]);
    want.extend_from_slice(&content[MIB as usize..]);
    let mut got = vec![0u8; want.len()];
    disk.read_exact_at(&mut got, 0).unwrap();
    assert!(got == want);
    let ext = extents(&disk);
    assert!(
        !ext.iter().any(|&(s, e)| s < MIB + 2048 && e > MIB),
        "ZERO extent reported as data: {ext:?}"
    );
    disk.done_with(0, disk.size());
}

/// A file name, how to corrupt the file, and the defect the error names.
type Corruption = (&'static str, Box<dyn Fn(&Path)>, &'static str);

fn sparse_header_patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn open_err(path: &Path) -> String {
    match VmdkDisk::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

/// The error names the file and the defect.
fn assert_err(path: &Path, defect: &str) {
    let msg = open_err(path);
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(msg.contains(&*name), "no file name in: {msg}");
    assert!(msg.contains(defect), "expected {defect:?} in: {msg}");
}

fn u32_at(path: &Path, at: u64) -> u32 {
    let mut b = [0u8; 4];
    File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
    u32::from_le_bytes(b)
}

/// A fresh monolithicSparse copy for one corruption.
fn sparse_copy(src: &Path, name: &str) -> PathBuf {
    let p = src.with_file_name(name);
    std::fs::copy(src, &p).unwrap();
    p
}

#[test]
fn corrupt_sparse_headers_and_tables_are_refused() {
    let (_dir, _raw, vmdk) = converted("monolithicSparse");
    let gd_sector = u64::from(u32_at(&vmdk, 56));
    let gt_sector = u64::from(u32_at(&vmdk, gd_sector * 512));
    let len = std::fs::metadata(&vmdk).unwrap().len();
    let cases: Vec<Corruption> = vec![
        (
            "short.vmdk",
            Box::new(|p| {
                File::options()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(300)
                    .unwrap()
            }),
            "shorter than the 512-byte",
        ),
        (
            "cut.vmdk",
            Box::new(|p| {
                File::options()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(11 * 512)
                    .unwrap()
            }),
            "outside the file",
        ),
        (
            "lastgrain.vmdk",
            Box::new(move |p| {
                File::options()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(len - GRAIN + 1000)
                    .unwrap()
            }),
            "grain 80 at byte",
        ),
        (
            "version.vmdk",
            Box::new(|p| sparse_header_patch(p, 4, &9u32.to_le_bytes())),
            "version 9",
        ),
        (
            "capacity.vmdk",
            Box::new(|p| sparse_header_patch(p, 12, &(u64::MAX / 3).to_le_bytes())),
            "capacity",
        ),
        (
            "zerocap.vmdk",
            Box::new(|p| sparse_header_patch(p, 12, &0u64.to_le_bytes())),
            "capacity of 0",
        ),
        (
            "grain100.vmdk",
            Box::new(|p| sparse_header_patch(p, 20, &100u64.to_le_bytes())),
            "not a power of two",
        ),
        (
            "grainbig.vmdk",
            Box::new(|p| sparse_header_patch(p, 20, &(1u64 << 20).to_le_bytes())),
            "grain size",
        ),
        (
            "gtes.vmdk",
            Box::new(|p| sparse_header_patch(p, 44, &1024u32.to_le_bytes())),
            "numGTEsPerGT is 1024",
        ),
        (
            "tables.vmdk",
            Box::new(|p| {
                sparse_header_patch(p, 12, &(1u64 << 36).to_le_bytes());
                sparse_header_patch(p, 20, &8u64.to_le_bytes());
            }),
            // Checked against the file's real size, not a fixed cap.
            "grain directory at sector",
        ),
        (
            "gdout.vmdk",
            Box::new(|p| sparse_header_patch(p, 56, &(1u64 << 40).to_le_bytes())),
            "grain directory at sector",
        ),
        (
            "gdhuge.vmdk",
            Box::new(|p| sparse_header_patch(p, 56, &(u64::MAX - 1).to_le_bytes())),
            "outside the file",
        ),
        (
            "gtout.vmdk",
            Box::new(move |p| {
                sparse_header_patch(p, gd_sector * 512, &0xffff_ff00u32.to_le_bytes())
            }),
            "grain table at sector",
        ),
        (
            "gtoverlap.vmdk",
            Box::new(move |p| {
                sparse_header_patch(p, gd_sector * 512, &(gd_sector as u32).to_le_bytes())
            }),
            "overlaps",
        ),
        (
            "grainout.vmdk",
            Box::new(move |p| {
                sparse_header_patch(p, gt_sector * 512, &0x00ff_ffffu32.to_le_bytes())
            }),
            "outside the file",
        ),
        (
            "grainmeta.vmdk",
            Box::new(move |p| {
                sparse_header_patch(p, gt_sector * 512, &(gt_sector as u32).to_le_bytes())
            }),
            "overlaps the grain table",
        ),
        (
            "descsize.vmdk",
            Box::new(|p| sparse_header_patch(p, 36, &(1u64 << 30).to_le_bytes())),
            "embedded descriptor",
        ),
        (
            "algo.vmdk",
            Box::new(|p| sparse_header_patch(p, 77, &7u16.to_le_bytes())),
            "compression algorithm 7",
        ),
        (
            "desc.vmdk",
            Box::new(|p| sparse_header_patch(p, 512, b"what is this\n")),
            "broken VMDK descriptor, line 1",
        ),
    ];
    for (name, corrupt, defect) in cases {
        let p = sparse_copy(&vmdk, name);
        corrupt(&p);
        assert_err(&p, defect);
    }
}

/// The sector of the first compressed grain and its marker's size field.
fn first_grain(path: &Path) -> u64 {
    let gd = u64::from(u32_at(path, 56));
    let gt = u64::from(u32_at(path, gd * 512));
    u64::from(u32_at(path, gt * 512))
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

/// Replaces the first grain's marker and data.
fn replace_grain(path: &Path, lba: u64, size: u32, data: &[u8]) {
    let at = first_grain(path) * 512;
    let mut b = lba.to_le_bytes().to_vec();
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(data);
    sparse_header_patch(path, at, &b);
}

#[test]
fn bad_compressed_grains_fail_when_read() {
    let (_dir, _raw, vmdk) = converted("streamOptimized");
    assert_eq!(first_grain(&vmdk), 128);
    let short = zlib(&[7; 1000]);
    let long = zlib(&vec![7; 2 * GRAIN as usize]);
    let cases: Vec<Corruption> = vec![
        (
            "absurd.vmdk",
            Box::new(|p| replace_grain(p, 0, 0xffff_fff0, &[])),
            "compressed size 4294967280",
        ),
        (
            "zero.vmdk",
            Box::new(|p| replace_grain(p, 0, 0, &[])),
            "compressed size 0",
        ),
        (
            "lba.vmdk",
            Box::new(|p| replace_grain(p, 99, 100, &[])),
            "says sector 99",
        ),
        (
            "short.vmdk",
            Box::new(move |p| replace_grain(p, 0, short.len() as u32, &short)),
            "inflates to 1000 bytes",
        ),
        (
            "long.vmdk",
            Box::new(move |p| replace_grain(p, 0, long.len() as u32, &long)),
            "more than one grain",
        ),
        (
            "garbage.vmdk",
            Box::new(|p| replace_grain(p, 0, 64, &[0x55; 64])),
            "does not inflate",
        ),
        (
            "cut.vmdk",
            Box::new(|p| {
                let z = zlib(&pattern(3, GRAIN as usize));
                replace_grain(p, 0, 200, &z[..200]);
            }),
            "ends before its zlib stream",
        ),
    ];
    for (name, corrupt, defect) in cases {
        let p = sparse_copy(&vmdk, name);
        corrupt(&p);
        let disk = match VmdkDisk::open(&p) {
            Ok(d) => d,
            Err(e) => panic!("{name}: {e}"),
        };
        for len in [GRAIN as usize, 4096] {
            let mut buf = vec![0u8; len];
            let err = disk.read_exact_at(&mut buf, 0).unwrap_err();
            assert!(
                matches!(err, SourceError::Vmdk(VmdkError::Grain { .. })),
                "{name}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(name) && msg.contains(defect), "{name}: {msg}");
        }
        // Other grains still read.
        let mut buf = vec![0u8; 4096];
        disk.read_exact_at(&mut buf, 2 * MIB).unwrap();
    }

    // The grain stored last in the file claims more bytes than follow it.
    let p = sparse_copy(&vmdk, "past.vmdk");
    let gt = u64::from(u32_at(&p, u64::from(u32_at(&p, 56)) * 512));
    let (index, sector) = (0..80u64)
        .map(|i| (i, u64::from(u32_at(&p, gt * 512 + 4 * i))))
        .max_by_key(|&(_, s)| s)
        .unwrap();
    sparse_header_patch(&p, sector * 512 + 8, &80_000u32.to_le_bytes());
    let disk = VmdkDisk::open(&p).unwrap();
    let mut buf = vec![0u8; 512];
    let msg = disk
        .read_exact_at(&mut buf, index * GRAIN)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("past.vmdk") && msg.contains("past the end of the file"),
        "{msg}"
    );
}

fn write_descriptor(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn descriptor_problems_name_the_file() {
    let (dir, _raw, _vmdk) = converted("monolithicFlat");
    let d = dir.path();
    let flat = "monolithicFlat-flat.vmdk";
    let sectors = std::fs::metadata(d.join(flat)).unwrap().len() / 512;
    let cases = [
        ("broken.vmdk", format!("createType=\"monolithicFlat\"\nRW {sectors} FLAT \"{flat}\" 0\nthis is not a descriptor line\n"), "line 3"),
        ("missing.vmdk", format!("createType=\"monolithicFlat\"\nRW {sectors} FLAT \"gone-flat.vmdk\" 0\n"), "gone-flat.vmdk cannot be opened"),
        ("toolong.vmdk", format!("createType=\"monolithicFlat\"\nRW {} FLAT \"{flat}\" 0\n", sectors + 1), "flat extent file is"),
        ("offset.vmdk", format!("createType=\"monolithicFlat\"\nRW {sectors} FLAT \"{flat}\" 1\n"), "flat extent file is"),
        ("hugeoff.vmdk", format!("createType=\"monolithicFlat\"\nRW 1 FLAT \"{flat}\" {}\n", u64::MAX / 2), "too large"),
        ("hugesize.vmdk", format!("createType=\"monolithicFlat\"\nRW {} FLAT \"{flat}\" 0\n", u64::MAX / 2), "add up to more than"),
        ("parentdir.vmdk", format!("createType=\"monolithicFlat\"\nRW 1 FLAT \"../{flat}\" 0\n"), "not a relative path"),
        ("absolute.vmdk", "createType=\"monolithicFlat\"\nRW 1 FLAT \"/etc/passwd\" 0\n".into(), "not a relative path"),
        ("sparse.vmdk", format!("createType=\"twoGbMaxExtentSparse\"\nRW {sectors} SPARSE \"{flat}\"\n"), "no KDMV sparse header"),
        ("type.vmdk", format!("createType=\"fullDevice\"\nRW {sectors} FLAT \"{flat}\" 0\n"), "createType=\"fullDevice\""),
        ("rdm.vmdk", "createType=\"vmfs\"\nRW 8 VMFSRDM \"x-rdm.vmdk\"\n".into(), "VMFSRDM"),
        ("noaccess.vmdk", format!("createType=\"vmfs\"\nNOACCESS {sectors} VMFS \"{flat}\"\n"), "NOACCESS"),
    ];
    for (name, text, defect) in cases {
        let p = write_descriptor(d, name, &text);
        assert_err(&p, defect);
    }
    // A flat extent that lost its tail.
    File::options()
        .write(true)
        .open(d.join(flat))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let msg = open_err(&d.join("monolithicFlat.vmdk"));
    assert!(
        msg.contains(flat) && msg.contains("flat extent file is 4096 bytes"),
        "{msg}"
    );
    // Files that are no VMDK at all.
    let big = d.join("big.vmdk");
    File::create(&big)
        .unwrap()
        .set_len(MAX_DESCRIPTOR_FILE + 1)
        .unwrap();
    assert_err(&big, "not a VMDK file");
    assert!(VmdkDisk::open(d).is_err());
    assert_err(&d.join("nothing-here.vmdk"), "cannot open");
}

#[test]
fn an_extent_that_leaves_the_directory_through_a_link_is_refused() {
    let (dir, _raw, _vmdk) = converted("monolithicFlat");
    let d = dir.path();
    let flat = "monolithicFlat-flat.vmdk";
    let sectors = std::fs::metadata(d.join(flat)).unwrap().len() / 512;
    // A file outside, reached through a link to it and through a linked
    // directory.
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(d.join(flat), outside.path().join(flat)).unwrap();
    std::os::unix::fs::symlink(outside.path().join(flat), d.join("evil-flat.vmdk")).unwrap();
    std::os::unix::fs::symlink(outside.path(), d.join("sub")).unwrap();
    for (name, extent) in [
        ("evil.vmdk", "evil-flat.vmdk"),
        ("subdir.vmdk", "sub/monolithicFlat-flat.vmdk"),
    ] {
        let p = write_descriptor(
            d,
            name,
            &format!("createType=\"monolithicFlat\"\nRW {sectors} FLAT \"{extent}\" 0\n"),
        );
        let msg = open_err(&p);
        assert!(
            msg.contains(name)
                && msg.contains(extent)
                && msg.contains("outside the descriptor's directory"),
            "{msg}"
        );
    }
    // A link that stays inside is followed.
    std::os::unix::fs::symlink(flat, d.join("alias-flat.vmdk")).unwrap();
    let p = write_descriptor(
        d,
        "alias.vmdk",
        &format!("createType=\"monolithicFlat\"\nRW {sectors} FLAT \"alias-flat.vmdk\" 0\n"),
    );
    VmdkDisk::open(&p).unwrap();
}

#[test]
fn multi_terabyte_sparse_disks_open() {
    // A 5 TiB disk as VMware hands them out: its grain tables alone would
    // be 320 MiB, more than the fixed cap this reader used to have.
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["streamOptimized", "monolithicSparse"] {
        let p = dir.path().join(format!("{subformat}.vmdk"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            p.to_str().unwrap(),
            "5T",
        ]);
        let disk = VmdkDisk::open(&p).unwrap();
        assert_eq!(disk.size(), 5 << 40, "{subformat}");
        let mut buf = vec![1u8; 4096];
        disk.read_exact_at(&mut buf, (5 << 40) - 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "{subformat}");
    }
}

#[test]
fn snapshot_deltas_are_refused_naming_the_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", base.to_str().unwrap(), "4M"]);
    let delta = d.join("delta.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        delta.to_str().unwrap(),
    ]);
    // qemu's delta: monolithicSparse with parentCID and parentFileNameHint.
    assert_err(&delta, "parentCID=");
    VmdkDisk::open(&base).unwrap();

    let cases = [
        (
            "vmfssparse.vmdk",
            "createType=\"vmfsSparse\"\nparentCID=12345678\nRW 8 VMFSSPARSE \"x-delta.vmdk\"\n",
            "vmfsSparse",
        ),
        (
            "sesparse.vmdk",
            "createType=\"seSparse\"\nRW 8 SESPARSE \"x-sesparse.vmdk\"\n",
            "seSparse",
        ),
        (
            "sesparse-extent.vmdk",
            "createType=\"vmfs\"\nRW 8 SESPARSE \"x-sesparse.vmdk\"\n",
            "SESPARSE extent",
        ),
        (
            "hint.vmdk",
            "createType=\"vmfs\"\nparentFileNameHint=\"base.vmdk\"\nRW 8 ZERO\n",
            "parentFileNameHint",
        ),
        (
            "cid.vmdk",
            "createType=\"monolithicFlat\"\nparentCID=0badf00d\nRW 8 ZERO\n",
            "parentCID=0badf00d",
        ),
    ];
    for (name, text, format) in cases {
        let p = write_descriptor(d, name, text);
        assert_err(&p, format);
        assert!(open_err(&p).contains("snapshot"), "{}", open_err(&p));
    }
    let cowd = d.join("old-delta.vmdk");
    let mut bytes = b"COWD".to_vec();
    bytes.resize(2048, 0);
    std::fs::write(&cowd, bytes).unwrap();
    assert_err(&cowd, "vmfsSparse (COWD)");
}

#[test]
fn in_memory_images_open_like_files() {
    let (_dir, raw, vmdk) = converted("streamOptimized");
    let disk = VmdkDisk::from_bytes("mem.vmdk", std::fs::read(&vmdk).unwrap()).unwrap();
    assert_eq!(disk.describe(), "mem.vmdk");
    let want = std::fs::read(&raw).unwrap();
    let mut got = vec![0u8; want.len()];
    disk.read_exact_at(&mut got, 0).unwrap();
    assert!(got == want);
    let err = VmdkDisk::from_bytes("d.vmdk", b"createType=\"vmfs\"\nRW 8 VMFS \"x\"\n".to_vec())
        .err()
        .unwrap();
    assert!(matches!(err, VmdkError::MissingExtent { .. }), "{err}");
    let zero =
        VmdkDisk::from_bytes("z.vmdk", b"createType=\"vmfs\"\nRW 8 ZERO\n".to_vec()).unwrap();
    assert_eq!(zero.size(), 4096);
    assert_eq!(zero.next_data(0).unwrap(), None);
}

#[test]
fn vmdk_disk_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<VmdkDisk>();
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vmdk_parser")
}

/// Writes the seed corpus (`TIDELINE_WRITE_CORPUS=1`): qemu-img images of a
/// 1 MiB raw disk in each sparse subformat, a VMware-style footer variant,
/// an extent of a twoGb disk and a few descriptors.
fn write_corpus(out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("seed.raw");
    make_raw(
        &raw,
        MIB,
        &[(0, 3000), (300 * KIB, 70_000), (MIB - 512, 512)],
    );
    for sub in [
        "monolithicSparse",
        "streamOptimized",
        "twoGbMaxExtentSparse",
    ] {
        let v = dir.path().join(format!("{sub}.vmdk"));
        convert(&raw, &v, sub);
        let file = if sub == "twoGbMaxExtentSparse" {
            std::fs::copy(&v, out.join("twoGbMaxExtentSparse-descriptor.vmdk")).unwrap();
            dir.path().join("twoGbMaxExtentSparse-s001.vmdk")
        } else {
            v.clone()
        };
        std::fs::copy(&file, out.join(format!("{sub}.vmdk"))).unwrap();
        if sub == "streamOptimized" {
            move_gd_to_footer(&v);
            std::fs::copy(&v, out.join("streamOptimized-footer.vmdk")).unwrap();
        }
    }
    let flat = dir.path().join("monolithicFlat.vmdk");
    convert(&raw, &flat, "monolithicFlat");
    std::fs::copy(&flat, out.join("monolithicFlat-descriptor.vmdk")).unwrap();
    std::fs::write(
        out.join("zero-extents.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 2048 ZERO\nRDONLY 8 ZERO\n#DDB\nddb.adapterType = \"lsilogic\"\n",
    )
    .unwrap();
    std::fs::write(
        out.join("vmfs-descriptor.vmdk"),
        "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\nparentCID=ffffffff\r\ncreateType=\"vmfs\"\r\nRW 2048 VMFS \"x-flat.vmdk\"\r\n",
    )
    .unwrap();
}

#[test]
fn fuzz_corpus_replays_through_the_fuzz_body() {
    let dir = corpus_dir();
    if std::env::var_os("TIDELINE_WRITE_CORPUS").is_some() {
        write_corpus(&dir);
    }
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty fuzz corpus {}", dir.display());
    let mut readable = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        check_untrusted_image(&bytes);
        if let Ok(disk) = VmdkDisk::from_bytes("corpus.vmdk", bytes) {
            if disk.next_data(0).unwrap().is_some() {
                readable += 1;
            }
        }
    }
    // The corpus reaches the grain reader, not only the header checks.
    assert!(readable >= 3, "only {readable} corpus files open with data");
}

/// A stable stand-in for the fuzzer: corpus files with bytes of their
/// metadata (header, descriptor, tables, first grains) overwritten, and cut
/// short, go through the fuzz body without panicking.
#[test]
fn mutated_corpus_files_never_panic() {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for f in &files {
        let original = std::fs::read(f).unwrap();
        for round in 0..150 {
            let mut bytes = original.clone();
            let span = bytes.len().min(80 * 1024);
            for _ in 0..1 + next() % 4 {
                let at = (next() % span as u64) as usize;
                let value = match next() % 4 {
                    0 => 0,
                    1 => 0xff,
                    _ => next() as u8,
                };
                bytes[at] = value;
            }
            if round % 10 == 0 {
                bytes.truncate((next() % bytes.len() as u64) as usize);
            }
            check_untrusted_image(&bytes);
        }
    }
}
