//! The Debian package, end to end: contrib/deb/build.sh builds it from this checkout (with the
//! test build of the binary, which the script strips), then its contents, control fields and
//! lintian are checked; `dpkg -i` installs it on this machine, the installed files, owners,
//! modes, the crier group and `systemd-analyze verify` are checked and the installed binary
//! runs; a reinstall keeps a local change to the conffile; `dpkg --purge` removes it all.
//!
//! Installing needs root (CI runs as root): without it the test fails, unless CRIER_SKIP_ROOT=1
//! says to skip it. It needs dpkg-dev, binutils, lintian and systemd (.ci/run installs them).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn require_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CRIER_SKIP_ROOT").as_deref() == Ok("1") {
        eprintln!("SKIPPED because CRIER_SKIP_ROOT=1: {what} needs root");
        return false;
    }
    panic!(
        "{what} needs root (CI runs as root): run the tests as root, or set CRIER_SKIP_ROOT=1 \
         to skip it knowingly"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed? see .ci/run)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "crier"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
}

/// Regular files of the .deb: path → (mode string, owner).
fn deb_files(deb: &Path) -> (BTreeMap<String, (String, String)>, Vec<String>) {
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(deb));
    let mut files = BTreeMap::new();
    let mut dirs = Vec::new();
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (mode, owner, path) = (f[0], f[1], f[5].trim_start_matches('.'));
        assert_eq!(owner, "root/root", "{line}");
        if mode.starts_with('d') {
            assert_eq!(mode, "drwxr-xr-x", "{line}");
            dirs.push(path.to_string());
        } else {
            assert!(mode.starts_with('-'), "only files and directories: {line}");
            files.insert(path.to_string(), (mode.to_string(), owner.to_string()));
        }
    }
    (files, dirs)
}

fn unit_path(files: &BTreeMap<String, (String, String)>) -> String {
    let units: Vec<&String> = files
        .keys()
        .filter(|p| p.ends_with("/systemd/system/crier.service"))
        .collect();
    assert_eq!(units.len(), 1, "{units:?}");
    units[0].clone()
}

fn field(deb: &Path, name: &str) -> String {
    stdout(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
        .trim()
        .to_string()
}

/// The file at `path` in the .deb.
fn deb_file(deb: &Path, path: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir.path()));
    std::fs::read(dir.path().join(path.trim_start_matches('/'))).unwrap()
}

fn build_deb(out: &Path) -> PathBuf {
    let printed = stdout(
        Command::new(format!("{ROOT}/contrib/deb/build.sh"))
            .arg("--binary")
            .arg(env!("CARGO_BIN_EXE_crier"))
            .arg("--out")
            .arg(out)
            .arg("--fast"),
    );
    let deb = PathBuf::from(printed.trim());
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!(
            "crier_{VERSION}-1_{}.deb",
            stdout(Command::new("dpkg").arg("--print-architecture")).trim()
        )
    );
    deb
}

fn check_contents(deb: &Path) -> String {
    let (files, dirs) = deb_files(deb);
    let unit = unit_path(&files);
    let want: BTreeMap<&str, &str> = [
        ("/usr/bin/crier", "-rwxr-xr-x"),
        (unit.as_str(), "-rw-r--r--"),
        ("/etc/crier/crier.toml", "-rw-r--r--"),
        ("/usr/lib/sysusers.d/crier.conf", "-rw-r--r--"),
        ("/usr/share/doc/crier/README.md", "-rw-r--r--"),
        ("/usr/share/doc/crier/SECURITY.md", "-rw-r--r--"),
        ("/usr/share/doc/crier/copyright", "-rw-r--r--"),
        ("/usr/share/doc/crier/changelog.Debian.gz", "-rw-r--r--"),
        (
            "/usr/share/doc/crier/examples/grafana-dashboard.json",
            "-rw-r--r--",
        ),
        (
            "/usr/share/doc/crier/examples/prometheus-alerts.yml",
            "-rw-r--r--",
        ),
        ("/usr/share/man/man1/crier.1.gz", "-rw-r--r--"),
        ("/usr/share/lintian/overrides/crier", "-rw-r--r--"),
    ]
    .into_iter()
    .collect();
    let got: BTreeMap<&str, &str> = files
        .iter()
        .map(|(p, (m, _))| (p.as_str(), m.as_str()))
        .collect();
    assert_eq!(got, want, "the .deb's files and modes");
    assert!(dirs.contains(&"/etc/crier/".to_string()), "{dirs:?}");

    assert_eq!(field(deb, "Package"), "crier");
    assert_eq!(field(deb, "Version"), format!("{VERSION}-1"));
    assert!(
        field(deb, "Depends").contains("libc6 (>="),
        "{}",
        field(deb, "Depends")
    );
    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb)
        .arg(control.path()));
    assert_eq!(
        std::fs::read_to_string(control.path().join("conffiles")).unwrap(),
        "/etc/crier/crier.toml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let mode = std::fs::metadata(control.path().join(script))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{script}");
    }

    // Stripped: no symbol table, no DWARF (the test build has plenty of both).
    let bin = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bin.path(), deb_file(deb, "/usr/bin/crier")).unwrap();
    // (.debug_gdb_scripts is loaded with the program, not debug information: it stays.)
    let sections = stdout(Command::new("readelf").args(["-S", "-W"]).arg(bin.path()));
    for s in [".symtab", ".debug_info", ".debug_line", ".debug_str"] {
        assert!(!sections.contains(s), "/usr/bin/crier is not stripped: {s}");
    }
    let input = std::fs::metadata(env!("CARGO_BIN_EXE_crier"))
        .unwrap()
        .len();
    let packaged = std::fs::metadata(bin.path()).unwrap().len();
    eprintln!(
        "binary: {:.1} MB built, {:.1} MB packaged; .deb {:.1} MB (gzip -1 here; xz by default)",
        input as f64 / 1e6,
        packaged as f64 / 1e6,
        std::fs::metadata(deb).unwrap().len() as f64 / 1e6
    );

    // The unit runs the packaged binary.
    let unit_text = String::from_utf8(deb_file(deb, &unit)).unwrap();
    assert!(unit_text.contains("\nExecStart=/usr/bin/crier --config /etc/crier/crier.toml\n"));
    assert!(!unit_text.contains("/usr/local"), "{unit_text}");
    // The shipped conffile is conf/crier.toml as it is.
    assert_eq!(
        deb_file(deb, "/etc/crier/crier.toml"),
        std::fs::read(format!("{ROOT}/conf/crier.toml")).unwrap()
    );
    let changelog = stdout(
        Command::new("sh")
            .arg("-c")
            .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -xO ./usr/share/doc/crier/changelog.Debian.gz | gzip -d")
            .arg("sh")
            .arg(deb),
    );
    assert!(
        changelog.starts_with(&format!("crier ({VERSION}-1) unstable; urgency=medium\n")),
        "{changelog}"
    );
    unit
}

