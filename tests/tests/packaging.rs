//! Packaging, end to end: `packaging/build-deb.sh` builds the two `.deb`
//! packages from the test binaries, and they install, upgrade and purge
//! cleanly in a real Debian bookworm chroot made by `mmdebstrap`, with the
//! packaged units checked by `systemd-analyze verify` inside that root.
//!
//! Needs root (chroot, dpkg as root, file ownership); skips otherwise. The
//! chroot is cached as a tarball (see [`chroot_tarball`]) and made from
//! nothing when the cache is missing, which needs http://deb.debian.org.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use tideline_tests::{bin, bin_dir, run};

/// Where the chroot tarball is cached between runs.
const DEFAULT_CHROOT_CACHE: &str = "/var/cache/tideline-test-chroot.tar";
/// A cached chroot older than this is made again (security updates).
const CHROOT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
const MIRROR: &str = "http://deb.debian.org/debian";
const PACKAGES: [&str; 2] = ["tideline-agent", "tideline-controller"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace directory")
}

/// `[workspace.package] version` of the workspace's Cargo.toml.
fn workspace_version() -> Result<String> {
    let text = fs::read_to_string(workspace().join("Cargo.toml"))?;
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package && line.starts_with("version") {
            if let Some(v) = line.split('"').nth(1) {
                return Ok(v.replace('-', "~"));
            }
        }
    }
    bail!("no [workspace.package] version in Cargo.toml")
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// Runs a shell script inside the chroot, failing with its output.
fn in_root(root: &Path, script: &str) -> Result<String> {
    run(chroot_cmd(root, None).args(["sh", "-ec", script]))
}

fn chroot_cmd(root: &Path, userspec: Option<&str>) -> Command {
    let mut c = Command::new("chroot");
    if let Some(u) = userspec {
        c.arg(format!("--userspec={u}"));
    }
    c.arg(root)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("HOME", "/root");
    c
}

/// The cached bookworm chroot tarball, made with mmdebstrap when missing or
/// stale. `systemd` is included so that `systemd-analyze --root` finds the
/// targets the units refer to and `systemctl enable` works offline, as on a
/// real machine; systemd is not running in it (`/run/systemd/system` is
/// absent), which is what the maintainer scripts' guards are for.
fn chroot_tarball() -> Result<PathBuf> {
    let cache = PathBuf::from(
        std::env::var("TIDELINE_CHROOT_CACHE").unwrap_or_else(|_| DEFAULT_CHROOT_CACHE.into()),
    );
    let fresh = fs::metadata(&cache)
        .and_then(|m| m.modified())
        .map(|t| {
            SystemTime::now()
                .duration_since(t)
                .map_or(true, |age| age < CHROOT_MAX_AGE)
        })
        .unwrap_or(false);
    if fresh {
        return Ok(cache);
    }
    if let Some(dir) = cache.parent() {
        fs::create_dir_all(dir)?;
    }
    // Made under a temporary name and renamed, so that an interrupted run
    // never leaves a truncated cache behind.
    let partial = cache.with_extension(format!("partial-{}.tar", std::process::id()));
    let started = Instant::now();
    let made = run(Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--variant=minbase",
            "--include=systemd",
            "--format=tar",
            "bookworm",
        ])
        .arg(&partial)
        .arg(MIRROR));
    if let Err(e) = made {
        let _ = fs::remove_file(&partial);
        return Err(e.context("mmdebstrap could not make the bookworm chroot"));
    }
    fs::rename(&partial, &cache)?;
    eprintln!(
        "packaging: made {} in {:.0?}",
        cache.display(),
        started.elapsed()
    );
    Ok(cache)
}

/// Every path in the chroot, relative, except the bookkeeping that any
/// dpkg run changes and that is not a package's leftover: dpkg's and apt's
/// databases, logs, apt's cache, /tmp (where the test copies the .deb
/// files), and the `-` backups that useradd/userdel write next to
/// /etc/passwd, /etc/group, /etc/shadow and /etc/gshadow.
fn file_list(root: &Path) -> Result<BTreeSet<String>> {
    const IGNORED: [&str; 6] = [
        "var/lib/dpkg",
        "var/lib/apt",
        "var/log",
        "var/cache/apt",
        "var/cache/debconf",
        "tmp",
    ];
    const SHADOW_BACKUPS: [&str; 4] = ["etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-"];
    let listing =
        run(Command::new("find")
            .arg(root)
            .args(["-xdev", "-mindepth", "1", "-printf", "%P\\n"]))?;
    Ok(listing
        .lines()
        .filter(|p| {
            !IGNORED
                .iter()
                .any(|i| *p == *i || p.starts_with(&format!("{i}/")))
                && !SHADOW_BACKUPS.contains(p)
        })
        .map(str::to_owned)
        .collect())
}

