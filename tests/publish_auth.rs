//! Who may publish: the TCP publish API's bearer token, the Unix socket's group and mode, and
//! the refusal to start on a non-loopback publish address without a token.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;

const TOKEN: &str = "publish-token-0123456789abcdef";

fn token_file(dir: &Path) -> PathBuf {
    let p = dir.join("publish.token");
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    p
}

async fn start_with_token() -> (Crier, tempfile::TempDir) {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let f = token_file(dir.path());
    let c = Crier::start(
        &up.url(),
        &format!("[publish]\ntoken_file = \"{}\"\n", f.display()),
    )
    .await;
    (c, dir)
}

async fn send(
    c: &Crier,
    method: reqwest::Method,
    channel: &str,
    auth: Option<&str>,
) -> (StatusCode, reqwest::header::HeaderMap, serde_json::Value) {
    let mut req = client().request(method, c.pub_url(channel)).body("hi");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.send().await.expect("publish request");
    let status = r.status();
    let h = r.headers().clone();
    (status, h, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn tcp_publish_needs_the_token_and_the_unix_socket_does_not() {
    let (c, _dir) = start_with_token().await;
    let bearer = format!("Bearer {TOKEN}");
    let post = reqwest::Method::POST;

    let (s, h, v) = send(&c, post.clone(), "news", None).await;
    assert_eq!(s, 401);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["www-authenticate"], "Bearer realm=\"crier-publish\"");
    assert!(v["error"].as_str().unwrap().contains("Bearer"), "{v}");
    for wrong in [
        "Bearer wrong-token-0123456789abcdef".to_string(),
        format!("Bearer {TOKEN}x"),
        format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
        format!("Basic {TOKEN}"),
        TOKEN.to_string(),
        "Bearer ".to_string(),
    ] {
        let (s, _, v) = send(&c, post.clone(), "news", Some(&wrong)).await;
        assert_eq!(s, 401, "{wrong:?}: {v}");
    }
    assert_eq!(channel_info(&c, "news").await.0, 401, "reads need it too");
    let (s, _, _) = send(&c, reqwest::Method::DELETE, "news", None).await;
    assert_eq!(s, 401, "and deletes");

    let (s, _, v) = send(&c, post.clone(), "news", Some(&bearer)).await;
    assert_eq!(s, 201, "{v}");
    let (s, _, v) = send(
        &c,
        reqwest::Method::GET,
        "news",
        Some(&format!("bearer {TOKEN}")),
    )
    .await;
    assert_eq!(s, 200, "the scheme is case-insensitive: {v}");
    assert_eq!(v["published"], 1);

    // The Unix socket: its file permissions guard it, no token.
    let req = http::Request::post("/pub/news")
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(b"via unix")))
        .unwrap();
    let (s, body) = unix_request(&c.publish_unix, req).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(
        metric(
            &c,
            "crier_auth_checks_total{method=\"publish_token\",result=\"deny\"}"
        )
        .await,
        Some(9.0)
    );
    c.shutdown().await;
}

#[test]
fn a_non_loopback_publish_address_needs_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = token_file(dir.path());
    let check = |publish: &str| {
        let text = format!("[publish]\nunix = \"\"\n{publish}");
        crier::keys::load_str(&text, Some(Path::new("c.toml"))).map_err(|e| e.to_string())
    };
    let e = check("listen = [\"127.0.0.1:8081\", \"0.0.0.0:8081\"]\n").unwrap_err();
    assert!(
        e.starts_with("c.toml:3:29: publish.listen: 0.0.0.0:8081 is not a loopback address"),
        "{e}"
    );
    assert!(e.contains("publish.token_file"), "{e}");
    let e = check("listen = [\"192.0.2.10:8081\"]\n").unwrap_err();
    assert!(e.contains("publish.listen: 192.0.2.10:8081"), "{e}");
    let e = check("listen = [\"[::]:8081\"]\n").unwrap_err();
    assert!(e.contains("[::]:8081 is not a loopback"), "{e}");
    check("listen = [\"127.0.0.1:8081\", \"[::1]:8081\", \"127.9.9.9:1\"]\n").unwrap();
    let with_token = format!(
        "listen = [\"0.0.0.0:8081\"]\ntoken_file = \"{}\"\n",
        f.display()
    );
    let (_, keys) = check(&with_token).unwrap();
    assert!(keys.publish_token.is_some());

    // crier refuses to start on it (EX_USAGE), and says why.
    let conf = dir.path().join("crier.toml");
    std::fs::write(&conf, "[publish]\nlisten = [\"0.0.0.0:0\"]\n").unwrap();
    let out = process::run_cli(&["run", "--config", conf.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("crier.toml:2:11: publish.listen"), "{err}");
}

