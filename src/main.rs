//! The `crier` command: `run` (default), `check`, `publish`.

use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
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
    Check,
    /// Publish a message to a channel through the publish API and print the JSON answer.
    Publish {
        /// Unix socket of the publish API (default: the config's publish.unix).
        #[arg(long, conflicts_with = "url")]
        socket: Option<PathBuf>,
        /// TCP publish API, e.g. http://127.0.0.1:8081
        #[arg(long)]
        url: Option<String>,
        /// SSE event name for the message.
        #[arg(long)]
        event: Option<String>,
        channel: String,
        /// The message; read from stdin when absent.
        message: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let path = cli.config.clone().or_else(Config::default_path);
    let load = || match &path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => match load() {
            Ok(_) => {
                let name = path.map_or("built-in defaults".into(), |p| p.display().to_string());
                println!("{name}: ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Run => {
            let config = match load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!("crier: invalid config; not starting");
                    return ExitCode::from(64);
                }
            };
            run(config)
        }
        Command::Publish {
            socket,
            url,
            event,
            channel,
            message,
        } => {
            let target = match (socket, url) {
                (Some(s), _) => Target::Socket(s),
                (None, Some(u)) => Target::Url(u),
                (None, None) => {
                    match load() {
                        Ok(c) => match (&c.publish.unix, c.publish.listen.first()) {
                            (Some(s), _) => Target::Socket(s.clone()),
                            (None, Some(a)) => Target::Url(format!("http://{a}")),
                            (None, None) => {
                                eprintln!("crier: the config has no publish socket; pass --socket or --url");
                                return ExitCode::from(1);
                            }
                        },
                        Err(e) => {
                            eprintln!("{e}");
                            return ExitCode::from(1);
                        }
                    }
                }
            };
            publish(target, event, channel, message)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRIER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if worker_threads > 0 {
        b.worker_threads(worker_threads);
    }
    b.build()
}

fn run(config: Config) -> ExitCode {
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
        let server = match Server::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("crier: {e}");
                return ExitCode::from(1);
            }
        };
        let a = server.addrs().clone();
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
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            eprintln!("crier: cannot install signal handlers");
            return ExitCode::from(1);
        };
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
        tracing::info!("SIGHUP: running on built-in defaults; nothing to reload");
        return;
    };
    match Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|c| handle.reload(c).map_err(|e| e.to_string()))
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

fn publish(
    target: Target,
    event: Option<String>,
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
