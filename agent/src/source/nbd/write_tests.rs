//! Tests of writing to NBD exports: against real servers (`qemu-nbd`
//! serving qcow2, raw and VMDK images, checked afterwards with `qemu-img`;
//! `nbdkit` with filters that hide write-zeroes, inject errors, enforce
//! block sizes or log every request), against a fake server that records
//! every request it gets, and of the write reply parser.
//!
//! Like the read tests they need `qemu-utils` and `nbdkit`
//! (`scripts/install-deps.sh`) and fail, not skip, when a tool is missing.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use super::reply::{receive_write_reply, ReplyError};
use super::tests::{
    chunk, data_chunk, error_chunk, error_offset_chunk, hole_chunk, info_block_size, info_export,
    nbdkit, need_tool, none_chunk, opt_reply, read_exact, run, simple_reply, status_chunk,
    wait_listening, FakeServer, Server, MIB,
};
use super::wire::*;
use super::*;

/// Deterministic pseudo-random bytes (xorshift64*), so that a failure
/// reproduces.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What the disk should hold: a model the tests apply every write to.
struct Model(Vec<u8>);

impl Model {
    fn new(size: u64) -> Model {
        Model(vec![0; size as usize])
    }

    /// Writes `data` at `offset` to the disk and to the model.
    fn write(&mut self, disk: &NbdDisk, offset: u64, data: &[u8]) {
        disk.write_at(data, offset)
            .unwrap_or_else(|e| panic!("write {}+{}: {e}", offset, data.len()));
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    /// Zeroes `[offset, offset + len)` on the disk and in the model.
    fn zero(&mut self, disk: &NbdDisk, offset: u64, len: u64) {
        disk.write_zeroes(offset, len)
            .unwrap_or_else(|e| panic!("zero {offset}+{len}: {e}"));
        self.0[offset as usize..(offset + len) as usize].fill(0);
    }

    /// Reads the whole export back through the client and compares.
    fn check_reads(&self, disk: &NbdDisk) {
        let mut got = vec![0u8; self.0.len()];
        for (i, piece) in got.chunks_mut(7 * MIB as usize + 3).enumerate() {
            disk.read_exact_at(piece, i as u64 * (7 * MIB + 3)).unwrap();
        }
        assert_first_difference(&got, &self.0, "read back through the client");
    }
}

fn assert_first_difference(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {:#x}, expected {:#x}",
            got[i], want[i]
        );
    }
}

/// `qemu-nbd` serving `image` writable on a Unix socket in `dir`;
/// `--shared=N` above 1 makes it advertise multi-conn.
fn qemu_nbd_rw(dir: &Path, image: &Path, format: &str, shared: u32) -> Server {
    need_tool("qemu-nbd");
    let sock = dir.join("qemu-nbd-rw.sock");
    let mut child = Command::new("qemu-nbd")
        .args(["--persistent", "--cache=writeback"])
        .arg(format!("--shared={shared}"))
        .arg(format!("--format={format}"))
        .arg(format!("--socket={}", sock.display()))
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

/// The image's content as qemu reads it, through `qemu-img convert`.
fn qemu_img_raw(image: &Path, format: &str) -> Vec<u8> {
    let out = image.with_extension("converted.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(&out));
    std::fs::read(&out).unwrap()
}

/// Requests in an `nbdkit --filter=log` file: (connection, request kind,
/// the rest of the line).
fn logged_requests(log: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let conn = f.get(2)?.strip_prefix("connection=")?;
            let kind = *f.get(3)?;
            // Request lines only ("...Write" lines are the returns).
            if kind.starts_with("...") || !f.get(4)?.starts_with("id=") {
                return None;
            }
            Some((conn.to_owned(), kind.to_owned(), f[4..].join(" ")))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// qemu-nbd: qcow2, raw and VMDK images.

/// Writes of every shape into a fresh image of `format` served by qemu-nbd,
/// then a flush; the server is killed (SIGKILL) right after, so only what
/// the flush made durable can be in the file that `qemu-img` reads.
fn write_image_and_compare(format: &str) {
    need_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("target.{format}"));
    let size = 80 * MIB;
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&image)
        .arg(size.to_string()));
    let server = qemu_nbd_rw(dir.path(), &image, format, 4);
    let disk = NbdDisk::connect_writable(&server.uri).unwrap();
    assert!(disk.writable());
    assert_eq!(disk.size(), size);

    let mut model = Model::new(size);
    for (i, (offset, len)) in [
        (0, 1),
        (1, 4095),
        (4097, 65_536 * 3 + 7),
        // Larger than the 32 MiB maximum: split.
        (5 * MIB - 3, 33 * MIB + 11),
        (60 * MIB + 12_345, 777_777),
        // Up to the last byte.
        (size - 700, 700),
    ]
    .into_iter()
    .enumerate()
    {
        model.write(&disk, offset, &pattern(i as u64 + 1, len as usize));
    }
    // Zeroes over data, unaligned at both ends, and over a hole.
    model.zero(&disk, 5 * MIB + 100, 2 * MIB + 1);
    model.zero(&disk, 70 * MIB, MIB);
    model.check_reads(&disk);
    disk.flush().unwrap();
    drop(disk);
    drop(server);

    let got = qemu_img_raw(&image, format);
    assert_first_difference(&got, &model.0, &format!("{format} image via qemu-img"));
    if format == "qcow2" {
        run(Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2"])
            .arg(&image));
    }
}