#[test]
fn token_file_problems_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let check = |file: &Path| {
        let text = format!("[publish]\ntoken_file = \"{}\"\n", file.display());
        crier::keys::load_str(&text, Some(Path::new("c.toml")))
            .unwrap_err()
            .to_string()
    };
    let missing = dir.path().join("missing.token");
    let e = check(&missing);
    assert!(
        e.starts_with("c.toml:2:14: publish.token_file: cannot read"),
        "{e}"
    );
    assert!(e.contains("missing.token"), "{e}");
    let short = dir.path().join("short.token");
    std::fs::write(&short, "abc\n").unwrap();
    assert!(check(&short).contains("at least 16 characters"));
    let spaced = dir.path().join("spaced.token");
    std::fs::write(&spaced, "a token with spaces in it\n").unwrap();
    assert!(check(&spaced).contains("visible ASCII"));
}

/// The name of a group the socket can be given: another one than ours when we are root (so
/// the change shows), else our own.
fn some_group() -> (String, u32) {
    // SAFETY: getegid/geteuid cannot fail; getgrgid returns a pointer into static storage
    // that we copy out of at once (tests in this file do not call it concurrently).
    unsafe {
        let gid = if libc::geteuid() == 0 {
            let g = libc::getgrnam(c"daemon".as_ptr());
            if g.is_null() {
                libc::getegid()
            } else {
                (*g).gr_gid
            }
        } else {
            libc::getegid()
        };
        let g = libc::getgrgid(gid);
        assert!(!g.is_null(), "our group has a name");
        let name = std::ffi::CStr::from_ptr((*g).gr_name)
            .to_string_lossy()
            .into_owned();
        (name, gid)
    }
}

#[tokio::test]
async fn unix_group_and_mode_are_set_on_the_socket() {
    let up = Upstream::start().await;
    let (name, gid) = some_group();
    let c = Crier::start(
        &up.url(),
        &format!("[publish]\nunix_mode = \"0620\"\nunix_group = \"{name}\"\n"),
    )
    .await;
    let meta = std::fs::metadata(&c.publish_unix).unwrap();
    assert_eq!(meta.gid(), gid, "group {name}");
    assert_eq!(meta.permissions().mode() & 0o777, 0o620);
    // SIGHUP: the socket stays open and takes the new mode.
    let toml = base_config(
        &up.url(),
        &c.publish_unix,
        "[publish]\nunix_mode = \"0600\"\n",
    );
    c.handle
        .reload(crier::Config::from_toml(&toml, None).unwrap())
        .unwrap();
    let meta = std::fs::metadata(&c.publish_unix).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    c.shutdown().await;

    let e = crier::Config::from_toml(
        "[publish]\nunix_group = \"no-such-group-crier\"\n",
        Some(Path::new("c.toml")),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("c.toml:2:14: publish.unix_group: unknown group \"no-such-group-crier\""),
        "{e}"
    );
    let c =
        crier::Config::from_toml(&format!("[publish]\nunix_group = \"{gid}\"\n"), None).unwrap();
    assert_eq!(c.publish.unix_group.unwrap().gid, gid, "a numeric gid");
}

/// Runs `crier publish ...` off the runtime (the server under test runs on it).
async fn crier_publish(args: Vec<String>, env_token: Option<&'static str>) -> Output {
    let cwd = tempfile::tempdir().unwrap();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
        cmd.args(&args)
            .current_dir(cwd.path())
            .env_remove("CRIER_PUBLISH_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = env_token {
            cmd.env("CRIER_PUBLISH_TOKEN", t);
        }
        cmd.output().expect("run crier")
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn crier_publish_sends_the_token() {
    let (c, dir) = start_with_token().await;
    let url = format!("http://{}", c.publish);
    let file = dir.path().join("publish.token").display().to_string();
    let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let out = crier_publish(a(&["publish", "--url", &url, "t", "no token"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Bearer"),
        "{out:?}"
    );

    let out = crier_publish(
        a(&[
            "publish",
            "--url",
            &url,
            "--token-file",
            &file,
            "t",
            "with file",
        ]),
        None,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = crier_publish(a(&["publish", "--url", &url, "t", "with env"]), Some(TOKEN)).await;
    assert!(out.status.success(), "{out:?}");
    let out = crier_publish(
        a(&["publish", "--url", &url, "t", "wrong env"]),
        Some("not-the-token-0000000000"),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // No flag and no env: the config's publish.token_file, for the config's TCP listener.
    let conf = dir.path().join("client.toml");
    std::fs::write(
        &conf,
        format!(
            "[publish]\nunix = \"\"\nlisten = [\"{}\"]\ntoken_file = \"publish.token\"\n",
            c.publish
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    let out = crier_publish(a(&["--config", &conf, "publish", "t", "from config"]), None).await;
    assert!(out.status.success(), "{out:?}");

    let out = crier_publish(
        a(&[
            "publish",
            "--url",
            &url,
            "--token-file",
            "/no/such/file",
            "t",
            "x",
        ]),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/no/such/file"),
        "{out:?}"
    );
    let (_, v) = channel_info_with_token(&c, "t").await;
    assert_eq!(v["published"], 3);
    c.shutdown().await;
}

async fn channel_info_with_token(c: &Crier, channel: &str) -> (StatusCode, serde_json::Value) {
    let r = client()
        .get(c.pub_url(channel))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}
