//! The CLI and config errors, through the built binary: `--version`, `--help`, `crier check`
//! exit codes and messages (file:line:col, the key, what is wrong), the default config path,
//! and a bad config refusing to start.

mod common;

use std::path::Path;

use common::process::run_cli;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes `text` as `name` in `dir` and returns its path as a string.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn version_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let v = run_cli(&["--version"], dir.path());
    assert!(v.status.success());
    assert_eq!(
        stdout(&v).trim(),
        format!("crier {}", env!("CARGO_PKG_VERSION"))
    );

    let h = run_cli(&["--help"], dir.path());
    assert!(h.status.success());
    let help = stdout(&h);
    for word in [
        "check",
        "run",
        "publish",
        "--config",
        "--log-format",
        "CRIER_LOG",
        "--version",
    ] {
        assert!(
            help.contains(word),
            "--help does not mention {word}:\n{help}"
        );
    }

    let bad = run_cli(&["--no-such-flag"], dir.path());
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

#[test]
fn check_accepts_valid_files() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "good.toml",
        "[server]\nlisten = [\"127.0.0.1:8080\", \"[::1]:8080\"]\nheader_timeout = \"250ms\"\n\
         max_header_size = \"32KiB\"\nmax_connections = 10\n\
         [upstream]\nurl = \"unix:/run/app.sock\"\nconnect_timeout = \"2s\"\nresponse_timeout = \"10m\"\n",
    );
    let o = run_cli(&["check", "--config", &f], dir.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), format!("{f}: ok"));

    // The global flag may come before the subcommand too.
    let o = run_cli(&["--config", &f, "check"], dir.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // The shipped example (every key with its default) is valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/crier.toml");
    let o = run_cli(&["check", "--config", example], dir.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// Each kind of bad value: exit 1 and one line `file:line:col: key: reason`.
#[test]
fn check_rejects_each_kind_of_error_with_position_and_key() {
    let dir = tempfile::tempdir().unwrap();
    // (file name, contents, expected `line:col: key`, a word of the reason)
    let cases = [
        (
            "unknown_key.toml",
            "[server]\nlisten = [\"127.0.0.1:8080\"]\nlisen = [\"127.0.0.1:8081\"]\n",
            "3:1: server.lisen",
            "unknown key",
        ),
        (
            "unknown_section.toml",
            "[sever]\nlisten = []\n",
            "1:2: sever",
            "unknown key",
        ),
        (
            "wrong_type.toml",
            "[upstream]\nconnect_timeout = 5\n",
            "2:19: upstream.connect_timeout",
            "invalid type",
        ),
        (
            "wrong_type_list.toml",
            "[server]\nlisten = \"127.0.0.1:8080\"\n",
            "2:10: server.listen",
            "expected an array",
        ),
        (
            "port.toml",
            "[server]\nlisten = [\"127.0.0.1:70000\"]\n",
            "2:11: server.listen",
            "70000",
        ),
        (
            "negative_timeout.toml",
            "[upstream]\nresponse_timeout = \"-5s\"\n",
            "2:20: upstream.response_timeout",
            "negative",
        ),
        (
            "zero_timeout.toml",
            "[server]\nheader_timeout = \"0s\"\n",
            "2:18: server.header_timeout",
            "greater than zero",
        ),
        (
            "bad_duration.toml",
            "[upstream]\nconnect_timeout = \"2 fortnights\"\n",
            "2:19: upstream.connect_timeout",
            "unit",
        ),
        (
            "empty_listen.toml",
            "[server]\nlisten = []\n",
            "2:10: server.listen",
            "at least one",
        ),
        (
            "bad_size.toml",
            "[server]\nmax_header_size = \"lots\"\n",
            "2:19: server.max_header_size",
            "not a size",
        ),
        (
            "small_size.toml",
            "[server]\nmax_header_size = \"1KiB\"\n",
            "2:19: server.max_header_size",
            "at least 8KiB",
        ),
        (
            "bad_upstream.toml",
            "[upstream]\nurl = \"https://app.example\"\n",
            "2:7: upstream.url",
            "http://host:port",
        ),
        (
            "zero_buffer.toml",
            "[channels]\nbuffer_messages = 0\n",
            "2:19: channels.buffer_messages",
            "out of range (1..=",
        ),
        (
            "unit_list.toml",
            "[channels]\nmax_message_size = \"16 kb\"\n",
            "2:20: channels.max_message_size",
            "(B, KiB, MiB, GiB, or KB, kB, MB, GB",
        ),
        (
            "placeholder_typo.toml",
            "[[push]]\npath = \"/live/{chanel}\"\n",
            "2:8: push.path",
            "unknown placeholder {chanel}",
        ),
        (
            "push_not_array.toml",
            "[push]\npath = \"/live/{channel}\"\n",
            "1:1: push",
            "write [[push]]",
        ),
        (
            "syntax.toml",
            "[server]\nlisten = [\"127.0.0.1:8080\"\n",
            "2:",
            "]",
        ),
    ];
    for (name, text, at, reason) in cases {
        let f = write(dir.path(), name, text);
        let o = run_cli(&["check", "--config", &f], dir.path());
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{name}: one error, one line:\n{err}"
        );
        assert!(
            err.starts_with(&format!("{f}:{at}")),
            "{name}: expected {f}:{at}…, got:\n{err}"
        );
        assert!(
            err.contains(reason),
            "{name}: expected {reason:?} in:\n{err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(stdout(&o).is_empty(), "{name}: {}", stdout(&o));
    }
}

/// Every problem of a file in one run, in file order, whatever its kind.
#[test]
fn check_reports_every_error_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "many.toml",
        "[server]\n\
         listen = [\"127.0.0.1:70000\"]\n\
         max_connections = \"lots\"\n\
         max_header_size = \"big\"\n\
         color = \"blue\"\n\
         [upstream]\n\
         connect_timeout = \"-1s\"\n\
         response_timeout = 30\n",
    );
    let o = run_cli(&["check", "--config", &f], dir.path());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    let expected = [
        "2:11: server.listen",
        "3:19: server.max_connections",
        "4:19: server.max_header_size",
        "5:1: server.color",
        "7:19: upstream.connect_timeout",
        "8:20: upstream.response_timeout",
    ];
    assert_eq!(lines.len(), expected.len(), "{err}");
    for (line, at) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(&format!("{f}:{at}: ")),
            "expected {at} in {line:?}\n{err}"
        );
    }
}