#[test]
fn qemu_nbd_qcow2_receives_writes_that_survive_a_kill_after_flush() {
    write_image_and_compare("qcow2");
}

#[test]
fn qemu_nbd_raw_receives_writes_that_survive_a_kill_after_flush() {
    write_image_and_compare("raw");
}

#[test]
fn qemu_nbd_vmdk_receives_writes_that_survive_a_kill_after_flush() {
    write_image_and_compare("vmdk");
}

#[test]
fn read_only_exports_are_refused_for_writing() {
    need_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&image)
        .arg("1M"));
    need_tool("qemu-nbd");
    let sock = dir.path().join("ro.sock");
    let mut child = Command::new("qemu-nbd")
        .args(["--persistent", "--read-only", "--format=raw"])
        .arg(format!("--socket={}", sock.display()))
        .arg(&image)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&mut child, &sock);
    let qemu = Server {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    };
    let nbdkit_ro = nbdkit(dir.path(), &["-r", "memory", "1M"]);
    for uri in [&qemu.uri, &nbdkit_ro.uri] {
        let err = NbdDisk::connect_writable(uri).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, NbdError::ReadOnly { .. }), "{msg}");
        assert!(
            msg.contains(uri.as_str()) && msg.contains("read-only"),
            "{msg}"
        );
        // Reading is still fine, and writes through a reader are refused.
        let disk = NbdDisk::connect(uri).unwrap();
        assert!(!disk.writable());
        let err = disk.write_at(&[1; 512], 0).unwrap_err();
        assert!(matches!(err, NbdError::ReadOnly { .. }), "{err}");
        let err = disk.write_zeroes(0, 512).unwrap_err();
        assert!(matches!(err, NbdError::ReadOnly { .. }), "{err}");
        // Nothing was written, so nothing to flush.
        disk.flush().unwrap();
    }
}

// ---------------------------------------------------------------------------
// Concurrent writers through the pool.

/// `threads` writers, started together, each writing its own interleaved
/// 1 MiB + 1 pieces of the whole export, then one flush.
fn write_concurrently(disk: &Arc<NbdDisk>, threads: u64) -> Vec<u8> {
    let size = disk.size();
    let piece = MIB + 1;
    let start = Arc::new(std::sync::Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let disk = Arc::clone(disk);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                let mut off = t * piece;
                while off < size {
                    let len = piece.min(size - off) as usize;
                    disk.write_at(&pattern(off, len), off).unwrap();
                    off += threads * piece;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread");
    }
    disk.flush().unwrap();
    let mut want = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let len = piece.min(size - off) as usize;
        want.extend(pattern(off, len));
        off += piece;
    }
    want
}

