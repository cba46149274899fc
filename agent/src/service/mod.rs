//! Service: the agent's contract with systemd (`Type=notify`).
//!
//! The unit runs the agent with `Type=notify` and `WatchdogSec=`, and the
//! agent keeps three promises:
//!
//! * [`notify`]: `READY=1` once configuration and local state (block maps,
//!   change logs) are loaded — not once the controller answers, because a
//!   reconnecting agent is a running agent and must not fail its start job
//!   when the network is down; `STOPPING=1` when shutdown begins; raw
//!   `sd_notify` datagrams written here, without libsystemd.
//! * [`status`]: one `STATUS=` line saying what the agent is doing
//!   (connected or reconnecting, session, disk, percent, throughput), shown
//!   by `systemctl status`.
//! * [`watchdog`]: `WATCHDOG=1` only while the connection loop that does the
//!   work keeps beating a [`watchdog::Heartbeat`]; a timer alone would keep
//!   pinging for a wedged pipeline, whereas here the pings stop and systemd
//!   restarts the agent.
//!
//! [`notify`] and [`watchdog`] live in the `tideline-service` crate, shared
//! with the controller, and are re-exported here under their old paths.

pub use tideline_service::{notify, watchdog};
pub mod status;
pub mod status_file;

pub use notify::{watchdog_interval, Notifier, NotifyError};
pub use status::StatusLine;
pub use watchdog::{run_watchdog, Heartbeat};
