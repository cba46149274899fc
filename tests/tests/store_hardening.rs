//! The store keeps what it committed through a flipped byte and a full file
//! system, and says what went wrong where the administrator looks.
//!
//! * A byte flipped in the newest pack (the one being written, after a
//!   clean stop) costs only the point whose chunk it hit: verify names that
//!   point's pack and offset, every other point verifies and exports bit
//!   for bit, and the pack is not cut.
//! * A store on a small tmpfs filled by a sync: the cause ("no space left")
//!   is in the CLI's output, the session, the agent list, the agent's own
//!   status and the metrics; further syncs are refused up front; committed
//!   points still export bit for bit, also after a restart on the full file
//!   system; with space added the store takes points again by itself.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use serde_json::Value;
use tideline_tests::fs::{root_or_skip, wait_for, Tmpfs};
use tideline_tests::*;

const BLOCK: usize = 65536;

/// One 64 KiB-block disk of an agent.
fn disk(w: &World, file: &str) -> DiskSpec {
    DiskSpec {
        id: "d".into(),
        path: w.path(file),
        block_size: BLOCK as u32,
    }
}

/// BLAKE3 digests of the blocks of an image, with their indexes.
fn block_digests(image: &Path) -> Result<HashMap<[u8; 32], u64>> {
    let bytes = std::fs::read(image)?;
    Ok(bytes
        .chunks(BLOCK)
        .enumerate()
        .map(|(i, b)| (*blake3::hash(b).as_bytes(), i as u64))
        .collect())
}

/// The controller's metrics page.
fn metrics(w: &World) -> Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(w.socket())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The agent's own status document (`tideline-agent status --json`).
fn agent_status(w: &World, id: &str) -> Result<Value> {
    let out = run(Command::new(bin("tideline-agent"))
        .arg("--config")
        .arg(w.path(&format!("agent-{id}.toml")))
        .args(["status", "--json"]))?;
    Ok(serde_json::from_str(&out)?)
}

/// Exports `point` of `agent`'s disk and checks it against `expected`.
fn exports_exactly(w: &World, agent: &str, point: &str, expected: &Path) -> Result<()> {
    let out = w.export(agent, "d", point)?;
    if !same_contents(&out, expected)? {
        bail!("point {point} of {agent}/d does not export bit for bit");
    }
    std::fs::remove_file(out)?;
    Ok(())
}

