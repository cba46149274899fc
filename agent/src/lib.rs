//! The Tideline agent: reads protected disks, finds what changed, and streams
//! verified deltas to the controller over its mutual-TLS control channel.
//!
//! Data path: [`source`] (what is read) → [`sync::pipeline`] (hash, compare
//! with [`tracking`], compress) → [`transport`] (frames over TLS). The
//! agent dials out and never listens on a port.

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
