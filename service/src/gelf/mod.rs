//! Where the agent's and the controller's logs leave the machine: a `tracing` layer that ships
//! every event as a GELF 1.1 message over UDP to Graylog (or anything that
//! speaks GELF), default port 12201.
//!
//! Logging must never slow the data path. `GelfLayer::on_event` runs on the
//! thread that logged (a reader, a hasher, the transport) and only copies the
//! event's fields into a JSON object and `try_send`s it into a bounded queue;
//! when the queue is full the message is dropped and counted. One background
//! thread (`sender.rs`) drains the queue, encodes, compresses, chunks and
//! writes datagrams, and reports drops as GELF messages of its own.
//! [`GelfHandle`] reads the counters and flushes at shutdown.
//!
//! Wire format (GELF 1.1):
//! - payload: a JSON object with `version` ("1.1"), `host`, `short_message`,
//!   optional `full_message` (multi-line or over 250 characters),
//!   `timestamp` (Unix seconds with decimals), `level` (syslog severity:
//!   error 3, warn 4, info 6, debug and trace 7), and additional fields
//!   prefixed `_`: static ones such as `_agent_id`, span fields such as
//!   `_session` and `_disk`, event fields such as `_point` and `_bytes`
//!   (numbers stay JSON numbers), `_target`, `_file`, `_line`. A field named
//!   `id` is sent as `_id_`, since GELF reserves `_id`.
//! - optional compression (gzip or zlib) of the whole payload;
//! - a payload larger than `chunk_size` is split into chunks, each datagram
//!   `1e 0f`, an 8-byte message id, a sequence number and a count (one byte
//!   each), then its slice; at most 128 chunks, larger messages are dropped.
//!   See [`chunk`](chunk/index.html).
//!
//! The `gelf_logger` crate speaks only TCP and `tracing-gelf` sends unchunked
//! datagrams, hence this module.

pub mod chunk;
pub mod message;
mod sender;

#[cfg(test)]
mod tests;

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

pub use chunk::{chunk, Reassembler, MAX_CHUNKS};

use message::{additional_field_key, build_message, EventRecord, FieldCollector, SpanFields};
use sender::{Counters, SenderSettings};

/// GELF's registered UDP port, used when the address names none.
pub const DEFAULT_PORT: u16 = 12201;
/// Default datagram size, header included: fits a 1500-byte Ethernet MTU
/// after IP and UDP headers with room for tunnels.
pub const DEFAULT_CHUNK_SIZE: usize = 1420;
/// Smallest accepted `chunk_size`.
pub const MIN_CHUNK_SIZE: usize = 512;
/// Largest accepted `chunk_size` (below the 65 507-byte UDP limit).
pub const MAX_CHUNK_SIZE: usize = 65_000;
/// Default queue length, in messages.
pub const DEFAULT_QUEUE: usize = 1024;

/// Errors of the GELF layer.
#[derive(Debug, thiserror::Error)]
pub enum GelfError {
    /// The log server's address did not resolve.
    #[error("cannot resolve GELF address {address}: {cause}")]
    Resolve {
        /// The address as configured.
        address: String,
        /// Resolver error.
        cause: io::Error,
    },
    /// The log server's address resolved to no socket address.
    #[error("GELF address {address} resolved to no socket address")]
    NoAddress {
        /// The address as configured.
        address: String,
    },
    /// `chunk_size` outside [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
    #[error("GELF chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    InvalidChunkSize {
        /// The configured size.
        chunk_size: usize,
    },
    /// A chunk size that leaves no room for payload after the chunk header.
    #[error("GELF chunk size {chunk_size} leaves no room after the 12-byte chunk header")]
    ChunkSizeTooSmall {
        /// The size asked for.
        chunk_size: usize,
    },
    /// A queue of zero messages.
    #[error("GELF queue length must be at least 1")]
    InvalidQueue,
    /// An empty `host`, which GELF requires.
    #[error("GELF host field must not be empty")]
    EmptyHost,
    /// The local UDP socket could not be opened.
    #[error("cannot open a UDP socket to send GELF to {address}: {cause}")]
    Bind {
        /// The log server's address.
        address: SocketAddr,
        /// Socket error.
        cause: io::Error,
    },
    /// The sender thread could not be started.
    #[error("cannot start the GELF sender thread: {0}")]
    Spawn(#[source] io::Error),
    /// A message that would need more than [`MAX_CHUNKS`] chunks.
    #[error("GELF payload of {payload_len} bytes needs {chunks} chunks of {chunk_size} bytes, over the limit of 128")]
    TooManyChunks {
        /// Payload length after compression.
        payload_len: usize,
        /// Datagram size, header included.
        chunk_size: usize,
        /// Chunks it would need.
        chunks: usize,
    },
    /// JSON serialization failed.
    #[error("cannot encode a GELF message: {0}")]
    Encode(#[source] serde_json::Error),
    /// Compression failed.
    #[error("cannot compress a GELF message: {0}")]
    Compress(io::Error),
    /// Writing a datagram failed.
    #[error("cannot send GELF to {address}: {cause}")]
    Send {
        /// The log server's address.
        address: SocketAddr,
        /// Socket error.
        cause: io::Error,
    },
}

/// Compression of the whole GELF payload, before chunking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Plain JSON.
    #[default]
    None,
    /// gzip (RFC 1952).
    Gzip,
    /// zlib (RFC 1950).
    Zlib,
}

