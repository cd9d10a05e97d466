//! The shipped unit taken at its word, without systemd as PID 1 (a CI container has none):
//! crier started the way the unit starts it (its ExecStartPre and ExecStart, a uid of the
//! dynamic range in the unit's group, the runtime directory with the unit's mode, its umask and
//! environment, NOTIFY_SOCKET), then a second uid (`nobody`) publishing on the Unix socket with
//! and without membership in that group; ExecReload run the way systemd runs it, against a
//! broken and a valid config; TimeoutStopSec against a measured drain plus webhook flush; and
//! the README's drop-ins and credential paths (systemd-analyze verify, crier check).
//!
//! The second-uid test needs root (CI runs as root); elsewhere it fails unless
//! CRIER_SKIP_ROOT=1 says to skip it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const UNIT: &str = include_str!("../systemd/crier.service");
const SYSUSERS: &str = include_str!("../systemd/crier.sysusers");
const CONF: &str = include_str!("../conf/crier.toml");
/// The paths the unit names, replaced by the test's own.
const UNIT_BIN: &str = "/usr/local/bin/crier";
const UNIT_CONF: &str = "/etc/crier/crier.toml";

/// Every value of `key` in the unit's [Service] section, in order.
fn service(key: &str) -> Vec<String> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == "[Service]";
        } else if inside && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    out.push(v.trim().to_string());
                }
            }
        }
    }
    out
}

fn service_one(key: &str) -> String {
    let v = service(key);
    assert_eq!(v.len(), 1, "{key}= once in the unit: {v:?}");
    v[0].clone()
}

/// systemd time spans as the unit writes them: "90", "90s", "2min", "1min 30s".
fn timespan(s: &str) -> Duration {
    s.split_whitespace()
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits.parse().unwrap_or_else(|_| panic!("time span {s:?}"));
            match &part[digits.len()..] {
                "" | "s" | "sec" => Duration::from_secs(n),
                "min" | "m" => Duration::from_secs(60 * n),
                "ms" => Duration::from_millis(n),
                u => panic!("unit {u:?} in {s:?}"),
            }
        })
        .sum()
}

/// The group systemd/crier.sysusers creates.
fn sysusers_group() -> String {
    let groups: Vec<&str> = SYSUSERS
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("g "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(groups.len(), 1, "one group in crier.sysusers: {groups:?}");
    groups[0].to_string()
}

/// The value of `key` in `section` of conf/crier.toml when it is set (not commented out).
fn conf_value(section: &str, key: &str) -> Option<String> {
    let mut inside = false;
    for line in CONF.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == section;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().trim_matches('"').to_string());
                }
            }
        }
    }
    None
}

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

#[test]
fn the_unit_runs_crier_as_a_dynamic_user_in_the_static_crier_group() {
    let group = sysusers_group();
    assert_eq!(service_one("DynamicUser"), "yes");
    assert_eq!(
        service_one("Group"),
        group,
        "Group= is the sysusers.d group"
    );
    // systemd refuses a dynamic user whose name a static group already has (EILSEQ in
    // dynamic_user_realize), so User= must name something else.
    assert_ne!(service_one("User"), group);
    // The socket's directory: RuntimeDirectory under %t, which crier's default path uses.
    assert_eq!(service_one("RuntimeDirectory"), "crier");
    assert!(
        service("Environment").contains(&"XDG_RUNTIME_DIR=%t".to_string()),
        "the default publish socket must land in %t/crier: {:?}",
        service("Environment")
    );
    match conf_value("[publish]", "unix") {
        None => {} // the default: $XDG_RUNTIME_DIR/crier/publish.sock
        Some(p) => assert_eq!(p, "/run/crier/publish.sock"),
    }
}

/// A uid in systemd's dynamic range (61184-65519) and a gid that exist nowhere, as a
/// DynamicUser= service gets (the gid stands in for the static group, which systemd resolves
/// to a number before crier starts).
fn free_ids() -> (u32, u32) {
    // SAFETY: getpwuid/getgrgid return null or a pointer to static storage we do not keep.
    let uid = (61184..65519)
        .rev()
        .find(|&u| unsafe { libc::getpwuid(u).is_null() && libc::getgrgid(u).is_null() })
        .expect("a free uid");
    let gid = (59000..60000)
        .find(|&g| unsafe { libc::getgrgid(g).is_null() })
        .expect("a free gid");
    (uid, gid)
}

