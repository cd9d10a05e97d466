//! The `crier` command: `run` (default), `check`, `publish`, `demo`.

mod logging;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use crier::config::UpstreamAddr;
use crier::keys::Keys;
use crier::publish::{client_request, Target};
use crier::{sd_notify, Config, Server};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "crier",
    version,
    about = "A push sidecar: reverse proxy for your app, plus WebSocket, SSE and long-poll \
             subscribers fed by a local publish socket."
)]
struct Cli {
    /// Config file. Default: conf/crier.toml, else /etc/crier/crier.toml, else built-in defaults.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Log line format on stderr. The level comes from CRIER_LOG (e.g. CRIER_LOG=debug).
    /// Text has colour only on a terminal without NO_COLOR; on the journal each line carries
    /// its syslog priority.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Run,
    /// Validate a config file: exit 0, or print every error and exit 1.
    Check {
        /// The file to check (the same as --config FILE; default: as for run).
        #[arg(conflicts_with = "config", value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Publish a message to a channel through the publish API and print the JSON answer.
    Publish {
        /// Unix socket of the publish API (default: the config's publish.unix, or
        /// /run/crier/publish.sock, where the systemd unit puts it, when that one is absent).
        #[arg(long, conflicts_with = "url")]
        socket: Option<PathBuf>,
        /// TCP publish API, e.g. http://127.0.0.1:8081
        #[arg(long)]
        url: Option<String>,
        /// SSE event name for the message.
        #[arg(long)]
        event: Option<String>,
        /// File holding the publish token (publish.token_file), sent as Authorization: Bearer.
        /// Default: $CRIER_PUBLISH_TOKEN, else (for a TCP URL) the config's publish.token_file.
        #[arg(long)]
        token_file: Option<PathBuf>,
        channel: String,
        /// The message; read from stdin when absent.
        message: Option<String>,
    },
    /// Try crier in one command: run it in front of a built-in demo app whose page shows the
    /// messages published to the channel "demo" as they arrive. Prints what to open and run.
    Demo,
    /// Web Push (VAPID) keys.
    Vapid {
        #[command(subcommand)]
        action: VapidAction,
    },
}

#[derive(Subcommand)]
enum VapidAction {
    /// Write a new P-256 private key (PEM, mode 0600) for webpush.vapid_key_file and print
    /// its public key. Never overwrites a file.
    Generate { path: PathBuf },
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    logging::init(match cli.log_format {
        LogFormat::Text => logging::Format::Text,
        LogFormat::Json => logging::Format::Json,
    });
    if let Some(Command::Check { file: Some(f) }) = &mut cli.command {
        cli.config = Some(std::mem::take(f));
    }
    let path = cli.config.clone().or_else(Config::default_path);
    // The config alone (`crier publish` needs no keys, and may not be allowed to read them).
    let load = || match &path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    };
    // The config and the key files it names, checked together.
    let load_all = || match &path {
        Some(p) => crier::keys::load_file(p),
        None => {
            let c = Config::default();
            Keys::load(&c).map(|k| (c, k))
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { .. } => match load_all() {
            Ok((config, _)) => {
                let name = path.map_or("built-in defaults".into(), |p| p.display().to_string());
                println!("{name}: ok");
                for note in config.ownership_notes() {
                    println!("note: {note}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        command @ (Command::Run | Command::Demo) => {
            let (config, keys) = match load_all() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!("crier: invalid config; not starting");
                    return ExitCode::from(64);
                }
            };
            if matches!(command, Command::Demo) {
                demo(config, cli.config.as_deref())
            } else {
                run(config, keys, None)
            }
        }
        Command::Vapid {
            action: VapidAction::Generate { path },
        } => match crier::keys::VapidKey::generate(&path) {
            Ok(k) => {
                println!("wrote {} (mode 0600)", path.display());
                println!("public key (applicationServerKey): {}", k.public_key_b64());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("crier: {e}");
                ExitCode::from(1)
            }
        },
        Command::Publish {
            socket,
            url,
            event,
            token_file,
            channel,
            message,
        } => {
            let target = match (socket, url) {
                (Some(s), _) => Target::Socket(s),
                (None, Some(u)) => Target::Url(u),
                (None, None) => match load() {
                    Ok(c) => match (&c.publish.unix, c.publish.listen.first()) {
                        (Some(s), _) => Target::Socket(installed_socket(s, Path::new(UNIT_SOCKET))),
                        (None, Some(a)) => Target::Url(format!("http://{a}")),
                        (None, None) => {
                            eprintln!(
                                "crier: the config has no publish socket; pass --socket or --url"
                            );
                            return ExitCode::from(1);
                        }
                    },
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(1);
                    }
                },
            };
            let token = match publish_token(token_file, &target, || {
                load()
                    .ok()
                    .and_then(|c| c.publish.token_file.map(|f| f.path))
            }) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("crier: {e}");
                    return ExitCode::from(1);
                }
            };
            publish(target, event, token, channel, message)
        }
    }
}

/// Where the systemd unit puts the socket (`RuntimeDirectory=crier` under `/run`).
const UNIT_SOCKET: &str = "/run/crier/publish.sock";

