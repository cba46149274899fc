//! Writing to an NBD export: [`NbdDisk::write_at`],
//! [`NbdDisk::write_zeroes`] and [`NbdDisk::flush`] on a disk opened with
//! [`NbdDisk::connect_writable`], through the same pool of connections the
//! reads use.
//!
//! The rules of the NBD protocol specification (`doc/proto.md`) this relies
//! on, and what is done with them:
//!
//! * **Read-only exports.** A server that sets `NBD_FLAG_READ_ONLY` must
//!   fail every write, so [`NbdDisk::connect_writable`] refuses such an
//!   export up front, and writes to a disk that [`NbdDisk::writable`] says
//!   no for fail with [`NbdError::ReadOnly`] before anything is sent.
//! * **Ranges and sizes.** A request must not reach past the export's end,
//!   must be aligned to the minimum block size and, for `NBD_CMD_WRITE` and
//!   `NBD_CMD_WRITE_ZEROES`, must not exceed the maximum block size when
//!   the server advertised one (`NBD_INFO_BLOCK_SIZE`). Without one the spec
//!   advises clients to send at most 2^25 bytes per read or write. So a
//!   range is checked against the export size before any request is sent
//!   ([`NbdError::OutOfRange`]); writes go out in pieces of at most the
//!   advertised maximum, capped at 32 MiB; write-zeroes requests in pieces
//!   of at most the advertised maximum, or 1 GiB when there is none (no
//!   data travels with them). An unaligned head or tail is written by
//!   reading the whole minimum block around it, patching it and writing it
//!   back (serialised, so that two writers patching different bytes of one
//!   block cannot undo each other; callers must not write overlapping
//!   ranges concurrently, as with any disk).
//! * **Zeroes.** `NBD_CMD_WRITE_ZEROES` may only be sent when the server
//!   advertises `NBD_FLAG_SEND_WRITE_ZEROES`; it is sent without
//!   `NBD_CMD_FLAG_NO_HOLE`, so the server may deallocate the range, but
//!   must make it read as zeros. Without the flag, zeros are written as
//!   data. Unaligned edges are zeroed by a patched block write.
//! * **Replies.** A reply to a write, a write of zeroes or a flush carries
//!   no data: a simple reply, or with structured replies a `NONE` chunk
//!   with DONE and any error chunks (`ERROR`, `ERROR_OFFSET`) before it.
//!   Anything else is a protocol error and the connection is dropped. A
//!   server error becomes [`NbdError::Server`] naming the command, the
//!   offset (the server's, for `ERROR_OFFSET`) and the errno; the
//!   connection stays in use, except after `NBD_ESHUTDOWN`, where the
//!   spec requires the client to disconnect.
//! * **Durability.** A server may reply to a write before the data is on
//!   permanent storage; it must not reply to `NBD_CMD_FLUSH` before every
//!   write it has already replied to is there. [`NbdDisk::flush`] therefore
//!   makes durable every write whose call has returned. The pool remembers
//!   which connections may have written since their last flush (marked
//!   before the write is sent: a failed write may still have changed data).
//! * **Multi-conn.** With `NBD_FLAG_CAN_MULTI_CONN` the server has no cache
//!   or one shared by all connections, and a flush's effect is visible on
//!   all of them when it is answered; the client must only wait for the
//!   replies of the writes the flush is to cover before sending it. So one
//!   flush on any connection covers every write that has returned, on
//!   every connection, including connections closed since. Without the
//!   flag caches may be per connection and the spec tells clients not to
//!   spread commands over several connections: the pool then holds a
//!   single connection, and a flush is sent on each connection that wrote
//!   since its last flush. Writes on a connection closed before its flush
//!   cannot be made durable through another one, so from then on every
//!   flush fails with [`NbdError::UnflushedWritesLost`], and the caller must
//!   write them again on a new [`NbdDisk`].
//! * **No flush.** A client must not send `NBD_CMD_FLUSH` unless the server
//!   sets `NBD_FLAG_SEND_FLUSH`, and the protocol has no other way to ask
//!   for durability (`NBD_CMD_FLAG_FUA` needs `NBD_FLAG_SEND_FUA`): a write
//!   such a server has answered is as durable as it will ever make it. So
//!   there [`NbdDisk::flush`] sends nothing and succeeds, as qemu's NBD
//!   client does (Linux's turns the device's write cache off instead).
//! * **Dropping.** Nothing is flushed when a disk is dropped (an error
//!   could not be reported); dropping one with writes not yet flushed only
//!   logs a warning.
//! * **Block status.** Writes change what `base:allocation` reports, so the
//!   cached allocation answer is forgotten after every write.

use super::wire;
use super::{Lease, NbdDisk, NbdError};

