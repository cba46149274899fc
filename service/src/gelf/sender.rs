//! The GELF sender thread: drains the bounded queue the layer fills, encodes
//! each message (JSON, optional compression, chunks) and writes the
//! datagrams to a plain `std` UDP socket.
//!
//! The thread is the only place that touches the network, so a slow or
//! absent log server costs the data path nothing: the logging thread only
//! ever does a `try_send`. Drops (queue full, message over 128 chunks, send
//! errors) are counted in [`Counters`] and reported from here as a GELF
//! message of their own, never through `tracing`, which would recurse into
//! the layer.

use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};

use super::chunk::chunk;
use super::message::build_drop_report;
use super::{Compression, GelfError};

/// How often the thread wakes when the queue is idle, to report drops and
/// notice flush requests.
const TICK: Duration = Duration::from_millis(50);
/// Unreported drops that trigger a report at once.
const REPORT_EVERY_DROPS: u64 = 100;
/// Otherwise drops are reported at most this often (the first drop after a
/// quiet period is reported at once).
const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Counters shared by the layer (producer), the sender thread (consumer) and
/// every [`super::GelfHandle`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Messages accepted into the queue.
    pub(crate) enqueued: AtomicU64,
    /// Messages taken off the queue and either sent or dropped.
    pub(crate) processed: AtomicU64,
    /// Log messages whose datagrams were all written to the socket.
    pub(crate) sent: AtomicU64,
    /// Log messages lost: queue full, too many chunks, or a send error.
    pub(crate) dropped: AtomicU64,
    /// Value of `dropped` covered by the last successful drop report.
    pub(crate) reported: AtomicU64,
    /// Set by a flush: report pending drops now rather than on schedule.
    pub(crate) report_now: AtomicBool,
}

/// What the sender needs to encode and address messages.
pub(crate) struct SenderSettings {
    pub(crate) target: SocketAddr,
    pub(crate) host: String,
    /// Static fields, already keyed `_name`.
    pub(crate) static_fields: Vec<(String, Value)>,
    pub(crate) chunk_size: usize,
    pub(crate) compression: Compression,
}

struct Sender {
    socket: UdpSocket,
    settings: SenderSettings,
    counters: Arc<Counters>,
    last_report: Option<Instant>,
}

/// Starts the sender thread. `start_gate`, when given, holds the thread
/// before it reads the queue until the gate yields or closes: a test hook to
/// fill the queue deterministically.
pub(crate) fn spawn(
    socket: UdpSocket,
    settings: SenderSettings,
    queue: Receiver<Map<String, Value>>,
    counters: Arc<Counters>,
    start_gate: Option<Receiver<()>>,
) -> io::Result<JoinHandle<()>> {
    let mut sender = Sender {
        socket,
        settings,
        counters,
        last_report: None,
    };
    thread::Builder::new()
        .name("gelf-sender".into())
        .spawn(move || {
            if let Some(gate) = start_gate {
                // Err only means the gate's sender is gone: start anyway.
                let _ = gate.recv();
            }
            sender.run(queue);
        })
}

impl Sender {
    fn run(&mut self, queue: Receiver<Map<String, Value>>) {
        loop {
            match queue.recv_timeout(TICK) {
                Ok(message) => {
                    let counter = match self.send(message) {
                        Ok(()) => &self.counters.sent,
                        Err(_) => &self.counters.dropped,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    self.counters.processed.fetch_add(1, Ordering::Release);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The layer is gone: say what was lost, then stop.
                    self.report_drops(true);
                    return;
                }
            }
            let forced = self.counters.report_now.swap(false, Ordering::AcqRel);
            self.report_drops(forced);
        }
    }

    /// Encodes one message and writes its datagrams.
    fn send(&self, message: Map<String, Value>) -> Result<(), GelfError> {
        let payload = encode(&Value::Object(message), self.settings.compression)?;
        let datagrams = chunk(
            &payload,
            rand::random::<[u8; 8]>(),
            self.settings.chunk_size,
        )?;
        for datagram in &datagrams {
            self.socket
                .send_to(datagram, self.settings.target)
                .map_err(|cause| GelfError::Send {
                    address: self.settings.target,
                    cause,
                })?;
        }
        Ok(())
    }

    /// Sends a drop report when drops are unreported and one is due.
    fn report_drops(&mut self, forced: bool) {
        let dropped = self.counters.dropped.load(Ordering::Acquire);
        let reported = self.counters.reported.load(Ordering::Acquire);
        let unreported = dropped.saturating_sub(reported);
        if unreported == 0 {
            return;
        }
        let due = forced
            || unreported >= REPORT_EVERY_DROPS
            || match self.last_report {
                None => true,
                Some(at) => at.elapsed() >= REPORT_INTERVAL,
            };
        if !due {
            return;
        }
        self.last_report = Some(Instant::now());
        let report = build_drop_report(
            &self.settings.host,
            &self.settings.static_fields,
            unreported,
            dropped,
            SystemTime::now(),
        );
        // On failure the drops stay unreported and are retried when due.
        if self.send(report).is_ok() {
            self.counters.reported.store(dropped, Ordering::Release);
        }
    }
}

/// Serializes a GELF message and compresses it as configured.
pub(crate) fn encode(message: &Value, compression: Compression) -> Result<Vec<u8>, GelfError> {
    let json = serde_json::to_vec(message).map_err(GelfError::Encode)?;
    let compressed = match compression {
        Compression::None => return Ok(json),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(&json).and_then(|()| encoder.finish())
        }
        Compression::Zlib => {
            let mut encoder =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(&json).and_then(|()| encoder.finish())
        }
    };
    compressed.map_err(GelfError::Compress)
}
