//! The systemd watchdog, fed by the work loop rather than by a timer.
//!
//! A thread that pings `WATCHDOG=1` on a timer proves only that the timer
//! runs. Here the connection loop calls [`Heartbeat::beat`] each time it
//! makes progress (a frame read or written, a block sent, a reconnect
//! attempt), and [`run_watchdog`] pings only while the last beat is recent.
//! When the pipeline wedges (a disk read that never returns, a deadlocked
//! channel), beats stop, pings stop, and after `WatchdogSec=` systemd
//! restarts the agent, which resumes from its last checkpoint.
//!
//! The loop must therefore beat at least once per stall limit even when idle
//! or reconnecting: waiting for the controller is progress, a frozen task is
//! not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{error, info, warn};

use crate::notify::Notifier;

/// The shortest ping interval accepted; a zero interval would spin.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// The time of the work loop's last progress, shared between the loop that
/// beats and the task that pings.
#[derive(Debug)]
struct Pulse {
    /// Origin of the monotonic clock the timestamps count from.
    start: Instant,
    /// Milliseconds from `start` to the last beat.
    last_ms: AtomicU64,
}

/// A handle on the work loop's last-progress time. Cheap to clone; all
/// clones share one timestamp.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pulse: Arc<Pulse>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    /// A heartbeat that counts as having just beaten.
    pub fn new() -> Heartbeat {
        Heartbeat {
            pulse: Arc::new(Pulse {
                start: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
        }
    }

    /// Records progress now.
    pub fn beat(&self) {
        // Relaxed: the timestamp is the only shared datum; no other memory
        // is published through it.
        self.pulse
            .last_ms
            .fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// Time since the last beat (millisecond resolution).
    pub fn age(&self) -> Duration {
        let last = self.pulse.last_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    /// Another handle on the same heartbeat, for the task that beats it.
    pub fn clone_handle(&self) -> Heartbeat {
        self.clone()
    }

    fn now_ms(&self) -> u64 {
        // u64 milliseconds cover 584 million years of uptime.
        u64::try_from(self.pulse.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Sends `WATCHDOG=1` every `interval` while `heartbeat.age() < stall_limit`,
/// until `shutdown` becomes true or its sender is dropped.
///
/// When the work loop stops beating, pings stop (logged once, at error
/// level) and systemd restarts the agent after `WatchdogSec=`; if the loop
/// recovers first, pings resume (logged at info level). A failed ping is
/// logged once until one succeeds again: the next tick retries anyway.
///
/// `interval` is normally [`crate::notify::watchdog_interval`]; the stall
/// limit should be shorter than `WatchdogSec=` minus one interval, so that a
/// wedged loop is noticed in time, and longer than the slowest legitimate
/// step of the loop.
pub async fn run_watchdog(
    notifier: Arc<Notifier>,
    heartbeat: Heartbeat,
    interval: Duration,
    stall_limit: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval.max(MIN_INTERVAL));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stalled = false;
    let mut ping_failing = false;
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        tokio::select! {
            _ = ticks.tick() => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return; // sender dropped: the agent is going away
                }
                continue; // re-check the value at the top of the loop
            }
        }

        let age = heartbeat.age();
        if age >= stall_limit {
            if !stalled {
                stalled = true;
                error!(
                    since_progress_ms = age.as_millis() as u64,
                    stall_limit_ms = stall_limit.as_millis() as u64,
                    "work loop has made no progress; withholding watchdog pings so that systemd restarts the agent"
                );
            }
            continue;
        }
        if stalled {
            stalled = false;
            info!("work loop made progress again; resuming watchdog pings");
        }
        match notifier.watchdog() {
            Ok(()) => ping_failing = false,
            Err(e) if !ping_failing => {
                ping_failing = true;
                warn!(error = %e, "watchdog ping failed");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Mutex;

    use tracing::field::{Field, Visit};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::Layer;

    #[test]
    fn heartbeat_age_grows_and_resets_on_beat() {
        let heartbeat = Heartbeat::new();
        let handle = heartbeat.clone_handle();
        std::thread::sleep(Duration::from_millis(30));
        assert!(heartbeat.age() >= Duration::from_millis(30));
        handle.beat();
        assert!(heartbeat.age() < Duration::from_millis(30));
    }

    /// Counts events by level, and keeps their messages.
    #[derive(Default, Clone)]
    struct Recorded {
        errors: Arc<AtomicUsize>,
        messages: Arc<Mutex<Vec<String>>>,
    }

    impl<S: Subscriber> Layer<S> for Recorded {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            struct Message(String);
            impl Visit for Message {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            if *event.metadata().level() == Level::ERROR {
                self.errors.fetch_add(1, Ordering::SeqCst);
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            self.messages.lock().unwrap().push(message.0);
        }
    }

    fn drain_pings(receiver: &UnixDatagram) -> usize {
        let mut buf = [0u8; 64];
        let mut pings = 0;
        loop {
            match receiver.recv(&mut buf) {
                Ok(n) => {
                    assert_eq!(&buf[..n], b"WATCHDOG=1");
                    pings += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return pings,
                Err(e) => panic!("receiving pings: {e}"),
            }
        }
    }

    // Current-thread runtime: the watchdog task runs on the test's thread,
    // so the thread-local subscriber below sees its events.
    #[tokio::test]
    async fn pings_follow_the_work_loop() {
        let recorded = Recorded::default();
        let _log =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(recorded.clone()));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_nonblocking(true).unwrap();
        let notifier = Arc::new(Notifier::for_socket(&path).unwrap());

        let interval = Duration::from_millis(50);
        let stall_limit = Duration::from_millis(150);
        let heartbeat = Heartbeat::new();

        // The stand-in work loop: beats every 10 ms while `working`.
        let working = Arc::new(AtomicBool::new(true));
        let work_loop = {
            let heartbeat = heartbeat.clone_handle();
            let working = working.clone();
            tokio::spawn(async move {
                loop {
                    if working.load(Ordering::SeqCst) {
                        heartbeat.beat();
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };

        let (stop, shutdown) = watch::channel(false);
        let watchdog = tokio::spawn(run_watchdog(
            notifier,
            heartbeat.clone_handle(),
            interval,
            stall_limit,
            shutdown,
        ));

        // Working: pings flow.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let pings = drain_pings(&receiver);
        assert!(pings >= 3, "only {pings} pings in 8 intervals of work");
        assert_eq!(recorded.errors.load(Ordering::SeqCst), 0);

        // Wedged: once the stall limit passes, pings stop for good.
        working.store(false, Ordering::SeqCst);
        tokio::time::sleep(stall_limit + 2 * interval).await;
        drain_pings(&receiver); // pings sent before the limit was reached
        tokio::time::sleep(5 * interval).await;
        assert_eq!(
            drain_pings(&receiver),
            0,
            "pinged while the work loop was wedged"
        );
        assert!(heartbeat.age() >= stall_limit);
        assert_eq!(
            recorded.errors.load(Ordering::SeqCst),
            1,
            "the stall is logged exactly once"
        );

        // Recovered: pings resume.
        working.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pings = drain_pings(&receiver);
        assert!(pings >= 2, "only {pings} pings after the loop recovered");
        assert_eq!(recorded.errors.load(Ordering::SeqCst), 1);
        assert!(recorded
            .messages
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("resuming watchdog pings")));

        // Shutdown ends the task.
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), watchdog)
            .await
            .expect("watchdog task ends on shutdown")
            .unwrap();
        work_loop.abort();
    }

    #[tokio::test]
    async fn dropped_shutdown_sender_ends_the_task() {
        let (stop, shutdown) = watch::channel(false);
        let watchdog = tokio::spawn(run_watchdog(
            Arc::new(Notifier::disabled()),
            Heartbeat::new(),
            Duration::from_millis(10),
            Duration::from_secs(1),
            shutdown,
        ));
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(stop);
        tokio::time::timeout(Duration::from_secs(2), watchdog)
            .await
            .expect("watchdog task ends when the sender is dropped")
            .unwrap();
    }
}
