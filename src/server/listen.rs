//! Listeners: which ones a config asks for, binding them (each failure its own clear error),
//! their accept loops, and what reload opens and closes.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio_util::sync::CancellationToken;

use super::{accept, Addrs, StartError, State};
use crate::config::{Config, PublishConfig};

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Public,
    PublicTls,
    /// The publish API on TCP: a bearer token when `publish.token_file` is set.
    Publish,
    /// The publish API on the Unix socket: its file mode and group guard it.
    PublishUnix,
    Admin,
}

impl Kind {
    pub(super) fn key(self) -> &'static str {
        match self {
            Kind::Public => "server.listen",
            Kind::PublicTls => "server.tls.listen",
            Kind::Publish => "publish.listen",
            Kind::PublishUnix => "publish.unix",
            Kind::Admin => "admin.listen",
        }
    }
}

/// A listener as configured: reload compares these to decide what to open and close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ListenKey {
    Tcp(Kind, SocketAddr),
    Unix(PathBuf),
}

pub(super) enum Bound {
    Tcp(TcpListener),
    /// A public listener with event loops: one socket per loop on the same address
    /// (`SO_REUSEPORT`), the first one's port for all.
    Loops(Vec<TcpListener>),
    Unix(UnixListener),
}

impl Bound {
    pub(super) fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok(),
            Bound::Loops(ls) => ls.first().and_then(|l| l.local_addr().ok()),
            Bound::Unix(_) => None,
        }
    }
}

/// An open listener: its accept loop stops when `stop` is cancelled.
pub(super) struct Listening {
    pub(super) key: ListenKey,
    pub(super) local: Option<SocketAddr>,
    pub(super) stop: CancellationToken,
    /// Bound at start and not accepting yet: `Server::run` starts it. Kept with its key so
    /// that a reload before `run` closes the socket it means (dropped with the entry).
    pub(super) idle: Option<Bound>,
}

pub(super) fn listen_keys(c: &Config) -> Vec<ListenKey> {
    let mut keys: Vec<ListenKey> = c
        .server
        .listen
        .iter()
        .map(|a| ListenKey::Tcp(Kind::Public, *a))
        .collect();
    if let Some(t) = &c.server.tls {
        keys.extend(t.listen.iter().map(|a| ListenKey::Tcp(Kind::PublicTls, *a)));
    }
    keys.extend(
        c.publish
            .listen
            .iter()
            .map(|a| ListenKey::Tcp(Kind::Publish, *a)),
    );
    if let Some(p) = &c.publish.unix {
        keys.push(ListenKey::Unix(p.clone()));
    }
    if let Some(a) = c.admin.listen {
        keys.push(ListenKey::Tcp(Kind::Admin, a));
    }
    keys
}

/// Binds every key (a public one once per event loop, `loops` of them); on the first error
/// the ones already bound are dropped (closed).
pub(super) fn bind_keys<'a>(
    keys: impl Iterator<Item = &'a ListenKey>,
    publish: &PublishConfig,
    loops: usize,
) -> Result<Vec<(ListenKey, Bound)>, StartError> {
    keys.map(|k| {
        let b = match k {
            ListenKey::Tcp(kind @ (Kind::Public | Kind::PublicTls), addr) if loops > 0 => {
                Bound::Loops(bind_group(*addr, kind.key(), loops)?)
            }
            ListenKey::Tcp(kind, addr) => Bound::Tcp(bind_tcp(*addr, kind.key(), false)?),
            ListenKey::Unix(p) => Bound::Unix(bind_unix(p, publish)?),
        };
        Ok((k.clone(), b))
    })
    .collect()
}

pub(super) fn addrs_of(listeners: &[Listening]) -> Addrs {
    let mut a = Addrs::default();
    for l in listeners {
        match (&l.key, l.local) {
            (ListenKey::Tcp(Kind::Public, _), Some(s)) => a.public.push(s),
            (ListenKey::Tcp(Kind::PublicTls, _), Some(s)) => a.public_tls.push(s),
            (ListenKey::Tcp(Kind::Publish, _), Some(s)) => a.publish.push(s),
            (ListenKey::Tcp(Kind::Admin, _), Some(s)) => a.admin = Some(s),
            (ListenKey::Unix(p), _) => a.publish_unix = Some(p.clone()),
            _ => {}
        }
    }
    a
}

/// The admin listener outlives the drain; every other one stops when it begins.
pub(super) fn listener_stop(
    key: &ListenKey,
    stop: &CancellationToken,
    finished: &CancellationToken,
) -> CancellationToken {
    match key {
        ListenKey::Tcp(Kind::Admin, _) => finished.child_token(),
        _ => stop.child_token(),
    }
}

/// Registers a bound listener and starts its accept loop.
pub(super) fn start_listener(st: &Arc<State>, key: ListenKey, bound: Bound) -> Listening {
    let l = Listening {
        local: bound.local_addr(),
        stop: listener_stop(&key, &st.stop, &st.finished),
        key,
        idle: None,
    };
    spawn_accept(st, &l, bound);
    l
}

