//! NBD exports: a native client for disks served by `qemu-nbd`, `nbdkit`,
//! a hypervisor's backup API or any other NBD server.
//!
//! In the data path this is a [`DiskSource`] like a raw image: the scan asks
//! [`NbdDisk::next_data`] where data is, which is answered from
//! `NBD_CMD_BLOCK_STATUS` on the `base:allocation` context (extents flagged
//! `NBD_STATE_ZERO` read as zeros and are never read), then reads batches
//! with `NBD_CMD_READ` from several threads. When the export carries a qemu
//! dirty bitmap, [`NbdDisk::dirty_extents`] lists what changed since the
//! bitmap was started, so an incremental sync reads only that; without it
//! the caller falls back to hashing the whole disk.
//!
//! Failback writes the other way: [`NbdDisk::connect_writable`] opens an
//! export (a `qemu-nbd`-served VMDK or qcow2 standing in for a new VM's
//! disk) and [`NbdDisk::write_at`], [`NbdDisk::write_zeroes`] and
//! [`NbdDisk::flush`] fill it (`write` says how, and which rules of the
//! protocol that relies on).
//!
//! Layout of this module:
//!
//! * [`uri`]: `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`;
//! * [`wire`]: protocol constants and pure parsers (the fuzzed part), in a
//!   handshake half and a transmission half;
//! * [`reply`]: receiving and checking one reply over any `Read`;
//! * `conn`: one connection, its handshake and requests;
//! * `write`: writes, zeroes and flushes through the pool.
//!
//! Connections: reader threads share the disk through `&self`. Requests are
//! synchronous, one in flight per connection, so the disk keeps a small pool:
//! when the server advertises `NBD_FLAG_CAN_MULTI_CONN` (all connections see
//! the same data) up to [`MAX_CONNECTIONS`] are opened lazily, otherwise all
//! requests share one. A connection that saw a protocol defect or an I/O
//! error is dropped, not returned to the pool; the next request opens a new
//! one. Reads are split at the server's maximum payload (32 MiB unless
//! `NBD_INFO_BLOCK_SIZE` says less) and aligned to its minimum block size.

use std::io::ErrorKind;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::{DiskSource, SourceError};

mod conn;
pub mod fuzzing;
pub mod reply;
pub mod uri;
pub mod wire;
mod write;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod write_tests;

use conn::{Conn, Context, Negotiated};
use reply::ReplyError;
use wire::{Extent, WireError};

/// Most connections opened to a server that allows several.
pub const MAX_CONNECTIONS: usize = 4;
/// Bytes asked about in one `NBD_CMD_BLOCK_STATUS` (fewer round trips; the
/// request length is a u32).
pub const STATUS_WINDOW: u64 = 1 << 30;

