//! `sd_notify` without libsystemd: datagrams to `$NOTIFY_SOCKET`.
//!
//! systemd hands a `Type=notify` service the address of a datagram socket in
//! `NOTIFY_SOCKET`: an absolute path, or an abstract-namespace name written
//! with a leading `@`. Each notification is one datagram of newline-separated
//! `KEY=value` assignments (`READY=1`, `STATUS=...`, `WATCHDOG=1`,
//! `STOPPING=1`). systemd identifies the sender by the credentials the kernel
//! attaches, so with the default `NotifyAccess=main` only the agent's own
//! process is heard, never the qemu tools it runs (which inherit the
//! variable).
//!
//! When `NOTIFY_SOCKET` is unset (run by hand, in a container, in tests) the
//! [`Notifier`] is disabled and every call is a successful no-op, so callers
//! never branch on how the agent was started.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The largest datagram systemd reads from the notification socket
/// (`NOTIFY_BUFFER_MAX`, one page); a longer one is discarded whole, so the
/// agent refuses to send it.
pub const NOTIFY_MAX_BYTES: usize = 4096;

/// The longest `STATUS=` text sent; longer lines are cut at a character
/// boundary. Far below [`NOTIFY_MAX_BYTES`], so that a status can share a
/// datagram with other assignments, and more than `systemctl status` shows.
pub const STATUS_MAX_BYTES: usize = 1024;

/// How long a send may block when systemd's receive queue is full. The
/// socket is blocking (as libsystemd's is) so that a momentary backlog does
/// not lose a `READY=1`, but bounded so that a wedged PID 1 cannot wedge the
/// task that reports.
const SEND_TIMEOUT: Duration = Duration::from_millis(250);

/// Why a notification could not be delivered to systemd.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is neither an absolute path nor an `@` abstract name
    /// (for example a `vsock:` address, which the agent does not support).
    #[error(
        "NOTIFY_SOCKET {socket:?} is neither an absolute path nor an abstract socket name (@name)"
    )]
    UnsupportedAddress {
        /// The value of `NOTIFY_SOCKET`.
        socket: String,
    },
    /// The address could not be made into a Unix socket address (too long,
    /// or it contains a NUL byte).
    #[error("NOTIFY_SOCKET {socket:?} is not a usable Unix socket address: {cause}")]
    Address {
        /// The value of `NOTIFY_SOCKET`.
        socket: String,
        /// The underlying error.
        cause: io::Error,
    },
    /// The unbound datagram socket to send from could not be created.
    #[error("cannot create a datagram socket to notify {socket:?}: {cause}")]
    Socket {
        /// The value of `NOTIFY_SOCKET`.
        socket: String,
        /// The underlying error.
        cause: io::Error,
    },
    /// The datagram could not be sent (systemd gone, queue full past the
    /// send timeout, permission denied).
    #[error("cannot send {state:?} to NOTIFY_SOCKET {socket:?}: {cause}")]
    Send {
        /// The value of `NOTIFY_SOCKET`.
        socket: String,
        /// The first assignment of the notification, to say which one failed.
        state: String,
        /// The underlying error.
        cause: io::Error,
    },
    /// The notification is longer than systemd accepts.
    #[error("notification of {len} bytes exceeds the {max}-byte datagram systemd accepts")]
    TooLong {
        /// The notification's length in bytes.
        len: usize,
        /// [`NOTIFY_MAX_BYTES`].
        max: usize,
    },
}

/// Where notifications go: a socket to send from and systemd's address.
#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for error messages.
    name: String,
}

/// A handle on systemd's notification socket, or a no-op when the agent was
/// not started by systemd. Shared between tasks behind an `Arc`: sending
/// takes `&self`.
#[derive(Debug)]
pub struct Notifier {
    /// `None` when `NOTIFY_SOCKET` is unset: every call is a no-op.
    target: Option<Target>,
}

