//! Tideline's wire protocol, version 2: frames, messages and the session
//! state machines, with no I/O.
//!
//! The crate never touches a socket, a file or a clock. The agent and the
//! controller read bytes from their TLS streams, feed them to
//! [`frame::FrameDecoder`], hand decoded [`message::Message`]s to a session
//! state machine, and write the frames it returns. Tests drive both ends
//! against each other in memory. `docs/protocol.md` is the specification.
#![warn(missing_docs)]

pub mod consistency;
pub mod digest;
pub mod limits;
pub mod resize;

pub use digest::{Digest, Geometry, IndexRootHasher, ZeroDigests, PAGE_BLOCKS};
pub mod encoding;
pub use encoding::Encoding;
pub mod frame;
pub mod message;
pub mod session;
pub mod wire;

pub use consistency::{Consistency, PointConsistency, Requirement};
pub use message::{Message, Position};
pub use session::ProtocolError;
#[cfg(test)]
mod roundtrip_tests;
