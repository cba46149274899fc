//! A multi-terabyte disk that holds little costs its data, not its size:
//! `tideline-agent dump` of a 2 TiB + 64 MiB disk with 1 MiB of data at the
//! start, the middle and the end, as a monolithicSparse VMDK, a
//! streamOptimized VMDK and a raw image served by qemu-nbd, reads exactly
//! those 3 MiB and writes them bit for bit, the rest left as holes.
//!
//! Before grain tables that qemu wrote empty were skipped whole and dump
//! skipped ahead to the next data, each of these took minutes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::SeedableRng;
use serde_json::Value;
use tideline_tests::fs::wait_for;
use tideline_tests::*;

const MIB: u64 = 1 << 20;
/// 2 TiB + 64 MiB: past 2 TiB, and not a multiple of a grain table's span.
const SIZE: u64 = (2 << 40) + 64 * MIB;
/// Where the three 1 MiB runs of data are.
const DATA_AT: [u64; 3] = [0, 1 << 40, SIZE - MIB];

/// `qemu-nbd` serving an image read-only on a Unix socket; killed on drop.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Dumps `location` into `out` and checks it read exactly the data, which
/// matches `raw`, and stored nothing else.
fn dump_reads_only_the_data(location: &str, out: &Path, raw: &Path) -> Result<()> {
    let text = run(Command::new(bin("tideline-agent")).args([
        "dump",
        "--path",
        location,
        "--out",
        out.to_str().unwrap_or_default(),
    ]))?;
    let stats: Value = serde_json::from_str(&text).context("dump output")?;
    assert_eq!(stats["size"], SIZE, "{location}: {stats}");
    assert_eq!(
        stats["bytes_read"],
        3 * MIB,
        "{location} read more than its data: {stats}"
    );
    for at in DATA_AT {
        let mut a = vec![0u8; MIB as usize];
        let mut b = vec![0u8; MIB as usize];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(out)?, &mut a, at)?;
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(raw)?, &mut b, at)?;
        assert!(a == b, "{location}: the data at {at} differs");
    }
    // Everything else is a hole (zeros): at most the data is allocated.
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(out)?) * 512;
    assert!(
        allocated <= 3 * MIB + 64 * 1024,
        "{location}: {allocated} bytes allocated in the dump"
    );
    std::fs::remove_file(out)?;
    Ok(())
}

#[test]
fn dump_of_a_two_terabyte_sparse_disk_reads_only_its_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("big.raw");
    std::fs::File::create(&raw)?.set_len(SIZE)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    for at in DATA_AT {
        write_random(&raw, at, MIB as usize, &mut rng)?;
    }
    let out = dir.path().join("out.raw");
    for subformat in ["monolithicSparse", "streamOptimized"] {
        let vmdk = dir.path().join(format!("{subformat}.vmdk"));
        run(Command::new("qemu-img")
            .args(["convert", "-O", "vmdk", "-o"])
            .arg(format!("subformat={subformat}"))
            .arg(&raw)
            .arg(&vmdk))?;
        dump_reads_only_the_data(vmdk.to_str().unwrap_or_default(), &out, &raw)?;
        std::fs::remove_file(vmdk)?;
    }

    let sock = dir.path().join("nbd.sock");
    let _server = QemuNbd(
        Command::new("qemu-nbd")
            .args(["--persistent", "--shared=4", "--read-only", "--format=raw"])
            .arg(format!("--socket={}", sock.display()))
            .arg("--export-name=disk")
            .arg(&raw)
            .stdout(Stdio::null())
            .spawn()
            .context("starting qemu-nbd")?,
    );
    wait_for(Duration::from_secs(10), "qemu-nbd's socket", || {
        sock.exists()
    })?;
    dump_reads_only_the_data(
        &format!("nbd+unix:///disk?socket={}", sock.display()),
        &out,
        &raw,
    )?;
    Ok(())
}
