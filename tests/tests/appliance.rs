//! The agent appliance, end to end: `image-build/build.sh` builds it (once
//! per run, cached by its inputs), its four outputs hold the same disk, and
//! the raw image boots under QEMU in TCG mode, with UEFI (OVMF) and with
//! legacy BIOS (SeaBIOS). In each boot, a NoCloud seed configures the agent
//! through cloud-init (controller on the host's loopback, reached as
//! 10.0.2.2; its CA, certificate and key; an extra data disk; GELF to a UDP
//! port of the test), and the test checks, against the guest's real systemd:
//! the agent's unit becomes active through `Type=notify` and reports its
//! status, the agent connects, the controller syncs the data disk and the
//! exported point equals it bit for bit, the host receives the agent's GELF
//! messages, a `kill -9` of the agent is answered by systemd with a restart
//! and the restarted agent syncs again, nothing listens on the network, no
//! password can log in and sshd is off.
//!
//! Needs root (mmdebstrap) and skips otherwise; fails with a hint when a
//! tool is missing (scripts/install-deps.sh installs them all). Takes about
//! 4 minutes to build the image (less with the package cache of
//! `target/appliance-test/apt-cache`) and 2 to 3 minutes per boot.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use tideline_tests::appliance::*;
use tideline_tests::{assert_same, make_image, run, World};

/// Size of the data disk the guest's agent protects.
const DATA_DISK_BYTES: u64 = 32 << 20;
/// Size of the guest's root disk: 1 GiB more than the image, which
/// cloud-init's growpart and resize2fs must claim at first boot.
const ROOT_DISK_BYTES: u64 = 3 << 30;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Skips (returns false) without root; fails when a tool is missing.
fn ready_to_run(test: &str) -> Result<bool> {
    if !is_root() {
        eprintln!(
            "skipping {test}: building the appliance needs root (mmdebstrap); CI runs it as root"
        );
        return Ok(false);
    }
    check_tools()?;
    Ok(true)
}