pub(super) fn spawn_accept(st: &Arc<State>, l: &Listening, bound: Bound) {
    match (bound, &l.key) {
        (Bound::Tcp(t), ListenKey::Tcp(Kind::Admin, _)) => {
            // Not on the accept tracker: the admin listener stays up through the drain.
            tokio::spawn(accept::accept_tcp(
                t,
                Kind::Admin,
                st.clone(),
                l.stop.clone(),
            ));
        }
        (Bound::Loops(ls), ListenKey::Tcp(kind, _)) => spawn_on_loops(st, ls, *kind, &l.stop),
        (Bound::Tcp(t), ListenKey::Tcp(kind, _)) => {
            st.accept
                .spawn(accept::accept_tcp(t, *kind, st.clone(), l.stop.clone()));
        }
        (Bound::Unix(u), _) => {
            st.accept
                .spawn(accept::accept_unix(u, st.clone(), l.stop.clone()));
        }
        (Bound::Tcp(_) | Bound::Loops(_), ListenKey::Unix(_)) => {}
    }
}

/// A socket for `addr` with SO_REUSEADDR (a restart binds at once over old connections in
/// TIME_WAIT), and SO_REUSEPORT when asked.
fn tcp_socket(addr: SocketAddr, reuseport: bool) -> io::Result<TcpSocket> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    sock.set_reuseaddr(true)?;
    if reuseport {
        sock.set_reuseport(true)?;
    }
    Ok(sock)
}

pub(super) fn bind_tcp(
    addr: SocketAddr,
    key: &'static str,
    reuseport: bool,
) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { key, addr, source };
    let sock = tcp_socket(addr, reuseport).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    sock.listen(4096).map_err(err)
}

/// `n` sockets on `addr` with `SO_REUSEPORT`: the kernel spreads new connections over them
/// by their addresses, so each event loop gets its share without waking the others.
///
/// `SO_REUSEPORT` would also let this group join another process's on the same port (same
/// user, the option set there too) and share its connections without a word. So the address
/// is first bound the ordinary way, and a listener already there is the usual "address in
/// use" error.
fn bind_group(
    addr: SocketAddr,
    key: &'static str,
    n: usize,
) -> Result<Vec<TcpListener>, StartError> {
    if addr.port() != 0 {
        // Dropped unlistened: the port is free again at once.
        tcp_socket(addr, false)
            .and_then(|probe| probe.bind(addr))
            .map_err(|source| StartError::Bind { key, addr, source })?;
    }
    let first = bind_tcp(addr, key, true)?;
    let at = first
        .local_addr()
        .map_err(|source| StartError::Bind { key, addr, source })?;
    let mut group = vec![first];
    for _ in 1..n {
        group.push(bind_tcp(at, key, true)?);
    }
    Ok(group)
}

/// Removes a stale socket file, binds, then sets the mode and group; each step its own error.
pub(super) fn bind_unix(path: &Path, publish: &PublishConfig) -> Result<UnixListener, StartError> {
    let err = |what, source| StartError::Unix {
        path: path.to_path_buf(),
        what,
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| err("cannot create its directory", e))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(err(
                "exists and is not a socket; refusing to remove it",
                io::ErrorKind::AlreadyExists.into(),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::UnixInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| err("cannot remove the stale socket file", e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| err("cannot bind", e))?;
    set_socket_access(path, publish)?;
    Ok(l)
}

/// `chmod unix_mode` and, with `unix_group`, `chown :group` on the socket file.
pub(super) fn set_socket_access(path: &Path, publish: &PublishConfig) -> Result<(), StartError> {
    let err = |what, source| StartError::Unix {
        path: path.to_path_buf(),
        what,
        source,
    };
    if let Some(g) = &publish.unix_group {
        std::os::unix::fs::chown(path, None, Some(g.gid)).map_err(|e| StartError::UnixGroup {
            path: path.to_path_buf(),
            group: g.name.clone(),
            source: e,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(publish.unix_mode))
        .map_err(|e| err("cannot set its file mode", e))
}

/// A public listener's sockets, one to each event loop (its accept loop and every connection
/// it takes run there).
fn spawn_on_loops(st: &Arc<State>, group: Vec<TcpListener>, kind: Kind, stop: &CancellationToken) {
    for (t, h) in group.into_iter().zip(st.loops.handles()) {
        // Moved from the runtime that bound it to the loop's own epoll.
        let std = match t.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    "{}: cannot hand a listener to its event loop: {e}",
                    kind.key()
                );
                continue;
            }
        };
        let (state, stop) = (st.clone(), stop.clone());
        st.accept.spawn_on(
            async move {
                match TcpListener::from_std(std) {
                    Ok(l) => accept::accept_tcp(l, kind, state, stop).await,
                    Err(e) => tracing::error!("{}: event loop: {e}", kind.key()),
                }
            },
            h,
        );
    }
}
