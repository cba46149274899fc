//! Pack files: where chunk bytes rest.
//!
//! Blocks (and index pages) are not one file each: a 1 TiB disk would be
//! millions of files. They are appended as *chunk records* to pack files
//! under `packs/`, and the in-memory catalogue (`catalogue.rs`) maps each
//! digest to its record.
//!
//! # `packs/<id:08x>.pack`
//!
//! A sequence of chunk records, appended only. A new pack is started when
//! the current one would pass [`PACK_TARGET_BYTES`] (1 GiB) and after every
//! `Store::open`, so a pack that was being written when the controller
//! stopped is never appended to again. A record is a 52-byte header
//! followed by its payload (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"TCHK"` |
//! | 4 | 1 | encoding code (`Encoding::code`: 1 raw, 2 zstd; 0 is never stored) |
//! | 5 | 3 | reserved, zero |
//! | 8 | 4 | `raw_len`: decoded length, 1 ..= 4 MiB |
//! | 12 | 4 | `stored_len`: payload length, 1 ..= [`MAX_STORED_LEN`] |
//! | 16 | 32 | BLAKE3 digest of the decoded bytes |
//! | 48 | 4 | CRC32 (crc32fast) of bytes 0..48 and the payload |
//! | 52 | `stored_len` | payload |
//!
//! Only verified chunks are appended (decoded and re-hashed first). A crash
//! can leave a torn record at the tail of the pack being written; `open`
//! scans what no `.idx` covers record by record and cuts a torn *tail*. A
//! record that does not check out in the *middle* of a pack is damage, not
//! a tail: the scan reports it (pack, offsets) and looks for the next whole
//! record after it, so nothing after a flipped byte is lost; only when no
//! whole record follows is the rest cut as a torn tail.
//!
//! # `packs/<id:08x>.idx`
//!
//! Written when a pack is sealed (it will never grow again), and also, for
//! the pack being written, at every commit (`Store::sync_and_index`): every
//! chunk a committed point references is then listed in an `.idx`, so no
//! recovery ever has to find it by scanning. An `.idx` covers the first
//! `sealed length` bytes of its pack; records after them (appended since
//! the last commit) are scanned at `open`. Made atomically: `.idx.tmp`,
//! fsync, rename, fsync of `packs/`; the pack itself is fsynced first.
//! Layout:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"TDLPIDX1"` |
//! | 8 | 4 | version, 1 |
//! | 12 | 4 | pack id |
//! | 16 | 8 | sealed pack length in bytes |
//! | 24 | 8 | entry count `n` |
//! | 32 | 4 | CRC32 of bytes 0..32 and the entries |
//! | 36 | 52 × `n` | entries: digest [32], offset u64, stored_len u32, raw_len u32, encoding u8, 3 reserved |
//!
//! A pack whose `.idx` is missing or does not check out is scanned instead
//! and its `.idx` rewritten.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tideline_protocol::limits::MAX_BODY_LEN;
use tideline_protocol::{Digest, Encoding};

use super::chunk::MAX_RAW_LEN;
use super::error::{io_err, StoreError};
use super::fsutil;

/// A pack is sealed and a new one started once it would pass this size.
pub(crate) const PACK_TARGET_BYTES: u64 = 1 << 30;
/// Length of a chunk record header.
pub(crate) const RECORD_HEADER_LEN: usize = 52;
/// Largest payload accepted in a record (the largest frame body).
pub(crate) const MAX_STORED_LEN: u32 = MAX_BODY_LEN;

const RECORD_MAGIC: &[u8; 4] = b"TCHK";
const IDX_MAGIC: &[u8; 8] = b"TDLPIDX1";
const IDX_VERSION: u32 = 1;
const IDX_HEADER_LEN: usize = 36;
const IDX_ENTRY_LEN: usize = 52;

/// Where one chunk lies: its pack and the offset of its record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkLoc {
    /// Pack id.
    pub pack: u32,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Payload length.
    pub stored_len: u32,
    /// Decoded length.
    pub raw_len: u32,
    /// Payload encoding.
    pub encoding: Encoding,
}

impl ChunkLoc {
    /// Bytes the record takes in its pack.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// Path of pack `id` in `dir`.
pub(crate) fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08x}.pack"))
}

