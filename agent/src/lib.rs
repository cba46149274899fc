//! The Tideline agent: reads protected disks, finds what changed, and streams
//! verified deltas to the controller over its mutual-TLS control channel.
//!
//! Data path: [`source`] (what is read) → [`sync::pipeline`] (hash, compare
//! with [`tracking`], compress) → [`transport`] (frames over TLS). The
//! agent dials out and never listens on a port.
//!
//! Errors: one `thiserror` enum per concern. An error's `Display` is the
//! whole message on one line, naming the disk, file or peer and ending with
//! its cause, because that text travels as it is: to the controller in an
//! `Error` frame, into `status.json`, into log fields. So a cause printed by
//! `Display` is held in a field named `cause` and is *not* the error's
//! `source()`: otherwise `{:#}` (anyhow's chain, as `main` prints errors)
//! would print it a second time. A variant that wraps another error and
//! adds nothing is `#[error(transparent)]`.

pub mod config;
pub mod consistency;
pub mod dump;
pub mod failback;
/// GELF log export, shared with the controller (`tideline-service`).
pub use tideline_service::gelf;
pub mod service;
pub mod source;
pub mod sync;
pub mod tracking;
pub mod transport;
