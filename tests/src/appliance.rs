//! The agent appliance under QEMU: its image (built by
//! `image-build/build.sh`, cached by a digest of its inputs), a NoCloud seed
//! for cloud-init, and a guest booted in TCG mode (no KVM) with UEFI (OVMF)
//! or BIOS (SeaBIOS).
//!
//! The guest's serial console is a file the test reads as it grows; systemd
//! prints its boot status there. A second, test-only channel is a
//! virtio-serial port whose guest end a command loop reads: the test's
//! cloud-init seed starts that loop (the image has no such thing, and no
//! login), so the test can ask the guest's own systemd what it sees.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

pub use crate::service::GelfReceiver;
use crate::{bin_dir, run};

/// Name of the virtio-serial port of the test's command channel.
pub const CHANNEL_PORT: &str = "org.tideline.test";
/// A cached image older than this is built again (Debian security updates).
const IMAGE_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// File names of the build's outputs.
pub const OUTPUTS: [&str; 4] = [
    "tideline-appliance.raw",
    "tideline-appliance.raw.tar.gz",
    "tideline-appliance.qcow2",
    "tideline-appliance.ova",
];

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace directory")
}

fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"))
}

/// Tools the build and the boot test need, with the package that has them.
pub const TOOLS: [(&str, &str); 11] = [
    ("mmdebstrap", "mmdebstrap"),
    ("sfdisk", "fdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("grub-mkimage", "grub-pc-bin, grub-efi-amd64-bin"),
    ("qemu-img", "qemu-utils"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("python3", "python3"),
    ("dpkg-deb", "dpkg"),
    ("tar", "tar"),
];

/// Fails with a hint naming the first missing tool.
pub fn check_tools() -> Result<()> {
    for (tool, package) in TOOLS {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ensure!(
            found,
            "{tool} is missing: install {package} (scripts/install-deps.sh does)"
        );
    }
    ensure!(
        ovmf().is_some(),
        "no OVMF firmware in /usr/share/OVMF: install ovmf (scripts/install-deps.sh does)"
    );
    Ok(())
}

/// A built appliance image.
#[derive(Clone, Debug)]
pub struct ApplianceImage {
    /// Directory holding the outputs, `manifest.json` and `SHA256SUMS`.
    pub dir: PathBuf,
}

impl ApplianceImage {
    /// The raw disk image.
    pub fn raw(&self) -> PathBuf {
        self.dir.join("tideline-appliance.raw")
    }

    /// The parsed `manifest.json`.
    pub fn manifest(&self) -> Result<Value> {
        let text = fs::read_to_string(self.dir.join("manifest.json"))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Digest of everything the image is made from: `image-build/`, the
/// packaging files, the workspace's Cargo.toml (the version) and the agent
/// binary the .deb is built from.
fn input_digest(agent_binary: &Path) -> Result<String> {
    let root = workspace();
    let mut files = Vec::new();
    for dir in ["image-build", "packaging"] {
        collect_files(&root.join(dir), &mut files)?;
    }
    files.push(root.join("Cargo.toml"));
    files.push(agent_binary.to_owned());
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in files {
        h.update(
            f.strip_prefix(&root)
                .unwrap_or(&f)
                .to_string_lossy()
                .as_bytes(),
        );
        h.update(&[0]);
        let mut file = fs::File::open(&f).with_context(|| format!("reading {}", f.display()))?;
        h.update_reader(&mut file)?;
        h.update(&[0]);
    }
    Ok(h.finalize().to_hex()[..24].to_owned())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// The image of this process, or why it could not be built (so that the
/// other tests fail at once instead of building again).
static IMAGE: Mutex<Option<Result<ApplianceImage, String>>> = Mutex::new(None);

/// The appliance image for this test run, with the agent binaries of
/// [`bin_dir`]: built once per process with `image-build/build.sh
/// --release-dir <bin_dir>`, and reused from `target/appliance-test/<digest>`
/// when nothing it is made from changed (and it is less than 30 days old).
/// Downloaded packages are kept in `target/appliance-test/apt-cache`.
pub fn appliance_image() -> Result<ApplianceImage> {
    // A test that panicked while holding the lock did not build anything
    // half-way into the cache (build.sh writes the outputs last).
    let mut slot = IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    let result = match slot.as_ref() {
        Some(done) => done.clone(),
        None => {
            let built = build_or_reuse().map_err(|e| format!("{e:#}"));
            *slot = Some(built.clone());
            built
        }
    };
    result.map_err(|e| anyhow::anyhow!("the appliance image is not available: {e}"))
}

fn build_or_reuse() -> Result<ApplianceImage> {
    let agent = bin_dir().join("tideline-agent");
    ensure!(
        agent.exists(),
        "{} not found: build the binaries first (cargo build --bins)",
        agent.display()
    );
    let cache = target_dir().join("appliance-test");
    let digest = input_digest(&agent)?;
    let dir = cache.join(&digest);
    let fresh = fs::metadata(dir.join("manifest.json"))
        .and_then(|m| m.modified())
        .map(|t| {
            SystemTime::now()
                .duration_since(t)
                .map_or(true, |age| age < IMAGE_MAX_AGE)
        })
        .unwrap_or(false)
        && OUTPUTS
            .iter()
            .chain(&["SHA256SUMS"])
            .all(|f| dir.join(f).exists());
    if fresh {
        eprintln!("appliance: reusing the image in {}", dir.display());
    } else {
        // One image at a time is enough: drop older ones (about 1 GB each).
        if let Ok(entries) = fs::read_dir(&cache) {
            for e in entries.flatten() {
                if e.file_name() != "apt-cache" && e.path() != dir {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        fs::create_dir_all(&dir)?;
        let started = Instant::now();
        let log = dir.join("build.log");
        let status = Command::new(workspace().join("image-build/build.sh"))
            .arg("--release-dir")
            .arg(bin_dir())
            .arg("--out")
            .arg(&dir)
            .arg("--apt-cache")
            .arg(cache.join("apt-cache"))
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::options().append(true).open(&log)?)
            .status()
            .context("running image-build/build.sh")?;
        let secs = started.elapsed().as_secs_f64();
        if !status.success() {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            bail!(
                "image-build/build.sh failed ({status}) after {secs:.0} s; end of {}:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        eprintln!(
            "appliance: built the image in {secs:.0} s ({})",
            dir.display()
        );
    }
    Ok(ApplianceImage { dir })
}

/// Firmware a guest boots with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// UEFI: OVMF, booting EFI/BOOT/BOOTX64.EFI from the ESP.
    Uefi,
    /// Legacy BIOS: SeaBIOS (QEMU's default), booting GRUB from the MBR.
    Bios,
}

/// OVMF's code and variable-store templates.
fn ovmf() -> Option<(PathBuf, PathBuf)> {
    [
        ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
        ("OVMF_CODE.fd", "OVMF_VARS.fd"),
    ]
    .iter()
    .map(|(c, v)| {
        (
            Path::new("/usr/share/OVMF").join(c),
            Path::new("/usr/share/OVMF").join(v),
        )
    })
    .find(|(c, v)| c.exists() && v.exists())
}

/// Writes a NoCloud seed: a small FAT image labelled `CIDATA` holding
/// `user-data` and `meta-data`, made without mounting (mkfs.vfat, mcopy).
pub fn nocloud_seed(path: &Path, user_data: &str, meta_data: &str) -> Result<()> {
    let dir = path.with_extension("d");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("user-data"), user_data)?;
    fs::write(dir.join("meta-data"), meta_data)?;
    let _ = fs::remove_file(path);
    run(Command::new("mkfs.vfat")
        .args(["-C", "-n", "CIDATA"])
        .arg(path)
        .arg("2048"))?;
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(path)
        .arg(dir.join("user-data"))
        .arg(dir.join("meta-data"))
        .arg("::/"))?;
    Ok(())
}

/// Indents every line of `text` by `n` spaces (YAML block scalars).
pub fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines()
        .map(|l| format!("{pad}{l}\n"))
        .collect::<String>()
}

/// The `bootcmd` that starts the test's command channel in the guest: a
/// transient systemd service that reads one shell command per line from the
/// virtio-serial port, runs it as root, and answers with its output and
/// `@@END <status>`. While the host end is not connected, reads return end
/// of file at once, hence the outer loop. `systemd-run --no-block`: bootcmd runs inside
/// cloud-init.service, which is ordered before sysinit.target, and the
/// transient service after basic.target, so waiting for it to start would
/// hang the boot.
pub fn channel_bootcmd() -> String {
    format!(
        r#"bootcmd:
  - |
    cat >/run/tideline-test-channel.sh <<'EOF'
    port=/dev/virtio-ports/{CHANNEL_PORT}
    while [ ! -e "$port" ]; do sleep 0.2; done
    exec 3<>"$port"
    while :; do
      while IFS= read -r line <&3; do
        sh -c "$line" </dev/null >&3 2>&1
        echo "@@END $?" >&3
      done
      sleep 0.5
    done
    EOF
    systemd-run --no-block --unit=tideline-test-channel --description="Tideline boot test: command channel (test seed only)" /bin/sh /run/tideline-test-channel.sh
"#
    )
}

/// What to boot.
pub struct GuestSpec {
    /// Firmware.
    pub firmware: Firmware,
    /// The appliance's raw image (used read-only, through a qcow2 overlay).
    pub image: PathBuf,
    /// Size of the guest's root disk (the overlay), if larger than the
    /// image: cloud-init grows the root file system into it.
    pub root_disk_bytes: Option<u64>,
    /// Directory for the overlay, the serial log, the channel socket and the
    /// firmware's variable store.
    pub dir: PathBuf,
    /// The NoCloud seed.
    pub seed: PathBuf,
    /// Extra raw disks, with the serial number the guest sees
    /// (`/dev/disk/by-id/virtio-<serial>`).
    pub data_disks: Vec<(PathBuf, String)>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
}

/// A running QEMU guest; killed on drop if still running.
pub struct Guest {
    child: Child,
    /// When QEMU was started ("power-on").
    pub powered_on: Instant,
    /// The serial console's log.
    pub serial: PathBuf,
    channel_path: PathBuf,
    channel: Option<BufReader<UnixStream>>,
}

impl Guest {
    /// Starts QEMU (TCG) with the spec's disks, user networking (the host's
    /// loopback is 10.0.2.2 in the guest), a virtio RNG, the serial console
    /// in a file and the command channel on a Unix socket.
    pub fn boot(spec: &GuestSpec) -> Result<Guest> {
        let overlay = spec.dir.join("root.qcow2");
        let _ = fs::remove_file(&overlay);
        let mut create = Command::new("qemu-img");
        create
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&spec.image)
            .arg(&overlay);
        if let Some(size) = spec.root_disk_bytes {
            create.arg(size.to_string());
        }
        run(&mut create)?;
        let serial = spec.dir.join("serial.log");
        let channel_path = spec.dir.join("channel.sock");
        let _ = fs::remove_file(&serial);
        let _ = fs::remove_file(&channel_path);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35", "-accel", "tcg"])
            .args(["-m", &spec.memory_mib.to_string()])
            .args(["-smp", &spec.cpus.to_string()])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()));
        if spec.firmware == Firmware::Uefi {
            let (code, vars_template) =
                ovmf().context("no OVMF firmware in /usr/share/OVMF (package ovmf)")?;
            let vars = spec.dir.join("OVMF_VARS.fd");
            fs::copy(&vars_template, &vars)?;
            cmd.arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    code.display()
                ))
                .arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    vars.display()
                ));
        }
        // The root disk boots first, whatever the PCI order: SeaBIOS would
        // otherwise try the seed, whose FAT boot sector (0x55AA) only prints
        // "not a bootable disk" and waits for a key.
        cmd.arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id=root",
                overlay.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=root,bootindex=0"]);
        for (i, (disk, serial_no)) in spec.data_disks.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "file={},format=raw,if=none,id=data{i}",
                    disk.display()
                ))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=data{i},serial={serial_no}"));
        }
        cmd.arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,readonly=on",
                spec.seed.display()
            ))
            .args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ])
            .args(["-device", "virtio-rng-pci", "-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=chan,path={},server=on,wait=off",
                channel_path.display()
            ))
            .arg("-device")
            .arg(format!("virtserialport,chardev=chan,name={CHANNEL_PORT}"));
        let log = fs::File::create(spec.dir.join("qemu.log"))?;
        let powered_on = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        Ok(Guest {
            child,
            powered_on,
            serial,
            channel_path,
            channel: None,
        })
    }

    /// The serial console so far, without terminal escape sequences.
    pub fn console(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(
            &fs::read(&self.serial).unwrap_or_default(),
        ))
    }

    /// The last `n` lines of the console (for failure messages).
    pub fn console_tail(&self, n: usize) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Fails if QEMU has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "qemu exited ({status}); console:\n{}",
                self.console_tail(60)
            );
        }
        Ok(())
    }

    /// Waits until a console line satisfies `want`; returns the line and the
    /// time from power-on at which it was seen (polled every 100 ms).
    pub fn wait_console(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> Result<(String, Duration)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.console().lines().find(|l| want(l)) {
                return Ok((line.to_owned(), self.powered_on.elapsed()));
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "no console line with {what} within {timeout:?}; console:\n{}",
                    self.console_tail(80)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a one-line shell command in the guest through the command
    /// channel; returns its exit status and output.
    pub fn sh(&mut self, command: &str, timeout: Duration) -> Result<(i32, String)> {
        ensure!(!command.contains('\n'), "one line only: {command:?}");
        if self.channel.is_none() {
            let stream = UnixStream::connect(&self.channel_path)
                .with_context(|| format!("connecting to {}", self.channel_path.display()))?;
            self.channel = Some(BufReader::new(stream));
        }
        let chan = self.channel.as_mut().context("no channel")?;
        chan.get_ref().set_read_timeout(Some(timeout))?;
        chan.get_mut()
            .write_all(format!("{command}\n").as_bytes())?;
        let mut output = String::new();
        loop {
            let mut line = String::new();
            let n = chan
                .read_line(&mut line)
                .with_context(|| format!("no answer to {command:?} within {timeout:?}"))?;
            ensure!(n > 0, "the command channel closed during {command:?}");
            if let Some(status) = line.trim_end().strip_prefix("@@END ") {
                return Ok((status.parse().unwrap_or(-1), output));
            }
            output.push_str(&line);
        }
    }

    /// Connects to the command channel and waits until the guest answers
    /// (the seed's bootcmd has started its end). A command sent before the
    /// guest reads waits in the socket (QEMU takes nothing from it until
    /// the guest's port is open), so one probe is enough. The connection is
    /// kept: QEMU serves one client, and the guest sees every disconnect.
    pub fn wait_channel(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.channel.is_none() {
            match UnixStream::connect(&self.channel_path) {
                Ok(stream) => self.channel = Some(BufReader::new(stream)),
                Err(e) => {
                    self.check_running()?;
                    ensure!(
                        Instant::now() < deadline,
                        "cannot connect to {}: {e}",
                        self.channel_path.display()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let (status, out) = self.sh("echo channel-up", left).with_context(|| {
            format!(
                "the guest's command channel did not answer; console:\n{}",
                self.console_tail(60)
            )
        })?;
        ensure!(
            status == 0 && out.trim() == "channel-up",
            "channel probe: {out}"
        );
        Ok(())
    }

    /// `systemctl show` properties of a unit, as a map.
    pub fn unit_properties(
        &mut self,
        unit: &str,
        props: &[&str],
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let (status, out) = self.sh(
            &format!("systemctl show -p {} {unit}", props.join(",")),
            Duration::from_secs(30),
        )?;
        ensure!(status == 0, "systemctl show {unit}: {out}");
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// Asks the guest to power off and waits for QEMU to exit; returns how
    /// long the shutdown took.
    pub fn poweroff(&mut self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        if let Some(chan) = self.channel.as_mut() {
            // No answer is awaited: the channel dies with the guest.
            chan.get_mut()
                .write_all(b"systemctl --no-block poweroff\n")?;
        }
        let deadline = started + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "qemu exited with {status}");
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "the guest did not power off within {timeout:?}; console:\n{}",
            self.console_tail(40)
        )
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Removes ANSI escape sequences (colours, cursor moves) and carriage
/// returns from console text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // CSI: parameters and intermediates, then one final byte.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            _ => out.push(c),
        }
    }
    out
}

/// SHA-256 of a file, with `sha256sum`.
pub fn sha256(path: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}
