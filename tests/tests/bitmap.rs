//! QEMU dirty bitmaps over NBD: an incremental sync reads only the dirty
//! extents when the bitmap has tracked since the last point, and falls back
//! to a hash scan when the server does not offer it. The replica always
//! equals `qemu-img convert -O raw` of the qcow2.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tideline_tests::*;

const BS: u64 = 64 * 1024;

struct QemuNbd(Child);

impl QemuNbd {
    fn start(image: &Path, sock: &Path, bitmap: Option<&str>) -> Result<QemuNbd> {
        let _ = std::fs::remove_file(sock);
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "--persistent",
            "--shared=8",
            "--read-only",
            "-f",
            "qcow2",
            "--socket",
        ])
        .arg(sock);
        if let Some(b) = bitmap {
            cmd.args(["-B", b]);
        }
        let child = cmd
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        for _ in 0..200 {
            if sock.exists() {
                return Ok(QemuNbd(child));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("qemu-nbd did not start")
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_write(image: &Path, offset: u64, pattern: u8) -> Result<()> {
    run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(image)
        .args(["-c", &format!("write -P {pattern} {offset} 64k")]))?;
    Ok(())
}

fn as_raw(w: &World, image: &Path, name: &str) -> Result<PathBuf> {
    let out = w.path(name);
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&out))?;
    Ok(out)
}

#[test]
fn dirty_bitmap_incremental_reads_only_dirty_extents() -> Result<()> {
    let mut w = World::new(&["kvm"])?;
    w.start_controller()?;
    let raw = w.path("base.raw");
    make_image(&raw, 48 << 20, 81)?;
    let qcow = w.path("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow))?;
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable"])
        .arg(&qcow)
        .arg("tl"))?;
    let sock = w.path("nbd.sock");
    let server = QemuNbd::start(&qcow, &sock, Some("tl"))?;

    let disks = [DiskSpec {
        id: "vda".into(),
        path: PathBuf::from(format!("nbd+unix:///?socket={}", sock.display())),
        block_size: BS as u32,
    }];
    let cfg = w.agent_config("kvm", &disks, "kvm", "pki/ca.crt", w.port, "")?;
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)? + "dirty_bitmap = \"tl\"\n",
    )?;
    w.spawn_agent("kvm", &cfg)?;
    w.wait_connected("kvm")?;
    w.sync("kvm")?;
    assert_same(
        &w.export("kvm", "vda", "latest")?,
        &as_raw(&w, &qcow, "p1.raw")?,
    );

    // Three 64 KiB writes while the bitmap tracks.
    drop(server);
    for (i, block) in [3u64, 250, 700].into_iter().enumerate() {
        qemu_write(&qcow, block * BS, 0x40 + i as u8)?;
    }
    let server = QemuNbd::start(&qcow, &sock, Some("tl"))?;
    let s = w.sync("kvm")?;
    assert_eq!(s["disks"][0]["blocks_received"].as_u64(), Some(3), "{s}");
    let log = w.log("agent-kvm.log");
    assert!(log.contains("using the dirty bitmap"), "{log}");
    assert_eq!(
        last_scan_bytes_read(&log),
        3 * BS,
        "only the dirty extents are read"
    );
    assert_same(
        &w.export("kvm", "vda", "latest")?,
        &as_raw(&w, &qcow, "p2.raw")?,
    );

    // The server no longer offers the bitmap: scan, and still exact.
    drop(server);
    qemu_write(&qcow, 100 * BS, 0x77)?;
    let _server = QemuNbd::start(&qcow, &sock, None)?;
    let s = w.sync("kvm")?;
    let log = w.log("agent-kvm.log");
    assert!(log.contains("falling back to a hash scan"), "{log}");
    // The bitmap accumulates since it was added, so blocks 3, 250 and 700
    // are still dirty in it; a scan finds only what differs from point 2.
    assert_eq!(s["disks"][0]["blocks_received"].as_u64(), Some(1), "{s}");
    assert_same(
        &w.export("kvm", "vda", "latest")?,
        &as_raw(&w, &qcow, "p3.raw")?,
    );
    Ok(())
}
