//! The option haggling phase of the fixed newstyle handshake, without I/O:
//! the connection feeds each option in and writes what comes out.
//!
//! One export per socket: its name is `agent/disk/point`, and the empty
//! name (what `nbd+unix:///?socket=...` asks for) means it too.

use super::nbd::{self, opt, rep, InfoRequest, MetaContextRequest};

/// What a client can see of the export before transmission.
#[derive(Debug, Clone)]
pub struct ExportDescription {
    /// The export's name.
    pub name: String,
    /// Human-readable description (for `NBD_OPT_LIST`).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Preferred I/O size (the point's block size).
    pub block_size: u32,
}

/// Transmission flags of every export.
pub const TRANSMISSION_FLAGS: u16 =
    nbd::TFLAG_HAS_FLAGS | nbd::TFLAG_READ_ONLY | nbd::TFLAG_SEND_DF | nbd::TFLAG_CAN_MULTI_CONN;

/// What the connection does after an option.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Write these bytes and read the next option.
    Reply(Vec<u8>),
    /// Write these bytes and start transmission.
    Transmit(Vec<u8>),
    /// Write these bytes and close.
    Close(Vec<u8>),
}

/// What the client has negotiated so far.
#[derive(Debug)]
pub struct Handshake {
    export: ExportDescription,
    no_zeroes: bool,
    structured: bool,
    base_allocation: bool,
}

/// What transmission needs to know from the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies are on.
    pub structured: bool,
    /// `base:allocation` is selected (context id
    /// [`nbd::BASE_ALLOCATION_ID`]).
    pub base_allocation: bool,
}

impl Handshake {
    /// A handshake for `export` after the client flags arrived.
    pub fn new(export: ExportDescription, client_flags: u32) -> Handshake {
        Handshake {
            export,
            no_zeroes: client_flags & nbd::CLIENT_NO_ZEROES != 0,
            structured: false,
            base_allocation: false,
        }
    }

    /// The result of the handshake.
    pub fn negotiated(&self) -> Negotiated {
        Negotiated {
            structured: self.structured,
            base_allocation: self.base_allocation,
        }
    }

    fn names_export(&self, name: &str) -> bool {
        name.is_empty() || name == self.export.name
    }