/// Path of the sealed index of pack `id` in `dir`.
pub(crate) fn idx_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08x}.idx"))
}

/// Parses a pack file name (`0000002a.pack`) into its id.
pub(crate) fn parse_pack_name(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(".pack")?;
    if hex.len() != 8 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// The header of a record with this `payload`, CRC included.
fn encode_header(
    digest: &Digest,
    encoding: Encoding,
    raw_len: u32,
    payload: &[u8],
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(RECORD_MAGIC);
    h[4] = encoding.code();
    h[8..12].copy_from_slice(&raw_len.to_le_bytes());
    // Callers bound payloads by MAX_STORED_LEN (< 4 GiB).
    h[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[16..48].copy_from_slice(&digest.0);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..48]);
    crc.update(payload);
    h[48..52].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// A record header read back: the fields, once magic and bounds are checked.
struct RecordHeader {
    encoding: Encoding,
    raw_len: u32,
    stored_len: u32,
    digest: Digest,
    crc: u32,
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn decode_header(h: &[u8; RECORD_HEADER_LEN]) -> Result<RecordHeader, String> {
    if &h[0..4] != RECORD_MAGIC {
        return Err("bad record magic".into());
    }
    let encoding = match Encoding::from_code(h[4]) {
        Some(e @ (Encoding::Raw | Encoding::Zstd)) => e,
        _ => return Err(format!("bad encoding code {}", h[4])),
    };
    if h[5..8] != [0, 0, 0] {
        return Err("reserved bytes not zero".into());
    }
    let raw_len = le_u32(&h[8..12]);
    let stored_len = le_u32(&h[12..16]);
    if raw_len == 0 || raw_len > MAX_RAW_LEN {
        return Err(format!("raw length {raw_len} out of bounds"));
    }
    if stored_len == 0 || stored_len > MAX_STORED_LEN {
        return Err(format!("stored length {stored_len} out of bounds"));
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&h[16..48]);
    Ok(RecordHeader {
        encoding,
        raw_len,
        stored_len,
        digest: Digest(digest),
        crc: le_u32(&h[48..52]),
    })
}

fn record_crc(h: &[u8; RECORD_HEADER_LEN], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..48]);
    crc.update(payload);
    crc.finalize()
}

/// Reads the payload of the record at `loc` from `file` (pack `path`),
/// checking that the header is the one the catalogue expects and that the
/// CRC matches. The payload is not decoded here.
pub(crate) fn read_record(
    file: &File,
    path: &Path,
    digest: &Digest,
    loc: &ChunkLoc,
) -> Result<Vec<u8>, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        what: format!("record at offset {}: {what}", loc.offset),
    };
    let mut buf = vec![0u8; RECORD_HEADER_LEN + loc.stored_len as usize];
    file.read_exact_at(&mut buf, loc.offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt("pack ends inside the record".into())
        } else {
            io_err(path)(e)
        }
    })?;
    let mut h = [0u8; RECORD_HEADER_LEN];
    h.copy_from_slice(&buf[..RECORD_HEADER_LEN]);
    let header = decode_header(&h).map_err(corrupt)?;
    if header.digest != *digest
        || header.stored_len != loc.stored_len
        || header.raw_len != loc.raw_len
        || header.encoding != loc.encoding
    {
        return Err(corrupt(format!(
            "header does not match catalogue entry for {digest}"
        )));
    }
    let payload = buf.split_off(RECORD_HEADER_LEN);
    if record_crc(&h, &payload) != header.crc {
        return Err(corrupt(format!("CRC mismatch in chunk {digest}")));
    }
    Ok(payload)
}

/// The pack new chunks are appended to.
pub(crate) struct PackWriter {
    id: u32,
    path: PathBuf,
    file: File,
    len: u64,
    /// Records not yet fsynced.
    dirty: bool,
    /// Entries of this pack, for its `.idx` when it is sealed. Bounded by
    /// the pack size, and the catalogue holds the same entries anyway.
    entries: Vec<(Digest, ChunkLoc)>,
    /// Bytes the pack's `.idx` covers.
    indexed: u64,
}

