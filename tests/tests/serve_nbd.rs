//! A committed point served as a read-only NBD export, read with the real
//! libnbd and qemu tools:
//!
//! * `nbdinfo --map` shows exactly the point's allocation (zero blocks as
//!   hole|zero), `nbdcopy` copies it bit for bit, and two `nbdcopy`s at
//!   once (each with several connections: the export says multi-conn) get
//!   the same bytes;
//! * a chunk corrupted in its pack is an EIO on exactly that block's
//!   range, logged with the point and offset, while reads around it work;
//! * the TTL closes the export: its socket goes, its open connections are
//!   cut, it leaves the list.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use tideline_tests::fs::wait_for;
use tideline_tests::*;

const BLOCK: usize = 65536;

fn disk(w: &World, file: &str) -> DiskSpec {
    DiskSpec {
        id: "d".into(),
        path: w.path(file),
        block_size: BLOCK as u32,
    }
}

/// A 96 MiB + 12 KiB image (a short last block): in the first 4 MiB every
/// third block zeros written out, blocks 40..48 a hole, the rest random;
/// then a hole to the end (larger than the 32 MiB a reply may carry, so
/// `nbdinfo --map` asks for more than one request's worth at once).
fn make_test_image(path: &Path, seed: u64) -> Result<()> {
    let size = (1536 * BLOCK + 12 * 1024) as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes = vec![0u8; size as usize];
    for (i, b) in bytes.chunks_mut(BLOCK).enumerate() {
        if i < 64 && i % 3 != 0 && !(40..48).contains(&i) {
            rng.fill_bytes(b);
        }
    }
    std::fs::write(path, &bytes[..64 * BLOCK])?;
    std::fs::File::options()
        .write(true)
        .open(path)?
        .set_len(size)?;
    Ok(())
}

/// A world with agent `id` whose disk `d` (from `make_test_image`) has one
/// committed point.
fn world_with_point(id: &str, seed: u64) -> Result<World> {
    let mut w = World::new(&[id])?;
    w.start_controller()?;
    make_test_image(&w.path("disk.raw"), seed)?;
    w.start_agent(id, &[disk(&w, "disk.raw")], "")?;
    w.wait_connected(id)?;
    let s = w.sync(id)?;
    assert_eq!(s["state"], "done", "{s}");
    Ok(w)
}

fn serve_point(w: &World, agent: &str, ttl: u64) -> Result<Value> {
    let v = w.admin(&[
        "serve-point",
        "--agent",
        agent,
        "--disk",
        "d",
        "--point",
        "1",
        "--ttl",
        &ttl.to_string(),
    ])?;
    Ok(v)
}

/// `(offset, length, zero)` runs of an image, by whole blocks.
fn allocation(image: &Path) -> Result<Vec<(u64, u64, bool)>> {
    let bytes = std::fs::read(image)?;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for (i, b) in bytes.chunks(BLOCK).enumerate() {
        let zero = b.iter().all(|&x| x == 0);
        match runs.last_mut() {
            Some(r) if r.2 == zero => r.1 += b.len() as u64,
            _ => runs.push(((i * BLOCK) as u64, b.len() as u64, zero)),
        }
    }
    Ok(runs)
}

/// `nbdinfo --map` of `uri` as `(offset, length, zero)` runs, adjacent
/// extents of one type merged. Types other than 0 (data) and 3 (hole and
/// zero) fail the test.
fn nbd_map(uri: &str) -> Result<Vec<(u64, u64, bool)>> {
    let out = run(Command::new("nbdinfo").args(["--map", "--json", uri]))?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("nbdinfo: {out}"))?;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for e in v.as_array().context("map is not a list")? {
        let (off, len, ty) = (
            e["offset"].as_u64().context("offset")?,
            e["length"].as_u64().context("length")?,
            e["type"].as_u64().context("type")?,
        );
        let zero = match ty {
            0 => false,
            3 => true,
            t => bail!("unexpected extent type {t} in {out}"),
        };
        match runs.last_mut() {
            Some(r) if r.2 == zero && r.0 + r.1 == off => r.1 += len,
            _ => runs.push((off, len, zero)),
        }
    }
    Ok(runs)
}

