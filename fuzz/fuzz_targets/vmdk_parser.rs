//! Arbitrary bytes as a VMDK file: a sparse header with its grain directory,
//! grain tables, embedded descriptor and compressed grains, or a text
//! descriptor. The image is parsed in memory, up to 16 MiB of it is read
//! whole and in pieces, and its data extents are walked; the checks live in
//! `tideline_agent::source::vmdk::check_untrusted_image`, which the agent's
//! unit tests also run on the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tideline_agent::source::vmdk::check_untrusted_image(data);
});
