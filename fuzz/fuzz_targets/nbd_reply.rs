//! Arbitrary bytes as an NBD server would send them: option replies, read
//! replies (simple and structured), block status replies and replies to
//! writes, writes of zeroes and flushes, through the agent's own reply
//! parsers. The first byte selects which (see
//! `tideline_agent::source::nbd::fuzzing`); besides never panicking, every
//! accepted reply must fill exactly the request, every accepted block
//! status must be contiguous, non-empty and inside the request, and a
//! server error to a write may name only an offset inside the request.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tideline_agent::source::nbd::fuzzing::check_reply_bytes(data);
});