impl Notifier {
    /// The notifier for `NOTIFY_SOCKET`, disabled when the variable is unset
    /// or empty. An address the agent cannot use is an error naming it,
    /// rather than a silent no-op: systemd would otherwise time the start
    /// job out with no hint why.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        Self::from_env_value(std::env::var_os("NOTIFY_SOCKET"))
    }

    /// [`Notifier::from_env`] given the variable's value, so that tests need
    /// not mutate the process environment.
    fn from_env_value(value: Option<OsString>) -> Result<Notifier, NotifyError> {
        match value {
            Some(socket) if !socket.is_empty() => Self::for_socket(socket),
            _ => Ok(Self::disabled()),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// A notifier for an explicit address in `NOTIFY_SOCKET` syntax: an
    /// absolute path, or `@name` for the abstract namespace.
    pub fn for_socket(socket: impl AsRef<OsStr>) -> Result<Notifier, NotifyError> {
        let socket = socket.as_ref();
        let name = socket.to_string_lossy().into_owned();
        let bytes = socket.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddr::from_pathname(socket),
            _ => return Err(NotifyError::UnsupportedAddress { socket: name }),
        }
        .map_err(|cause| NotifyError::Address {
            socket: name.clone(),
            cause,
        })?;
        let sender = UnixDatagram::unbound()
            .and_then(|s| s.set_write_timeout(Some(SEND_TIMEOUT)).map(|()| s))
            .map_err(|cause| NotifyError::Socket {
                socket: name.clone(),
                cause,
            })?;
        Ok(Notifier {
            target: Some(Target {
                socket: sender,
                addr,
                name,
            }),
        })
    }

    /// Whether notifications are sent anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: configuration and state are loaded; the start job ends.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1")
    }

    /// `STATUS=line`, with line breaks turned into spaces (a newline would
    /// start a new assignment) and cut to [`STATUS_MAX_BYTES`].
    pub fn status(&self, line: &str) -> Result<(), NotifyError> {
        self.send(&status_assignment(line))
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }

    /// `WATCHDOG=1`: the work loop is alive.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }

    /// Sends `state` as one datagram, unchanged: newline-separated
    /// assignments such as `"READY=1\nSTATUS=idle"`. Use [`status_assignment`]
    /// to build a `STATUS=` part from free text.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        if state.len() > NOTIFY_MAX_BYTES {
            return Err(NotifyError::TooLong {
                len: state.len(),
                max: NOTIFY_MAX_BYTES,
            });
        }
        let send_error = |cause| NotifyError::Send {
            socket: target.name.clone(),
            state: state.lines().next().unwrap_or_default().to_owned(),
            cause,
        };
        loop {
            match target.socket.send_to_addr(state.as_bytes(), &target.addr) {
                Ok(sent) if sent == state.len() => return Ok(()),
                Ok(sent) => {
                    return Err(send_error(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("sent {sent} of {} bytes", state.len()),
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(send_error(e)),
            }
        }
    }
}

/// `STATUS=` followed by `line` made safe for one assignment: CR and LF
/// become spaces, NULs are dropped, and the text is cut at a character
/// boundary to [`STATUS_MAX_BYTES`].
pub fn status_assignment(line: &str) -> String {
    let mut out = String::with_capacity("STATUS=".len() + line.len().min(STATUS_MAX_BYTES));
    out.push_str("STATUS=");
    let mut text_len = 0;
    for c in line.chars() {
        let c = match c {
            '\n' | '\r' => ' ',
            '\0' => continue,
            c => c,
        };
        if text_len + c.len_utf8() > STATUS_MAX_BYTES {
            break;
        }
        text_len += c.len_utf8();
        out.push(c);
    }
    out
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC` (systemd's
/// advice, leaving a full half-period of slack), when it is set and
/// `WATCHDOG_PID` is unset or names this process. `None` when the watchdog
/// is off or meant for another process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] given the values of `WATCHDOG_USEC` and
/// `WATCHDOG_PID` and this process's id. Unparseable or zero values mean no
/// watchdog, as in libsystemd's `sd_watchdog_enabled`.
pub fn watchdog_interval_from(
    watchdog_usec: Option<&str>,
    watchdog_pid: Option<&str>,
    our_pid: u32,
) -> Option<Duration> {
    let usec: u64 = watchdog_usec?.parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = watchdog_pid {
        let pid: u32 = pid.parse().ok().filter(|&p| p > 0)?;
        if pid != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A listener standing in for systemd: a datagram socket bound where
    /// `NOTIFY_SOCKET` points.
    struct Listener {
        socket: UnixDatagram,
        _dir: Option<tempfile::TempDir>,
    }

    impl Listener {
        fn recv(&self) -> String {
            let mut buf = [0u8; NOTIFY_MAX_BYTES + 1];
            let n = self.socket.recv(&mut buf).expect("datagram within timeout");
            String::from_utf8(buf[..n].to_vec()).expect("utf-8 notification")
        }

        fn assert_empty(&self) {
            self.socket.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 64];
            let err = self.socket.recv(&mut buf).expect_err("no further datagram");
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            self.socket.set_nonblocking(false).unwrap();
        }
    }

    fn path_listener() -> (Listener, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let name = path.to_str().unwrap().to_owned();
        (
            Listener {
                socket,
                _dir: Some(dir),
            },
            name,
        )
    }

    fn abstract_listener() -> (Listener, String) {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tideline-test-notify-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (Listener { socket, _dir: None }, format!("@{name}"))
    }

    fn assert_delivers_each_state(listener: &Listener, notifier: &Notifier) {
        assert!(notifier.enabled());
        notifier.ready().unwrap();
        assert_eq!(listener.recv(), "READY=1");
        notifier.status("connected to ctl:443; idle").unwrap();
        assert_eq!(listener.recv(), "STATUS=connected to ctl:443; idle");
        notifier.watchdog().unwrap();
        assert_eq!(listener.recv(), "WATCHDOG=1");
        notifier.stopping().unwrap();
        assert_eq!(listener.recv(), "STOPPING=1");
        notifier.send("READY=1\nSTATUS=starting").unwrap();
        assert_eq!(listener.recv(), "READY=1\nSTATUS=starting");
        listener.assert_empty();
    }

    #[test]
    fn path_socket_receives_exact_states() {
        let (listener, name) = path_listener();
        let notifier = Notifier::for_socket(&name).unwrap();
        assert_delivers_each_state(&listener, &notifier);
    }

    #[test]
    fn abstract_socket_receives_exact_states() {
        let (listener, name) = abstract_listener();
        assert!(name.starts_with('@'));
        let notifier = Notifier::for_socket(&name).unwrap();
        assert_delivers_each_state(&listener, &notifier);
    }

    #[test]
    fn env_value_selects_socket_or_disables() {
        let (listener, name) = path_listener();
        let notifier = Notifier::from_env_value(Some(name.into())).unwrap();
        notifier.ready().unwrap();
        assert_eq!(listener.recv(), "READY=1");

        for value in [None, Some(OsString::new())] {
            let notifier = Notifier::from_env_value(value).unwrap();
            assert!(!notifier.enabled());
        }
    }

    #[test]
    fn disabled_notifier_is_a_no_op() {
        let notifier = Notifier::from_env_value(None).unwrap();
        assert!(!notifier.enabled());
        notifier.ready().unwrap();
        notifier.status("line").unwrap();
        notifier.watchdog().unwrap();
        notifier.stopping().unwrap();
        notifier.send(&"X".repeat(NOTIFY_MAX_BYTES * 2)).unwrap();
    }

    #[test]
    fn status_newlines_cannot_inject_assignments() {
        let (listener, name) = path_listener();
        let notifier = Notifier::for_socket(&name).unwrap();
        notifier
            .status("reconnecting (last error: a\nWATCHDOG=1\r\nb\0)")
            .unwrap();
        assert_eq!(
            listener.recv(),
            "STATUS=reconnecting (last error: a WATCHDOG=1  b)"
        );
    }

    #[test]
    fn long_status_is_cut_at_a_char_boundary() {
        let line = "é".repeat(STATUS_MAX_BYTES); // 2 bytes each
        let assignment = status_assignment(&line);
        let text = assignment.strip_prefix("STATUS=").unwrap();
        assert_eq!(text.len(), STATUS_MAX_BYTES);
        assert!(text.chars().all(|c| c == 'é'));
        let odd = format!("x{line}");
        assert_eq!(
            status_assignment(&odd).len(),
            "STATUS=".len() + STATUS_MAX_BYTES - 1
        );
    }

    #[test]
    fn oversized_notification_is_refused() {
        let (listener, name) = path_listener();
        let notifier = Notifier::for_socket(&name).unwrap();
        let err = notifier
            .send(&"X".repeat(NOTIFY_MAX_BYTES + 1))
            .unwrap_err();
        assert!(matches!(err, NotifyError::TooLong { len, .. } if len == NOTIFY_MAX_BYTES + 1));
        listener.assert_empty();
    }

    #[test]
    fn unusable_addresses_are_errors_naming_the_socket() {
        for bad in ["relative/notify", "vsock:2:1234"] {
            let err = Notifier::for_socket(bad).unwrap_err();
            assert!(matches!(err, NotifyError::UnsupportedAddress { .. }));
            assert!(err.to_string().contains(bad), "{err}");
        }
        let long = format!("/{}", "p".repeat(200)); // sun_path holds 108 bytes
        let err = Notifier::for_socket(&long).unwrap_err();
        assert!(matches!(err, NotifyError::Address { .. }), "{err}");
    }

    #[test]
    fn send_to_missing_listener_names_socket_and_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let notifier = Notifier::for_socket(&path).unwrap();
        let err = notifier.send("READY=1\nSTATUS=x").unwrap_err();
        let NotifyError::Send { socket, state, .. } = &err else {
            panic!("expected a send error, got {err}");
        };
        assert_eq!(socket, path.to_str().unwrap());
        assert_eq!(state, "READY=1");
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn watchdog_interval_parsing() {
        let half_second = Some(Duration::from_millis(500));
        assert_eq!(
            watchdog_interval_from(Some("1000000"), None, 42),
            half_second
        );
        assert_eq!(
            watchdog_interval_from(Some("1000000"), Some("42"), 42),
            half_second
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        // Meant for another process.
        assert_eq!(
            watchdog_interval_from(Some("1000000"), Some("43"), 42),
            None
        );
        // Unset, zero or garbage.
        assert_eq!(watchdog_interval_from(None, None, 42), None);
        assert_eq!(watchdog_interval_from(None, Some("42"), 42), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("abc"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("-5"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some(""), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("1000000"), Some("x"), 42), None);
        assert_eq!(watchdog_interval_from(Some("1000000"), Some("0"), 42), None);
    }
}