impl PackWriter {
    /// Creates the empty pack `id` in `dir` (which must not exist yet).
    pub fn create(dir: &Path, id: u32) -> Result<Self, StoreError> {
        let path = pack_path(dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        fsutil::fsync_dir(dir)?;
        Ok(PackWriter {
            id,
            path,
            file,
            len: 0,
            dirty: false,
            entries: Vec::new(),
            indexed: 0,
        })
    }

    /// Id of this pack.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether appending `stored_len` more payload bytes would pass the
    /// target size `target` (a pack always takes at least one record).
    pub fn is_full_for(&self, stored_len: usize, target: u64) -> bool {
        self.len > 0 && self.len + (RECORD_HEADER_LEN + stored_len) as u64 > target
    }

    /// Appends one verified chunk and returns where it lies. On a failed
    /// write the pack is cut back to its previous length.
    pub fn append(
        &mut self,
        digest: &Digest,
        encoding: Encoding,
        raw_len: u32,
        payload: &[u8],
    ) -> Result<ChunkLoc, StoreError> {
        let header = encode_header(digest, encoding, raw_len, payload);
        let mut rec = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
        rec.extend_from_slice(&header);
        rec.extend_from_slice(payload);
        if let Err(e) = self.file.write_all_at(&rec, self.len) {
            // Best effort: a torn tail would also be cut by the next open.
            let _ = self.file.set_len(self.len);
            return Err(io_err(&self.path)(e));
        }
        let loc = ChunkLoc {
            pack: self.id,
            offset: self.len,
            stored_len: payload.len() as u32,
            raw_len,
            encoding,
        };
        self.len += rec.len() as u64;
        self.dirty = true;
        self.entries.push((*digest, loc));
        Ok(loc)
    }

    /// Makes every record appended so far durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.dirty {
            self.file.sync_data().map_err(io_err(&self.path))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Seals the pack: fsync, then its `.idx`.
    pub fn seal(mut self, dir: &Path) -> Result<(), StoreError> {
        self.sync()?;
        write_idx(dir, self.id, self.len, &self.entries)
    }

    /// Makes every record durable and lists them all in the pack's `.idx`
    /// (the pack may still grow; a later `.idx` replaces this one). Does
    /// nothing when the `.idx` already covers the whole pack.
    pub fn index(&mut self, dir: &Path) -> Result<(), StoreError> {
        if !self.dirty && self.indexed == self.len {
            return Ok(());
        }
        self.sync()?;
        write_idx(dir, self.id, self.len, &self.entries)?;
        self.indexed = self.len;
        Ok(())
    }
}

/// Writes the `.idx` of sealed pack `id` atomically.
pub(crate) fn write_idx(
    dir: &Path,
    id: u32,
    pack_len: u64,
    entries: &[(Digest, ChunkLoc)],
) -> Result<(), StoreError> {
    let mut buf = Vec::with_capacity(IDX_HEADER_LEN + entries.len() * IDX_ENTRY_LEN);
    buf.extend_from_slice(IDX_MAGIC);
    buf.extend_from_slice(&IDX_VERSION.to_le_bytes());
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&pack_len.to_le_bytes());
    buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    for (d, loc) in entries {
        buf.extend_from_slice(&d.0);
        buf.extend_from_slice(&loc.offset.to_le_bytes());
        buf.extend_from_slice(&loc.stored_len.to_le_bytes());
        buf.extend_from_slice(&loc.raw_len.to_le_bytes());
        buf.push(loc.encoding.code());
        buf.extend_from_slice(&[0u8; 3]);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..32]);
    crc.update(&buf[IDX_HEADER_LEN..]);
    let crc = crc.finalize();
    buf[32..36].copy_from_slice(&crc.to_le_bytes());
    fsutil::write_atomic(&idx_path(dir, id), &buf)
}

/// The chunks of one pack, in record order.
pub(crate) type PackEntries = Vec<(Digest, ChunkLoc)>;

/// What an `.idx` lists: the bytes of the pack it covers, and their chunks.
pub(crate) type Indexed = (u64, PackEntries);

