//! The control socket of a running guest (`ornament run --control SOCKET`): JSON lines
//! over a unix stream socket, answered from guest memory while the guest runs.
//!
//! # Protocol (version 1)
//!
//! A client connects to SOCKET and writes one request per line: a JSON object with a
//! string `cmd`, and optionally an `id` (any JSON value) that is echoed in the
//! response. Each request gets exactly one response line, in order; a connection may
//! carry any number of requests, and several clients may be connected at once (at most
//! [`MAX_CLIENTS`]; one more is told so and closed). Blank lines are ignored. A line
//! longer than [`MAX_REQUEST_BYTES`] gets an error response and the connection is closed.
//!
//! Every response is an object with `"ok": true` and the command's fields, or
//! `"ok": false` and a human-readable `"error"`:
//!
//! ```text
//! -> {"cmd":"info"}
//! <- {"ok":true,"protocol":1,"release":"6.1.0-50-cloud-amd64","banner":"Linux version ...",
//!     "layout":{"virt_slide":"0x1e000000","phys_slide":"0x2c00000"},"vcpus":2}
//! -> {"cmd":"ps","id":7}
//! <- {"ok":true,"id":7,"walk":"complete","processes":[
//!      {"pid":1,"tgid":1,"ppid":0,"uid":0,"gid":0,"euid":0,"egid":0,"comm":"init",
//!       "args":["/bin/sh","/init"],"args_truncated":false,"exe":"/bin/busybox","cwd":"/",
//!       "kernel_thread":false,"task":"0xffff888003d08000"},
//!      {"pid":2,"tgid":2,"ppid":0,...,"comm":"kthreadd","args":[],"exe":null,
//!       "kernel_thread":true,...}, ...]}
//! -> {"cmd":"reboot"}
//! <- {"ok":false,"error":"unknown command \"reboot\" (known: info, ps, pause, resume, status)"}
//! -> not json
//! <- {"ok":false,"error":"bad request: expected value at line 1 column 1"}
//! ```
//!
//! - `info`: `release` and `banner` (null when the profile has none) of the profile the
//!   running kernel was checked against, the KASLR `layout` (`virt_slide`, `phys_slide`:
//!   hex strings, since the physical slide is arithmetic modulo 2^64), and `vcpus`.
//! - `pause`: stop every vCPU (as an ornament's pause does); `resume`: let a paused
//!   guest run again (`resumed` says whether it was paused); `status`: `paused`.
//! - `ps`: every process (thread-group leader) on the kernel's task list, in list order
//!   (creation order), as `ps -e` sees them: `init_task` (pid 0) is not listed, so pid 1
//!   and the kernel threads show ppid 0. Per process: `pid`, `tgid`, `ppid` (the real
//!   parent's tgid), `uid`/`gid`/`euid`/`egid` (real and effective ids), `comm`, `args`
//!   (the command line from `mm->arg_start..arg_end`; `[]` for kernel threads and exited
//!   tasks, which have no mm), `args_truncated`, `exe` (the executable's path, null for
//!   kernel threads), `cwd` (the working directory: kernel threads have `/` too), `kernel_thread` (`PF_KTHREAD`), `task` (the `task_struct` address,
//!   hex). `walk` says how the task-list walk ended: `complete`, `budget_exhausted` (more
//!   than [`PS_TASK_BUDGET`] processes), `cycle` or `unreadable` (with `walk_at`, the
//!   address where it stopped); the processes found before are still listed.
//!
//! The guest is not stopped: tasks may fork, exit and change under the reader. A field
//! that cannot be read (a pointer into nowhere, a page not present) is `null`; the
//! reader never trusts guest data further than its caps (task budget, string and
//! argument caps, a total budget of string bytes per `ps`).