/// Where and how to ship logs.
#[derive(Debug, Clone)]
pub struct GelfConfig {
    /// Log server, `host:port`; the port defaults to [`DEFAULT_PORT`].
    pub address: String,
    /// GELF `host` field: the name this machine is known by.
    pub host: String,
    /// Largest datagram, chunk header included, [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
    pub chunk_size: usize,
    /// Payload compression.
    pub compression: Compression,
    /// Messages held for the sender thread before new ones are dropped.
    pub queue: usize,
    /// Fields added to every message, e.g. `("agent_id", "...")` sent as
    /// `_agent_id`.
    pub static_fields: Vec<(String, String)>,
}

impl Default for GelfConfig {
    fn default() -> Self {
        GelfConfig {
            address: format!("127.0.0.1:{DEFAULT_PORT}"),
            host: local_hostname().unwrap_or_else(|| "tideline".to_owned()),
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: Compression::None,
            queue: DEFAULT_QUEUE,
            static_fields: Vec::new(),
        }
    }
}

/// The machine's host name, if it has a valid UTF-8 one.
fn local_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..len]).ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// Adds [`DEFAULT_PORT`] to an address that has no port.
fn with_default_port(address: &str) -> String {
    let address = address.trim();
    if address.parse::<SocketAddr>().is_ok() {
        return address.to_owned();
    }
    if let Ok(ip) = address.parse::<IpAddr>() {
        return SocketAddr::new(ip, DEFAULT_PORT).to_string();
    }
    if (address.starts_with('[') && address.ends_with(']')) || !address.contains(':') {
        return format!("{address}:{DEFAULT_PORT}");
    }
    address.to_owned()
}

/// Resolves the configured address once, at start-up.
fn resolve(address: &str) -> Result<SocketAddr, GelfError> {
    let mut addrs = with_default_port(address)
        .to_socket_addrs()
        .map_err(|cause| GelfError::Resolve {
            address: address.to_owned(),
            cause,
        })?;
    addrs.next().ok_or_else(|| GelfError::NoAddress {
        address: address.to_owned(),
    })
}

/// `tracing` layer that queues every event as a GELF message; see the module
/// documentation.
pub struct GelfLayer {
    queue: SyncSender<Map<String, Value>>,
    counters: Arc<Counters>,
    host: String,
    /// Static fields, already keyed `_name`.
    static_fields: Vec<(String, Value)>,
}

/// Reads the layer's counters and waits for its queue to drain. Cheap to
/// clone; outlives the layer.
#[derive(Debug, Clone)]
pub struct GelfHandle {
    counters: Arc<Counters>,
}

impl GelfLayer {
    /// Validates `cfg`, resolves the address, opens the socket and starts the
    /// sender thread.
    pub fn new(cfg: GelfConfig) -> Result<(GelfLayer, GelfHandle), GelfError> {
        Self::start(cfg, None)
    }