#[test]
fn concurrent_writes_over_multi_conn_land_and_one_flush_covers_them() {
    need_tool("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(48 * MIB)
        .unwrap();
    let log = dir.path().join("requests.log");
    let server = nbdkit(
        dir.path(),
        &[
            "--filter=log",
            "file",
            &file.to_string_lossy(),
            &format!("logfile={}", log.display()),
        ],
    );
    let disk = Arc::new(NbdDisk::connect_writable(&server.uri).unwrap());
    assert!(disk.info.flags & TFLAG_CAN_MULTI_CONN != 0);
    let want = write_concurrently(&disk, 6);
    let n = disk.connections();
    assert!((1..=MAX_CONNECTIONS).contains(&n), "{n} connections");
    // Nothing written since: the second flush sends nothing.
    disk.flush().unwrap();
    drop(disk);
    drop(server);

    assert_first_difference(&std::fs::read(&file).unwrap(), &want, "file behind nbdkit");
    let requests = logged_requests(&log);
    let writers: std::collections::BTreeSet<&str> = requests
        .iter()
        .filter(|r| r.1 == "Write")
        .map(|r| r.0.as_str())
        .collect();
    let flushes = requests.iter().filter(|r| r.1 == "Flush").count();
    assert!(writers.len() > 1, "writes on {writers:?} only");
    assert_eq!(
        flushes,
        1,
        "multi-conn: one flush covers writes on {} connections",
        writers.len()
    );
}

#[test]
fn concurrent_writes_without_multi_conn_share_one_connection_and_survive_a_kill() {
    need_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("single.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("40M"));
    // --shared=1: qemu-nbd then does not advertise multi-conn.
    let server = qemu_nbd_rw(dir.path(), &image, "qcow2", 1);
    let disk = Arc::new(NbdDisk::connect_writable(&server.uri).unwrap());
    assert_eq!(disk.info.flags & TFLAG_CAN_MULTI_CONN, 0);
    let want = write_concurrently(&disk, 4);
    assert_eq!(disk.connections(), 1);
    drop(disk);
    drop(server);
    assert_first_difference(&qemu_img_raw(&image, "qcow2"), &want, "qcow2 via qemu-img");
}

// ---------------------------------------------------------------------------
// nbdkit: zeroes, errors, block sizes.

#[test]
fn write_zeroes_uses_the_command_when_advertised_and_zero_writes_otherwise() {
    need_tool("nbdkit");
    for nozero in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.log");
        let logfile = format!("logfile={}", log.display());
        let mut args = vec!["--filter=log"];
        if nozero {
            args.push("--filter=nozero");
        }
        args.extend(["memory", "24M", &logfile]);
        if nozero {
            // The server does not advertise write-zeroes.
            args.push("zeromode=none");
        }
        let server = nbdkit(dir.path(), &args);
        let disk = NbdDisk::connect_writable(&server.uri).unwrap();
        assert_eq!(
            disk.info.flags & TFLAG_SEND_WRITE_ZEROES == 0,
            nozero,
            "flags {:#x}",
            disk.info.flags
        );
        let mut model = Model::new(disk.size());
        model.write(&disk, 0, &pattern(9, 20 * MIB as usize));
        let writes_before = logged_requests(&log)
            .iter()
            .filter(|r| r.1 == "Write")
            .count();
        model.zero(&disk, 1000, 5 * MIB + 17);
        model.zero(&disk, 9 * MIB, 9 * MIB);
        model.zero(&disk, 23 * MIB, MIB);
        model.check_reads(&disk);
        disk.flush().unwrap();
        drop(disk);
        drop(server);

        let requests = logged_requests(&log);
        let zeroes: Vec<_> = requests.iter().filter(|r| r.1 == "Zero").collect();
        let writes = requests.iter().filter(|r| r.1 == "Write").count() - writes_before;
        if nozero {
            assert!(zeroes.is_empty(), "{zeroes:?}");
            assert!(writes >= 3, "{writes} zero writes");
        } else {
            assert!(!zeroes.is_empty());
            assert_eq!(writes, 0, "zeroes sent as data");
            // Holes allowed: no NBD_CMD_FLAG_NO_HOLE, so nbdkit may trim.
            assert!(zeroes.iter().all(|z| z.2.contains("trim=1")), "{zeroes:?}");
        }
    }
}

#[test]
fn server_write_errors_name_the_command_offset_and_errno() {
    need_tool("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(
        dir.path(),
        &[
            "--filter=error",
            "memory",
            "8M",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
            "error-zero=ENOSPC",
            "error-zero-rate=100%",
        ],
    );
    let disk = NbdDisk::connect_writable(&server.uri).unwrap();
    let err = disk.write_at(&[7; 1000], 3 * 4096 + 5).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            NbdError::Server {
                command: "NBD_CMD_WRITE",
                offset: 12_293,
                errno: 5,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&server.uri)
            && msg.contains("NBD_CMD_WRITE at offset 12293")
            && msg.contains("EIO"),
        "{msg}"
    );
    let err = disk.write_zeroes(MIB, MIB).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("NBD_CMD_WRITE_ZEROES at offset 1048576") && msg.contains("ENOSPC"),
        "{msg}"
    );
    // Server errors keep the connection: reads still work on it.
    assert_eq!(disk.connections(), 1);
    let mut buf = [1u8; 16];
    disk.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0; 16]);
    assert_eq!(disk.connections(), 1);
}

