//! Session state machines for both ends of a control channel.
//!
//! Each end starts in a handshake type that can only become an established
//! link by receiving the right first message; only a link can start or
//! answer sync sessions. Within a session, the link checks every message
//! against the session's state (which slot is streaming, which block may
//! come next) and returns a typed [`ProtocolError`] for anything else.
//!
//! Neither end reads a socket or a clock: `handle` takes decoded messages,
//! the `send_*` methods queue frames, and `take_output` hands the bytes to
//! the I/O shell.

pub mod agent;
pub mod controller;

use crate::frame::FrameError;
use crate::message::{ErrorCode, ErrorMsg, MessageError};

/// A violation of the protocol by the peer or by the local caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame could not be taken off the stream.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// A frame did not decode into a message.
    #[error("bad message: {0}")]
    Message(#[from] MessageError),
    /// The peers have no protocol version in common.
    #[error("no common protocol version: we speak {ours_min}..={ours_max}, peer speaks {theirs_min}..={theirs_max}")]
    NoCommonVersion {
        /// Our lowest version.
        ours_min: u16,
        /// Our highest version.
        ours_max: u16,
        /// Peer's lowest version.
        theirs_min: u16,
        /// Peer's highest version.
        theirs_max: u16,
    },
    /// A message that the current state does not allow.
    #[error("unexpected {got} while {state}")]
    Unexpected {
        /// The message received or sent.
        got: &'static str,
        /// What the state machine was doing.
        state: &'static str,
    },
    /// A message names a slot the session does not have.
    #[error("slot {slot} is not part of session (it has {slots} slots)")]
    NoSuchSlot {
        /// Slot named.
        slot: u16,
        /// Number of slots.
        slots: usize,
    },
    /// A block arrived out of order or out of range.
    #[error("slot {slot}: block {block} not allowed here ({why})")]
    BadBlock {
        /// Slot.
        slot: u16,
        /// Block number.
        block: u64,
        /// Why.
        why: &'static str,
    },
    /// A message's content contradicts the session.
    #[error("{0}")]
    Inconsistent(String),
    /// The peer reported a fatal error.
    #[error("peer error {code:?}: {message}")]
    Peer {
        /// Code reported.
        code: ErrorCode,
        /// Peer's message.
        message: String,
    },
}

impl ProtocolError {
    /// The error code to tell the peer about this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::Frame(_) | ProtocolError::Message(_) => ErrorCode::Malformed,
            ProtocolError::NoCommonVersion { .. } => ErrorCode::VersionUnsupported,
            ProtocolError::Peer { code, .. } => *code,
            _ => ErrorCode::UnexpectedMessage,
        }
    }

    /// An `Error` message that reports this error to the peer.
    pub fn to_message(&self, session: u64) -> ErrorMsg {
        ErrorMsg {
            code: self.code(),
            session,
            fatal: true,
            message: self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