#[test]
fn the_deb_builds_installs_runs_and_purges() {
    if !require_root("installing the .deb") {
        return;
    }
    assert!(
        !installed(),
        "a crier package is already installed here; this test would replace and purge it"
    );
    let out = tempfile::tempdir().unwrap();
    let deb = build_deb(out.path());
    let unit = check_contents(&deb);

    // lintian, as a Debian archive would: no errors, no warnings.
    let lint = run(Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .arg(&deb));
    let said = String::from_utf8_lossy(&lint.stdout);
    assert!(
        !said
            .lines()
            .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian:\n{said}"
    );

    // Same inputs, same bytes.
    let again = tempfile::tempdir().unwrap();
    assert_eq!(
        std::fs::read(&deb).unwrap(),
        std::fs::read(build_deb(again.path())).unwrap(),
        "two builds of the same checkout differ"
    );

    run(Command::new("dpkg").arg("-i").arg(&deb));
    let result = std::panic::catch_unwind(|| check_installed(&deb, &unit));
    // Purge whatever happened, then report.
    let purge = Command::new("dpkg")
        .args(["--purge", "crier"])
        .output()
        .unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(purge.status.success(), "dpkg --purge: {purge:?}");
    assert!(!installed(), "still installed after purge");
    for p in [
        "/usr/bin/crier",
        unit.as_str(),
        "/etc/crier/crier.toml",
        "/etc/crier",
        "/usr/lib/sysusers.d/crier.conf",
        "/usr/share/doc/crier",
        "/usr/share/man/man1/crier.1.gz",
    ] {
        assert!(!Path::new(p).exists(), "{p} left after purge");
    }
    // The group stays on purpose (members keep it across a reinstall): see postrm.
    assert!(group_gid("crier").is_some());
}

fn group_gid(name: &str) -> Option<u32> {
    let out = Command::new("getent")
        .args(["group", name])
        .output()
        .unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    line.split(':').nth(2).and_then(|g| g.trim().parse().ok())
}

fn check_installed(deb: &Path, unit: &str) {
    let gid = group_gid("crier").expect("the package creates the group crier");
    assert!(gid < 1000, "crier is a system group: gid {gid}");

    for (path, mode) in [
        ("/usr/bin/crier", 0o755),
        (unit, 0o644),
        ("/etc/crier/crier.toml", 0o644),
        ("/etc/crier", 0o755),
        ("/usr/lib/sysusers.d/crier.conf", 0o644),
        ("/usr/share/doc/crier/copyright", 0o644),
    ] {
        let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(m.mode() & 0o7777, mode, "{path} mode");
        assert_eq!((m.uid(), m.gid()), (0, 0), "{path} owner");
    }
    // dpkg's own record of the files matches what is on disk.
    let verify = run(Command::new("dpkg").args(["-V", "crier"]));
    assert!(verify.stdout.is_empty(), "{verify:?}");

    let out = run(Command::new("systemd-analyze").arg("verify").arg(unit));
    let complaints: Vec<_> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("crier.service"))
        .map(String::from)
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");

    assert_eq!(
        stdout(Command::new("/usr/bin/crier").arg("--version")).trim(),
        format!("crier {VERSION}")
    );
    // From /, so the default path is the installed conffile (not a conf/ in the cwd).
    for args in [&["check"][..], &["check", "/etc/crier/crier.toml"]] {
        let said = stdout(Command::new("/usr/bin/crier").args(args).current_dir("/"));
        assert_eq!(said.trim(), "/etc/crier/crier.toml: ok");
    }

    // A local change to the conffile survives a reinstall (the upgrade path of the scripts).
    let mut conf = std::fs::read_to_string("/etc/crier/crier.toml").unwrap();
    conf.push_str("# a local change\n");
    std::fs::write("/etc/crier/crier.toml", &conf).unwrap();
    run(Command::new("dpkg").arg("-i").arg(deb));
    assert_eq!(
        std::fs::read_to_string("/etc/crier/crier.toml").unwrap(),
        conf
    );
}

#[test]
fn the_man_page_names_every_command() {
    let help = stdout(Command::new(env!("CARGO_BIN_EXE_crier")).arg("--help"));
    let man = std::fs::read_to_string(format!("{ROOT}/contrib/deb/crier.1")).unwrap();
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 4, "{commands:?}");
    for c in commands {
        assert!(
            man.lines()
                .any(|l| l == format!(".B {c}") || l.starts_with(&format!(".BI \"{c} "))),
            "crier.1 does not describe `crier {c}`"
        );
    }
}