/// conf/crier.toml with its TCP ports moved to 0 (tests run side by side); every other key
/// as shipped.
fn shipped_config_on_free_ports() -> String {
    let mut text = CONF.to_string();
    for port in ["127.0.0.1:8080", "127.0.0.1:8081", "127.0.0.1:9090"] {
        assert!(
            text.contains(&format!("\"{port}\"")),
            "conf/crier.toml listens on {port}"
        );
        text = text.replace(&format!("\"{port}\""), "\"127.0.0.1:0\"");
    }
    text
}

/// An ExecStart=/ExecStartPre=/ExecReload= line as argv, with the unit's binary and config
/// paths replaced and `$MAINPID` set.
fn argv(line: &str, bin: &Path, conf: &Path, mainpid: Option<u32>) -> Vec<String> {
    line.split_whitespace()
        .map(|w| match w {
            UNIT_BIN => bin.display().to_string(),
            UNIT_CONF => conf.display().to_string(),
            "$MAINPID" => mainpid.expect("$MAINPID set").to_string(),
            w => w.to_string(),
        })
        .collect()
}

fn umask() -> u32 {
    u32::from_str_radix(&service_one("UMask"), 8).expect("octal UMask")
}

/// A command that runs as the unit's process would: `uid:gid` with no supplementary groups,
/// the unit's umask and Environment= (with %t = `runtime_root`), and nothing else inherited.
fn as_service(argv: &[String], ids: Option<(u32, u32)>, runtime_root: &Path) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CRIER_LOG", "info")
        .stdin(Stdio::null());
    for e in service("Environment") {
        let (k, v) = e.split_once('=').expect("KEY=value");
        cmd.env(k, v.replace("%t", &runtime_root.display().to_string()));
    }
    let mask = umask();
    // SAFETY: the closure only makes async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = ids {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::umask(mask as libc::mode_t);
            Ok(())
        });
    }
    cmd
}

/// A NOTIFY_SOCKET like systemd's: a datagram socket the service's uid may write to, read
/// all the time (crier's send blocks on a full queue, as libsystemd's does).
struct Notify {
    path: PathBuf,
    got: mpsc::Receiver<String>,
}

impl Notify {
    fn new(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (tx, got) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        Notify { path, got }
    }

    /// Messages until one has the line `want` (or `within` passes): all of them, in order.
    fn until(&self, want: &str, within: Duration) -> Vec<String> {
        let end = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let Ok(m) = self.got.recv_timeout(left) else {
                panic!("no {want} from crier within {within:?}; got {got:?}");
            };
            let done = m.lines().any(|l| l == want);
            got.push(m);
            if done {
                return got;
            }
        }
    }
}