#[test]
fn check_of_a_missing_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_cli(&["check", "--config", "nope.toml"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("nope.toml") && err.contains("cannot read"),
        "{err}"
    );
}

/// No `--config` and no `conf/crier.toml`: the built-in defaults, which are valid.
#[test]
fn check_without_a_file_uses_the_builtin_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_cli(&["check"], dir.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let expected = if Path::new("/etc/crier/crier.toml").is_file() {
        "/etc/crier/crier.toml: ok"
    } else {
        "built-in defaults: ok"
    };
    assert_eq!(stdout(&o).trim(), expected);
}

/// Without `--config`, `conf/crier.toml` in the working directory is the config.
#[test]
fn check_finds_conf_crier_toml_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    write(
        &dir.path().join("conf"),
        "crier.toml",
        "[server]\nlisten = []\n",
    );
    let o = run_cli(&["check"], dir.path());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("conf/crier.toml:2:10: server.listen"),
        "{err}"
    );
}

/// `crier --config bad.toml` (run) refuses to start and says why; nothing is bound.
#[test]
fn run_with_a_bad_config_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "bad.toml",
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[upstream]\nresponse_timeout = \"-5s\"\n",
    );
    let o = run_cli(&["--config", &f], dir.path());
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "crier started with a bad config:\n{err}"
    );
    assert!(o.status.code().is_some(), "crier died by a signal:\n{err}");
    assert!(
        err.contains(&format!("{f}:4:20: upstream.response_timeout")),
        "{err}"
    );
    assert!(!err.contains("listening on"), "{err}");

    let o = run_cli(&["run", "--config", &f], dir.path());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("upstream.response_timeout"),
        "{}",
        stderr(&o)
    );

    let o = run_cli(&["--config", "missing.toml"], dir.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.toml"), "{}", stderr(&o));
}