/// Why an NBD export cannot be used. Every message names the URI.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The URI cannot be parsed.
    #[error("invalid NBD URI {uri}: {reason}")]
    InvalidUri {
        /// The URI.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server cannot be reached.
    #[error("cannot connect to NBD server {uri}: {cause}")]
    Connect {
        /// The URI.
        uri: String,
        /// The socket error.
        cause: std::io::Error,
    },
    /// The connection failed while in use.
    #[error("I/O error talking to NBD server {uri}: {cause}")]
    Io {
        /// The URI.
        uri: String,
        /// The socket error.
        cause: std::io::Error,
    },
    /// The server did not answer in time; the connection was closed.
    #[error("NBD server {uri} did not answer within {secs} s")]
    Timeout {
        /// The URI.
        uri: String,
        /// The time allowed.
        secs: u64,
    },
    /// The server sent something that breaks the protocol; the connection
    /// was closed.
    #[error("NBD server {uri} sent a bad reply: {cause}")]
    Protocol {
        /// The URI.
        uri: String,
        /// The defect.
        cause: WireError,
    },
    /// The server answered an option with `NBD_REP_ERR_*`.
    #[error("NBD server {uri} refused {option} for export {export:?}: {reply}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    OptionRefused {
        /// The URI.
        uri: String,
        /// The option.
        option: &'static str,
        /// The export name.
        export: String,
        /// The error reply's name (`NBD_REP_ERR_UNKNOWN`: no such export).
        reply: &'static str,
        /// The server's message.
        message: String,
    },
    /// The server reported an error for a request.
    #[error("NBD server {uri} failed {command} at offset {offset}: {} (errno {errno}){}", errno_name(*errno), if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        /// The URI.
        uri: String,
        /// The command.
        command: &'static str,
        /// Offset of the request (or the one the server named).
        offset: u64,
        /// NBD error number.
        errno: u32,
        /// The server's message.
        message: String,
    },
    /// A further connection saw a different export than the first.
    #[error("NBD server {uri}: a new connection sees a different export ({first:?} then {now:?})")]
    ExportChanged {
        /// The URI.
        uri: String,
        /// What the first connection agreed.
        first: String,
        /// What the new one agreed.
        now: String,
    },
    /// The export is read-only (`NBD_FLAG_READ_ONLY`).
    #[error(
        "NBD export {uri} is read-only (the server sets NBD_FLAG_READ_ONLY): it cannot be written"
    )]
    ReadOnly {
        /// The URI.
        uri: String,
    },
    /// Connections with writes not yet flushed were closed, and the server
    /// does not promise that a flush on another connection covers them
    /// (no `NBD_FLAG_CAN_MULTI_CONN`).
    #[error("NBD export {uri}: {connections} connection(s) closed before their writes were flushed; without NBD_FLAG_CAN_MULTI_CONN those writes may not be durable and must be written again on a new connection")]
    UnflushedWritesLost {
        /// The URI.
        uri: String,
        /// How many such connections were closed.
        connections: usize,
    },
    /// A request outside the export.
    #[error("NBD export {uri}: range [{offset}, +{len}) is outside the export of {size} bytes")]
    OutOfRange {
        /// The URI.
        uri: String,
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// The dirty bitmap was not negotiated (not asked for at connect time, or
    /// the server does not export it): fall back to a hash scan.
    #[error("dirty bitmap {bitmap:?} is not available from NBD server {uri}")]
    BitmapUnavailable {
        /// The URI.
        uri: String,
        /// The bitmap name.
        bitmap: String,
    },
}

/// The names of NBD's error numbers.
fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Connections of one disk: idle ones, how many exist in all, and which
/// ones may hold writes not yet flushed.
struct PoolState {
    idle: Vec<Conn>,
    open: usize,
    limit: usize,
    /// [`Conn::id`] of the next connection opened.
    next_id: u64,
    /// Open connections that may have written since their last flush.
    unflushed: Vec<u64>,
    /// Connections closed while in `unflushed`.
    lost_unflushed: usize,
}

impl PoolState {
    /// Connection `id` may have written since its last flush.
    fn mark_unflushed(&mut self, id: u64) {
        if !self.unflushed.contains(&id) {
            self.unflushed.push(id);
        }
    }

    /// Connection `id` is being closed: its unflushed writes, if any, are
    /// lost to a flush on another connection.
    fn closing(&mut self, id: u64) {
        if let Some(i) = self.unflushed.iter().position(|&u| u == id) {
            self.unflushed.swap_remove(i);
            self.lost_unflushed += 1;
        }
    }
}

/// A connection taken from the pool; returned when dropped unless it broke.
struct Lease<'a> {
    disk: &'a NbdDisk,
    conn: Option<Conn>,
    usable: bool,
}

impl Lease<'_> {
    fn conn(&mut self) -> &mut Conn {
        // Only `Drop` takes the connection out.
        self.conn
            .as_mut()
            .expect("lease holds a connection until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut st = self.disk.state();
        let broken = match self.conn.take() {
            Some(c) if self.usable => {
                st.idle.push(c);
                None
            }
            Some(c) => {
                st.open -= 1;
                st.closing(c.id);
                Some(c)
            }
            None => {
                st.open -= 1;
                None
            }
        };
        drop(st);
        // Waiters want any connection (lease) or one in particular (flush).
        self.disk.freed.notify_all();
        // Closed outside the lock: NBD_CMD_DISC on a broken socket may
        // block until the write timeout.
        drop(broken);
    }
}

