//! The Debian package: `cargo deb` builds it (around the binary these tests run, so
//! no second release build), `dpkg-deb -x` unpacks it into a throwaway root, and the
//! files, maintainer scripts and systemd units are checked — the units with
//! `systemd-analyze verify`, which must print nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::repo;

fn ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?} does not run: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_deb_installs_binary_units_configs_docs_and_a_user() {
    let has_deb = Command::new("cargo").args(["deb", "--version"]).output().is_ok_and(|o| o.status.success());
    assert!(has_deb, "this test needs cargo-deb: cargo install cargo-deb --locked (.ci/run installs it)");
    let tmp = tempfile::tempdir().expect("tempdir");
    // cargo-deb packages <target dir>/release/nbackup; hand it this build's binary.
    let target = tmp.path().join("target");
    fs::create_dir_all(target.join("release")).expect("mkdir");
    fs::copy(env!("CARGO_BIN_EXE_nbackup"), target.join("release/nbackup")).expect("binary");
    let deb = tmp.path().join("nbackup.deb");
    ok(Command::new("cargo")
        .args(["deb", "--no-build", "--no-strip", "--fast", "--output"])
        .arg(&deb)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(repo()));
    let info = String::from_utf8_lossy(&ok(Command::new("dpkg-deb").arg("--info").arg(&deb)).stdout).into_owned();
    assert!(info.contains("Package: nbackup") && info.contains("Section: admin"), "{info}");
    assert!(info.contains(&format!("Version: {}-1", env!("CARGO_PKG_VERSION"))), "{info}");

    let root = tmp.path().join("root");
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let bin = root.join("usr/bin/nbackup");
    assert_eq!(fs::metadata(&bin).expect("binary").permissions().mode() & 0o777, 0o755);
    let version = ok(Command::new(&bin).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    for file in [
        "lib/systemd/system/nbackup-server.service",
        "lib/systemd/system/nbackup-agent.service",
        "usr/lib/sysusers.d/nbackup.conf",
        "etc/nbackup/server.example.yaml",
        "etc/nbackup/agent.example.yaml",
        "usr/share/man/man1/nbackup.1.gz",
        "usr/share/man/man1/nbackup-setup-agent.1.gz",
        "usr/share/bash-completion/completions/nbackup",
        "usr/share/zsh/vendor-completions/_nbackup",
        "usr/share/fish/vendor_completions.d/nbackup.fish",
        "usr/share/doc/nbackup/README.md",
        "usr/share/doc/nbackup/certificates.md",
    ] {
        assert!(root.join(file).is_file(), "{file} is in the package");
    }
    // Every man page the CLI generates is shipped.
    for page in fs::read_dir(repo().join("man")).expect("man").flatten() {
        let name = format!("{}.gz", page.file_name().to_string_lossy());
        assert!(root.join("usr/share/man/man1").join(&name).is_file(), "{name} shipped");
    }
    // The example configs are conffiles and load as shipped.
    let control = tmp.path().join("control");
    ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert!(
        conffiles.contains("/etc/nbackup/server.example.yaml") && conffiles.contains("/etc/nbackup/agent.example.yaml")
    );
    for script in ["postinst", "postrm"] {
        let path = control.join(script);
        assert_eq!(fs::metadata(&path).expect(script).permissions().mode() & 0o111, 0o111, "{script} executable");
        ok(Command::new("sh").arg("-n").arg(&path));
    }
    let postinst = fs::read_to_string(control.join("postinst")).expect("postinst");
    assert!(postinst.contains("systemd-sysusers nbackup.conf") && postinst.contains("adduser --system"));
    let sysusers = fs::read_to_string(root.join("usr/lib/sysusers.d/nbackup.conf")).expect("sysusers");
    assert!(
        sysusers.lines().any(|l| l.starts_with("g nbackup")) && sysusers.lines().any(|l| l.starts_with("u nbackup"))
    );

    for unit in ["nbackup-server.service", "nbackup-agent.service"] {
        let text = fs::read_to_string(root.join("lib/systemd/system").join(unit)).expect("unit");
        for directive in [
            "Type=notify",
            "ExecStart=/usr/bin/nbackup",
            "ProtectSystem=strict",
            "ReadWritePaths=",
            "NoNewPrivileges=yes",
            "StateDirectory=nbackup",
            "RuntimeDirectory=nbackup",
            "LimitNOFILE=",
        ] {
            assert!(text.contains(directive), "{unit} lacks {directive}");
        }
        verify_unit(&root, unit, &text);
    }
}

/// `systemd-analyze verify` on a copy whose `ExecStart` points into the unpacked root
/// (verify insists the command exists); any complaint fails the test.
fn verify_unit(root: &Path, unit: &str, text: &str) {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed: {unit} not verified");
        return;
    }
    let dir = root.parent().expect("parent").join("units");
    fs::create_dir_all(&dir).expect("mkdir");
    let copy = dir.join(unit);
    let bin = root.join("usr/bin/nbackup");
    fs::write(&copy, text.replace("/usr/bin/nbackup", &bin.to_string_lossy())).expect("unit copy");
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().expect("verify runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {unit}:\n{said}");
}
