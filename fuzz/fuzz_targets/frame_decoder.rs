//! Arbitrary bytes from the network side of a control channel: through the
//! streaming frame buffer (in input-derived pieces) and the message decoder.
//! Every decoded message must re-encode to the very frame it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tideline_fuzz::check_input(data);
});