/// The last block status answer of `base:allocation`.
#[derive(Debug)]
struct StatusWindow {
    start: u64,
    /// End of what the answer covered.
    end: u64,
    /// Merged extents that may hold data, within `[start, end)`.
    data: Vec<(u64, u64)>,
}

/// An NBD export, read through a small pool of connections.
pub struct NbdDisk {
    uri: String,
    target: uri::Target,
    bitmap: Option<String>,
    /// What the first connection agreed; later ones must agree the same.
    info: Negotiated,
    pool: Mutex<PoolState>,
    freed: Condvar,
    allocation: Mutex<Option<StatusWindow>>,
    /// Held while a minimum block is read, patched and written back.
    patching: Mutex<()>,
    /// Held by [`NbdDisk::flush`]: one flush at a time, so that a flush
    /// never returns while another it relies on is still in flight.
    flushing: Mutex<()>,
}

impl std::fmt::Debug for NbdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDisk")
            .field("uri", &self.uri)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl NbdDisk {
    /// Connects to an `nbd://` or `nbd+unix://` URI, without a dirty bitmap.
    pub fn connect(uri: &str) -> Result<NbdDisk, NbdError> {
        NbdDisk::connect_with_bitmap(uri, None)
    }

    /// Connects and, if `bitmap` is given, asks for the
    /// `qemu:dirty-bitmap:NAME` context (see [`NbdDisk::has_bitmap`]).
    pub fn connect_with_bitmap(uri: &str, bitmap: Option<&str>) -> Result<NbdDisk, NbdError> {
        let target = uri::parse(uri).map_err(|reason| NbdError::InvalidUri {
            uri: uri.to_owned(),
            reason,
        })?;
        if let Some(b) = bitmap {
            if b.is_empty() || b.len() > 1024 {
                return Err(NbdError::InvalidUri {
                    uri: uri.to_owned(),
                    reason: format!("bad dirty bitmap name {b:?}"),
                });
            }
        }
        let first = Conn::open(uri, &target, bitmap)?;
        let info = first.info.clone();
        let limit = if info.flags & wire::TFLAG_CAN_MULTI_CONN != 0 {
            MAX_CONNECTIONS
        } else {
            1
        };
        tracing::debug!(uri, ?info, limit, "connected to NBD export");
        Ok(NbdDisk {
            uri: uri.to_owned(),
            target,
            bitmap: bitmap.map(str::to_owned),
            info,
            pool: Mutex::new(PoolState {
                // The first connection has id 0 (Conn::open's).
                idle: vec![first],
                open: 1,
                limit,
                next_id: 1,
                unflushed: Vec::new(),
                lost_unflushed: 0,
            }),
            freed: Condvar::new(),
            allocation: Mutex::new(None),
            patching: Mutex::new(()),
            flushing: Mutex::new(()),
        })
    }

    /// Whether the dirty bitmap asked for at connect time is available.
    pub fn has_bitmap(&self) -> bool {
        self.info.bitmap.is_some()
    }

    /// Whether block status (`base:allocation`) is available; without it
    /// every byte counts as data.
    pub fn has_block_status(&self) -> bool {
        self.info.allocation.is_some()
    }

    /// Connections currently open (idle or in use).
    pub fn connections(&self) -> usize {
        self.state().open
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        // The state is a list and two counters, consistent at every
        // unlock: a thread that panicked while holding it left it valid.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes an idle connection, opens one if the limit allows, or waits.
    fn lease(&self) -> Result<Lease<'_>, NbdError> {
        let mut st = self.state();
        loop {
            if let Some(conn) = st.idle.pop() {
                return Ok(Lease {
                    disk: self,
                    conn: Some(conn),
                    usable: true,
                });
            }
            if st.open < st.limit {
                st.open += 1;
                let id = st.next_id;
                st.next_id += 1;
                drop(st);
                let opened = Conn::open(&self.uri, &self.target, self.bitmap.as_deref()).and_then(
                    |mut c| {
                        c.id = id;
                        if c.info.same_export(&self.info) {
                            Ok(c)
                        } else {
                            Err(NbdError::ExportChanged {
                                uri: self.uri.clone(),
                                first: format!("{:?}", self.info),
                                now: format!("{:?}", c.info),
                            })
                        }
                    },
                );
                st = self.state();
                match opened {
                    Ok(conn) => {
                        return Ok(Lease {
                            disk: self,
                            conn: Some(conn),
                            usable: true,
                        })
                    }
                    Err(e) => {
                        st.open -= 1;
                        if st.open == 0 || matches!(e, NbdError::ExportChanged { .. }) {
                            return Err(e);
                        }
                        // The server takes fewer clients than it claims
                        // (qemu-nbd without --shared): make do with those
                        // already open.
                        tracing::warn!(uri = %self.uri, error = %e, "cannot open another NBD connection; sharing {}", st.open);
                        st.limit = st.open;
                    }
                }
                continue;
            }
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until connection `id` is idle and takes it; `None` once it no
    /// longer needs a flush (it was closed: counted in `lost_unflushed`).
    fn lease_unflushed(&self, id: u64) -> Option<Lease<'_>> {
        let mut st = self.state();
        loop {
            if !st.unflushed.contains(&id) {
                return None;
            }
            if let Some(i) = st.idle.iter().position(|c| c.id == id) {
                let conn = st.idle.swap_remove(i);
                return Some(Lease {
                    disk: self,
                    conn: Some(conn),
                    usable: true,
                });
            }
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn reply_error(&self, e: ReplyError, command: &'static str, offset: u64) -> NbdError {
        let uri = self.uri.clone();
        match e {
            ReplyError::Io(e)
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                NbdError::Timeout {
                    uri,
                    secs: conn::IO_TIMEOUT.as_secs(),
                }
            }
            ReplyError::Io(source) => NbdError::Io { uri, cause: source },
            ReplyError::Wire(source) => NbdError::Protocol { uri, cause: source },
            ReplyError::Server {
                errno,
                message,
                offset: at,
                ..
            } => NbdError::Server {
                uri,
                command,
                offset: at.unwrap_or(offset),
                errno,
                message,
            },
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(NbdError::OutOfRange {
                uri: self.uri.clone(),
                offset,
                len,
                size: self.info.size,
            }),
        }
    }

    /// One request on a leased connection; a broken connection is dropped.
    fn request<T>(
        &self,
        lease: &mut Lease<'_>,
        command: &'static str,
        offset: u64,
        f: impl FnOnce(&mut Conn) -> Result<T, ReplyError>,
    ) -> Result<T, NbdError> {
        f(lease.conn()).map_err(|e| {
            lease.usable = e.connection_usable();
            self.reply_error(e, command, offset)
        })
    }

    /// Reads `buf.len()` bytes at `offset` (within the export).
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let min = u64::from(self.info.min_block);
        let step = u64::from(self.info.max_payload);
        let size = self.info.size;
        let mut lease = self.lease()?;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let left = (buf.len() - done) as u64;
            let head = off % min;
            if head != 0 || left < min {
                // Unaligned head or tail: read the aligned block around it
                // (cut at the export's end, which needs no alignment).
                let start = off - head;
                let end = (start + min).min(size);
                let take = (end - off).min(left) as usize;
                let mut block = vec![0u8; (end - start) as usize];
                self.request(&mut lease, "NBD_CMD_READ", start, |c| {
                    c.read(start, &mut block)
                })?;
                buf[done..done + take].copy_from_slice(&block[head as usize..head as usize + take]);
                done += take;
            } else {
                let n = left.min(step) / min * min;
                let piece = &mut buf[done..done + n as usize];
                self.request(&mut lease, "NBD_CMD_READ", off, |c| c.read(off, piece))?;
                done += n as usize;
            }
        }
        Ok(())
    }

    /// Block status of `context` from `offset` for up to [`STATUS_WINDOW`]
    /// bytes (cut at `end`); `None` when the context is not negotiated.
    fn status(
        &self,
        context: Context,
        offset: u64,
        end: u64,
    ) -> Result<Option<Vec<Extent>>, NbdError> {
        // The caller keeps offset < end <= size; the window fits a u32.
        let len = (end - offset).min(STATUS_WINDOW) as u32;
        let mut lease = self.lease()?;
        self.request(&mut lease, "NBD_CMD_BLOCK_STATUS", offset, |c| {
            c.block_status(offset, len, context)
        })
    }

    /// Asks the server for the allocation status from `offset`; `None`
    /// when `base:allocation` was not negotiated.
    fn query_allocation(&self, offset: u64) -> Result<Option<StatusWindow>, NbdError> {
        let Some(extents) = self.status(Context::Allocation, offset, self.info.size)? else {
            return Ok(None);
        };
        let mut data: Vec<(u64, u64)> = Vec::new();
        for e in &extents {
            // NBD_STATE_ZERO: reads as zeros, never read. A bare
            // NBD_STATE_HOLE does not promise zeros, so it is read.
            if e.flags & wire::STATE_ZERO != 0 {
                continue;
            }
            match data.last_mut() {
                Some(last) if last.1 == e.start => last.1 = e.end,
                _ => data.push((e.start, e.end)),
            }
        }
        // parse_descriptors returns at least one non-empty extent.
        let end = extents.last().map_or(offset + 1, |e| e.end);
        Ok(Some(StatusWindow {
            start: offset,
            end,
            data,
        }))
    }

    fn next_data_extent(&self, offset: u64) -> Result<Option<(u64, u64)>, NbdError> {
        let size = self.info.size;
        let mut pos = offset;
        while pos < size {
            {
                let cache = self.allocation.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(w) = cache.as_ref().filter(|w| w.start <= pos && pos < w.end) {
                    // First data extent ending after pos (the list is sorted).
                    let i = w.data.partition_point(|&(_, e)| e <= pos);
                    if let Some(&(s, e)) = w.data.get(i) {
                        return Ok(Some((s.max(pos), e)));
                    }
                    pos = w.end;
                    continue;
                }
            }
            let Some(w) = self.query_allocation(pos)? else {
                return Ok(Some((pos, size)));
            };
            *self.allocation.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
        }
        Ok(None)
    }

    /// Dirty extents `[start, end)` of `bitmap` within `[offset, offset +
    /// len)` (cut at the export's end), merged and in order. Fails with
    /// [`NbdError::BitmapUnavailable`] unless this bitmap was negotiated by
    /// [`NbdDisk::connect_with_bitmap`].
    pub fn dirty_extents(
        &self,
        bitmap: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, NbdError> {
        let unavailable = || NbdError::BitmapUnavailable {
            uri: self.uri.clone(),
            bitmap: bitmap.to_owned(),
        };
        if self.bitmap.as_deref() != Some(bitmap) || self.info.bitmap.is_none() {
            return Err(unavailable());
        }
        let end = offset.saturating_add(len).min(self.info.size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let extents = self
                .status(Context::Bitmap, pos, end)?
                .ok_or_else(unavailable)?;
            for e in &extents {
                if e.flags & wire::STATE_DIRTY == 0 {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if last.1 == e.start => last.1 = e.end,
                    _ => out.push((e.start, e.end)),
                }
            }
            pos = extents.last().map_or(end, |e| e.end);
        }
        Ok(out)
    }
}

impl DiskSource for NbdDisk {
    fn describe(&self) -> &str {
        &self.uri
    }

    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        match self.read(buf, offset) {
            Err(NbdError::OutOfRange { .. }) => Err(SourceError::ShortRead {
                disk: self.uri.clone(),
                offset,
                len: buf.len(),
                size: self.info.size,
            }),
            other => other.map_err(SourceError::from),
        }
    }

    fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, SourceError> {
        Ok(self.next_data_extent(offset)?)
    }
}