#[test]
fn nbdkit_block_size_constraints_are_honoured_by_writes() {
    // The server refuses requests unaligned to 4 KiB or longer than 64
    // KiB, zeroes included: writes of any shape must still land.
    need_tool("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(
        dir.path(),
        &[
            "--filter=blocksize-policy",
            "memory",
            "2M",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let disk = NbdDisk::connect_writable(&server.uri).unwrap();
    let mut model = Model::new(disk.size());
    for (i, (offset, len)) in [
        (0u64, 1usize),
        (1, 4095),
        (4095, 2),
        (1000, 200_000),
        (2 * MIB - 3, 3),
        (12_288, 65_536 * 3),
        (300_001, 70_000),
    ]
    .into_iter()
    .enumerate()
    {
        model.write(&disk, offset, &pattern(100 + i as u64, len));
    }
    model.zero(&disk, 5, 10);
    model.zero(&disk, 4096, 4096);
    model.zero(&disk, 1001, 300_000);
    model.zero(&disk, 2 * MIB - 5000, 5000);
    model.check_reads(&disk);
    disk.flush().unwrap();
}

// ---------------------------------------------------------------------------
// A fake server that records every request and keeps the disk in memory.

/// One request as the fake server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    kind: u16,
    flags: u16,
    offset: u64,
    len: u32,
}

/// Reads one request and, for a write, its data.
fn fake_request_with_data(s: &mut UnixStream) -> (Seen, u64, Vec<u8>) {
    let b = read_exact(s, REQUEST_LEN);
    assert_eq!(&b[0..4], &REQUEST_MAGIC.to_be_bytes(), "request magic");
    let seen = Seen {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    };
    let cookie = u64::from_be_bytes(b[8..16].try_into().unwrap());
    let data = if seen.kind == CMD_WRITE {
        read_exact(s, seen.len as usize)
    } else {
        Vec::new()
    };
    (seen, cookie, data)
}

/// The answer to `NBD_OPT_GO`: an export of `size` bytes with `flags`, and
/// block sizes when given.
fn go_reply(size: u64, flags: u16, block: Option<(u32, u32, u32)>) -> Vec<u8> {
    let mut r = info_export(size, TFLAG_HAS_FLAGS | flags);
    if let Some((min, preferred, max)) = block {
        r.extend(info_block_size(min, preferred, max));
    }
    r.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    r
}

/// A fake export kept in memory, with every request it saw.
struct MemoryServer {
    server: FakeServer,
    seen: Arc<Mutex<Vec<Seen>>>,
    content: Arc<Mutex<Vec<u8>>>,
}

/// A fake export of `size` bytes kept in memory, serving one connection
/// until `NBD_CMD_DISC`; requests outside its block size constraints get
/// `EINVAL`.
fn memory_server(size: u64, flags: u16, block: Option<(u32, u32, u32)>) -> MemoryServer {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let content = Arc::new(Mutex::new(vec![0u8; size as usize]));
    let (log, mem) = (Arc::clone(&seen), Arc::clone(&content));
    let (min, max) = block.map_or((1, u32::MAX), |(min, _, max)| (min, max));
    let server = FakeServer::start(size, Some(go_reply(size, flags, block)), move |s| loop {
        let (req, cookie, data) = fake_request_with_data(s);
        log.lock().unwrap().push(req);
        let (off, len) = (req.offset as usize, req.len as usize);
        let bad = req.offset % u64::from(min) != 0
            || req.len % min != 0
            || req.len > max
            || off + len > size as usize;
        let reply = match req.kind {
            CMD_DISC => return,
            CMD_FLUSH => none_chunk(cookie),
            _ if bad => error_chunk(cookie, 22, "bad request", true),
            CMD_READ => data_chunk(
                cookie,
                req.offset,
                &mem.lock().unwrap()[off..off + len],
                true,
            ),
            CMD_WRITE => {
                mem.lock().unwrap()[off..off + len].copy_from_slice(&data);
                none_chunk(cookie)
            }
            CMD_WRITE_ZEROES => {
                mem.lock().unwrap()[off..off + len].fill(0);
                none_chunk(cookie)
            }
            other => panic!("unexpected command {other}"),
        };
        s.write_all(&reply).unwrap();
    });
    MemoryServer {
        server,
        seen,
        content,
    }
}

#[test]
fn fake_server_sees_aligned_bounded_requests_and_one_flush() {
    let size = MIB;
    let MemoryServer {
        server,
        seen,
        content,
    } = memory_server(
        size,
        TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES,
        Some((512, 4096, 65_536)),
    );
    let disk = NbdDisk::connect_writable(&server.uri).unwrap();
    let mut model = Model::new(size);
    model.write(&disk, 1000, &pattern(1, 200_000));
    model.zero(&disk, 300_000, 150_001);
    model.zero(&disk, 2000, 10);
    model.write(&disk, size - 1, &[0xee]);
    disk.flush().unwrap();
    // Nothing written since the last flush: nothing sent.
    disk.flush().unwrap();
    drop(disk);
    server.join();

    let seen = seen.lock().unwrap();
    assert!(seen.iter().all(|r| r.flags == 0), "command flags: {seen:?}");
    for r in seen
        .iter()
        .filter(|r| r.kind != CMD_DISC && r.kind != CMD_FLUSH)
    {
        assert!(
            r.offset % 512 == 0 && r.len % 512 == 0 && r.len > 0 && r.len <= 65_536,
            "{r:?}"
        );
    }
    let flushes: Vec<_> = seen.iter().filter(|r| r.kind == CMD_FLUSH).collect();
    assert_eq!(
        flushes,
        vec![&Seen {
            kind: CMD_FLUSH,
            flags: 0,
            offset: 0,
            len: 0
        }]
    );
    assert!(seen.iter().filter(|r| r.kind == CMD_WRITE_ZEROES).count() >= 3);
    assert_eq!(seen.last().map(|r| r.kind), Some(CMD_DISC));
    assert_first_difference(&content.lock().unwrap(), &model.0, "fake server's content");
}

#[test]
fn fake_server_without_flush_or_write_zeroes_gets_neither() {
    let size = 256 * 1024;
    let MemoryServer {
        server,
        seen,
        content,
    } = memory_server(size, 0, None);
    let disk = NbdDisk::connect_writable(&server.uri).unwrap();
    let mut model = Model::new(size);
    model.write(&disk, 0, &pattern(2, size as usize));
    model.zero(&disk, 17, 100_000);
    disk.flush().unwrap();
    drop(disk);
    server.join();
    let kinds: Vec<u16> = seen.lock().unwrap().iter().map(|r| r.kind).collect();
    assert!(
        kinds[..kinds.len() - 1].iter().all(|&k| k == CMD_WRITE),
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&CMD_DISC));
    assert_first_difference(&content.lock().unwrap(), &model.0, "fake server's content");
}

