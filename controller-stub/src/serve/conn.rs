//! One NBD client connection: the handshake (decided in `handshake.rs`),
//! then requests served one at a time in order. Clients that want
//! parallelism open several connections (the export says
//! `CAN_MULTI_CONN`). Block reads run on the blocking pool; this task only
//! moves bytes.
//!
//! A connection ends on `NBD_CMD_DISC`, on a malformed request, when the
//! client goes away, or when the export stops (stop, TTL, shutdown): then
//! the request in progress is finished and the socket closed.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::handshake::{ExportDescription, Handshake, Negotiated, Next};
use super::image::PointImage;
use super::nbd::{self, cmd, errno, Request};

/// How long a client may take over the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes one block status reply describes.
const STATUS_SPAN: u32 = 1 << 30;
/// Most options one handshake may send (a client looping on options is
/// cut off).
const MAX_OPTIONS: u32 = 64;

/// Serves one client until it leaves or `stop` turns true.
pub async fn serve<S>(
    mut stream: S,
    image: Arc<PointImage>,
    export: ExportDescription,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let negotiated = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, export)) => match r {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out")),
        },
        _ = stopped(&mut stop) => return Ok(()),
    };
    let Some(negotiated) = negotiated else {
        return Ok(());
    };
    let mut header = [0u8; nbd::REQUEST_LEN];
    loop {
        tokio::select! {
            r = stream.read_exact(&mut header) => {
                match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            _ = stopped(&mut stop) => return Ok(()),
        }
        let req =
            Request::parse(&header).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if req.kind == cmd::DISC {
            return Ok(());
        }
        // A client that stops reading must not keep a stopped export's
        // connection open: the stop also ends a reply in progress.
        tokio::select! {
            r = answer(&mut stream, &image, negotiated, req) => r?,
            _ = stopped(&mut stop) => return Ok(()),
        }
        stream.flush().await?;
    }
}

/// Returns when `stop` turns true or its sender is gone (the export was
/// removed).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, before any await: it
    // must not live in a task's state (it is not `Send`).
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs the handshake: `Some` when transmission starts, `None` when the
/// client ended it.
async fn handshake<S>(stream: &mut S, export: ExportDescription) -> io::Result<Option<Negotiated>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&nbd::greeting()).await?;
    stream.flush().await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & nbd::CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "client does not speak fixed newstyle",
        ));
    }
    let mut hs = Handshake::new(export, client_flags);
    for _ in 0..MAX_OPTIONS {
        let magic = stream.read_u64().await?;
        if magic != nbd::IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option magic {magic:#x}"),
            ));
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        if len > nbd::MAX_OPTION_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option {option} of {len} bytes is too long"),
            ));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;
        match hs.option(option, &data) {
            Next::Reply(out) => stream.write_all(&out).await?,
            Next::Transmit(out) => {
                stream.write_all(&out).await?;
                return Ok(Some(hs.negotiated()));
            }
            Next::Close(out) => {
                stream.write_all(&out).await?;
                stream.flush().await?;
                return Ok(None);
            }
        }
        stream.flush().await?;
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "too many options in one handshake",
    ))
}

/// Answers one request (not `DISC`).
async fn answer<S>(
    stream: &mut S,
    image: &Arc<PointImage>,
    neg: Negotiated,
    req: Request,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let inside = req.length > 0
        && req
            .offset
            .checked_add(u64::from(req.length))
            .is_some_and(|end| end <= image.size());
    let in_range = inside && req.length <= nbd::MAX_REQUEST_LEN;
    match req.kind {
        cmd::READ if !in_range => fail(stream, neg, req, errno::EINVAL, "read out of range").await,
        cmd::READ if neg.structured => read_structured(stream, image, req).await,
        cmd::READ => read_simple(stream, image, req).await,
        cmd::BLOCK_STATUS if !neg.base_allocation => {
            fail(
                stream,
                neg,
                req,
                errno::EINVAL,
                "no metadata context selected",
            )
            .await
        }
        cmd::BLOCK_STATUS if !inside => {
            fail(stream, neg, req, errno::EINVAL, "block status out of range").await
        }
        cmd::BLOCK_STATUS => {
            // Clients ask for large ranges (nbdinfo --map: up to 4 GiB);
            // the spec lets the reply cover less, so it covers at most
            // STATUS_SPAN, which bounds the work and the reply's size.
            let span = req.length.min(STATUS_SPAN);
            let mut extents: Vec<(u32, u32)> = image
                .allocation(req.offset, span)
                .into_iter()
                .map(|(len, zero)| {
                    let flags = if zero {
                        nbd::STATE_HOLE | nbd::STATE_ZERO
                    } else {
                        0
                    };
                    (len, flags)
                })
                .collect();
            if req.flags & nbd::CMD_FLAG_REQ_ONE != 0 {
                extents.truncate(1);
            }
            stream
                .write_all(&nbd::block_status_chunk(
                    req.cookie,
                    nbd::BASE_ALLOCATION_ID,
                    &extents,
                ))
                .await
        }
        cmd::WRITE => {
            // The payload follows the header: drain it to stay in step, or
            // close if it is too long to be a request we would accept.
            if req.length > nbd::MAX_REQUEST_LEN {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "write payload too long",
                ));
            }
            let mut sink = tokio::io::sink();
            let mut payload = (&mut *stream).take(u64::from(req.length));
            tokio::io::copy(&mut payload, &mut sink).await?;
            fail(stream, neg, req, errno::EPERM, "the export is read-only").await
        }
        cmd::TRIM | cmd::WRITE_ZEROES | cmd::RESIZE => {
            fail(stream, neg, req, errno::EPERM, "the export is read-only").await
        }
        _ => fail(stream, neg, req, errno::EINVAL, "command not supported").await,
    }
}