use crate::guest::GuestView;
use anyhow::Context;
use ornament_introspect::task::Limits;
use serde::Serialize;
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Version of the protocol described above (reported by `info`).
pub const PROTOCOL_VERSION: u32 = 1;
/// Most clients connected at once.
pub const MAX_CLIENTS: usize = 16;
/// Longest request line in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Most processes one `ps` lists (the default `pid_max` of small guests).
pub const PS_TASK_BUDGET: usize = 32_768;
/// What `ps` reads of each process: at most 4 KiB of its command line, and the
/// default caps of its executable's path.
pub const PS_LIMITS: Limits = Limits {
    max_argv_bytes: 4096,
    max_path_depth: 64,
    max_name_bytes: 255,
};
/// Once one `ps` has read this many bytes of command lines and paths, the rest of the
/// processes are read with [`PS_SHORT_LIMITS`], so that a response stays bounded (some
/// tens of MiB) whatever the guest holds.
pub const PS_TOTAL_STRING_BYTES: u64 = 8 << 20;
/// Caps after [`PS_TOTAL_STRING_BYTES`] is spent (a cut command line is marked
/// `args_truncated`; a longer path is null).
pub const PS_SHORT_LIMITS: Limits = Limits {
    max_argv_bytes: 256,
    max_path_depth: 8,
    max_name_bytes: 32,
};
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// A client that does not read its responses for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the control socket could not be served.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ControlError {
    /// {path} exists and is not a socket; not replacing it
    NotASocket {
        /// The path given.
        path: PathBuf,
    },
    /// {path} is in use by another server
    InUse {
        /// The path given.
        path: PathBuf,
    },
    /// cannot listen on {path}
    Bind {
        /// The path given.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// cannot start the control socket's thread
    Thread(#[source] std::io::Error),
}

/// A control socket served on its own thread. Dropping it stops the server, closes
/// every connection and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    /// (device, inode) of the socket file we bound, so that only ours is removed.
    file_id: Option<(u64, u64)>,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .field("clients", &self.shared.active.load(Ordering::Relaxed))
            .finish()
    }
}

/// State shared by the accept thread, the connection threads and the owner.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    active: AtomicUsize,
    next_conn: AtomicUsize,
    /// A clone of each open connection, to shut it down on stop.
    conns: Mutex<Vec<(usize, UnixStream)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serve the control socket at `path` for `view` until the returned server is dropped.
///
/// A stale socket file (nobody listening) at `path` is replaced; anything else there
/// is an error.
pub fn serve(path: &Path, view: Arc<GuestView>) -> anyhow::Result<ControlServer> {
    let listener = bind(path)?;
    let meta = std::fs::metadata(path).ok();
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot restrict the control socket to its owner");
    }
    listener
        .set_nonblocking(true)
        .with_context(|| format!("control socket {}", path.display()))?;
    let shared = Arc::new(Shared::default());
    let accept = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("ornament-control".into())
            .spawn(move || accept_loop(&listener, &view, &shared))
            .map_err(ControlError::Thread)?
    };
    tracing::info!(path = %path.display(), "control socket ready");
    Ok(ControlServer {
        path: path.to_path_buf(),
        file_id: meta.map(|m| (m.dev(), m.ino())),
        shared,
        accept: Some(accept),
    })
}

fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_path_buf(),
            });
        }
        tracing::debug!(path = %path.display(), "removing a stale control socket");
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (_, c) in Shared::lock(&self.shared.conns).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let threads: Vec<_> = Shared::lock(&self.shared.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| self.file_id == Some((m.dev(), m.ino())));
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
        tracing::debug!(path = %self.path.display(), "control socket closed");
    }
}

fn accept_loop(listener: &UnixListener, view: &Arc<GuestView>, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => start_client(stream, view, shared),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
        Shared::lock(&shared.threads).retain(|t| !t.is_finished());
    }
}

