//! The controller killed with SIGKILL during sessions (and so, at some of
//! the kills, during a commit) restarts with every earlier point intact.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::Duration;
use tideline_tests::*;

#[test]
fn controller_killed_during_sessions_keeps_every_earlier_point() -> Result<()> {
    let mut w = World::new(&["k"])?;
    w.start_controller()?;
    let img = w.path("disk.raw");
    make_image(&img, 48 << 20, 31)?;
    let disks = [DiskSpec {
        id: "data".into(),
        path: img.clone(),
        block_size: 65536,
    }];
    w.start_agent("k", &disks, "")?;
    w.wait_connected("k")?;
    w.sync("k")?;
    let mut expected: BTreeMap<u64, std::path::PathBuf> = BTreeMap::new();
    expected.insert(1, w.path("expected-1.raw"));
    snapshot(&img, &expected[&1])?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    for (round, delay_ms) in [0u64, 15, 40, 80, 150, 300].into_iter().enumerate() {
        for _ in 0..60 {
            let off = rng.gen_range(0..(48u64 << 20) - 70_000);
            write_random(&img, off, rng.gen_range(1000..70_000), &mut rng)?;
        }
        let candidate = w.path(&format!("candidate-{round}.raw"));
        snapshot(&img, &candidate)?;
        let next = expected.keys().last().copied().unwrap_or(0) + 1;

        let _ = w.admin(&["sync", "--agent", "k", "--no-wait"]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        w.kill_controller();
        w.start_controller()?;
        w.wait_connected("k")?;

        let points = w.admin(&["points", "--agent", "k", "--disk", "data"])?;
        let ids: Vec<u64> = points
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["point"].as_u64())
            .collect();
        let committed = ids.contains(&next);
        eprintln!(
            "round {round}: killed after {delay_ms} ms, point {next} {}",
            if committed { "committed" } else { "absent" }
        );
        if committed {
            expected.insert(next, candidate);
        }
        assert_eq!(
            ids,
            expected.keys().copied().collect::<Vec<_>>(),
            "round {round}: points after restart"
        );
        for (p, image) in &expected {
            let v = w.verify("k", "data", &p.to_string())?;
            assert_eq!(v["ok"], true, "round {round}, point {p}: {v}");
            assert_same(&w.export("k", "data", &p.to_string())?, image);
        }
    }

    // After all that, a normal sync still produces an exact point.
    let s = w.sync("k")?;
    assert_eq!(s["state"], "done");
    assert_same(&w.export("k", "data", "latest")?, &img);
    Ok(())
}
