//! Arbitrary bytes as an NBD server would send them: option replies, read
//! replies (simple and structured) and block status replies, through the
//! agent's own reply parsers. The first byte selects which (see
//! `tideline_agent::source::nbd::fuzzing`); besides never panicking, every
//! accepted reply must fill exactly the request and every accepted block
//! status must be contiguous, non-empty and inside the request.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tideline_agent::source::nbd::fuzzing::check_reply_bytes(data);
});