/// The tests of this file run one at a time once the image is built: two
/// TCG guests on two cores take as long together as one after the other,
/// and each boot's timings stay meaningful for docs/benchmarks.md (the
/// outputs test's decompression would skew them too).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn appliance_outputs_hold_the_same_disk_and_the_manifest_says_what_is_inside() -> Result<()> {
    if !ready_to_run("the appliance outputs test")? {
        return Ok(());
    }
    let image = appliance_image()?;
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let raw = image.raw();
    let raw_len = fs::metadata(&raw)?.len();
    let scratch = tempfile::Builder::new()
        .prefix("tideline-appliance-")
        .tempdir()?;

    // The raw disk: GPT with a BIOS boot partition, an ESP and the root;
    // GRUB's boot code in the MBR.
    let table: Value = serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(&raw))?)?;
    let parts = table["partitiontable"]["partitions"]
        .as_array()
        .context("no partitions")?;
    let types: Vec<&str> = parts.iter().filter_map(|p| p["type"].as_str()).collect();
    ensure!(table["partitiontable"]["label"] == "gpt", "{table}");
    ensure!(
        types
            == [
                "21686148-6449-6E6F-744E-656564454649",
                "C12A7328-F81F-11D2-BA4B-00A0C93EC3B8",
                "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
            ],
        "partition types {types:?}"
    );
    let mbr = {
        let mut f = fs::File::open(&raw)?;
        let mut b = [0u8; 512];
        std::io::Read::read_exact(&mut f, &mut b)?;
        b
    };
    let boot_img = fs::read("/usr/lib/grub/i386-pc/boot.img")?;
    ensure!(
        mbr[..0x5c] == boot_img[..0x5c] && mbr[510..] == [0x55, 0xaa],
        "the MBR does not hold GRUB's boot.img"
    );
    ensure!(
        u64::from_le_bytes(mbr[0x5c..0x64].try_into()?) == 2048,
        "boot.img does not point at the BIOS boot partition"
    );

    // .raw.tar.gz: the raw image, alone, same bytes.
    let listing = run(Command::new("tar")
        .arg("-tzvf")
        .arg(image.dir.join("tideline-appliance.raw.tar.gz")))?;
    ensure!(
        listing.lines().count() == 1
            && listing.contains(" tideline-appliance.raw")
            && listing.contains(&format!(" {raw_len} ")),
        "tar listing: {listing}"
    );
    run(Command::new("tar")
        .arg("-xzSf")
        .arg(image.dir.join("tideline-appliance.raw.tar.gz"))
        .arg("-C")
        .arg(scratch.path()))?;
    assert_same(&scratch.path().join("tideline-appliance.raw"), &raw);
    fs::remove_file(scratch.path().join("tideline-appliance.raw"))?;

    // .qcow2: compressed, same disk.
    let qcow2 = image.dir.join("tideline-appliance.qcow2");
    let info: Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&qcow2))?)?;
    ensure!(
        info["format"] == "qcow2" && info["virtual-size"] == raw_len,
        "{info}"
    );
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(&raw)
        .arg(&qcow2))
    .context("the qcow2 differs from the raw image")?;
    ensure!(
        fs::metadata(&qcow2)?.len() < raw_len / 4,
        "the qcow2 is not compressed"
    );

    // .ova: OVF first, then the manifest, then a streamOptimized VMDK of the
    // same disk; the manifest's SHA-256 sums hold.
    let ova = image.dir.join("tideline-appliance.ova");
    let members: Vec<String> = run(Command::new("tar").arg("-tf").arg(&ova))?
        .lines()
        .map(str::to_owned)
        .collect();
    ensure!(
        members
            == [
                "tideline-appliance.ovf",
                "tideline-appliance.mf",
                "tideline-appliance-disk1.vmdk"
            ],
        "OVA members {members:?}"
    );
    run(Command::new("tar")
        .arg("-xf")
        .arg(&ova)
        .arg("-C")
        .arg(scratch.path()))?;
    let mf = fs::read_to_string(scratch.path().join("tideline-appliance.mf"))?;
    for name in ["tideline-appliance.ovf", "tideline-appliance-disk1.vmdk"] {
        let want = format!("SHA256({name})= {}", sha256(&scratch.path().join(name))?);
        ensure!(
            mf.lines().any(|l| l == want),
            "{name} not in the manifest:\n{mf}"
        );
    }
    let vmdk = scratch.path().join("tideline-appliance-disk1.vmdk");
    let vinfo: Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&vmdk))?)?;
    ensure!(
        vinfo["format"] == "vmdk"
            && vinfo["format-specific"]["data"]["create-type"] == "streamOptimized"
            && vinfo["virtual-size"] == raw_len,
        "{vinfo}"
    );
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "vmdk"])
        .arg(&raw)
        .arg(&vmdk))
    .context("the VMDK differs from the raw image")?;
    let ovf = fs::read_to_string(scratch.path().join("tideline-appliance.ovf"))?;
    for want in [
        format!("ovf:capacity=\"{raw_len}\""),
        format!(
            "ovf:href=\"tideline-appliance-disk1.vmdk\" ovf:id=\"file1\" ovf:size=\"{}\"",
            fs::metadata(&vmdk)?.len()
        ),
        "vmdk.html#streamOptimized".into(),
        "vmw:key=\"firmware\" vmw:value=\"efi\"".into(),
        "<rasd:ResourceType>3</rasd:ResourceType>\n        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>".into(),
        "<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>".into(),
        "<rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>".into(),
        "<rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>".into(),
        "ovf:transport=\"com.vmware.guestInfo\"".into(),
        "ovf:key=\"user-data\"".into(),
    ] {
        ensure!(ovf.contains(&want), "the OVF descriptor lacks {want}");
    }
    ensure!(
        !ovf.contains('@'),
        "unfilled placeholder in the OVF descriptor"
    );

    // manifest.json: the agent's version, the kernel, every package, and the
    // checksums of the outputs beside it.
    let m = image.manifest()?;
    let version = fs::read_to_string(workspace().join("Cargo.toml"))?
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| {
            l.trim()
                .strip_prefix("version = ")
                .map(|v| v.trim_matches('"').replace('-', "~"))
        })
        .context("no workspace version")?;
    ensure!(
        m["tideline"]["version"] == version.as_str(),
        "{}",
        m["tideline"]
    );
    let packages = m["packages"].as_array().context("no packages")?;
    let has = |name: &str| packages.iter().any(|p| p["name"] == name);
    for p in [
        "tideline-agent",
        "systemd",
        "cloud-init",
        "linux-image-cloud-amd64",
        "open-vm-tools",
    ] {
        ensure!(has(p), "manifest.json lists no {p}");
    }
    ensure!(
        !has("usrmerge") && !has("perl"),
        "perl crept into the image"
    );
    let kernel = m["kernel"]["release"].as_str().context("no kernel")?;
    ensure!(
        has(&format!("linux-image-{kernel}")),
        "kernel {kernel} not among the packages"
    );
    ensure!(
        m["debian"]["suite"] == "bookworm"
            && m["debian"]["archives"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    );
    let sums = fs::read_to_string(image.dir.join("SHA256SUMS"))?;
    for out in m["outputs"].as_array().context("no outputs")? {
        let file = out["file"].as_str().context("output without a name")?;
        let digest = sha256(&image.dir.join(file))?;
        ensure!(
            out["sha256"] == digest.as_str(),
            "manifest.json: {file} sha256"
        );
        ensure!(
            sums.contains(&format!("{digest}  {file}")),
            "SHA256SUMS: {file}"
        );
    }
    ensure!(m["outputs"]
        .as_array()
        .is_some_and(|o| o.len() == OUTPUTS.len()));
    eprintln!(
        "appliance: raw {} MiB virtual, {} MiB allocated; .raw.tar.gz {:.1} MB; .qcow2 {:.1} MB; .ova {:.1} MB",
        raw_len >> 20,
        m["outputs"][0]["allocated_bytes"].as_u64().unwrap_or(0) >> 20,
        m["outputs"][1]["bytes"].as_f64().unwrap_or(0.0) / 1e6,
        m["outputs"][2]["bytes"].as_f64().unwrap_or(0.0) / 1e6,
        m["outputs"][3]["bytes"].as_f64().unwrap_or(0.0) / 1e6,
    );
    Ok(())
}