/// Reads the `.idx` of pack `id`, checking it against the pack's actual
/// length. `Ok(None)` when there is no `.idx`; `Err(reason)` inside when it
/// does not check out (the caller scans the pack instead).
pub(crate) fn read_idx(
    dir: &Path,
    id: u32,
    pack_len: u64,
) -> Result<Option<Result<Indexed, String>>, StoreError> {
    let path = idx_path(dir, id);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    Ok(Some(parse_idx(&bytes, id, pack_len)))
}

fn parse_idx(b: &[u8], id: u32, pack_len: u64) -> Result<Indexed, String> {
    if b.len() < IDX_HEADER_LEN || &b[0..8] != IDX_MAGIC {
        return Err("bad idx header".into());
    }
    if le_u32(&b[8..12]) != IDX_VERSION {
        return Err(format!("unknown idx version {}", le_u32(&b[8..12])));
    }
    if le_u32(&b[12..16]) != id {
        return Err("idx names another pack".into());
    }
    let sealed_len = le_u64(&b[16..24]);
    let count = le_u64(&b[24..32]);
    let body = &b[IDX_HEADER_LEN..];
    if count.checked_mul(IDX_ENTRY_LEN as u64) != Some(body.len() as u64) {
        return Err("idx length does not match its entry count".into());
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&b[..32]);
    crc.update(body);
    if crc.finalize() != le_u32(&b[32..36]) {
        return Err("idx CRC mismatch".into());
    }
    if sealed_len > pack_len {
        return Err(format!(
            "pack is {pack_len} bytes, shorter than its sealed length {sealed_len}"
        ));
    }
    let mut out = Vec::with_capacity(body.len() / IDX_ENTRY_LEN);
    for e in body.chunks_exact(IDX_ENTRY_LEN) {
        let mut d = [0u8; 32];
        d.copy_from_slice(&e[..32]);
        let encoding = match Encoding::from_code(e[48]) {
            Some(enc @ (Encoding::Raw | Encoding::Zstd)) => enc,
            _ => return Err(format!("bad encoding code {}", e[48])),
        };
        let loc = ChunkLoc {
            pack: id,
            offset: le_u64(&e[32..40]),
            stored_len: le_u32(&e[40..44]),
            raw_len: le_u32(&e[44..48]),
            encoding,
        };
        let end = loc.offset.checked_add(loc.record_len());
        if loc.stored_len > MAX_STORED_LEN
            || loc.raw_len == 0
            || loc.raw_len > MAX_RAW_LEN
            || !matches!(end, Some(end) if end <= sealed_len)
        {
            return Err("idx entry out of bounds".into());
        }
        out.push((Digest(d), loc));
    }
    Ok((sealed_len, out))
}

/// A damaged stretch of a pack: bytes `[start, end)` hold no record that
/// checks out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Damage {
    /// The pack.
    pub pack: PathBuf,
    /// First damaged byte.
    pub start: u64,
    /// First byte of the next whole record.
    pub end: u64,
    /// What was wrong with the record at `start`.
    pub why: String,
    /// The digest its header names, when the header itself was intact.
    pub digest: Option<Digest>,
}

/// What [`recover_pack`] found.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    /// Every record that checks out, in order.
    pub entries: PackEntries,
    /// Damage in the middle of the pack (records after it were kept).
    pub damage: Vec<Damage>,
    /// Whether the `.idx` could not be written for lack of space (the
    /// entries are good; the store is then read-only until it can be).
    pub idx_deferred: bool,
}

/// The record at `offset` of `bytes`, if it is whole and checks out.
fn record_at(bytes: &[u8], offset: usize) -> Result<(RecordHeader, usize), String> {
    let Some(h) = bytes.get(offset..offset + RECORD_HEADER_LEN) else {
        return Err("torn header".into());
    };
    let mut hb = [0u8; RECORD_HEADER_LEN];
    hb.copy_from_slice(h);
    let header = decode_header(&hb)?;
    let end = offset + RECORD_HEADER_LEN + header.stored_len as usize;
    let Some(payload) = bytes.get(offset + RECORD_HEADER_LEN..end) else {
        return Err("torn payload".into());
    };
    if record_crc(&hb, payload) != header.crc {
        return Err(format!("CRC mismatch in chunk {}", header.digest));
    }
    Ok((header, end))
}