/// The config's socket, or the unit's when that one is not there: the default socket lives
/// under `$XDG_RUNTIME_DIR`, which differs between the service and the app's user running
/// `crier publish`, so the same config names two paths.
fn installed_socket(configured: &Path, unit: &Path) -> PathBuf {
    if !configured.exists() && unit.exists() {
        return unit.to_path_buf();
    }
    configured.to_path_buf()
}

fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if worker_threads > 0 {
        b.worker_threads(worker_threads);
    }
    b.build()
}

/// The demo app `crier demo` puts behind crier, and what to tell the user once it runs.
struct Demo {
    app: std::net::TcpListener,
    publish_command: String,
}

fn demo(mut config: Config, config_arg: Option<&std::path::Path>) -> ExitCode {
    let app = match std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("crier demo: cannot listen for the demo app on 127.0.0.1: {e}");
            return ExitCode::from(1);
        }
    };
    let app_addr = match app.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("crier demo: {e}");
            return ExitCode::from(1);
        }
    };
    config.upstream.url = UpstreamAddr::Http {
        authority: app_addr.to_string(),
    };
    // SIGHUP would re-read the file and point the proxy back at the real upstream.
    config.source = None;
    // "Notify me" on the page needs Web Push: a throwaway key and store unless configured.
    let webpush_dir = match config.webpush {
        Some(_) => None,
        None => {
            let dir = std::env::temp_dir().join(format!("crier-demo-{}", std::process::id()));
            // 0700 and never an existing path (the name is guessable; /tmp is shared).
            let made =
                std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                    .create(&dir)
                    .map_err(|e| e.to_string())
                    .and_then(|()| crier::demo::webpush_config(&dir).map_err(|e| e.to_string()));
            match made {
                Ok(w) => config.webpush = Some(w),
                Err(e) => eprintln!("crier demo: Web Push stays off ({}: {e})", dir.display()),
            }
            Some(dir)
        }
    };
    crier::demo::enable_webrtc(&mut config);
    crier::demo::enable_chat(&mut config);
    let bin = std::env::args()
        .next()
        .filter(|a| a.contains('/'))
        .unwrap_or_else(|| "crier".into());
    let mut cmd = shell_word(&bin);
    if let Some(c) = config_arg {
        cmd.push_str(" --config ");
        cmd.push_str(&shell_word(&c.display().to_string()));
    }
    cmd.push_str(&format!(" publish {} \"hello\"", crier::demo::CHANNEL));
    // The demo changed the config (Web Push, WebRTC): read its keys again.
    let keys = match Keys::load(&config) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    };
    let code = run(
        config,
        keys,
        Some(Demo {
            app,
            publish_command: cmd,
        }),
    );
    if let Some(dir) = webpush_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    code
}

/// `s`, single-quoted when the shell would otherwise split or expand it.
fn shell_word(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@%,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn print_demo_help(a: &crier::Addrs, publish_command: &str) {
    let page = match (a.public.first(), a.public_tls.first()) {
        (Some(p), _) => format!("http://{p}/"),
        (None, Some(p)) => format!("https://{p}/"),
        (None, None) => {
            println!(
                "crier demo: the config has no public listener ([server] listen); nothing to open"
            );
            return;
        }
    };
    println!();
    println!("crier demo is running: a built-in demo app behind crier.");
    println!();
    println!("  1. open      {page}");
    if a.publish_unix.is_some() || !a.publish.is_empty() {
        println!("  2. publish   {publish_command}");
    } else {
        println!("  2. publish   (the config has no publish API: set [publish] unix or listen)");
    }
    if let Some(p) = a.publish.first() {
        println!(
            "     or        curl -X POST --data-binary 'hello' http://{p}/pub/{}",
            crier::demo::CHANNEL
        );
    }
    if let Some(s) = &a.admin {
        println!("  status page  http://{s}/");
    }
    println!();
    println!("Messages appear on the page as you publish them. Ctrl-C stops.");
}

fn run(config: Config, keys: Keys, demo: Option<Demo>) -> ExitCode {
    raise_fd_limit();
    let rt = match runtime(config.server.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crier: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let source = config.source.clone();
        // Before anything can report readiness: a SIGHUP or SIGTERM that arrives between
        // "ready" and the handlers would otherwise kill the process.
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            eprintln!("crier: cannot install signal handlers");
            return ExitCode::from(1);
        };
        let server = match Server::bind_with_keys(config, keys).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("crier: {e}");
                return ExitCode::from(1);
            }
        };
        let a = server.addrs().clone();
        // One line that says what runs, from where, on what (the lines below give each
        // listener again, for scripts that wait for one of them).
        let mut on: Vec<String> = a.public.iter().map(|l| format!("http://{l}")).collect();
        on.extend(a.public_tls.iter().map(|l| format!("https://{l}")));
        on.extend(a.publish.iter().map(|l| format!("publish http://{l}")));
        on.extend(
            a.publish_unix
                .iter()
                .map(|p| format!("publish unix:{}", p.display())),
        );
        on.extend(a.admin.iter().map(|l| format!("admin http://{l}")));
        on.extend(a.webrtc.iter().map(|l| format!("webrtc udp://{l}")));
        tracing::info!(
            "crier {} starting; config {}; listeners {}",
            env!("CARGO_PKG_VERSION"),
            source
                .as_ref()
                .map_or("(built-in defaults)".to_string(), |p| p
                    .display()
                    .to_string()),
            on.join(", ")
        );
        for l in &a.public {
            tracing::info!("listening on http://{l} (public)");
        }
        for l in &a.public_tls {
            tracing::info!("listening on https://{l} (public, TLS)");
        }
        for l in &a.publish {
            tracing::info!("publish API on http://{l}");
        }
        if let Some(p) = &a.publish_unix {
            tracing::info!("publish API on unix:{}", p.display());
        }
        if let Some(l) = &a.admin {
            tracing::info!("admin on http://{l} (/metrics /healthz /readyz /channels)");
        }
        if let Some(l) = &a.webrtc {
            tracing::info!("webrtc on udp://{l} (ICE-lite)");
        }
        if let Some(d) = demo {
            match tokio::net::TcpListener::from_std(d.app) {
                Ok(l) => {
                    tokio::spawn(crier::demo::serve_app(l));
                }
                Err(e) => {
                    eprintln!("crier demo: {e}");
                    return ExitCode::from(1);
                }
            }
            print_demo_help(&a, &d.publish_command);
        }
        let handle = server.handle();
        let running = tokio::spawn(server.run());
        sd_notify::notify("READY=1");
        if let Some(every) = sd_notify::watchdog_interval() {
            tokio::spawn(async move {
                let mut t = tokio::time::interval(every);
                loop {
                    t.tick().await;
                    sd_notify::notify("WATCHDOG=1");
                }
            });
        }
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    sd_notify::reloading();
                    reload(&handle, source.as_deref());
                    sd_notify::notify("READY=1");
                }
            }
        }
        sd_notify::notify("STOPPING=1");
        handle.shutdown();
        let _ = running.await;
        ExitCode::SUCCESS
    })
}