fn mode(path: &Path) -> Result<u32> {
    Ok(fs::symlink_metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

fn installed_version(root: &Path, pkg: &str) -> Result<String> {
    in_root(
        root,
        &format!("dpkg-query -W -f '${{Status}} ${{Version}}' {pkg}"),
    )
}

/// The packaged configurations parse: the daemons' `check-config` fails
/// only because the certificates do not exist yet, and every commented key
/// is a key the daemon knows (uncommenting them all still parses).
fn default_configs_parse(scratch: &Path) -> Result<()> {
    for (daemon, file) in [
        ("tideline-agent", "agent.toml"),
        ("tideline-controller", "controller.toml"),
    ] {
        let packaged = workspace().join("packaging/config").join(file);
        let text = fs::read_to_string(&packaged)?;
        // Uncomment `#key = value` and `#[[section]]` lines; cbt_file and
        // dirty_bitmap exclude each other, so the CBT example stays out.
        let mut keys = 0;
        let uncommented: String = text
            .lines()
            .filter(|l| !l.starts_with("#cbt_file"))
            .map(|l| {
                let body = l.strip_prefix('#').unwrap_or(l);
                let is_key = body.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                });
                if l.starts_with('#') && (is_key || body.starts_with("[[")) {
                    keys += usize::from(is_key);
                    format!("{body}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        ensure!(keys >= 5, "{file}: only {keys} commented keys found");
        let all_keys = scratch.join(format!("all-{file}"));
        fs::write(&all_keys, &uncommented)?;
        for cfg in [&packaged, &all_keys] {
            let out = output(
                Command::new(bin(daemon))
                    .arg("--config")
                    .arg(cfg)
                    .arg("check-config"),
            )?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(
                !out.status.success()
                    && stderr.contains("/etc/tideline/pki/ca.crt")
                    && !stderr.contains("invalid configuration"),
                "{daemon} check-config {}: expected only the missing certificate error, got {}: {stderr}",
                cfg.display(),
                out.status
            );
        }
    }
    Ok(())
}

/// Runs build-deb.sh and checks what it made.
fn build_debs(out: &Path, suffix: &str, version: &str) -> Result<Vec<PathBuf>> {
    let started = Instant::now();
    let printed = run(Command::new(workspace().join("packaging/build-deb.sh"))
        .arg("--release-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out)
        .args(["--version-suffix", suffix]))?;
    eprintln!(
        "packaging: build-deb.sh --version-suffix {suffix:?} took {:.1?}",
        started.elapsed()
    );
    let arch = run(Command::new("dpkg").arg("--print-architecture"))?;
    let mut debs = Vec::new();
    for pkg in PACKAGES {
        let deb = out.join(format!("{pkg}_{version}_{}.deb", arch.trim()));
        ensure!(
            deb.exists(),
            "{} was not built; printed: {printed}",
            deb.display()
        );
        ensure!(
            printed.contains(&*deb.to_string_lossy()),
            "build-deb.sh did not print {}",
            deb.display()
        );
        let field = |f: &str| run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(f));
        ensure!(field("Package")?.trim() == pkg);
        ensure!(field("Version")?.trim() == version);
        let depends = field("Depends")?;
        ensure!(depends.contains("libc6 (>= "), "{pkg} Depends: {depends}");
        let short = pkg.trim_start_matches("tideline-");
        let conffiles = run(Command::new("dpkg-deb")
            .arg("--info")
            .arg(&deb)
            .arg("conffiles"))?;
        ensure!(
            conffiles.trim() == format!("/etc/tideline/{short}.toml"),
            "{pkg} conffiles: {conffiles}"
        );
        let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
        for want in [
            format!("./usr/bin/{pkg}"),
            format!("./lib/systemd/system/{pkg}.service"),
            format!("./etc/tideline/{short}.toml"),
        ] {
            ensure!(
                contents.lines().any(|l| l.ends_with(&want)),
                "{pkg} lacks {want}:\n{contents}"
            );
        }
        ensure!(
            contents.lines().all(|l| l.contains(" root/root ")),
            "{pkg} holds files not owned by root:\n{contents}"
        );
        debs.push(deb);
    }
    Ok(debs)
}

fn install(root: &Path, debs: &[PathBuf]) -> Result<String> {
    let mut inside = Vec::new();
    for deb in debs {
        let name = deb
            .file_name()
            .context("deb name")?
            .to_string_lossy()
            .into_owned();
        fs::copy(deb, root.join("tmp").join(&name))?;
        inside.push(format!("/tmp/{name}"));
    }
    let out = in_root(root, &format!("dpkg -i {}", inside.join(" ")))?;
    for p in &inside {
        fs::remove_file(root.join(p.trim_start_matches('/')))?;
    }
    Ok(out)
}

/// `systemd-analyze verify` of an installed unit, against the chroot as
/// root directory (so ExecStart's binary and the targets it names are those
/// of the installed system); then its exposure score must stay "OK" or
/// better (below 4.0).
fn analyze_unit(root: &Path, unit: &str) -> Result<()> {
    let path = format!("/lib/systemd/system/{unit}");
    let out = output(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(&path),
    )?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {unit}: {}: {said}",
        out.status
    );
    let out = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=40", "--no-pager"])
            .arg(format!("--root={}", root.display()))
            .arg(&path),
    )?;
    let report = String::from_utf8_lossy(&out.stdout);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("no overall exposure line");
    eprintln!("packaging: {overall}");
    ensure!(
        out.status.success(),
        "{unit} is too exposed ({}): {report}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn debian_packages_build_install_upgrade_and_purge_cleanly() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping packaging test: it needs root (chroot, dpkg); CI runs it as root");
        return Ok(());
    }
    for tool in ["mmdebstrap", "dpkg-deb", "systemd-analyze", "chroot"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()?
                .status
                .success(),
            "{tool} is missing: run scripts/install-deps.sh"
        );
    }
    let started = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("tideline-packaging-")
        .tempdir()?;
    let version = workspace_version()?;
    let upgraded = format!("{version}+test1");

    default_configs_parse(scratch.path())?;

    // Two builds: the release and an upgrade of it.
    let v1 = build_debs(&scratch.path().join("v1"), "", &version)?;
    let v2 = build_debs(&scratch.path().join("v2"), "+test1", &upgraded)?;

    let root = scratch.path().join("root");
    fs::create_dir(&root)?;
    let tarball = chroot_tarball()?;
    run(Command::new("tar")
        .args(["--numeric-owner", "-xpf"])
        .arg(&tarball)
        .arg("-C")
        .arg(&root))?;
    ensure!(
        root.join("bin/systemctl").exists() && !root.join("run/systemd/system").exists(),
        "{} is not a bookworm chroot with systemd installed but not running: remove it",
        tarball.display()
    );
    let before = file_list(&root)?;
    let passwd_before = fs::read_to_string(root.join("etc/passwd"))?;
    let group_before = fs::read_to_string(root.join("etc/group"))?;

    // Install.
    install(&root, &v1)?;
    for pkg in PACKAGES {
        let short = pkg.trim_start_matches("tideline-");
        ensure!(installed_version(&root, pkg)? == format!("install ok installed {version}"));
        ensure!(mode(&root.join("usr/bin").join(pkg))? == 0o755);
        ensure!(mode(&root.join(format!("lib/systemd/system/{pkg}.service")))? == 0o644);
        let conf = root.join(format!("etc/tideline/{short}.toml"));
        ensure!(mode(&conf)? == 0o644);
        ensure!(
            fs::read(&conf)?
                == fs::read(workspace().join(format!("packaging/config/{short}.toml")))?,
            "installed {short}.toml differs from packaging/config/{short}.toml"
        );
        let conffiles = in_root(&root, &format!("dpkg-query -W -f '${{Conffiles}}' {pkg}"))?;
        ensure!(
            conffiles.contains(&format!("/etc/tideline/{short}.toml ")),
            "{pkg} conffiles: {conffiles}"
        );
        // The binary runs on bookworm's libc, as shipped.
        let v = in_root(&root, &format!("{pkg} --version"))?;
        ensure!(
            v.trim() == format!("{pkg} {}", version.replace('~', "-")),
            "{pkg} --version: {v}"
        );
    }
    let user = in_root(&root, "getent passwd tideline")?;
    let fields: Vec<&str> = user.trim().split(':').collect();
    ensure!(fields.len() == 7, "getent passwd tideline: {user}");
    let uid: u32 = fields[2].parse()?;
    ensure!(uid < 1000, "tideline is not a system user: {user}");
    ensure!(
        fields[5] == "/var/lib/tideline-store" && fields[6] == "/usr/sbin/nologin",
        "{user}"
    );
    in_root(&root, "getent group tideline")?;
    ensure!(
        !root.join("var/lib/tideline").exists() && !root.join("var/lib/tideline-store").exists(),
        "the packages must leave the state directories to systemd"
    );

    // The packaged configurations pass check-config once certificates exist
    // (the controller's as the tideline user, as the unit runs it).
    let before_certs = output(chroot_cmd(&root, None).args(["tideline-agent", "check-config"]))?;
    ensure!(
        !before_certs.status.success(),
        "check-config passed without certificates"
    );
    in_root(
        &root,
        "tideline-controller ca init --dir /root/ca >/dev/null
         tideline-controller ca issue-controller --ca-dir /root/ca --out /etc/tideline/pki \
             --san controller.example.net >/dev/null
         tideline-controller ca issue-agent --ca-dir /root/ca --out /root/agent --id web-1 >/dev/null
         cp /root/agent/web-1.crt /etc/tideline/pki/agent.crt
         cp /root/agent/web-1.key /etc/tideline/pki/agent.key
         chown tideline /etc/tideline/pki/controller.key",
    )?;
    let ok = in_root(&root, "tideline-agent check-config")?;
    ensure!(
        ok.contains("/etc/tideline/agent.toml: ok (0 disks)"),
        "{ok}"
    );
    let ok = run(chroot_cmd(&root, Some(&format!("{uid}:{}", fields[3])))
        .args(["tideline-controller", "check-config"]))?;
    ensure!(ok.contains("/etc/tideline/controller.toml: ok"), "{ok}");

    // The units, as installed.
    for pkg in PACKAGES {
        analyze_unit(&root, &format!("{pkg}.service"))?;
    }

    // An admin enables both services, systemd made the state directories,
    // and the admin edits the agent's configuration.
    in_root(
        &root,
        "systemctl enable tideline-agent.service tideline-controller.service 2>&1",
    )?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    for pkg in PACKAGES {
        ensure!(
            wants.join(format!("{pkg}.service")).is_symlink(),
            "systemctl enable {pkg} made no symlink"
        );
    }
    in_root(
        &root,
        "install -d -m 0700 /var/lib/tideline
         echo map > /var/lib/tideline/disk.map
         install -d -m 0750 -o tideline -g tideline /var/lib/tideline-store
         echo point > /var/lib/tideline-store/point
         chown tideline: /var/lib/tideline-store/point",
    )?;
    let agent_toml = root.join("etc/tideline/agent.toml");
    let edited = fs::read_to_string(&agent_toml)?.replace(
        "address = \"controller.example.net:443\"",
        "address = \"ctl.upgrade-test.invalid:8443\"",
    );
    ensure!(
        edited.contains("ctl.upgrade-test.invalid"),
        "the default address line moved"
    );
    fs::write(&agent_toml, &edited)?;

    // Upgrade over the installed packages.
    install(&root, &v2)?;
    for pkg in PACKAGES {
        ensure!(installed_version(&root, pkg)? == format!("install ok installed {upgraded}"));
    }
    ensure!(
        fs::read_to_string(&agent_toml)? == edited,
        "the admin's agent.toml did not survive the upgrade"
    );
    ensure!(
        fs::read(root.join("etc/tideline/controller.toml"))?
            == fs::read(workspace().join("packaging/config/controller.toml"))?
    );
    let leftovers = run(Command::new("find")
        .arg(root.join("etc/tideline"))
        .args(["-name", "*.dpkg-*"]))?;
    ensure!(leftovers.trim().is_empty(), "dpkg left {leftovers}");
    ensure!(
        in_root(&root, "getent passwd tideline")? == user,
        "the upgrade changed the tideline user"
    );
    ensure!(
        root.join("var/lib/tideline/disk.map").exists()
            && root.join("var/lib/tideline-store/point").exists(),
        "the upgrade lost state"
    );
    in_root(&root, "tideline-agent check-config")?;

    // Purge. The admin's own files (CA, certificates) go first: dpkg leaves
    // what it did not install, by design.
    in_root(&root, "rm -r /root/ca /root/agent; rm /etc/tideline/pki/*")?;
    let purge = in_root(
        &root,
        "dpkg --purge tideline-agent tideline-controller 2>&1",
    )?;
    ensure!(!purge.contains("warning"), "dpkg --purge warned: {purge}");
    for pkg in PACKAGES {
        let status =
            output(chroot_cmd(&root, None).args(["dpkg-query", "-W", "-f", "${Status}", pkg]))?;
        let status = String::from_utf8_lossy(&status.stdout);
        ensure!(!status.contains("installed"), "{pkg} still {status}");
    }
    ensure!(
        fs::read_to_string(root.join("etc/passwd"))? == passwd_before,
        "purge left the tideline user"
    );
    ensure!(
        fs::read_to_string(root.join("etc/group"))? == group_before,
        "purge left the tideline group"
    );
    let after = file_list(&root)?;
    let left: Vec<_> = after.difference(&before).collect();
    let lost: Vec<_> = before.difference(&after).collect();
    ensure!(
        left.is_empty() && lost.is_empty(),
        "install + upgrade + purge changed the chroot: left behind {left:#?}, removed {lost:#?}"
    );

    eprintln!(
        "packaging: build, install, upgrade, purge in {:.1?}",
        started.elapsed()
    );
    Ok(())
}