#[test]
fn writes_past_the_end_are_refused_before_anything_is_sent() {
    let server = FakeServer::start(8192, Some(go_reply(8192, TFLAG_SEND_FLUSH, None)), |s| {
        let (req, ..) = fake_request_with_data(s);
        assert_eq!(req.kind, CMD_DISC, "a request was sent: {req:?}");
    });
    let disk = NbdDisk::connect_writable(&server.uri).unwrap();
    for (offset, len) in [(8150, 100), (8192, 1), (u64::MAX, 1), (0, 8193)] {
        let err = disk.write_at(&vec![1; len], offset).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, NbdError::OutOfRange { size: 8192, .. }) && msg.contains(&server.uri),
            "{msg}"
        );
    }
    for (offset, len) in [(8000, 193), (u64::MAX - 1, 5), (0, u64::MAX)] {
        let err = disk.write_zeroes(offset, len).unwrap_err();
        assert!(matches!(err, NbdError::OutOfRange { .. }), "{err}");
    }
    // Empty writes at the end are fine and send nothing; nor does a flush
    // with nothing written.
    disk.write_at(&[], 8192).unwrap();
    disk.write_zeroes(8192, 0).unwrap();
    disk.flush().unwrap();
    drop(disk);
    server.join();
}

#[test]
fn fake_server_read_only_flag_refuses_writes_before_sending() {
    // fake_handshake's default export is read-only.
    let server = FakeServer::start(MIB, None, |s| {
        let (req, ..) = fake_request_with_data(s);
        assert_eq!(req.kind, CMD_DISC, "a request was sent: {req:?}");
    });
    let disk = NbdDisk::connect(&server.uri).unwrap();
    assert!(!disk.writable());
    assert!(matches!(
        disk.write_at(&[1], 0),
        Err(NbdError::ReadOnly { .. })
    ));
    drop(disk);
    server.join();
    let server = FakeServer::start(MIB, None, |_| {});
    let err = NbdDisk::connect_writable(&server.uri).unwrap_err();
    assert!(
        err.to_string().contains(&server.uri) && err.to_string().contains("read-only"),
        "{err}"
    );
    server.join();
}