    /// [`GelfLayer::new`] with the sender thread held until `gate` yields:
    /// lets tests fill the queue.
    #[cfg(test)]
    pub(crate) fn new_gated(
        cfg: GelfConfig,
        gate: mpsc::Receiver<()>,
    ) -> Result<(GelfLayer, GelfHandle), GelfError> {
        Self::start(cfg, Some(gate))
    }

    fn start(
        cfg: GelfConfig,
        gate: Option<mpsc::Receiver<()>>,
    ) -> Result<(GelfLayer, GelfHandle), GelfError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cfg.chunk_size) {
            return Err(GelfError::InvalidChunkSize {
                chunk_size: cfg.chunk_size,
            });
        }
        if cfg.queue == 0 {
            return Err(GelfError::InvalidQueue);
        }
        if cfg.host.trim().is_empty() {
            return Err(GelfError::EmptyHost);
        }
        let target = resolve(&cfg.address)?;
        let local: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).map_err(|cause| GelfError::Bind {
            address: target,
            cause,
        })?;
        let static_fields: Vec<(String, Value)> = cfg
            .static_fields
            .iter()
            .map(|(name, value)| (additional_field_key(name), Value::from(value.as_str())))
            .collect();
        let counters = Arc::new(Counters::default());
        let (queue, drain) = mpsc::sync_channel(cfg.queue);
        let settings = SenderSettings {
            target,
            host: cfg.host.clone(),
            static_fields: static_fields.clone(),
            chunk_size: cfg.chunk_size,
            compression: cfg.compression,
        };
        // Detached: the thread ends once the layer (the queue's only
        // producer) is dropped and the queue is drained.
        sender::spawn(socket, settings, drain, Arc::clone(&counters), gate)
            .map_err(GelfError::Spawn)?;
        let layer = GelfLayer {
            queue,
            counters: Arc::clone(&counters),
            host: cfg.host,
            static_fields,
        };
        Ok((layer, GelfHandle { counters }))
    }
}

impl<S> Layer<S> for GelfLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields::default();
        attrs.record(&mut FieldCollector(&mut fields.0));
        let mut extensions = span.extensions_mut();
        // Another GelfLayer on the same subscriber may have stored them
        // already; `insert` would panic on a second value.
        match extensions.get_mut::<SpanFields>() {
            Some(existing) => *existing = fields,
            None => extensions.insert(fields),
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        match extensions.get_mut::<SpanFields>() {
            Some(fields) => values.record(&mut FieldCollector(&mut fields.0)),
            None => {
                let mut fields = SpanFields::default();
                values.record(&mut FieldCollector(&mut fields.0));
                extensions.insert(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let span_fields = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .filter_map(|span| span.extensions().get::<SpanFields>().map(|f| f.0.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut event_fields = Map::new();
        event.record(&mut FieldCollector(&mut event_fields));
        let message = build_message(
            &self.host,
            &self.static_fields,
            EventRecord {
                metadata: event.metadata(),
                span_fields,
                event_fields,
                now: SystemTime::now(),
            },
        );
        match self.queue.try_send(message) {
            Ok(()) => {
                self.counters.enqueued.fetch_add(1, Ordering::Release);
            }
            // Full: never wait. Disconnected: the sender thread died
            // (it does not, short of a panic); either way the message is lost.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Release);
            }
        }
    }
}

impl GelfHandle {
    /// Log messages lost so far: queue full, over 128 chunks, or a send
    /// error.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Acquire)
    }

    /// Log messages written to the socket so far (drop reports not counted).
    pub fn sent(&self) -> u64 {
        self.counters.sent.load(Ordering::Acquire)
    }

    /// Waits, at most `timeout`, until every message queued before the call
    /// has been sent or dropped and every drop has been reported. Returns
    /// whether that happened in time. For shutdown and tests; polls, so
    /// never call it on the data path.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let target = self.counters.enqueued.load(Ordering::Acquire);
        loop {
            let drained = self.counters.processed.load(Ordering::Acquire) >= target;
            let reported = self.counters.reported.load(Ordering::Acquire)
                >= self.counters.dropped.load(Ordering::Acquire);
            if drained && reported {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.counters.report_now.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