#[test]
fn a_flipped_byte_in_the_newest_pack_costs_only_the_points_that_use_it() -> Result<()> {
    let mut w = World::new(&["fa", "fb"])?;
    w.start_controller()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut snaps = Vec::new();
    for (i, a) in ["fa", "fb"].into_iter().enumerate() {
        make_image(&w.path(&format!("{a}.raw")), 8 << 20, 40 + i as u64)?;
        w.start_agent(a, &[disk(&w, &format!("{a}.raw"))], "")?;
        w.wait_connected(a)?;
    }
    for round in 1..=2 {
        for a in ["fa", "fb"] {
            let image = w.path(&format!("{a}.raw"));
            if round == 2 {
                // The first 1 MiB changes: its old blocks are only in point 1.
                write_random(&image, 0, 1 << 20, &mut rng)?;
            }
            w.sync(a)?;
            let snap = w.path(&format!("{a}-{round}.raw"));
            snapshot(&image, &snap)?;
            snaps.push((a, round, snap));
        }
    }

    // A block only point 1 of `fa` holds.
    let mut elsewhere = HashMap::new();
    for (a, round, snap) in &snaps {
        if (*a, *round) != ("fa", 1) {
            elsewhere.extend(block_digests(snap)?);
        }
    }
    let fa1 = block_digests(&w.path("fa-1.raw"))?;
    let zero = *blake3::hash(&[0u8; BLOCK]).as_bytes();
    let victim = fa1
        .iter()
        .filter(|(d, &b)| b < 16 && **d != zero && !elsewhere.contains_key(*d))
        .map(|(d, _)| *d)
        .next()
        .context("no block unique to point 1 of fa in its first MiB")?;

    w.stop_controller()?;
    let packs: Vec<_> = std::fs::read_dir(w.path("store/packs"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    assert_eq!(packs.len(), 1, "one pack expected: {packs:?}");
    let pack = &packs[0];
    let mut bytes = std::fs::read(pack)?;
    let (offset, stored) =
        find_pack_record(&bytes, &victim).context("victim chunk not in the pack")?;
    bytes[offset + 52 + stored / 2] ^= 0x40;
    std::fs::write(pack, &bytes)?;
    let pack_len = bytes.len() as u64;

    w.start_controller()?;
    assert_eq!(
        std::fs::metadata(pack)?.len(),
        pack_len,
        "the pack was cut at the damaged record; log:\n{}",
        w.log("controller.log")
    );
    // The damaged point fails verification, naming the pack and the offset.
    let err = match w.verify("fa", "d", "1") {
        Ok(v) => bail!("point 1 of fa verified despite a flipped byte: {v}"),
        Err(e) => format!("{e:#}"),
    };
    let name = pack.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    assert!(
        err.contains(name) && err.contains(&format!("offset {offset}")),
        "verify does not name {name} at offset {offset}: {err}"
    );
    // Every other point is whole.
    for (a, round, snap) in &snaps {
        if (*a, *round) == ("fa", 1) {
            continue;
        }
        let point = round.to_string();
        let v = w.verify(a, "d", &point)?;
        assert_eq!(v["ok"], true, "{a} point {round}: {v}");
        exports_exactly(&w, a, &point, snap)?;
    }
    // And the store goes on taking points.
    write_random(&w.path("fb.raw"), 2 << 20, 1 << 20, &mut rng)?;
    w.wait_connected("fb")?;
    w.sync("fb")?;
    exports_exactly(&w, "fb", "latest", &w.path("fb.raw"))?;
    Ok(())
}

#[test]
fn a_full_store_is_named_everywhere_and_still_serves_its_points() -> Result<()> {
    if !root_or_skip("a_full_store_is_named_everywhere_and_still_serves_its_points") {
        return Ok(());
    }
    let mut w = World::new(&["full"])?;
    let fs = Tmpfs::mount(&w.path("store"), 24 << 20)?;
    w.start_controller()?;
    let image = w.path("full.raw");
    std::fs::File::create(&image)?.set_len(64 << 20)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    write_random(&image, 0, 4 << 20, &mut rng)?;
    w.start_agent("full", &[disk(&w, "full.raw")], "")?;
    w.wait_connected("full")?;
    w.sync("full")?;
    snapshot(&image, &w.path("full-1.raw"))?;

    // 40 MiB that does not compress into a 24 MiB file system.
    write_random(&image, 8 << 20, 40 << 20, &mut rng)?;
    const CAUSE: &str = "no space left on the store's file system";
    let err = match w.admin(&["sync", "--agent", "full"]) {
        Ok(v) => bail!("the sync fit into a full store: {v}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(CAUSE),
        "the CLI does not name the cause: {err}"
    );
    let sessions = w.admin(&["sessions"])?;
    let last = sessions
        .as_array()
        .and_then(|s| s.iter().max_by_key(|s| s["session"].as_u64()))
        .context("no sessions")?;
    assert_eq!(last["state"], "failed", "{last}");
    assert!(
        last["error"].as_str().is_some_and(|e| e.contains(CAUSE)),
        "session error: {last}"
    );
    let agents = w.admin(&["agents"])?;
    assert!(
        agents[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(CAUSE)),
        "agents: {agents}"
    );
    wait_for(
        Duration::from_secs(20),
        "the agent's status to name the cause",
        || {
            agent_status(&w, "full")
                .is_ok_and(|s| s["last_error"].as_str().is_some_and(|e| e.contains(CAUSE)))
        },
    )
    .with_context(|| format!("agent status: {:?}", agent_status(&w, "full")))?;
    let text = metrics(&w)?;
    assert!(text.contains("\ntideline_store_writable 0\n"), "{text}");
    let store = w.admin(&["store"])?;
    assert_eq!(store["health"]["writable"], false, "{store}");
    // Another sync is refused up front, saying why.
    let err = match w.admin(&["sync", "--agent", "full"]) {
        Ok(v) => bail!("a sync started on a full store: {v}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("takes no new points") && err.contains("no space"),
        "{err}"
    );
    exports_exactly(&w, "full", "1", &w.path("full-1.raw"))?;

    // Restarted on a file system with not a byte left, it starts and serves.
    fs.fill(&w.path("store/filler"))?;
    w.stop_controller()?;
    w.start_controller()
        .with_context(|| w.log("controller.log"))?;
    let v = w.verify("full", "d", "1")?;
    assert_eq!(v["ok"], true, "{v}");
    exports_exactly(&w, "full", "1", &w.path("full-1.raw"))?;
    let store = w.admin(&["store"])?;
    assert_eq!(store["health"]["writable"], false, "{store}");
    w.wait_connected("full")?;
    let err = match w.admin(&["sync", "--agent", "full"]) {
        Ok(v) => bail!("a sync started on a full store after restart: {v}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("no space"), "{err}");

    // Room again: the store takes points by itself.
    std::fs::remove_file(w.path("store/filler"))?;
    fs.resize(256 << 20)?;
    w.sync("full")?;
    exports_exactly(&w, "full", "latest", &image)?;
    let store = w.admin(&["store"])?;
    assert_eq!(store["health"]["writable"], true, "{store}");
    w.verify("full", "d", "1")?;
    w.kill_controller();
    drop(fs);
    Ok(())
}
