//! Layer tests over real UDP on 127.0.0.1: a receiver socket collects the
//! datagrams, shuffles them and reassembles them with [`Reassembler`].

use super::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::{debug, error, info, info_span, trace, warn};
use tracing_subscriber::layer::SubscriberExt;

const FLUSH: Duration = Duration::from_secs(10);

/// A UDP socket standing in for Graylog.
struct LogServer {
    socket: UdpSocket,
}

impl LogServer {
    fn start() -> LogServer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        // A burst of 128 chunks must not overflow the default receive buffer.
        let size: libc::c_int = 4 << 20;
        // SAFETY: valid socket fd and a pointer/length pair for a c_int.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        LogServer { socket }
    }

    fn address(&self) -> String {
        self.socket.local_addr().unwrap().to_string()
    }

    /// Every datagram that arrives until the line goes quiet.
    fn datagrams(&self) -> Vec<Vec<u8>> {
        let mut datagrams = Vec::new();
        let mut buf = vec![0u8; 70_000];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(n) => datagrams.push(buf[..n].to_vec()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return datagrams
                }
                Err(e) => panic!("receive failed: {e}"),
            }
        }
    }
}

/// Shuffles datagrams and reassembles them into GELF JSON objects.
fn reassemble(mut datagrams: Vec<Vec<u8>>, seed: u64) -> Vec<Map<String, Value>> {
    datagrams.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut reassembler = Reassembler::new();
    let messages: Vec<_> = datagrams
        .iter()
        .filter_map(|d| reassembler.push(d))
        .map(|payload| match serde_json::from_slice(&payload).unwrap() {
            Value::Object(map) => map,
            other => panic!("GELF payload is not an object: {other}"),
        })
        .collect();
    assert_eq!(reassembler.pending(), 0, "incomplete messages left over");
    messages
}

fn config(server: &LogServer) -> GelfConfig {
    GelfConfig {
        address: server.address(),
        host: "agent-host-1".into(),
        static_fields: vec![("agent_id".into(), "agent-7f3a".into())],
        ..GelfConfig::default()
    }
}

/// Runs `emit` with `layer` as this thread's subscriber, then drops it.
fn with_layer(layer: GelfLayer, emit: impl FnOnce()) {
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, emit);
}

fn by_short_message<'a>(messages: &'a [Map<String, Value>], short: &str) -> &'a Map<String, Value> {
    messages
        .iter()
        .find(|m| m["short_message"] == short)
        .unwrap_or_else(|| panic!("no message {short:?} in {messages:#?}"))
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Text of `len` bytes that compresses like log text: words, not repeats.
fn words(len: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut text = String::with_capacity(len + 16);
    while text.len() < len {
        let word_len = rng.gen_range(2..10);
        for _ in 0..word_len {
            text.push(rng.gen_range(b'a'..=b'z') as char);
        }
        text.push(if rng.gen_ratio(1, 12) { '\n' } else { ' ' });
    }
    text.truncate(len);
    text
}

#[test]
fn every_field_arrives_with_its_gelf_name_and_type() {
    let server = LogServer::start();
    let (layer, handle) = GelfLayer::new(config(&server)).unwrap();
    let before = now_secs();
    with_layer(layer, || {
        let span = info_span!(
            "session",
            session = 7,
            disk = "sda",
            point = tracing::field::Empty
        );
        let _entered = span.enter();
        span.record("point", 1234);
        info!(
            bytes = 1_048_576u64,
            id = 9,
            ratio = 0.5,
            verified = true,
            "extent copied"
        );
        error!("read failed\n  at block 17\n  at extent 3");
        warn!(disk = "sdb", "disk slow");
        debug!("debug line");
        trace!("trace line");
        let inner = info_span!("pass", pass = 2);
        let _inner = inner.enter();
        info!("inside two spans");
    });
    assert!(handle.flush(FLUSH));
    let after = now_secs();
    assert_eq!(handle.sent(), 6);
    assert_eq!(handle.dropped(), 0);

    let messages = reassemble(server.datagrams(), 1);
    assert_eq!(messages.len(), 6);
    for message in &messages {
        assert_eq!(message["version"], "1.1");
        assert_eq!(message["host"], "agent-host-1");
        assert_eq!(message["_agent_id"], "agent-7f3a");
        assert_eq!(message["_session"], 7);
        assert_eq!(message["_point"], 1234);
        let timestamp = message["timestamp"].as_f64().unwrap();
        assert!(
            timestamp >= before - 1.0 && timestamp <= after + 1.0,
            "{timestamp}"
        );
        assert!(message["_line"].is_u64());
        assert!(message["_file"].as_str().unwrap().ends_with("tests.rs"));
        assert!(!message.contains_key("_id"), "GELF reserves _id");
        assert!(message.keys().all(|k| {
            [
                "version",
                "host",
                "short_message",
                "full_message",
                "timestamp",
                "level",
            ]
            .contains(&k.as_str())
                || k.starts_with('_')
        }));
    }

    let copied = by_short_message(&messages, "extent copied");
    assert_eq!(copied["level"], 6);
    assert_eq!(copied["_disk"], "sda");
    assert!(copied["_bytes"].is_u64(), "numbers stay JSON numbers");
    assert_eq!(copied["_bytes"], 1_048_576);
    assert_eq!(copied["_id_"], 9);
    assert_eq!(copied["_ratio"], 0.5);
    assert_eq!(copied["_verified"], true);
    assert!(!copied.contains_key("full_message"));
    assert!(!copied.contains_key("_message"));

    let failed = by_short_message(&messages, "read failed");
    assert_eq!(failed["level"], 3);
    assert_eq!(
        failed["full_message"],
        "read failed\n  at block 17\n  at extent 3"
    );

    let slow = by_short_message(&messages, "disk slow");
    assert_eq!(slow["level"], 4);
    assert_eq!(
        slow["_disk"], "sdb",
        "an event field wins over a span field"
    );

    assert_eq!(by_short_message(&messages, "debug line")["level"], 7);
    assert_eq!(by_short_message(&messages, "trace line")["level"], 7);

    let nested = by_short_message(&messages, "inside two spans");
    assert_eq!(nested["_pass"], 2);
    assert_eq!(nested["_disk"], "sda");
}