/// An error reply, structured or simple.
async fn fail<S>(
    stream: &mut S,
    neg: Negotiated,
    req: Request,
    error: u32,
    msg: &str,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    if neg.structured {
        stream
            .write_all(&nbd::error_chunk(req.cookie, error, msg))
            .await
    } else {
        stream
            .write_all(&nbd::simple_reply(req.cookie, error))
            .await
    }
}

/// Reads data block `block` on the blocking pool; an error is logged with
/// the point and offset.
async fn read_block(image: &Arc<PointImage>, block: u64) -> Result<Vec<u8>, ()> {
    let img = image.clone();
    let r = tokio::task::spawn_blocking(move || img.read_block(block)).await;
    let err = match r {
        Ok(Ok(bytes)) => return Ok(bytes),
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("read task failed: {e}"),
    };
    tracing::error!(
        agent = %image.agent,
        disk = %image.disk,
        point = image.point,
        block,
        offset = image.geometry.offset(block),
        error = %err,
        "NBD read of a block that fails verification: answered with EIO"
    );
    Err(())
}

/// A read with structured replies: a hole chunk per run of zero blocks, a
/// data chunk per data block; with `DF`, one data chunk for the whole
/// range. A block that fails ends the reply with an `EIO` error chunk at
/// its offset.
async fn read_structured<S>(stream: &mut S, image: &Arc<PointImage>, req: Request) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let segments = image.segments(req.offset, req.length);
    let df = req.flags & nbd::CMD_FLAG_DF != 0;
    if df {
        let mut buf = Vec::with_capacity(req.length as usize);
        for s in &segments {
            match fill(image, s, &mut buf).await {
                Ok(()) => {}
                Err(()) => return eio(stream, req, s.offset).await,
            }
        }
        stream
            .write_all(&nbd::data_chunk_header(
                req.cookie, true, req.offset, req.length,
            ))
            .await?;
        return stream.write_all(&buf).await;
    }
    let last = segments.len().saturating_sub(1);
    for (i, s) in segments.iter().enumerate() {
        let done = i == last;
        match s.block {
            None => {
                stream
                    .write_all(&nbd::hole_chunk(req.cookie, done, s.offset, s.len))
                    .await?
            }
            Some((block, within)) => {
                let Ok(bytes) = read_block(image, block).await else {
                    return eio(stream, req, s.offset).await;
                };
                let piece = slice(&bytes, within, s.len);
                stream
                    .write_all(&nbd::data_chunk_header(req.cookie, done, s.offset, s.len))
                    .await?;
                stream.write_all(piece).await?;
            }
        }
    }
    Ok(())
}

/// A read with a simple reply: the whole range is assembled first, since
/// the error code comes before the data.
async fn read_simple<S>(stream: &mut S, image: &Arc<PointImage>, req: Request) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(req.length as usize);
    for s in image.segments(req.offset, req.length) {
        if fill(image, &s, &mut buf).await.is_err() {
            return stream
                .write_all(&nbd::simple_reply(req.cookie, errno::EIO))
                .await;
        }
    }
    stream.write_all(&nbd::simple_reply(req.cookie, 0)).await?;
    stream.write_all(&buf).await
}

/// Appends segment `s`'s bytes to `buf`.
async fn fill(
    image: &Arc<PointImage>,
    s: &super::image::Segment,
    buf: &mut Vec<u8>,
) -> Result<(), ()> {
    match s.block {
        None => buf.resize(buf.len() + s.len as usize, 0),
        Some((block, within)) => {
            let bytes = read_block(image, block).await?;
            buf.extend_from_slice(slice(&bytes, within, s.len));
        }
    }
    Ok(())
}

/// `len` bytes of a block from `within`; the image's segments lie inside
/// their block, whose length `read_block` has checked.
fn slice(bytes: &[u8], within: u32, len: u32) -> &[u8] {
    let start = (within as usize).min(bytes.len());
    let end = (start + len as usize).min(bytes.len());
    &bytes[start..end]
}

async fn eio<S>(stream: &mut S, req: Request, offset: u64) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream
        .write_all(&nbd::error_offset_chunk(
            req.cookie,
            true,
            errno::EIO,
            "block failed verification",
            offset,
        ))
        .await
}