#[test]
fn fake_server_write_errors_are_named_and_shutdown_drops_the_connection() {
    let server = FakeServer::start(MIB, Some(go_reply(MIB, TFLAG_SEND_FLUSH, None)), |s| {
        // 1: a structured error naming an offset inside the request.
        let (req, cookie, data) = fake_request_with_data(s);
        assert_eq!(
            (req.kind, req.offset, data.len()),
            (CMD_WRITE, 8192, 10_000)
        );
        let mut r = error_offset_chunk(cookie, 28, "disk full", 8192 + 4096, false);
        r.extend(none_chunk(cookie));
        s.write_all(&r).unwrap();
        // 2: a simple error.
        let (req, cookie, _) = fake_request_with_data(s);
        assert_eq!((req.kind, req.offset, req.len), (CMD_WRITE, 0, 512));
        s.write_all(&simple_reply(1, cookie)).unwrap();
        // 3: a flush answered with a success.
        let (req, cookie, _) = fake_request_with_data(s);
        assert_eq!(req.kind, CMD_FLUSH);
        s.write_all(&simple_reply(0, cookie)).unwrap();
        // 4: shutting down.
        let (req, cookie, _) = fake_request_with_data(s);
        assert_eq!(req.kind, CMD_WRITE);
        s.write_all(&error_chunk(cookie, 108, "going away", true))
            .unwrap();
        // The client disconnects softly.
        let (req, ..) = fake_request_with_data(s);
        assert_eq!(req.kind, CMD_DISC);
    });
    let disk = NbdDisk::connect_writable(&server.uri).unwrap();
    let err = disk.write_at(&[1; 10_000], 8192).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&server.uri)
            && msg.contains("NBD_CMD_WRITE at offset 12288")
            && msg.contains("ENOSPC")
            && msg.contains("disk full"),
        "{msg}"
    );
    assert_eq!(disk.connections(), 1);
    // No write-zeroes flag: zeros go as a write.
    let err = disk.write_zeroes(0, 512).unwrap_err();
    assert!(
        err.to_string().contains("NBD_CMD_WRITE at offset 0: EPERM"),
        "{err}"
    );
    disk.flush().unwrap();
    let err = disk.write_at(&[2; 512], 0).unwrap_err();
    assert!(err.to_string().contains("ESHUTDOWN"), "{err}");
    assert_eq!(
        disk.connections(),
        0,
        "ESHUTDOWN: the client must disconnect"
    );
    // The closed connection may have written (the failed write) and was
    // not flushed; without multi-conn no other connection can flush it.
    let err = disk.flush().unwrap_err();
    assert!(
        matches!(err, NbdError::UnflushedWritesLost { connections: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&server.uri), "{err}");
    // And it stays that way.
    assert!(disk.flush().is_err());
    drop(disk);
    server.join();
}