fn reload(handle: &crier::ServerHandle, source: Option<&std::path::Path>) {
    let Some(path) = source else {
        tracing::info!("SIGHUP: no config file to re-read (built-in defaults or crier demo)");
        return;
    };
    match crier::keys::load_file(path)
        .map_err(|e| e.to_string())
        .and_then(|(c, k)| handle.reload_with_keys(c, k).map_err(|e| e.to_string()))
    {
        Ok(()) => {
            handle.metrics().config_reloads_ok.inc();
            tracing::info!("config reloaded from {}", path.display());
        }
        Err(e) => {
            handle.metrics().config_reloads_error.inc();
            tracing::error!("config reload failed; keeping the running config:\n{e}");
        }
    }
}

/// The token `crier publish` sends: `--token-file`, else `CRIER_PUBLISH_TOKEN`, else (TCP
/// only) the config's `publish.token_file` when this user can read it.
fn publish_token(
    token_file: Option<PathBuf>,
    target: &Target,
    config_token_file: impl FnOnce() -> Option<PathBuf>,
) -> Result<Option<String>, String> {
    let read = |p: &std::path::Path| {
        crier::keys::read_secret_file(p).map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    if let Some(p) = token_file {
        return read(&p).map(Some);
    }
    if let Some(t) = std::env::var("CRIER_PUBLISH_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Ok(Some(t.trim().to_string()));
    }
    if matches!(target, Target::Url(_)) {
        if let Some(p) = config_token_file() {
            return Ok(read(&p).ok());
        }
    }
    Ok(None)
}

fn publish(
    target: Target,
    event: Option<String>,
    token: Option<String>,
    channel: String,
    message: Option<String>,
) -> ExitCode {
    let body = match message {
        Some(m) => Bytes::from(m),
        None => {
            let mut buf = Vec::new();
            if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf) {
                eprintln!("crier: cannot read stdin: {e}");
                return ExitCode::from(1);
            }
            Bytes::from(buf)
        }
    };
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crier: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(client_request(
        &target,
        http::Method::POST,
        &channel,
        event.as_deref(),
        token.as_deref(),
        body,
    ));
    match r {
        Ok((status, text)) => {
            println!("{}", text.trim_end());
            if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("crier: {e}");
            ExitCode::from(1)
        }
    }
}

/// Subscribers are connections: lift the soft open-files limit to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_falls_back_to_the_units_socket_only_when_the_configured_one_is_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let configured = dir.path().join("user/crier/publish.sock");
        let unit = dir.path().join("run/crier/publish.sock");
        assert_eq!(
            installed_socket(&configured, &unit),
            configured,
            "neither exists"
        );
        std::fs::create_dir_all(unit.parent().expect("parent")).expect("mkdir");
        std::fs::write(&unit, b"").expect("touch");
        assert_eq!(
            installed_socket(&configured, &unit),
            unit,
            "only the unit's"
        );
        std::fs::create_dir_all(configured.parent().expect("parent")).expect("mkdir");
        std::fs::write(&configured, b"").expect("touch");
        assert_eq!(
            installed_socket(&configured, &unit),
            configured,
            "both: the config wins"
        );
    }
}