/// `qemu-io` read of `len` bytes at `offset`: Ok(true) if it read, Ok(false)
/// on an I/O error.
fn qemu_read(uri: &str, offset: u64, len: u64) -> Result<bool> {
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", uri, "-c"])
        .arg(format!("read {offset} {len}"))
        .stdin(Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("Input/output error") {
        return Ok(false);
    }
    if text.contains(&format!("read {len}/{len} bytes at offset {offset}")) {
        return Ok(true);
    }
    bail!("qemu-io read {offset} {len}: unexpected output: {text}")
}

#[test]
fn a_served_point_maps_copies_bit_for_bit_and_takes_several_clients() -> Result<()> {
    let w = world_with_point("na", 1)?;
    let img = w.path("disk.raw");
    let e = serve_point(&w, "na", 600)?;
    let uri = e["uri"].as_str().context("no uri")?.to_string();
    let socket = e["socket"].as_str().context("no socket")?.to_string();
    assert!(Path::new(&socket).starts_with(w.path("exports")), "{e}");

    let info: Value = serde_json::from_str(&run(Command::new("nbdinfo").args(["--json", &uri]))?)?;
    let ex = &info["exports"][0];
    assert_eq!(
        ex["export-size"].as_u64(),
        Some(std::fs::metadata(&img)?.len()),
        "{info}"
    );
    assert_eq!(ex["is_read_only"], true, "{info}");
    assert_eq!(ex["can_multi_conn"], true, "{info}");
    assert_eq!(info["protocol"], "newstyle-fixed", "{info}");

    assert_eq!(nbd_map(&uri)?, allocation(&img)?);

    let out = w.path("copy.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&out))?;
    let exported = w.export("na", "d", "1")?;
    assert_same(&out, &exported);
    assert_same(&out, &img);

    // Two copies at once, four connections each.
    let copies: Vec<_> = (0..2)
        .map(|i| {
            let dest = w.path(&format!("multi-{i}.raw"));
            let child = Command::new("nbdcopy")
                .args(["--connections=4", &uri])
                .arg(&dest)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn();
            (dest, child)
        })
        .collect();
    for (dest, child) in copies {
        let out = child?.wait_with_output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same(&dest, &img);
    }

    // Writes are refused.
    let wrote = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write 0 4096"])
        .stdin(Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&wrote.stdout),
        String::from_utf8_lossy(&wrote.stderr)
    );
    assert!(
        !text.contains("wrote 4096/4096"),
        "a write went through: {text}"
    );

    // Listed until stopped; then the socket is gone.
    let list = w.admin(&["exports"])?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let id = e["id"].as_u64().context("no id")?;
    w.admin(&["unserve", &id.to_string()])?;
    assert!(!Path::new(&socket).exists());
    assert_eq!(w.admin(&["exports"])?, serde_json::json!([]));
    Ok(())
}

#[test]
fn a_corrupted_chunk_is_an_eio_on_exactly_its_block() -> Result<()> {
    let mut w = world_with_point("nb", 2)?;
    let img = w.path("disk.raw");
    let bytes = std::fs::read(&img)?;
    let digests: HashMap<[u8; 32], usize> = bytes
        .chunks(BLOCK)
        .enumerate()
        .map(|(i, b)| (*blake3::hash(b).as_bytes(), i))
        .collect();
    // Block 10 is random data (10 % 3 != 0), so its chunk is its own.
    let victim = 10usize;
    let digest = *blake3::hash(&bytes[victim * BLOCK..(victim + 1) * BLOCK]).as_bytes();
    assert_eq!(digests[&digest], victim);

    w.stop_controller()?;
    let packs: Vec<_> = std::fs::read_dir(w.path("store/packs"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    assert_eq!(packs.len(), 1, "one pack expected: {packs:?}");
    let mut pack = std::fs::read(&packs[0])?;
    let (at, stored) = find_pack_record(&pack, &digest).context("victim chunk not in the pack")?;
    pack[at + 52 + stored / 2] ^= 0x40;
    std::fs::write(&packs[0], &pack)?;
    w.start_controller()?;

    let e = serve_point(&w, "nb", 600)?;
    let uri = e["uri"].as_str().context("no uri")?.to_string();
    let start = (victim * BLOCK) as u64;
    let b = BLOCK as u64;
    // The damaged block, whole or in part, does not read.
    assert!(!qemu_read(&uri, start, b)?, "damaged block read");
    assert!(!qemu_read(&uri, start + b - 4096, 4096)?, "its tail read");
    assert!(
        !qemu_read(&uri, start - 4096, 8192)?,
        "a read across it worked"
    );
    // Right up to its edges, everything else does.
    assert!(qemu_read(&uri, start - b, b)?, "block before failed");
    assert!(qemu_read(&uri, start + b, b)?, "block after failed");
    assert!(qemu_read(&uri, 0, start)?, "everything before failed");
    let size = bytes.len() as u64;
    assert!(
        qemu_read(&uri, start + b, size - start - b)?,
        "everything after failed"
    );
    // The whole image does not copy.
    let copied = Command::new("nbdcopy")
        .arg(&uri)
        .arg(w.path("copy.raw"))
        .stdin(Stdio::null())
        .output()?;
    assert!(!copied.status.success(), "nbdcopy copied a damaged point");
    // The controller says which point and offset.
    w.wait_log_line(
        "controller.log",
        &["EIO", "point=1", &format!("offset={start}")],
        Duration::from_secs(10),
    )?;
    Ok(())
}

#[test]
fn the_ttl_closes_the_export_and_its_connections() -> Result<()> {
    let w = world_with_point("nc", 3)?;
    let e = serve_point(&w, "nc", 3)?;
    let uri = e["uri"].as_str().context("no uri")?.to_string();
    let socket = e["socket"].as_str().context("no socket")?.to_string();
    run(Command::new("nbdinfo").arg(&uri))?;
    // A client that stays connected (it read the greeting, then waits).
    let mut idle = UnixStream::connect(&socket)?;
    let mut greeting = [0u8; 18];
    idle.read_exact(&mut greeting)?;
    assert_eq!(&greeting[..8], b"NBDMAGIC");

    wait_for(Duration::from_secs(20), "the export's socket to go", || {
        !Path::new(&socket).exists()
    })?;
    // The idle connection is closed: EOF, not a hang.
    idle.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest)
        .context("the idle connection was not closed")?;
    assert_eq!(w.admin(&["exports"])?, serde_json::json!([]));
    assert!(
        run(Command::new("nbdinfo").arg(&uri)).is_err(),
        "nbdinfo still connects"
    );
    Ok(())
}