#[test]
fn fake_server_protocol_errors_in_write_replies_drop_the_connection() {
    for (what, reply) in [
        (
            "reply type 1 is not valid for NBD_CMD_WRITE",
            (|c| data_chunk(c, 0, &[0; 512], true)) as fn(u64) -> Vec<u8>,
        ),
        ("exceeds the limit of 0", |c| {
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, c, &[0; 8])
        }),
        ("outside the request", |c| {
            let mut r = error_offset_chunk(c, 5, "", 4096, false);
            r.extend(none_chunk(c));
            r
        }),
    ] {
        let server = FakeServer::start(MIB, Some(go_reply(MIB, 0, None)), move |s| {
            let (_, cookie, _) = fake_request_with_data(s);
            s.write_all(&reply(cookie)).unwrap();
        });
        let disk = NbdDisk::connect_writable(&server.uri).unwrap();
        let err = disk.write_at(&[3; 512], 0).unwrap_err();
        assert!(
            matches!(err, NbdError::Protocol { .. }) && err.to_string().contains(what),
            "{err}"
        );
        assert_eq!(disk.connections(), 0);
        drop(disk);
        server.join();
    }
}

// ---------------------------------------------------------------------------
// The write reply parser.

fn write_reply(
    bytes: &[u8],
    command: wire::Command,
    offset: u64,
    len: u32,
    structured: bool,
) -> Result<(), ReplyError> {
    let mut input = bytes;
    let r = receive_write_reply(
        &mut input,
        1,
        command,
        offset,
        len,
        structured,
        &mut Vec::new(),
    );
    if r.is_ok() {
        assert!(input.is_empty(), "reply not fully consumed");
    }
    r
}