#[test]
fn appliance_boots_with_uefi_and_replicates_a_data_disk() -> Result<()> {
    boot_and_replicate(Firmware::Uefi)
}

#[test]
fn appliance_boots_with_bios_and_replicates_a_data_disk() -> Result<()> {
    boot_and_replicate(Firmware::Bios)
}

/// Reads a PEM file the harness issued.
fn pem(w: &World, rel: &str) -> Result<String> {
    fs::read_to_string(w.path(rel)).with_context(|| format!("reading {rel}"))
}

/// The agent as the controller lists it.
fn agent_entry(w: &World, id: &str) -> Option<Value> {
    w.admin(&["agents"])
        .ok()?
        .as_array()?
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
}

/// Waits until the controller lists the agent as connected with a
/// non-empty inventory, from a peer other than `not_peer`; returns the peer.
fn wait_agent(w: &World, id: &str, not_peer: Option<&str>, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(a) = agent_entry(w, id) {
            let peer = a["peer"].as_str().unwrap_or_default().to_owned();
            if a["connected"] == true
                && a["disks"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|d| !d["size"].is_null()))
                && not_peer != Some(peer.as_str())
            {
                return Ok(peer);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "agent {id} did not connect (again) within {timeout:?}; controller log:\n{}",
            w.log("controller.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn boot_and_replicate(firmware: Firmware) -> Result<()> {
    let fw = match firmware {
        Firmware::Uefi => "uefi",
        Firmware::Bios => "bios",
    };
    if !ready_to_run(&format!("the appliance {fw} boot test"))? {
        return Ok(());
    }
    let image = appliance_image()?;
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let test_started = Instant::now();

    let agent = format!("appliance-{fw}");
    let hostname = format!("tideline-{fw}");
    let mut w = World::new(&[&agent])?;
    w.start_controller()?;
    let data = w.path("data.raw");
    make_image(&data, DATA_DISK_BYTES, 0xA9 + firmware as u64)?;

    // Arrival times of GELF messages count from the guest's power-on, which
    // is a few milliseconds after this.
    let epoch = Instant::now();
    let gelf = GelfReceiver::start(epoch)?;

    let agent_toml = format!(
        "[controller]\naddress = \"10.0.2.2:{port}\"\nserver_name = \"localhost\"\nreconnect_min_ms = 200\nreconnect_max_ms = 2000\nheartbeat_secs = 2\n\
         [tls]\nca = \"/etc/tideline/pki/ca.crt\"\ncert = \"/etc/tideline/pki/agent.crt\"\nkey = \"/etc/tideline/pki/agent.key\"\n\
         [log]\ngelf_address = \"10.0.2.2:{gelf}\"\n\
         [[disk]]\nid = \"data\"\npath = \"/dev/disk/by-id/virtio-tideline-data\"\nblock_size = 65536\n",
        port = w.port,
        gelf = gelf.port,
    );
    let user_data = format!(
        "#cloud-config\nwrite_files:\n  - path: /etc/tideline/pki/ca.crt\n    permissions: \"0644\"\n    content: |\n{ca}  - path: /etc/tideline/pki/agent.crt\n    permissions: \"0644\"\n    content: |\n{crt}  - path: /etc/tideline/pki/agent.key\n    permissions: \"0600\"\n    content: |\n{key}  - path: /etc/tideline/agent.toml\n    permissions: \"0644\"\n    content: |\n{toml}{channel}",
        ca = indent(&pem(&w, "pki/ca.crt")?, 6),
        crt = indent(&pem(&w, &format!("pki/{agent}.crt"))?, 6),
        key = indent(&pem(&w, &format!("pki/{agent}.key"))?, 6),
        toml = indent(&agent_toml, 6),
        channel = channel_bootcmd(),
    );
    let meta_data = format!(
        "instance-id: tideline-test-{fw}-{}\nlocal-hostname: {hostname}\n",
        std::process::id()
    );
    let seed = w.path("seed.img");
    nocloud_seed(&seed, &user_data, &meta_data)?;

    let mut guest = Guest::boot(&GuestSpec {
        firmware,
        image: image.raw(),
        root_disk_bytes: Some(ROOT_DISK_BYTES),
        dir: w.dir.path().to_owned(),
        seed,
        data_disks: vec![(data.clone(), "tideline-data".into())],
        memory_mib: 1024,
        cpus: 2,
    })?;

    // systemd prints "Started <unit>" when a Type=notify service has sent
    // READY=1: that line's arrival is power-on to READY.
    let (_, ready) = guest.wait_console(
        "systemd's \"Started tideline-agent.service\"",
        Duration::from_secs(420),
        |l| l.contains("Started") && l.contains("tideline-agen"),
    )?;
    let peer = wait_agent(&w, &agent, None, Duration::from_secs(120))?;
    let connected = guest.powered_on.elapsed();
    guest.wait_channel(Duration::from_secs(60))?;

    let (_, fw_seen) = guest.sh(
        "if [ -d /sys/firmware/efi ]; then echo uefi; else echo bios; fi",
        Duration::from_secs(30),
    )?;
    ensure!(fw_seen.trim() == fw, "booted with {fw_seen}, expected {fw}");
    // cloud-init grew the root partition and file system to the disk.
    let (_, root_size) = guest.sh("df -B1 --output=size /", Duration::from_secs(30))?;
    let root_bytes: u64 = root_size
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .context("df output")?;
    ensure!(
        root_bytes > ROOT_DISK_BYTES - (300 << 20),
        "the root file system was not grown to the {ROOT_DISK_BYTES}-byte disk: {root_size}"
    );
    // cloud-init configured the network, through systemd-networkd.
    let (_, network) = guest.sh("ls /etc/systemd/network/", Duration::from_secs(30))?;
    ensure!(
        network
            .lines()
            .any(|l| l.starts_with("10-cloud-init-") && l.ends_with(".network")),
        "cloud-init wrote no systemd-networkd configuration: {network}"
    );

    // The unit is the packaged one, hardened as packaged, and systemd saw it
    // become ready through sd_notify.
    let props = [
        "Type",
        "ActiveState",
        "SubState",
        "Result",
        "NRestarts",
        "MainPID",
        "StatusText",
        "NotifyAccess",
        "WatchdogUSec",
        "CapabilityBoundingSet",
        "ProtectSystem",
        "NoNewPrivileges",
        "FragmentPath",
        "DropInPaths",
        "UnitFileState",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
    ];
    let unit = guest.unit_properties("tideline-agent.service", &props)?;
    let get = |k: &str| unit.get(k).map(String::as_str).unwrap_or_default();
    ensure!(get("Type") == "notify", "{unit:#?}");
    ensure!(
        get("ActiveState") == "active" && get("SubState") == "running",
        "{unit:#?}"
    );
    ensure!(
        get("NRestarts") == "0" && get("NotifyAccess") == "main",
        "{unit:#?}"
    );
    ensure!(
        get("StatusText").starts_with(&format!("connected to 10.0.2.2:{}", w.port)),
        "the agent's STATUS= did not reach systemd: {unit:#?}"
    );
    ensure!(get("WatchdogUSec") == "1min", "{unit:#?}");
    // What the packaged unit grants (packaging/README.md explains each).
    let mut caps: Vec<&str> = get("CapabilityBoundingSet").split_whitespace().collect();
    caps.sort_unstable();
    ensure!(
        caps == [
            "cap_bpf",
            "cap_dac_read_search",
            "cap_perfmon",
            "cap_sys_admin",
            "cap_sys_resource"
        ],
        "{unit:#?}"
    );
    ensure!(
        get("ProtectSystem") == "strict" && get("NoNewPrivileges") == "yes",
        "{unit:#?}"
    );
    ensure!(
        get("FragmentPath") == "/lib/systemd/system/tideline-agent.service",
        "{unit:#?}"
    );
    ensure!(
        get("DropInPaths") == "/etc/systemd/system/tideline-agent.service.d/appliance.conf",
        "{unit:#?}"
    );
    ensure!(get("UnitFileState") == "enabled", "{unit:#?}");
    let first_pid = get("MainPID").to_owned();
    // The guest's clock counts from the kernel's start: what the host saw
    // before that is firmware, GRUB and loading the kernel and initramfs.
    let secs = |us: &str| us.parse::<f64>().unwrap_or(f64::NAN) / 1e6;
    let agent_started = secs(get("ExecMainStartTimestampMonotonic"));
    let agent_ready = secs(get("ActiveEnterTimestampMonotonic"));
    let cloud_init =
        guest.unit_properties("cloud-init.service", &["ActiveEnterTimestampMonotonic"])?;
    let cloud_init_done = secs(
        cloud_init
            .get("ActiveEnterTimestampMonotonic")
            .map(String::as_str)
            .unwrap_or_default(),
    );

    // Safe by default: nothing listens on the network, no password logins,
    // sshd off (the seed gives no SSH key).
    let (_, listening) = guest.sh("ss -Htulnp", Duration::from_secs(30))?;
    for line in listening.lines() {
        let local = line.split_whitespace().nth(4).unwrap_or_default();
        let loopback = local.starts_with("127.") || local.starts_with("[::1]");
        let udp = line.starts_with("udp");
        // systemd-networkd's DHCP client keeps a UDP socket on the leased
        // address's port 68 for renewals.
        let dhcp_client = udp && local.ends_with(":68") && line.contains("\"systemd-network\"");
        // The agent sends GELF (turned on in its configuration) from an
        // unconnected UDP socket on an ephemeral port; it reads nothing.
        let gelf_sender = udp && line.contains("\"tideline-agent\"");
        ensure!(
            loopback || dhcp_client || gelf_sender,
            "something listens on the network: {line}\n(all: {listening})"
        );
    }
    let (_, ssh) = guest.sh(
        "systemctl is-enabled ssh.service; systemctl is-active ssh.service; systemctl is-enabled ssh.socket",
        Duration::from_secs(30),
    )?;
    ensure!(
        ssh.split_whitespace().collect::<Vec<_>>() == ["disabled", "inactive", "disabled"],
        "sshd: {ssh}"
    );
    let (_, passwords) = guest.sh(
        "awk -F: '$2 !~ /^[!*]/ { print $1 }' /etc/shadow",
        Duration::from_secs(30),
    )?;
    ensure!(
        passwords.trim().is_empty(),
        "accounts with a password: {passwords}"
    );
    let (_, sshd) = guest.sh(
        "install -d -m 0755 /run/sshd && sshd -T | grep -Ei '^(passwordauthentication|kbdinteractiveauthentication|permitrootlogin) '",
        Duration::from_secs(30),
    )?;
    let mut sshd_lines: Vec<&str> = sshd.lines().collect();
    sshd_lines.sort();
    ensure!(
        sshd_lines
            == [
                "kbdinteractiveauthentication no",
                "passwordauthentication no",
                "permitrootlogin no"
            ],
        "sshd's effective settings: {sshd}"
    );

    // Replication: a full sync of the data disk, exported bit for bit.
    let synced_at = Instant::now();
    w.sync(&agent)?;
    let sync_secs = synced_at.elapsed();
    let export = w.export(&agent, "data", "latest")?;
    assert_same(&export, &data);
    let verified = w.verify(&agent, "data", "latest")?;
    ensure!(verified["ok"] == true, "{verified}");

    // GELF: the host received the agent's messages with their fields.
    let (_, hello) = gelf.wait_for("connected to controller", Duration::from_secs(30))?;
    ensure!(hello["_agent_id"] == agent.as_str(), "{hello}");
    ensure!(
        hello["host"] == hostname.as_str(),
        "GELF host (cloud-init's hostname): {hello}"
    );
    let (_, committed) = gelf.wait_for("point committed", Duration::from_secs(30))?;
    ensure!(
        committed["_disk"] == "data" && committed["_point"] == 1,
        "{committed}"
    );
    ensure!(
        committed["version"] == "1.1" && committed["level"] == 6,
        "{committed}"
    );
    // Inside the packaged unit's sandbox, under a live systemd, the agent
    // tracks the data disk's writes with its eBPF program (bpf(2) allowed,
    // /sys/fs/bpf writable, CAP_BPF and CAP_PERFMON kept).
    let (_, copied) = gelf.wait_for("disk copied", Duration::from_secs(30))?;
    ensure!(
        copied["_method"]
            .as_str()
            .is_some_and(|m| m.starts_with("tracked")),
        "the agent did not track the data disk's writes: {copied}"
    );

    // kill -9 inside the guest: systemd restarts the agent (Restart=on-failure),
    // it reconnects from a new connection and syncs again.
    let killed_at = Instant::now();
    let (status, out) = guest.sh(&format!("kill -9 {first_pid}"), Duration::from_secs(30))?;
    ensure!(status == 0, "kill: {out}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let restarted = loop {
        let u = guest.unit_properties(
            "tideline-agent.service",
            &[
                "ActiveState",
                "SubState",
                "NRestarts",
                "MainPID",
                "StatusText",
            ],
        )?;
        let g = |k: &str| u.get(k).cloned().unwrap_or_default();
        if g("NRestarts") == "1"
            && g("ActiveState") == "active"
            && g("MainPID") != first_pid
            && g("MainPID") != "0"
        {
            break u;
        }
        ensure!(
            Instant::now() < deadline,
            "systemd did not restart the agent: {u:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let (_, journal) = guest.sh(
        "journalctl -b -u tideline-agent.service -o cat --no-pager | grep -E 'Main process exited|Scheduled restart' | head -n 5",
        Duration::from_secs(30),
    )?;
    ensure!(
        journal.contains("status=9/KILL") && journal.contains("Scheduled restart job"),
        "the journal does not show the kill and the restart: {journal}"
    );
    wait_agent(&w, &agent, Some(&peer), Duration::from_secs(120))?;
    let restart_secs = killed_at.elapsed();
    w.sync(&agent)?;
    let export2 = w.export(&agent, "data", "latest")?;
    assert_same(&export2, &data);
    let points = w.admin(&["points", "--agent", &agent, "--disk", "data"])?;
    ensure!(
        points.as_array().is_some_and(|p| p.len() == 2),
        "two points expected: {points}"
    );

    let shutdown = guest.poweroff(Duration::from_secs(180))?;
    eprintln!(
        "appliance [{fw}]: power-on -> agent READY {:.1} s, -> connected {:.1} s; first sync of {} MiB {:.1} s; \
         kill -9 -> restarted and reconnected {:.1} s (NRestarts={}); poweroff {:.1} s; test {:.0} s\n  \
         guest clock (from kernel start): cloud-init init stage done {:.1} s, agent started {:.1} s, READY {:.1} s \
         (so firmware + GRUB + loading took about {:.1} s)",
        ready.as_secs_f64(),
        connected.as_secs_f64(),
        DATA_DISK_BYTES >> 20,
        sync_secs.as_secs_f64(),
        restart_secs.as_secs_f64(),
        restarted.get("NRestarts").map(String::as_str).unwrap_or("?"),
        shutdown.as_secs_f64(),
        test_started.elapsed().as_secs_f64(),
        cloud_init_done,
        agent_started,
        agent_ready,
        ready.as_secs_f64() - agent_ready,
    );
    Ok(())
}