fn start_client(mut stream: UnixStream, view: &Arc<GuestView>, shared: &Arc<Shared>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    if shared.active.load(Ordering::SeqCst) >= MAX_CLIENTS {
        let _ = write_response(
            &mut stream,
            error_response(format!("too many clients (at most {MAX_CLIENTS})"), None),
        );
        return;
    }
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    shared.active.fetch_add(1, Ordering::SeqCst);
    Shared::lock(&shared.conns).push((id, clone));
    let (view, sh) = (view.clone(), shared.clone());
    let spawned = std::thread::Builder::new()
        .name("ornament-control-client".into())
        .spawn(move || {
            if let Err(e) = serve_client(stream, &view, &sh.stop) {
                tracing::debug!(error = %e, "control client gone");
            }
            Shared::lock(&sh.conns).retain(|(c, _)| *c != id);
            sh.active.fetch_sub(1, Ordering::SeqCst);
        });
    match spawned {
        Ok(t) => Shared::lock(&shared.threads).push(t),
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot start a client thread");
            Shared::lock(&shared.conns).retain(|(c, _)| *c != id);
            shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// What reading one request line gave.
enum Line {
    Request(Vec<u8>),
    TooLong,
    Eof,
}

/// Read up to and without the next `\n`, at most `max` bytes.
fn read_line(r: &mut impl BufRead, max: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                Line::Eof
            } else {
                Line::Request(line)
            });
        }
        let (take, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(Line::Request(line));
        }
    }
}

fn serve_client(stream: UnixStream, view: &GuestView, stop: &AtomicBool) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut input = BufReader::new(stream);
    while !stop.load(Ordering::SeqCst) {
        match read_line(&mut input, MAX_REQUEST_BYTES)? {
            Line::Eof => return Ok(()),
            Line::TooLong => {
                let msg = format!("request longer than {MAX_REQUEST_BYTES} bytes");
                return write_response(&mut out, error_response(msg, None));
            }
            Line::Request(line) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                write_response(&mut out, handle_request(view, &line))?;
            }
        }
    }
    Ok(())
}

fn write_response(out: &mut impl Write, response: Map<String, Value>) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&Value::Object(response)).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

fn error_response(error: String, id: Option<Value>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("ok".into(), Value::Bool(false));
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    m.insert("error".into(), Value::String(error));
    m
}

fn ok_response(body: impl Serialize, id: Option<Value>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("ok".into(), Value::Bool(true));
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    match serde_json::to_value(body) {
        Ok(Value::Object(fields)) => m.extend(fields),
        Ok(_) => {}
        Err(e) => {
            return error_response(format!("cannot encode the response: {e}"), m.remove("id"))
        }
    }
    m
}

/// Answer one request line (the protocol of the module documentation).
pub fn handle_request(view: &GuestView, line: &[u8]) -> Map<String, Value> {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_response(format!("bad request: {e}"), None),
    };
    let Value::Object(mut request) = request else {
        return error_response("bad request: expected a JSON object".into(), None);
    };
    let id = request.remove("id");
    let cmd = match request.get("cmd") {
        Some(Value::String(c)) => c.as_str(),
        Some(_) => return error_response("bad request: `cmd` must be a string".into(), id),
        None => return error_response("bad request: no `cmd`".into(), id),
    };
    match cmd {
        "info" => ok_response(info(view), id),
        "ps" => match process_list(view) {
            Ok(list) => ok_response(list, id),
            Err(e) => error_response(format!("{e:#}"), id),
        },
        "pause" => {
            view.control.pause_requested.store(true, Ordering::SeqCst);
            ok_response(serde_json::json!({ "pausing": true }), id)
        }
        "resume" => {
            let paused = view.control.paused.load(Ordering::SeqCst);
            if paused {
                view.control.resume_requested.store(true, Ordering::SeqCst);
            }
            ok_response(serde_json::json!({ "resumed": paused }), id)
        }
        "status" => ok_response(
            serde_json::json!({ "paused": view.control.paused.load(Ordering::SeqCst) }),
            id,
        ),
        other => error_response(
            format!("unknown command {other:?} (known: info, ps, pause, resume, status)"),
            id,
        ),
    }
}

mod answers;
pub use answers::{info, process_list, Info, Layout, Process, ProcessList};

#[cfg(test)]
use answers::{hex, process_list_bounded};
#[cfg(test)]
mod tests;