fn wire_err(r: Result<(), ReplyError>) -> WireError {
    match r {
        Err(ReplyError::Wire(e)) => e,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn write_replies_are_simple_or_none_and_errors() {
    use wire::Command::{Flush, Write, WriteZeroes};
    for command in [Write, WriteZeroes, Flush] {
        write_reply(&simple_reply(0, 1), command, 0, 512, false).unwrap();
        write_reply(&simple_reply(0, 1), command, 0, 512, true).unwrap();
        write_reply(&none_chunk(1), command, 0, 512, true).unwrap();
    }
    // Simple error: the stream stays in step.
    match write_reply(&simple_reply(28, 1), Write, 0, 512, true) {
        Err(e @ ReplyError::Server { errno: 28, .. }) => assert!(e.connection_usable()),
        other => panic!("{other:?}"),
    }
    // Structured errors: the first one counts; its offset is checked.
    let mut r = error_offset_chunk(1, 5, "bad sector", 1100, false);
    r.extend(error_chunk(1, 28, "later", false));
    r.extend(none_chunk(1));
    match write_reply(&r, Write, 1000, 512, true) {
        Err(ReplyError::Server {
            errno: 5,
            offset: Some(1100),
            message,
            in_sync: true,
        }) => assert_eq!(message, "bad sector"),
        other => panic!("{other:?}"),
    }
    // ... and dropped for a flush, whose request has no range.
    assert!(matches!(
        write_reply(&r, Flush, 0, 0, true),
        Err(ReplyError::Server {
            errno: 5,
            offset: None,
            ..
        })
    ));
    let mut outside = error_offset_chunk(1, 5, "", 1512, false);
    outside.extend(none_chunk(1));
    assert!(matches!(
        wire_err(write_reply(&outside, WriteZeroes, 1000, 512, true)),
        WireError::ErrorOffsetOutside { offset: 1512, .. }
    ));
    // An error chunk with DONE ends the reply; an unknown error type keeps
    // its errno.
    assert!(matches!(
        write_reply(&error_chunk(1, 22, "", true), Write, 0, 1, true),
        Err(ReplyError::Server { errno: 22, .. })
    ));
    let odd = chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR_BIT | 9,
        1,
        &12u32.to_be_bytes(),
    );
    assert!(matches!(
        write_reply(&odd, Write, 0, 1, true),
        Err(ReplyError::Server { errno: 12, .. })
    ));
    // ESHUTDOWN: the client must disconnect.
    match write_reply(&simple_reply(108, 1), Flush, 0, 0, true) {
        Err(e @ ReplyError::Server { .. }) => assert!(!e.connection_usable()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn write_reply_defects_are_named() {
    use wire::Command::{Flush, Write, WriteZeroes};
    // Any chunk that carries data.
    for c in [
        data_chunk(1, 0, &[0; 16], true),
        hole_chunk(1, 0, 16, true),
        status_chunk(1, 1, &[(16, 0)], true),
    ] {
        let e = wire_err(write_reply(&c, Write, 0, 16, true));
        assert!(matches!(e, WireError::ChunkForWrongCommand { .. }), "{e}");
    }
    // NONE with a payload (bounded before it is read), or without DONE.
    let mut big = chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[]);
    big[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        wire_err(write_reply(&big, Flush, 0, 0, true)),
        WireError::TooLong { max: 0, .. }
    ));
    assert_eq!(
        wire_err(write_reply(
            &chunk(0, REPLY_TYPE_NONE, 1, &[]),
            Write,
            0,
            1,
            true
        )),
        WireError::NoneNotDone
    );
    // A chunk without structured replies; a simple reply inside a
    // structured one; unknown type; wrong cookie; short.
    assert_eq!(
        wire_err(write_reply(&none_chunk(1), WriteZeroes, 0, 1, false)),
        WireError::UnexpectedChunk("NBD_CMD_WRITE_ZEROES")
    );
    let mut mixed = error_chunk(1, 5, "", false);
    mixed.extend(simple_reply(0, 1));
    assert_eq!(
        wire_err(write_reply(&mixed, Write, 0, 1, true)),
        WireError::SimpleInsideStructured("NBD_CMD_WRITE")
    );
    assert_eq!(
        wire_err(write_reply(
            &chunk(REPLY_FLAG_DONE, 42, 1, &[]),
            Write,
            0,
            1,
            true
        )),
        WireError::UnknownChunkType(42)
    );
    assert!(matches!(
        wire_err(write_reply(&simple_reply(0, 2), Write, 0, 1, true)),
        WireError::UnknownCookie { .. }
    ));
    assert!(matches!(
        wire_err(write_reply(&none_chunk(1)[..10], Write, 0, 1, true)),
        WireError::Short { .. }
    ));
    // A reply that never ends is cut off.
    let one = error_chunk(1, 5, "", false);
    let endless: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * (MAX_WRITE_REPLY_CHUNKS + 1))
        .collect();
    assert!(matches!(
        wire_err(write_reply(&endless, Write, 0, 1, true)),
        WireError::TooManyChunks { .. }
    ));
}

#[test]
fn block_sizes_without_an_inherent_maximum_are_accepted() {
    // 0xffffffff is "no limit" even when it is no multiple of the minimum.
    let b = info_block_size(512, 4096, u32::MAX);
    assert_eq!(
        parse_info(&b[20..]).unwrap(),
        Info::BlockSize {
            min: 512,
            preferred: 4096,
            max: u32::MAX
        }
    );
    let b = info_block_size(512, 4096, u32::MAX - 1);
    assert!(matches!(
        parse_info(&b[20..]),
        Err(WireError::BadBlockSizes { .. })
    ));
}

#[test]
fn requests_encode_as_the_spec_lays_them_out() {
    let r = encode_request(CMD_WRITE_ZEROES, 0x0102_0304_0506_0708, 1 << 40, 4096);
    let mut want = REQUEST_MAGIC.to_be_bytes().to_vec();
    want.extend_from_slice(&0u16.to_be_bytes());
    want.extend_from_slice(&6u16.to_be_bytes());
    want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    want.extend_from_slice(&(1u64 << 40).to_be_bytes());
    want.extend_from_slice(&4096u32.to_be_bytes());
    assert_eq!(r.to_vec(), want);
}
