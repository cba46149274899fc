//! Serving committed recovery points as read-only NBD exports, so that
//! `nbdinfo`, `nbdcopy`, `qemu-img` or a VM can read a point without
//! exporting it to a file first.
//!
//! * `nbd.rs`: the wire format (sans-IO): constants, option and request
//!   parsing, reply encoding.
//! * `handshake.rs`: the option phase as a state machine.
//! * `image.rs`: a point as a block device: its digest list, and verified
//!   block reads through the store.
//! * `conn.rs`: one client connection (async; block reads on the blocking
//!   pool).
//! * `exports.rs`: the live exports: one Unix socket each under
//!   `[serve] dir`, started and stopped from the admin interface, closed
//!   when their TTL runs out.

pub mod conn;
pub mod exports;
pub mod handshake;
pub mod image;
pub mod nbd;

pub use exports::{ExportInfo, Exports, ServeError};
