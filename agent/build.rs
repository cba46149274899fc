//! Compiles the eBPF write tracker (`bpf/write_tracker.bpf.c`) with clang
//! and generates its libbpf-rs skeleton, `$OUT_DIR/write_tracker.skel.rs`,
//! which `src/tracking/writes/program.rs` includes.
//!
//! Needs clang (any version with BPF CO-RE support; Debian bookworm's 14
//! works). `scripts/install-deps.sh` installs it, with libelf-dev,
//! zlib1g-dev and pkg-config that libbpf-sys links against. The clang binary
//! can be chosen with the `CLANG` environment variable.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SOURCE: &str = "bpf/write_tracker.bpf.c";
const HEADER: &str = "bpf/write_tracker.h";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={HEADER}");
    println!("cargo:rerun-if-env-changed=CLANG");

    let Some(out_dir) = env::var_os("OUT_DIR") else {
        panic!("OUT_DIR is not set: build.rs must run under cargo");
    };
    let skeleton = PathBuf::from(out_dir).join("write_tracker.skel.rs");
    let clang = env::var_os("CLANG").unwrap_or_else(|| "clang".into());

    let mut builder = SkeletonBuilder::new();
    builder.source(SOURCE).clang(&clang).clang_args([
        // Atomic OR on map words (BPF_ATOMIC) needs the v3 instruction set
        // (kernel 5.12 or later).
        "-mcpu=v3", "-Wall", "-Werror", "-Ibpf",
    ]);
    if let Err(e) = builder.build_and_generate(&skeleton) {
        panic!(
            "cannot build the eBPF write tracker from {SOURCE} with {}: {e:#}\n\
             (it needs clang and the headers of libelf and zlib: run scripts/install-deps.sh)",
            PathBuf::from(&clang).display()
        );
    }
}