#[test]
fn large_message_arrives_in_many_chunks_and_reassembles_out_of_order() {
    let server = LogServer::start();
    let cfg = GelfConfig {
        chunk_size: 1000,
        ..config(&server)
    };
    let (layer, handle) = GelfLayer::new(cfg).unwrap();
    let text = words(110_000, 7);
    with_layer(layer, || info!(disk = "sdc", "{text}"));
    assert!(handle.flush(FLUSH));
    assert_eq!((handle.sent(), handle.dropped()), (1, 0));

    let datagrams = server.datagrams();
    assert!(datagrams.len() > 100, "{} datagrams", datagrams.len());
    assert!(datagrams.len() <= MAX_CHUNKS);
    let count = datagrams.len() as u8;
    let id = &datagrams[0][2..10];
    for datagram in &datagrams {
        assert!(datagram.len() <= 1000);
        assert_eq!(&datagram[..2], &[0x1e, 0x0f]);
        assert_eq!(&datagram[2..10], id, "one message id for all chunks");
        assert_eq!(datagram[11], count);
    }
    for seed in 0..3 {
        let messages = reassemble(datagrams.clone(), seed);
        assert_eq!(messages.len(), 1);
        let message = &messages[0];
        assert_eq!(message["full_message"].as_str(), Some(text.as_str()));
        let first_line = text.lines().next().unwrap();
        let short: String = first_line.trim_end().chars().take(250).collect();
        assert_eq!(message["short_message"].as_str(), Some(short.as_str()));
        assert_eq!(message["_disk"], "sdc");
        assert_eq!(message["_agent_id"], "agent-7f3a");
    }
}

fn compression_round_trip(compression: Compression, is_compressed: fn(&[u8]) -> bool) {
    let server = LogServer::start();
    let cfg = GelfConfig {
        chunk_size: 1000,
        compression,
        ..config(&server)
    };
    let (layer, handle) = GelfLayer::new(cfg).unwrap();
    let text = words(150_000, 11);
    with_layer(layer, || {
        info!(bytes = 4096, "small compressed message");
        info!("{text}");
    });
    assert!(handle.flush(FLUSH));
    assert_eq!((handle.sent(), handle.dropped()), (2, 0));

    let datagrams = server.datagrams();
    let (chunked, whole): (Vec<_>, Vec<_>) =
        datagrams.iter().partition(|d| d.starts_with(&[0x1e, 0x0f]));
    assert_eq!(whole.len(), 1);
    assert!(is_compressed(whole[0]), "unchunked payload not compressed");
    // 150 kB of text would need 153 uncompressed chunks: compression is
    // what lets it through.
    assert!(chunked.len() > 1 && chunked.len() <= MAX_CHUNKS);
    let first = chunked.iter().find(|d| d[10] == 0).unwrap();
    assert!(
        is_compressed(&first[12..]),
        "chunked payload not compressed"
    );

    let messages = reassemble(datagrams.clone(), 3);
    assert_eq!(messages.len(), 2);
    let small = by_short_message(&messages, "small compressed message");
    assert_eq!(small["_bytes"], 4096);
    let large = messages
        .iter()
        .find(|m| m.contains_key("full_message"))
        .unwrap();
    assert_eq!(large["full_message"].as_str(), Some(text.as_str()));
}

#[test]
fn gzip_compression_round_trips() {
    compression_round_trip(Compression::Gzip, |p| p.starts_with(&[0x1f, 0x8b]));
}