    /// Answers option `option` with payload `data`.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Next {
        let reply = |kind: u32, d: &[u8]| nbd::option_reply(option, kind, d);
        let invalid = |msg: &str| Next::Reply(reply(rep::ERR_INVALID, msg.as_bytes()));
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                if !self.names_export(&name) {
                    // This option has no error reply: closing is the answer.
                    return Next::Close(Vec::new());
                }
                Next::Transmit(nbd::export_name_reply(
                    self.export.size,
                    TRANSMISSION_FLAGS,
                    self.no_zeroes,
                ))
            }
            opt::ABORT => Next::Close(reply(rep::ACK, &[])),
            opt::LIST => {
                if !data.is_empty() {
                    return invalid("NBD_OPT_LIST takes no data");
                }
                let mut out = reply(
                    rep::SERVER,
                    &nbd::server_entry(&self.export.name, &self.export.description),
                );
                out.extend(reply(rep::ACK, &[]));
                Next::Reply(out)
            }
            opt::STARTTLS => Next::Reply(reply(
                rep::ERR_POLICY,
                b"TLS is not offered on a Unix socket",
            )),
            opt::INFO | opt::GO => {
                let req = match InfoRequest::parse(data) {
                    Ok(r) => r,
                    Err(e) => return invalid(&e.to_string()),
                };
                if !self.names_export(&req.name) {
                    return Next::Reply(reply(rep::ERR_UNKNOWN, b"no such export"));
                }
                let mut out = reply(
                    rep::INFO,
                    &nbd::info_export(self.export.size, TRANSMISSION_FLAGS),
                );
                if req.items.contains(&nbd::info::BLOCK_SIZE) {
                    out.extend(reply(
                        rep::INFO,
                        &nbd::info_block_size(
                            1,
                            self.export.block_size.clamp(512, nbd::MAX_REQUEST_LEN),
                            nbd::MAX_REQUEST_LEN,
                        ),
                    ));
                }
                out.extend(reply(rep::ACK, &[]));
                if option == opt::GO {
                    Next::Transmit(out)
                } else {
                    Next::Reply(out)
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return invalid("NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                self.structured = true;
                Next::Reply(reply(rep::ACK, &[]))
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                // Selecting needs structured replies (block status answers
                // with them); listing does not.
                if set && !self.structured {
                    return invalid("metadata contexts need structured replies first");
                }
                let req = match MetaContextRequest::parse(data) {
                    Ok(r) => r,
                    Err(e) => return invalid(&e.to_string()),
                };
                if !self.names_export(&req.export) {
                    return Next::Reply(reply(rep::ERR_UNKNOWN, b"no such export"));
                }
                let wanted = req.wants_base_allocation(!set);
                if set {
                    // Each SET replaces the previous selection.
                    self.base_allocation = wanted;
                }
                let mut out = Vec::new();
                if wanted {
                    out = reply(
                        rep::META_CONTEXT,
                        &nbd::meta_context(nbd::BASE_ALLOCATION_ID, nbd::BASE_ALLOCATION),
                    );
                }
                out.extend(reply(rep::ACK, &[]));
                Next::Reply(out)
            }
            _ => Next::Reply(reply(rep::ERR_UNSUP, b"option not supported")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs() -> Handshake {
        Handshake::new(
            ExportDescription {
                name: "a/d/1".into(),
                description: "test".into(),
                size: 1 << 20,
                block_size: 65536,
            },
            nbd::CLIENT_FIXED_NEWSTYLE | nbd::CLIENT_NO_ZEROES,
        )
    }

    fn reply_type(bytes: &[u8]) -> u32 {
        u32::from_be_bytes(bytes[12..16].try_into().unwrap())
    }

    fn meta(queries: &[&str]) -> Vec<u8> {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn go_with_unknown_name_is_refused_and_empty_name_accepted() {
        let mut h = hs();
        let mut d = 5u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"other");
        d.extend_from_slice(&0u16.to_be_bytes());
        match h.option(opt::GO, &d) {
            Next::Reply(r) => assert_eq!(reply_type(&r), rep::ERR_UNKNOWN),
            n => panic!("{n:?}"),
        }
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&0u16.to_be_bytes());
        match h.option(opt::GO, &d) {
            Next::Transmit(r) => {
                assert_eq!(reply_type(&r), rep::INFO);
                let flags = u16::from_be_bytes(r[30..32].try_into().unwrap());
                assert_ne!(flags & nbd::TFLAG_READ_ONLY, 0);
                assert_ne!(flags & nbd::TFLAG_CAN_MULTI_CONN, 0);
            }
            n => panic!("{n:?}"),
        }
    }

    #[test]
    fn meta_contexts_need_structured_replies() {
        let mut h = hs();
        match h.option(opt::SET_META_CONTEXT, &meta(&["base:allocation"])) {
            Next::Reply(r) => assert_eq!(reply_type(&r), rep::ERR_INVALID),
            n => panic!("{n:?}"),
        }
        assert!(!h.negotiated().base_allocation);
        assert_eq!(
            h.option(opt::STRUCTURED_REPLY, &[]),
            Next::Reply(nbd::option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]))
        );
        match h.option(opt::SET_META_CONTEXT, &meta(&["base:allocation"])) {
            Next::Reply(r) => assert_eq!(reply_type(&r), rep::META_CONTEXT),
            n => panic!("{n:?}"),
        }
        assert_eq!(
            h.negotiated(),
            Negotiated {
                structured: true,
                base_allocation: true
            }
        );
        // A later SET without it deselects it.
        match h.option(opt::SET_META_CONTEXT, &meta(&["qemu:dirty-bitmap:b"])) {
            Next::Reply(r) => assert_eq!(reply_type(&r), rep::ACK),
            n => panic!("{n:?}"),
        }
        assert!(!h.negotiated().base_allocation);
    }

    #[test]
    fn unknown_options_are_unsupported_and_abort_closes() {
        let mut h = hs();
        match h.option(11, &[]) {
            Next::Reply(r) => assert_eq!(reply_type(&r), rep::ERR_UNSUP),
            n => panic!("{n:?}"),
        }
        assert!(matches!(h.option(opt::ABORT, &[]), Next::Close(_)));
    }

    proptest::proptest! {
        /// Whatever a client sends, the answer is a sequence of well-formed
        /// option replies for that option (or the export-name reply).
        #[test]
        fn any_option_gets_well_formed_replies(
            structured: bool,
            option in 0u32..16,
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut h = hs();
            if structured {
                h.option(opt::STRUCTURED_REPLY, &[]);
            }
            let out = match h.option(option, &data) {
                Next::Reply(o) | Next::Transmit(o) | Next::Close(o) => o,
            };
            if option == opt::EXPORT_NAME {
                proptest::prop_assert!(out.is_empty() || out.len() == 10);
                return Ok(());
            }
            let mut rest = &out[..];
            proptest::prop_assert!(!rest.is_empty());
            while !rest.is_empty() {
                proptest::prop_assert!(rest.len() >= 20);
                proptest::prop_assert_eq!(&rest[..8], &nbd::OPT_REPLY_MAGIC.to_be_bytes()[..]);
                proptest::prop_assert_eq!(&rest[8..12], &option.to_be_bytes()[..]);
                let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
                proptest::prop_assert!(rest.len() >= 20 + len);
                rest = &rest[20 + len..];
            }
        }
    }
}
