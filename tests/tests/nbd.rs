//! The agent reading its disk over NBD: a qcow2 image served by `qemu-nbd`
//! on a Unix socket, fully synced, exported and compared bit for bit with
//! the raw image it was made from.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tideline_tests::*;

const BS: u32 = 64 * 1024;
const MIB: u64 = 1024 * 1024;

/// `qemu-nbd`, killed when dropped whatever the test's outcome.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `image` read-only on `sock` and waits until it accepts clients.
/// `--shared` lets the agent's inventory and sync connections coexist.
fn serve(image: &Path, sock: &Path, export: &str) -> Result<QemuNbd> {
    let mut server = QemuNbd(
        Command::new("qemu-nbd")
            .args([
                "--persistent",
                "--read-only",
                "--shared=8",
                "--format=qcow2",
            ])
            .arg(format!("--socket={}", sock.display()))
            .arg(format!("--export-name={export}"))
            .arg(image)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return Ok(server);
        }
        if let Some(status) = server.0.try_wait()? {
            bail!("qemu-nbd exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("qemu-nbd did not listen on {}", sock.display())
}

#[test]
fn full_sync_from_qemu_nbd_exports_bit_identical() -> Result<()> {
    let mut w = World::new(&["agent-n"])?;
    w.start_controller()?;
    let raw = w.path("disk.raw");
    make_image(&raw, 96 * MIB, 11)?;
    let qcow2 = w.path("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2))?;
    let sock = w.path("nbd.sock");
    let _server = serve(&qcow2, &sock, "vm-disk")?;

    let uri = format!("nbd+unix:///vm-disk?socket={}", sock.display());
    let disk = DiskSpec {
        id: "data".into(),
        path: PathBuf::from(&uri),
        block_size: BS,
    };
    w.start_agent("agent-n", &[disk], "")?;
    w.wait_connected("agent-n")?;

    let s = w.sync("agent-n")?;
    assert_eq!(s["state"], "done", "{s}");
    let d = &s["disks"][0];
    assert_eq!(d["committed"]["point"], 1, "{s}");
    // Zero extents reported by block status are never read or sent: the
    // full sync sends exactly the blocks that are not all zeros.
    let nonzero = nonzero_blocks(&raw, BS as usize)?;
    assert_eq!(
        d["blocks_received"].as_u64(),
        Some(nonzero.len() as u64),
        "{s}"
    );

    let out = w.export("agent-n", "data", "latest")?;
    assert_same(&out, &raw);
    let v = w.verify("agent-n", "data", "latest")?;
    assert_eq!(v["ok"], true, "{v}");
    Ok(())
}
