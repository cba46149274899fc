//! How a Tideline daemon (agent or controller) behaves as a service on its
//! host, shared so that the two do not drift apart:
//!
//! * [`notify`]: `sd_notify` datagrams (`READY=1`, `STATUS=`, `WATCHDOG=1`,
//!   `STOPPING=1`) to `$NOTIFY_SOCKET`, without libsystemd, for units of
//!   `Type=notify`;
//! * [`watchdog`]: `WATCHDOG=1` pings that stop when the daemon's work loop
//!   stops beating its [`Heartbeat`](watchdog::Heartbeat);
//! * [`gelf`]: a `tracing` layer exporting logs as GELF 1.1 over UDP;
//! * [`log`]: the `[log]` configuration section both daemons accept, and the
//!   subscriber it installs.
//!
//! Nothing here knows about disks, sessions or the protocol; what a daemon
//! reports in `STATUS=` is its own business.

pub mod gelf;
pub mod log;
pub mod notify;
pub mod watchdog;

pub use notify::{status_assignment, watchdog_interval, Notifier, NotifyError};
pub use watchdog::{run_watchdog, Heartbeat};
