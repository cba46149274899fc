//! Watching a daemon as a service manager and a log server would: the
//! `sd_notify` datagrams it sends to `NOTIFY_SOCKET`, and the GELF messages
//! it sends over UDP, reassembled from their chunks.

use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;
use tideline_agent::gelf::Reassembler;

/// Collects notifications from `sock` into `seen` until one satisfies
/// `want` (20 s at most) and returns it; the failure lists what came.
pub fn wait_for_notification(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    want: impl Fn(&str) -> bool,
    what: &str,
) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = want(&msg);
            seen.push(msg.clone());
            if hit {
                return Ok(msg);
            }
        }
    }
    bail!("no notification with {what}; received: {seen:#?}")
}

/// GELF messages received on a UDP socket by a background thread.
pub struct GelfReceiver {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    messages: Arc<Mutex<Vec<(Duration, Value)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GelfReceiver {
    /// Binds 127.0.0.1:0 and starts collecting. `epoch` is the instant
    /// arrival times are measured from.
    pub fn start(epoch: Instant) -> Result<GelfReceiver> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let port = socket.local_addr()?.port();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (Arc::clone(&messages), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut reassembler = Reassembler::new();
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    if let Some(payload) = reassembler.push(&buf[..n]) {
                        if let Ok(v) = serde_json::from_slice::<Value>(&payload) {
                            m.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((epoch.elapsed(), v));
                        }
                    }
                }
            }
        });
        Ok(GelfReceiver {
            port,
            messages,
            stop,
            thread: Some(thread),
        })
    }

    /// The messages so far, with their arrival times.
    pub fn messages(&self) -> Vec<(Duration, Value)> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for a message whose `short_message` is `short`.
    pub fn wait_for(&self, short: &str, timeout: Duration) -> Result<(Duration, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self
                .messages()
                .into_iter()
                .find(|(_, m)| m["short_message"] == short)
            {
                return Ok(m);
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = self
                    .messages()
                    .iter()
                    .map(|(_, m)| m["short_message"].to_string())
                    .collect();
                bail!("no GELF message {short:?} within {timeout:?}; received {seen:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for GelfReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