/// Scans pack `id` from byte `from` (where its `.idx`, if any, ends; the
/// entries before it are `known`), keeps every record that checks out, and
/// cuts only a torn tail. A record that does not check out with whole
/// records after it is reported as [`Damage`] and skipped. Then fsyncs the
/// pack and writes its `.idx` over the whole of it, unless the file system
/// is full (then `idx_deferred`). Used on `open` for packs whose `.idx` is
/// missing, damaged, or shorter than the pack.
pub(crate) fn recover_pack(
    dir: &Path,
    id: u32,
    from: u64,
    known: PackEntries,
) -> Result<Recovered, StoreError> {
    let path = pack_path(dir, id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let file_len = file.metadata().map_err(io_err(&path))?.len();
    if from > file_len {
        return Err(StoreError::Corrupt {
            path: path.clone(),
            what: format!("{file_len} bytes, shorter than the {from} its idx covers"),
        });
    }
    // Only the part no idx covers is read: the tail of the pack being
    // written when the controller stopped (at most one pack's worth),
    // mapped rather than read, so memory is page cache the kernel can take
    // back.
    let map = if file_len > 0 {
        // SAFETY: the store is open by this process only (its lock), and
        // nothing writes this pack while it is recovered.
        Some(unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&path))?)
    } else {
        None
    };
    let bytes: &[u8] = map.as_deref().map_or(&[], |m| &m[from as usize..]);
    let mut out = Recovered {
        entries: known,
        ..Recovered::default()
    };
    let mut at = 0usize;
    let mut good_end = 0usize;
    while at < bytes.len() {
        match record_at(bytes, at) {
            Ok((header, end)) => {
                out.entries.push((
                    header.digest,
                    ChunkLoc {
                        pack: id,
                        offset: from + at as u64,
                        stored_len: header.stored_len,
                        raw_len: header.raw_len,
                        encoding: header.encoding,
                    },
                ));
                at = end;
                good_end = end;
            }
            Err(why) => {
                // Is there a whole record further on? Then this is damage in
                // the middle of the pack, and what follows is kept.
                let next = (at + 1..bytes.len().saturating_sub(RECORD_HEADER_LEN - 1))
                    .find(|&o| bytes[o..o + 4] == *RECORD_MAGIC && record_at(bytes, o).is_ok());
                let Some(next) = next else { break };
                let mut hb = [0u8; RECORD_HEADER_LEN];
                hb.copy_from_slice(&bytes[at..at + RECORD_HEADER_LEN]);
                let damage = Damage {
                    pack: path.clone(),
                    start: from + at as u64,
                    end: from + next as u64,
                    why,
                    digest: decode_header(&hb).ok().map(|h| h.digest),
                };
                tracing::error!(
                    pack = %path.display(),
                    start = damage.start,
                    end = damage.end,
                    chunk = ?damage.digest,
                    why = %damage.why,
                    "damaged record in the middle of a pack: skipped, the records after it are kept"
                );
                out.damage.push(damage);
                at = next;
            }
        }
    }
    drop(map);
    let keep = from + good_end as u64;
    if keep != file_len {
        tracing::warn!(
            pack = %path.display(),
            offset = keep,
            dropped_bytes = file_len - keep,
            "truncating a torn tail after the pack's last whole record"
        );
        file.set_len(keep).map_err(io_err(&path))?;
    }
    file.sync_all().map_err(io_err(&path))?;
    match write_idx(dir, id, keep, &out.entries) {
        Ok(()) => {}
        Err(e) if e.is_no_space() => {
            tracing::warn!(pack = %path.display(), "no space to write its .idx; the store takes no new points until there is");
            out.idx_deferred = true;
        }
        Err(e) => return Err(e),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(w: &mut PackWriter, data: &[u8]) -> (Digest, ChunkLoc) {
        let d = Digest::of(data);
        (
            d,
            w.append(&d, Encoding::Raw, data.len() as u32, data)
                .unwrap(),
        )
    }

    #[test]
    fn append_read_seal_and_reload_idx() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 3).unwrap();
        let a = put(&mut w, b"alpha");
        let b = put(&mut w, &[9u8; 5000]);
        w.seal(dir.path()).unwrap();
        let path = pack_path(dir.path(), 3);
        let f = File::open(&path).unwrap();
        assert_eq!(read_record(&f, &path, &a.0, &a.1).unwrap(), b"alpha");
        assert_eq!(read_record(&f, &path, &b.0, &b.1).unwrap(), vec![9u8; 5000]);
        let len = f.metadata().unwrap().len();
        let idx = read_idx(dir.path(), 3, len).unwrap().unwrap().unwrap();
        assert_eq!(idx, (len, vec![a, b]));
        // A pack shorter than its sealed length makes the idx untrusted.
        assert!(read_idx(dir.path(), 3, len - 1).unwrap().unwrap().is_err());
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 0).unwrap();
        let a = put(&mut w, b"first record");
        let b = put(&mut w, &[1u8; 3000]);
        w.sync().unwrap();
        drop(w);
        let path = pack_path(dir.path(), 0);
        let full = fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 7).unwrap();
        let entries = recover_pack(dir.path(), 0, 0, Vec::new()).unwrap().entries;
        assert_eq!(entries, vec![a]);
        assert_eq!(fs::metadata(&path).unwrap().len(), a.1.record_len());
        assert!(b.1.offset == a.1.record_len());
        let idx = read_idx(dir.path(), 0, a.1.record_len())
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(idx, (a.1.record_len(), vec![a]));
    }

    #[test]
    fn flipped_payload_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 1).unwrap();
        let a = put(&mut w, &[5u8; 100]);
        w.sync().unwrap();
        let path = pack_path(dir.path(), 1);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&[6u8], 60).unwrap();
        let err = read_record(&f, &path, &a.0, &a.1).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        // The scanner drops it too (it is the tail: nothing follows it).
        drop(w);
        assert!(recover_pack(dir.path(), 1, 0, Vec::new())
            .unwrap()
            .entries
            .is_empty());
    }

    #[test]
    fn damage_in_the_middle_is_skipped_and_reported_and_later_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 2).unwrap();
        let a = put(&mut w, &[1u8; 700]);
        let b = put(&mut w, &[2u8; 900]);
        let c = put(&mut w, &[3u8; 500]);
        let d = put(&mut w, &[4u8; 300]);
        w.sync().unwrap();
        drop(w);
        let path = pack_path(dir.path(), 2);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        // A payload byte of b, and the magic of c.
        f.write_all_at(&[0xee], b.1.offset + 60).unwrap();
        f.write_all_at(b"XXXX", c.1.offset).unwrap();
        let full = fs::metadata(&path).unwrap().len();
        let r = recover_pack(dir.path(), 2, 0, Vec::new()).unwrap();
        assert_eq!(r.entries, vec![a, d]);
        assert_eq!(r.damage.len(), 1, "{:?}", r.damage);
        assert_eq!(
            (r.damage[0].start, r.damage[0].end),
            (b.1.offset, d.1.offset)
        );
        assert_eq!(r.damage[0].digest, Some(b.0));
        // Nothing was cut, and the idx now lists what survived.
        assert_eq!(fs::metadata(&path).unwrap().len(), full);
        let idx = read_idx(dir.path(), 2, full).unwrap().unwrap().unwrap();
        assert_eq!(idx, (full, vec![a, d]));
    }

    #[test]
    fn an_index_written_at_commit_covers_a_prefix_and_the_tail_is_scanned() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 4).unwrap();
        let a = put(&mut w, &[7u8; 100]);
        w.index(dir.path()).unwrap();
        let b = put(&mut w, &[8u8; 100]);
        w.sync().unwrap();
        drop(w);
        let len = fs::metadata(pack_path(dir.path(), 4)).unwrap().len();
        let (covered, known) = read_idx(dir.path(), 4, len).unwrap().unwrap().unwrap();
        assert_eq!((covered, known.clone()), (a.1.record_len(), vec![a]));
        let r = recover_pack(dir.path(), 4, covered, known).unwrap();
        assert_eq!(r.entries, vec![a, b]);
    }

    #[test]
    fn pack_names_parse() {
        assert_eq!(parse_pack_name("0000002a.pack"), Some(42));
        assert_eq!(parse_pack_name("2a.pack"), None);
        assert_eq!(parse_pack_name("0000002a.idx"), None);
    }
}
