//! The controller's contract with systemd (`Type=notify`, `WatchdogSec=`).
//!
//! * `READY=1` once the store is opened, the agent port is bound and the
//!   admin socket listens: before that, `systemctl start` has not finished
//!   and units ordered `After=tideline-controller.service` wait.
//! * `STATUS=` says how many agents are connected and how many sync sessions
//!   and failback passes run ([`status_line`]); sent when it changes.
//! * `WATCHDOG=1` from the daemon's main loop, every half `WATCHDOG_USEC`,
//!   and only after [`ServiceReport::tick`] managed to lock the registry,
//!   the one lock every task shares: a controller wedged on it stops
//!   pinging and systemd restarts it.
//! * `STOPPING=1` when SIGTERM or SIGINT starts the shutdown.
//!
//! The datagrams themselves are `tideline_service::notify`, shared with the
//! agent.

use std::sync::Arc;
use std::time::Duration;

use tideline_service::{Notifier, NotifyError};

use crate::registry::{Controller, Registry};

/// How often the main loop refreshes `STATUS=` when systemd asked for no
/// watchdog.
pub const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// The `STATUS=` text for the registry's current state, e.g. `2 agents
/// connected, 1 sessions running, 0 failback passes running`.
pub fn status_line(registry: &Registry) -> String {
    let connected = registry
        .agents
        .values()
        .filter(|a| a.connection.is_some())
        .count();
    // Each status has its own lock; a poisoned one still holds usable data.
    let sessions = registry
        .sessions
        .values()
        .filter(|s| !s.lock().unwrap_or_else(|p| p.into_inner()).finished())
        .count();
    let passes = registry
        .failbacks
        .values()
        .filter(|s| !s.lock().unwrap_or_else(|p| p.into_inner()).finished())
        .count();
    format!(
        "{connected} agents connected, {sessions} sessions running, {passes} failback passes running"
    )
}

/// What the main loop tells systemd: the last status sent, so that an
/// unchanged one is not repeated.
pub struct ServiceReport {
    notifier: Arc<Notifier>,
    watchdog: bool,
    last_status: String,
}

impl ServiceReport {
    /// A reporter over `notifier`; `watchdog` says whether systemd expects
    /// `WATCHDOG=1` (see [`tideline_service::watchdog_interval`]).
    pub fn new(notifier: Arc<Notifier>, watchdog: bool) -> ServiceReport {
        ServiceReport {
            notifier,
            watchdog,
            last_status: String::new(),
        }
    }

    /// How often the main loop should call [`ServiceReport::tick`]: the
    /// watchdog interval when there is one, else [`STATUS_PERIOD`].
    pub fn period(watchdog_interval: Option<Duration>) -> Duration {
        watchdog_interval
            .unwrap_or(STATUS_PERIOD)
            .max(Duration::from_millis(1))
    }

    /// `READY=1` with the first status line, in one datagram.
    pub fn ready(&mut self, ctl: &Controller) -> Result<(), NotifyError> {
        let line = status_line(&ctl.registry());
        let state = format!("READY=1\n{}", tideline_service::status_assignment(&line));
        self.notifier.send(&state)?;
        self.last_status = line;
        Ok(())
    }

    /// One turn of the main loop: `STATUS=` if it changed, then
    /// `WATCHDOG=1` when the watchdog is on. Locks the registry, so a
    /// deadlocked registry stops the pings.
    pub fn tick(&mut self, ctl: &Controller) -> Result<(), NotifyError> {
        let line = status_line(&ctl.registry());
        let mut state = String::new();
        if line != self.last_status {
            state.push_str(&tideline_service::status_assignment(&line));
        }
        if self.watchdog {
            if !state.is_empty() {
                state.push('\n');
            }
            state.push_str("WATCHDOG=1");
        }
        if state.is_empty() {
            return Ok(());
        }
        self.notifier.send(&state)?;
        self.last_status = line;
        Ok(())
    }

    /// `STOPPING=1` with a last status.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.notifier.send(&format!(
            "STOPPING=1\n{}",
            tideline_service::status_assignment("stopping")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn status_line_counts_only_live_things() {
        let mut r = Registry::default();
        r.agents.insert("a".into(), Default::default());
        assert_eq!(
            status_line(&r),
            "0 agents connected, 0 sessions running, 0 failback passes running"
        );
    }

    #[test]
    fn period_is_the_watchdog_interval_or_the_status_period() {
        assert_eq!(ServiceReport::period(None), STATUS_PERIOD);
        assert_eq!(
            ServiceReport::period(Some(Duration::from_millis(250))),
            Duration::from_millis(250)
        );
    }

    /// A controller over an empty store, and a listener standing in for
    /// systemd with a notifier pointed at it.
    fn setup() -> (
        tempfile::TempDir,
        Arc<Controller>,
        UnixDatagram,
        Arc<Notifier>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::ControllerConfig::parse(
            "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[store]\ndir=\"store\"\n",
            &dir.path().join("controller.toml"),
        )
        .unwrap();
        let store = crate::store::Store::open(&cfg.store.dir).unwrap();
        let revocations = Arc::new(crate::revocation::Revocations::empty(
            &cfg.revocation_file(),
        ));
        let ctl = Controller::new(cfg, store, revocations);
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let notifier = Arc::new(Notifier::for_socket(&path).unwrap());
        (dir, ctl, listener, notifier)
    }

    fn recv_all(listener: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = listener.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn ready_then_ticks_send_status_once_and_every_ping() {
        let (_dir, ctl, listener, notifier) = setup();
        let mut report = ServiceReport::new(notifier, true);
        report.ready(&ctl).unwrap();
        report.tick(&ctl).unwrap();
        report.tick(&ctl).unwrap();
        report.stopping().unwrap();
        let got = recv_all(&listener);
        let idle = "0 agents connected, 0 sessions running, 0 failback passes running";
        assert_eq!(
            got,
            vec![
                format!("READY=1\nSTATUS={idle}"),
                "WATCHDOG=1".to_owned(),
                "WATCHDOG=1".to_owned(),
                "STOPPING=1\nSTATUS=stopping".to_owned(),
            ]
        );
    }

    #[test]
    fn without_watchdog_an_unchanged_status_sends_nothing() {
        let (_dir, ctl, listener, notifier) = setup();
        let mut report = ServiceReport::new(notifier, false);
        report.tick(&ctl).unwrap();
        report.tick(&ctl).unwrap();
        let got = recv_all(&listener);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].starts_with("STATUS=0 agents connected"), "{got:?}");
    }
}
