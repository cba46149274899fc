//! What the agent is doing, in one line.
//!
//! The connection loop fills a [`StatusLine`] and sends its text as
//! `STATUS=` (see [`super::notify::Notifier::status`]), which
//! `systemctl status` shows next to the unit; the same line will answer
//! `tideline-agent status`. It says whether the control channel is up, and
//! when a session runs, which disk, how far and how fast.

use std::fmt;

/// A snapshot of the agent's state for humans.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusLine {
    /// Whether the TLS control channel to the controller is up.
    pub connected: bool,
    /// The controller's address as configured (`host:port`).
    pub controller: String,
    /// The running sync session, if any.
    pub session: Option<u64>,
    /// The disk being read in that session.
    pub disk: Option<String>,
    /// Progress through the disk, 0 to 100.
    pub percent: Option<f64>,
    /// Recent throughput to the controller, MiB/s.
    pub mib_per_s: Option<f64>,
    /// The last error seen (connection refused, session aborted), until the
    /// loop clears it.
    pub last_error: Option<String>,
}

impl fmt::Display for StatusLine {
    /// `connected to ctl:443; session 17, disk sda 42.0% at 310.5 MiB/s`,
    /// `connected to ctl:443; idle`, or
    /// `reconnecting to ctl:443 (last error: connection refused)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.connected {
            write!(f, "reconnecting to {}", self.controller)?;
        } else {
            write!(f, "connected to {}; ", self.controller)?;
            let mut activity = false;
            if let Some(session) = self.session {
                write!(f, "session {session}")?;
                activity = true;
            }
            if let Some(disk) = &self.disk {
                if activity {
                    f.write_str(", ")?;
                }
                write!(f, "disk {disk}")?;
                activity = true;
            }
            if let Some(percent) = self.percent.filter(|p| p.is_finite()) {
                // "disk sda 42.0%", but "session 17, 42.0%".
                if self.disk.is_some() {
                    f.write_str(" ")?;
                } else if activity {
                    f.write_str(", ")?;
                }
                write!(f, "{:.1}%", percent.clamp(0.0, 100.0))?;
                activity = true;
            }
            if let Some(rate) = self.mib_per_s.filter(|r| r.is_finite() && *r >= 0.0) {
                if activity {
                    write!(f, " at {rate:.1} MiB/s")?;
                }
            }
            if !activity {
                f.write_str("idle")?;
            }
        }
        if let Some(error) = &self.last_error {
            write!(f, " (last error: {error})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected() -> StatusLine {
        StatusLine {
            connected: true,
            controller: "ctl:443".into(),
            ..StatusLine::default()
        }
    }

    #[test]
    fn running_session() {
        let line = StatusLine {
            session: Some(17),
            disk: Some("sda".into()),
            percent: Some(42.0),
            mib_per_s: Some(310.5),
            ..connected()
        };
        assert_eq!(
            line.to_string(),
            "connected to ctl:443; session 17, disk sda 42.0% at 310.5 MiB/s"
        );
    }

    #[test]
    fn session_before_disk_is_known() {
        let line = StatusLine {
            session: Some(3),
            ..connected()
        };
        assert_eq!(line.to_string(), "connected to ctl:443; session 3");
        let line = StatusLine {
            disk: Some("vdb".into()),
            percent: Some(99.96),
            ..line
        };
        assert_eq!(
            line.to_string(),
            "connected to ctl:443; session 3, disk vdb 100.0%"
        );
    }

    #[test]
    fn idle() {
        assert_eq!(connected().to_string(), "connected to ctl:443; idle");
        // A rate alone is no activity.
        let line = StatusLine {
            mib_per_s: Some(0.0),
            ..connected()
        };
        assert_eq!(line.to_string(), "connected to ctl:443; idle");
    }

    #[test]
    fn reconnecting() {
        let line = StatusLine {
            connected: false,
            controller: "ctl:443".into(),
            session: Some(17),
            last_error: Some("connection refused".into()),
            ..StatusLine::default()
        };
        assert_eq!(
            line.to_string(),
            "reconnecting to ctl:443 (last error: connection refused)"
        );
        let line = StatusLine {
            last_error: None,
            ..line
        };
        assert_eq!(line.to_string(), "reconnecting to ctl:443");
    }

    #[test]
    fn connected_with_last_error() {
        let line = StatusLine {
            last_error: Some("session 16 aborted: disk sdb read error".into()),
            ..connected()
        };
        assert_eq!(
            line.to_string(),
            "connected to ctl:443; idle (last error: session 16 aborted: disk sdb read error)"
        );
    }

    #[test]
    fn nonsense_numbers_are_left_out_or_clamped() {
        let line = StatusLine {
            session: Some(1),
            percent: Some(f64::NAN),
            mib_per_s: Some(f64::INFINITY),
            ..connected()
        };
        assert_eq!(line.to_string(), "connected to ctl:443; session 1");
        let line = StatusLine {
            percent: Some(-3.0),
            mib_per_s: Some(-1.0),
            ..line
        };
        assert_eq!(line.to_string(), "connected to ctl:443; session 1, 0.0%");
    }
}