impl NbdDisk {
    /// Connects for writing (no dirty bitmap); refuses an export whose
    /// transmission flags say read-only with [`NbdError::ReadOnly`].
    pub fn connect_writable(uri: &str) -> Result<NbdDisk, NbdError> {
        let disk = NbdDisk::connect(uri)?;
        if !disk.writable() {
            return Err(NbdError::ReadOnly {
                uri: uri.to_owned(),
            });
        }
        Ok(disk)
    }

    /// Whether the export accepts writes: its transmission flags do not
    /// say read-only. (A server may still refuse writes it cannot carry
    /// out, with an error per request.)
    pub fn writable(&self) -> bool {
        self.info.flags & wire::TFLAG_READ_ONLY == 0
    }

    fn check_writable(&self) -> Result<(), NbdError> {
        if self.writable() {
            Ok(())
        } else {
            Err(NbdError::ReadOnly {
                uri: self.uri.clone(),
            })
        }
    }

    /// Forgets the cached allocation answer, which writes make stale.
    fn forget_allocation(&self) {
        *self.allocation.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Records, before a write is sent, that the leased connection may
    /// hold writes not yet flushed.
    fn will_write(&self, lease: &mut Lease<'_>) {
        let id = lease.conn().id;
        self.state().mark_unflushed(id);
        self.forget_allocation();
    }

    /// Writes `buf` at `offset` with `NBD_CMD_WRITE`, in requests no larger
    /// than the server's maximum block size (32 MiB when it advertises none
    /// or more) and aligned to its minimum block size: an unaligned head or
    /// tail is read, patched and written back as a whole block. The range
    /// is checked against the export size before anything is sent
    /// ([`NbdError::OutOfRange`]); a read-only export fails with
    /// [`NbdError::ReadOnly`]. The data is durable only after
    /// [`NbdDisk::flush`].
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), NbdError> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut lease = self.lease()?;
        let written = self.write_on(&mut lease, buf, offset);
        self.forget_allocation();
        written
    }

    /// [`NbdDisk::write_at`] on a leased connection, range already checked.
    fn write_on(&self, lease: &mut Lease<'_>, buf: &[u8], offset: u64) -> Result<(), NbdError> {
        self.will_write(lease);
        let min = u64::from(self.info.min_block);
        let step = u64::from(self.info.max_payload);
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let left = (buf.len() - done) as u64;
            let head = off % min;
            if head != 0 || left < min {
                let start = off - head;
                // Cut at the export's end, which needs no alignment.
                let end = (start + min).min(self.info.size);
                let take = (end - off).min(left) as usize;
                self.patch_block(lease, start, end, &buf[done..done + take], head as usize)?;
                done += take;
            } else {
                let n = (left.min(step) / min * min) as usize;
                let piece = &buf[done..done + n];
                self.request(lease, "NBD_CMD_WRITE", off, |c| c.write(off, piece))?;
                done += n;
            }
        }
        Ok(())
    }

    /// Writes `bytes` at `at` within the block `[start, end)` by reading
    /// the block, patching it and writing it back.
    fn patch_block(
        &self,
        lease: &mut Lease<'_>,
        start: u64,
        end: u64,
        bytes: &[u8],
        at: usize,
    ) -> Result<(), NbdError> {
        // Two threads patching different bytes of one block would each
        // write back the other's old bytes. The guard protects no data, so
        // a poisoned one is as good as any.
        let _one = self.patching.lock().unwrap_or_else(|e| e.into_inner());
        let mut block = vec![0u8; (end - start) as usize];
        self.request(lease, "NBD_CMD_READ", start, |c| c.read(start, &mut block))?;
        block[at..at + bytes.len()].copy_from_slice(bytes);
        self.request(lease, "NBD_CMD_WRITE", start, |c| c.write(start, &block))
    }

    /// Makes `[offset, offset + len)` read as zeros: with
    /// `NBD_CMD_WRITE_ZEROES` (without `NBD_CMD_FLAG_NO_HOLE`: the server
    /// may leave holes) when the server advertises
    /// `NBD_FLAG_SEND_WRITE_ZEROES`, in requests no larger than its maximum
    /// block size (1 GiB when it sets none), with unaligned edges patched
    /// as in [`NbdDisk::write_at`]; otherwise by writing zeros. Range and
    /// read-only checks as for [`NbdDisk::write_at`].
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut lease = self.lease()?;
        let zeroed = if self.info.flags & wire::TFLAG_SEND_WRITE_ZEROES != 0 {
            self.zero_with_command(&mut lease, offset, len)
        } else {
            self.zero_with_writes(&mut lease, offset, len)
        };
        self.forget_allocation();
        zeroed
    }

    /// `NBD_CMD_WRITE_ZEROES` for the whole minimum blocks of the range,
    /// zero writes for the partial blocks at its ends.
    fn zero_with_command(
        &self,
        lease: &mut Lease<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), NbdError> {
        let min = u64::from(self.info.min_block);
        let end = offset + len;
        let (first, last) = (offset.div_ceil(min) * min, end / min * min);
        if first >= last {
            return self.zero_with_writes(lease, offset, len);
        }
        if first > offset {
            self.zero_with_writes(lease, offset, first - offset)?;
        }
        self.will_write(lease);
        let step = u64::from(self.info.max_zeroes);
        let mut off = first;
        while off < last {
            // A multiple of min, and at most max_zeroes, a u32.
            let n = (last - off).min(step) as u32;
            self.request(lease, "NBD_CMD_WRITE_ZEROES", off, |c| {
                c.write_zeroes(off, n)
            })?;
            off += u64::from(n);
        }
        if last < end {
            self.zero_with_writes(lease, last, end - last)?;
        }
        Ok(())
    }

    /// Zeros written as data, from one zero buffer of at most the maximum
    /// payload; pieces end at multiples of it, so only the range's own
    /// edges can be unaligned.
    fn zero_with_writes(
        &self,
        lease: &mut Lease<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), NbdError> {
        let step = u64::from(self.info.max_payload);
        let zeros = vec![0u8; len.min(step) as usize];
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let next = ((off / step + 1) * step).min(end);
            // At most step bytes: within the buffer.
            self.write_on(lease, &zeros[..(next - off) as usize], off)?;
            off = next;
        }
        Ok(())
    }

    /// Makes every write that has returned so far durable: one
    /// `NBD_CMD_FLUSH` when the server advertises `NBD_FLAG_CAN_MULTI_CONN`
    /// (a flush's effect is then visible on every connection), otherwise
    /// one on each connection that wrote since its last flush. Sends
    /// nothing when nothing was written since the last flush, or when the
    /// server does not advertise `NBD_FLAG_SEND_FLUSH` (the protocol then
    /// offers no way to ask for durability: what the server answered is
    /// all it promises). Fails with [`NbdError::UnflushedWritesLost`] once a
    /// connection with unflushed writes was closed and the server does not
    /// share its cache between connections. The protocol rules this relies
    /// on are listed in `agent/src/source/nbd/write.rs`.
    pub fn flush(&self) -> Result<(), NbdError> {
        // Serialises flushes; protects no data.
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        if self.info.flags & wire::TFLAG_SEND_FLUSH == 0 {
            let mut st = self.state();
            st.unflushed.clear();
            st.lost_unflushed = 0;
            return Ok(());
        }
        if self.info.flags & wire::TFLAG_CAN_MULTI_CONN != 0 {
            self.flush_shared()
        } else {
            self.flush_each()
        }
    }

    /// Multi-conn: one flush on any connection covers the writes replied
    /// to on every connection, closed ones included.
    fn flush_shared(&self) -> Result<(), NbdError> {
        let (ids, lost) = {
            let mut st = self.state();
            (
                std::mem::take(&mut st.unflushed),
                std::mem::take(&mut st.lost_unflushed),
            )
        };
        if ids.is_empty() && lost == 0 {
            return Ok(());
        }
        let flushed = self
            .lease()
            .and_then(|mut lease| self.request(&mut lease, "NBD_CMD_FLUSH", 0, |c| c.flush()));
        if flushed.is_err() {
            // Still owed: the next flush tries again.
            let mut st = self.state();
            for id in ids {
                st.mark_unflushed(id);
            }
            st.lost_unflushed += lost;
        }
        flushed
    }

    /// No multi-conn: a flush on each connection that wrote; writes on
    /// connections closed unflushed stay owed for good.
    fn flush_each(&self) -> Result<(), NbdError> {
        let ids = self.state().unflushed.clone();
        for id in ids {
            let Some(mut lease) = self.lease_unflushed(id) else {
                continue;
            };
            self.state().unflushed.retain(|&u| u != id);
            if let Err(e) = self.request(&mut lease, "NBD_CMD_FLUSH", 0, |c| c.flush()) {
                // Still owed; if the connection is dropped with the lease,
                // its writes count as lost.
                self.state().mark_unflushed(id);
                return Err(e);
            }
        }
        let lost = self.state().lost_unflushed;
        if lost > 0 {
            return Err(NbdError::UnflushedWritesLost {
                uri: self.uri.clone(),
                connections: lost,
            });
        }
        Ok(())
    }
}

impl Drop for NbdDisk {
    fn drop(&mut self) {
        let st = self.state();
        if !st.unflushed.is_empty() || st.lost_unflushed > 0 {
            tracing::warn!(uri = %self.uri, "closing NBD export with writes that were not flushed");
        }
    }
}
