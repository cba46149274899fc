//! How a block's bytes travel and rest.

/// The encoding of a block payload, on the wire and in the controller's
/// store (the controller stores what the agent sent, without recompressing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The block is all zeros; there is no payload.
    Zero,
    /// The payload is the block's bytes as they are (used when zstd does not
    /// make it smaller).
    Raw,
    /// The payload is one zstd frame that decompresses to the block.
    Zstd,
}

impl Encoding {
    /// Wire code of this encoding.
    pub fn code(self) -> u8 {
        match self {
            Encoding::Zero => 0,
            Encoding::Raw => 1,
            Encoding::Zstd => 2,
        }
    }

    /// The encoding with wire code `code`, if there is one.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Encoding::Zero),
            1 => Some(Encoding::Raw),
            2 => Some(Encoding::Zstd),
            _ => None,
        }
    }
}