#[test]
fn zlib_compression_round_trips() {
    compression_round_trip(Compression::Zlib, |p| p.first() == Some(&0x78));
}

#[test]
fn message_needing_more_than_128_chunks_is_dropped_counted_and_reported() {
    let server = LogServer::start();
    let cfg = GelfConfig {
        chunk_size: 512,
        ..config(&server)
    };
    let (layer, handle) = GelfLayer::new(cfg).unwrap();
    // 200 kB in 500-byte slices: 400 chunks.
    let text = words(200_000, 5);
    with_layer(layer, || {
        info!("{text}");
        info!("after the big one");
    });
    assert!(handle.flush(FLUSH));
    assert_eq!(handle.dropped(), 1);
    assert_eq!(handle.sent(), 1);

    let datagrams = server.datagrams();
    assert_eq!(
        datagrams.len(),
        2,
        "no chunk of the oversized message is sent"
    );
    let messages = reassemble(datagrams, 0);
    by_short_message(&messages, "after the big one");
    let report = messages
        .iter()
        .find(|m| m.contains_key("_dropped"))
        .expect("drop report");
    assert_eq!(report["_dropped"], 1);
    assert_eq!(report["_dropped_total"], 1);
    assert_eq!(report["level"], 4);
    assert_eq!(report["host"], "agent-host-1");
    assert_eq!(report["_agent_id"], "agent-7f3a");
}

#[test]
fn full_queue_drops_and_counts_without_blocking_the_caller() {
    let server = LogServer::start();
    let cfg = GelfConfig {
        queue: 4,
        ..config(&server)
    };
    let (gate_open, gate) = mpsc::channel();
    // The sender thread waits at the gate: nothing leaves the queue.
    let (layer, handle) = GelfLayer::new_gated(cfg, gate).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let started = Instant::now();
        with_layer(layer, || {
            for i in 0..1000 {
                info!(i, "event {i}");
            }
        });
        let _ = done_tx.send(started.elapsed());
    });
    // Had on_event blocked on the full queue, the thread would never finish.
    let elapsed = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("logging blocked on a full queue");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(handle.dropped(), 996);
    assert_eq!(handle.sent(), 0);

    gate_open.send(()).unwrap();
    assert!(handle.flush(FLUSH));
    assert_eq!(handle.sent(), 4);
    assert_eq!(handle.dropped(), 996);

    let messages = reassemble(server.datagrams(), 9);
    assert_eq!(messages.len(), 5);
    for i in 0..4 {
        assert_eq!(by_short_message(&messages, &format!("event {i}"))["_i"], i);
    }
    let report = messages
        .iter()
        .find(|m| m.contains_key("_dropped"))
        .expect("drop report");
    assert_eq!(report["_dropped"], 996);
    assert_eq!(report["_dropped_total"], 996);
}

#[test]
fn address_gets_the_default_port() {
    assert_eq!(with_default_port("10.0.0.5"), "10.0.0.5:12201");
    assert_eq!(with_default_port("10.0.0.5:5555"), "10.0.0.5:5555");
    assert_eq!(
        with_default_port("graylog.example"),
        "graylog.example:12201"
    );
    assert_eq!(
        with_default_port("graylog.example:1514"),
        "graylog.example:1514"
    );
    assert_eq!(with_default_port("::1"), "[::1]:12201");
    assert_eq!(with_default_port("[::1]"), "[::1]:12201");
    assert_eq!(with_default_port("[::1]:9000"), "[::1]:9000");
    assert_eq!(
        resolve("127.0.0.1").unwrap(),
        "127.0.0.1:12201".parse().unwrap()
    );
}

#[test]
fn bad_configuration_is_refused_with_the_culprit_named() {
    let err = GelfLayer::new(GelfConfig {
        address: "no such host:x:y".into(),
        ..GelfConfig::default()
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("no such host:x:y"), "{err}");

    for chunk_size in [511, 65_001] {
        let err = GelfLayer::new(GelfConfig {
            chunk_size,
            ..GelfConfig::default()
        })
        .err()
        .unwrap();
        assert!(matches!(err, GelfError::InvalidChunkSize { chunk_size: c } if c == chunk_size));
    }
    assert!(matches!(
        GelfLayer::new(GelfConfig {
            queue: 0,
            ..GelfConfig::default()
        })
        .err(),
        Some(GelfError::InvalidQueue)
    ));
    assert!(matches!(
        GelfLayer::new(GelfConfig {
            host: " ".into(),
            ..GelfConfig::default()
        })
        .err(),
        Some(GelfError::EmptyHost)
    ));
}

#[test]
fn default_config_matches_the_issue() {
    let cfg = GelfConfig::default();
    assert_eq!(cfg.address, "127.0.0.1:12201");
    assert_eq!(cfg.chunk_size, 1420);
    assert_eq!(cfg.compression, Compression::None);
    assert_eq!(cfg.queue, 1024);
    assert!(!cfg.host.is_empty());
}