/// A child whose stderr is kept (for failure messages); killed on drop.
struct Running {
    child: Child,
    log: mpsc::Receiver<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn crier");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running { child, log: rx }
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// The address in the first log line containing `marker` (e.g. "admin on http://").
    fn addr_after(&self, marker: &str) -> SocketAddr {
        let end = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while Instant::now() < end {
            if let Ok(line) = self.log.recv_timeout(Duration::from_millis(100)) {
                if let Some(i) = line.find(marker) {
                    let rest = &line[i + marker.len()..];
                    if let Some(a) = rest.split_whitespace().next().and_then(|a| a.parse().ok()) {
                        return a;
                    }
                }
                seen.push(line);
            }
        }
        panic!("no {marker:?} in crier's log:\n{}", seen.join("\n"));
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let log: Vec<String> = self.log.try_iter().collect();
        panic!(
            "crier did not exit within {within:?}; log:\n{}",
            log.join("\n")
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mkdir(p: &Path, mode: u32) {
    std::fs::create_dir_all(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `setpriv` as `nobody` (primary group nogroup), with `groups` as its only supplementary
/// groups, running `cmd`.
fn as_nobody(groups: Option<u32>, cmd: &[&str]) -> Output {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup"]);
    match groups {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    c.args(cmd)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
fn members_of_the_units_group_publish_on_the_socket_others_are_refused() {
    if !require_root("publishing as a second uid") {
        return;
    }
    let (uid, gid) = free_ids();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    mkdir(root, 0o755);
    // The binary where any uid may run it (the checkout may sit in a 0700 home).
    let bin = root.join("crier");
    std::fs::copy(env!("CARGO_BIN_EXE_crier"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = root.join("crier.toml");
    std::fs::write(&conf, shipped_config_on_free_ports()).unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    // %t and RuntimeDirectory=, as systemd makes them: owned by the service's user and group,
    // with RuntimeDirectoryMode.
    let run = root.join("run");
    mkdir(&run, 0o755);
    let dir_mode = u32::from_str_radix(&service_one("RuntimeDirectoryMode"), 8).unwrap();
    let rundir = run.join(service_one("RuntimeDirectory"));
    mkdir(&rundir, dir_mode);
    std::os::unix::fs::chown(&rundir, Some(uid), Some(gid)).unwrap();
    let notify_dir = root.join("notify");
    mkdir(&notify_dir, 0o777);
    let notify = Notify::new(&notify_dir);

    for pre in service("ExecStartPre") {
        let out = as_service(&argv(&pre, &bin, &conf, None), Some((uid, gid)), &run)
            .output()
            .unwrap();
        assert!(out.status.success(), "ExecStartPre={pre}: {out:?}");
    }
    let mut cmd = as_service(
        &argv(&service_one("ExecStart"), &bin, &conf, None),
        Some((uid, gid)),
        &run,
    );
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let crier = Running::spawn(cmd);
    let _ = notify.until("READY=1", Duration::from_secs(20));

    let sock = rundir.join("publish.sock");
    let meta = std::fs::metadata(&sock)
        .unwrap_or_else(|e| panic!("{}: {e}; log: {:?}", sock.display(), crier.log_lines()));
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    assert_eq!((meta.uid(), meta.gid()), (uid, gid), "socket owner");
    let dmeta = std::fs::metadata(&rundir).unwrap();
    assert_eq!(dmeta.mode() & 0o777, dir_mode);

    let sock_s = sock.to_str().unwrap();
    let curl = |groups| {
        as_nobody(
            groups,
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
                sock_s,
                "-X",
                "POST",
                "--data-binary",
                "hello",
                "http://localhost/pub/ops",
            ],
        )
    };
    // A member of the group: 201.
    let out = curl(Some(gid));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "201",
        "member of the group: {out:?}; crier log: {:?}",
        crier.log_lines()
    );
    // Not a member: the connect itself is refused (curl exit 7), and crier's own client
    // says why.
    let out = curl(None);
    assert_eq!(out.status.code(), Some(7), "not a member: {out:?}");
    let bin_s = bin.to_str().unwrap();
    let out = as_nobody(None, &[bin_s, "publish", "--socket", sock_s, "ops", "hi"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    let out = as_nobody(
        Some(gid),
        &[bin_s, "publish", "--socket", sock_s, "ops", "hi"],
    );
    assert!(out.status.success(), "{out:?}");
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(admin: SocketAddr, sample: &str) -> f64 {
    let body = http_get(admin, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in /metrics"))
}

/// Runs the unit's ExecReload= lines as systemd does: in order, stopping at the first that
/// fails, which fails the reload. Returns the failing line's output, if one failed.
fn exec_reload(bin: &Path, conf: &Path, mainpid: u32, runtime_root: &Path) -> Option<Output> {
    let lines = service("ExecReload");
    assert!(!lines.is_empty());
    for line in lines {
        let out = as_service(&argv(&line, bin, conf, Some(mainpid)), None, runtime_root)
            .output()
            .unwrap();
        if !out.status.success() {
            return Some(out);
        }
    }
    None
}

fn small_config(dir: &Path, extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\
         [publish]\nunix = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n{extra}",
        dir.join("pub.sock").display()
    )
}

#[test]
fn reload_with_a_broken_config_fails_and_is_never_signalled() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("crier.toml");
    std::fs::write(&conf, small_config(tmp.path(), "")).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_crier"));
    let mut cmd = as_service(
        &argv(&service_one("ExecStart"), bin, &conf, None),
        None,
        tmp.path(),
    );
    cmd.env("CRIER_LOG", "info");
    let crier = Running::spawn(cmd);
    let admin = crier.addr_after("admin on http://");
    let pid = crier.child.id();

    std::fs::write(&conf, "[channels]\nbuffer_ttl = \"a while\"\n").unwrap();
    let failed = exec_reload(bin, &conf, pid, tmp.path())
        .expect("systemctl reload must fail on a broken config");
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("channels.buffer_ttl"),
        "the reason reaches the journal: {err}"
    );
    // crier never got the SIGHUP: nothing was attempted, nothing failed inside it.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(admin, "crier_config_reloads_total{result=\"error\"}"),
        0.0
    );
    assert_eq!(
        metric(admin, "crier_config_reloads_total{result=\"ok\"}"),
        0.0
    );

    std::fs::write(
        &conf,
        small_config(tmp.path(), "[channels]\nbuffer_messages = 7\n"),
    )
    .unwrap();
    assert!(exec_reload(bin, &conf, pid, tmp.path()).is_none());
    let end = Instant::now() + Duration::from_secs(10);
    while metric(admin, "crier_config_reloads_total{result=\"ok\"}") < 1.0 {
        assert!(Instant::now() < end, "the valid reload never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Accepts connections and never answers: an upstream or webhook endpoint that hangs.
fn hanging_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().map_while(Result::ok) {
            held.push(s);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, accepted)
}

fn wait_count(n: &AtomicUsize, at_least: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while n.load(Ordering::SeqCst) < at_least {
        assert!(
            Instant::now() < end,
            "only {} connections",
            n.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_stop_timeout_covers_the_drain_and_the_webhook_flush() {
    // Measure: with shutdown_timeout = 1s, a proxied request that never gets its answer and a
    // webhook delivery that never completes, SIGTERM to exit takes both deadlines, back to back.
    let (hang, accepted) = hanging_listener();
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("hook.secret");
    std::fs::write(
        &secret,
        "whsec_MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI=",
    )
    .unwrap();
    let conf = tmp.path().join("crier.toml");
    std::fs::write(
        &conf,
        small_config(
            tmp.path(),
            &format!(
                "[upstream]\nurl = \"http://{hang}\"\nresponse_timeout = \"60s\"\n\
                 [[webhook]]\nurl = \"http://{hang}/hook\"\nsecret_file = \"{}\"\n\
                 events = [\"message\"]\ntimeout = \"60s\"\n",
                secret.display()
            ),
        )
        .replace("[server]\n", "[server]\nshutdown_timeout = \"1s\"\n"),
    )
    .unwrap();
    let notify = Notify::new(tmp.path());
    let bin = Path::new(env!("CARGO_BIN_EXE_crier"));
    let mut cmd = as_service(
        &argv(&service_one("ExecStart"), bin, &conf, None),
        None,
        tmp.path(),
    );
    // The watchdog as the unit sets it, only faster: it must keep beating through the drain.
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000");
    let mut crier = Running::spawn(cmd);
    let public = crier.addr_after("listening on http://");
    let publish = crier.addr_after("publish API on http://");
    let _ = notify.until("READY=1", Duration::from_secs(20));

    let mut slow = TcpStream::connect(public).unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
        .unwrap();
    wait_count(&accepted, 1); // the proxied request reached the upstream
    let mut p = TcpStream::connect(publish).unwrap();
    p.write_all(b"POST /pub/orders HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let mut answer = String::new();
    p.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 201") || answer.starts_with("HTTP/1.1 201"),
        "{answer}"
    );
    wait_count(&accepted, 2); // the webhook delivery is under way

    let t0 = Instant::now();
    crier.signal(libc::SIGTERM);
    let status = crier.wait_exit(Duration::from_secs(20));
    let took = t0.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(1900),
        "stop took {took:?}: both deadlines (drain, then webhook flush) should have run"
    );
    assert!(took < Duration::from_millis(3500), "stop took {took:?}");
    let _ = notify.until("STOPPING=1", Duration::from_secs(1));
    let beats = notify.got.try_iter().filter(|m| m == "WATCHDOG=1").count(); // after STOPPING=1
    assert!(beats >= 5, "{beats} watchdog pings during a 2 s drain");

    // So the unit must allow 2 x shutdown_timeout (conf/crier.toml's default), plus a margin.
    let shutdown = timespan(&conf_value("[server]", "shutdown_timeout").expect("default shown"));
    let stop = timespan(&service_one("TimeoutStopSec"));
    assert!(
        stop >= 2 * shutdown + Duration::from_secs(10),
        "TimeoutStopSec={stop:?} < 2 x shutdown_timeout ({shutdown:?}) + 10s"
    );
    let watchdog = timespan(&service_one("WatchdogSec"));
    assert!(watchdog > Duration::ZERO);
}

const README: &str = include_str!("../README.md");

/// The fenced ```lang blocks of the README section `heading`, in order.
fn readme_blocks(heading: &str, lang: &str) -> Vec<String> {
    let start = README
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &README[start + heading.len() + 2..];
    let end = [rest.find("\n## "), rest.find("\n### ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(rest.len());
    let section = &rest[..end];
    let mut out = Vec::new();
    let mut lines = section.lines();
    while let Some(l) = lines.next() {
        if l.trim() == format!("```{lang}") {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            out.push(block.join("\n") + "\n");
        }
    }
    out
}

/// `systemd-analyze verify` of the unit (with the test binary) plus `dropin` as
/// crier.service.d/readme.conf next to it.
fn verify_with_drop_in(dropin: &str) {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("crier.service");
    std::fs::write(&unit, UNIT.replace(UNIT_BIN, env!("CARGO_BIN_EXE_crier"))).unwrap();
    let d = dir.path().join("crier.service.d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("readme.conf"), dropin).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("crier.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "drop-in:\n{dropin}\n{err}"
    );
}

#[test]
fn the_readmes_drop_ins_are_valid_for_the_unit() {
    // The credentials drop-in, as the README gives it.
    let ini = readme_blocks(
        "### TLS keys and other secrets under the dynamic user",
        "ini",
    );
    assert_eq!(ini.len(), 1, "{ini:?}");
    assert!(ini[0].contains("LoadCredential=tls.key:"));
    verify_with_drop_in(&ini[0]);
    // The log level drop-in (shown as comments of `systemctl edit`).
    let sh = readme_blocks("### Logs: journalctl and the log level", "sh");
    let dropin: String = sh
        .iter()
        .flat_map(|b| b.lines())
        .filter_map(|l| l.strip_prefix("#   "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(dropin.contains("Environment=CRIER_LOG=debug"), "{dropin}");
    verify_with_drop_in(&dropin);
    // And verify does read the drop-in: a bad one fails.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("crier.service");
    std::fs::write(&unit, UNIT.replace(UNIT_BIN, env!("CARGO_BIN_EXE_crier"))).unwrap();
    std::fs::create_dir(dir.path().join("crier.service.d")).unwrap();
    std::fs::write(
        dir.path().join("crier.service.d/bad.conf"),
        "[Service]\nLoadCredential=\nTimeoutStopSec=soon\n",
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("crier.service.d/bad.conf:3"),
        "systemd-analyze verify ignored the drop-in: {out:?}"
    );
}

#[test]
fn the_readmes_credential_paths_make_a_valid_config() {
    let toml = readme_blocks(
        "### TLS keys and other secrets under the dynamic user",
        "toml",
    );
    assert_eq!(toml.len(), 1, "{toml:?}");
    // The credentials directory of a system service, here a temp dir with the same files.
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(creds.join("tls.crt"), ck.cert.pem()).unwrap();
    std::fs::write(creds.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["vapid", "generate"])
        .arg(creds.join("vapid.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = toml[0]
        .replace(
            "/run/credentials/crier.service/",
            &format!("{}/", creds.display()),
        )
        .replace("/var/lib/crier/", &format!("{}/", dir.path().display()));
    assert!(!text.contains("/run/credentials"), "{text}");
    let conf = dir.path().join("crier.toml");
    std::fs::write(&conf, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_crier"))
        .arg("check")
        .arg(&conf)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the README's config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
