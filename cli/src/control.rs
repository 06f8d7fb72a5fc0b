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
//!       "args":["/bin/sh","/init"],"args_truncated":false,"exe":"/bin/busybox",
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
//!   kernel threads), `kernel_thread` (`PF_KTHREAD`), `task` (the `task_struct` address,
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
use ornament_engine::Gva;
use ornament_introspect::kernel::Kernel;
use ornament_introspect::paging::{PageRoot, PagingMode};
use ornament_introspect::task::{Limits, TaskReader, WalkEnd, PF_KTHREAD};
use ornament_introspect::vmem::VirtMem;
use serde::{Deserialize, Serialize};
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

/// The `info` response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Kernel release of the profile (`uname -r`).
    pub release: String,
    /// The profile's `linux_banner`, checked against guest memory.
    pub banner: Option<String>,
    /// KASLR slides.
    pub layout: Layout,
    /// Number of vCPUs.
    pub vcpus: u32,
}

/// KASLR slides, as hex strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Runtime minus link-time virtual address of the kernel image.
    pub virt_slide: String,
    /// Runtime minus link-time physical address (`phys_base`), modulo 2^64.
    pub phys_slide: String,
}

/// The `info` answer for `view`.
pub fn info(view: &GuestView) -> Info {
    Info {
        protocol: PROTOCOL_VERSION,
        release: view.profile.kernel.release.clone(),
        banner: view.profile.kernel.banner.clone(),
        layout: Layout {
            virt_slide: format!("{:#x}", view.layout.virt_slide),
            phys_slide: format!("{:#x}", view.layout.phys_slide),
        },
        vcpus: view.vcpus,
    }
}

/// One process of a `ps` response; `None` (null) where the guest field was unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// `task->pid`.
    pub pid: Option<i32>,
    /// `task->tgid`.
    pub tgid: Option<i32>,
    /// `task->real_parent->tgid`.
    pub ppid: Option<i32>,
    /// Real user id.
    pub uid: Option<u32>,
    /// Real group id.
    pub gid: Option<u32>,
    /// Effective user id.
    pub euid: Option<u32>,
    /// Effective group id.
    pub egid: Option<u32>,
    /// `task->comm`.
    pub comm: Option<String>,
    /// Command line (`[]` without an mm).
    pub args: Option<Vec<String>>,
    /// The command line was longer than the cap, or its tail unreadable.
    pub args_truncated: bool,
    /// Executable path.
    pub exe: Option<String>,
    /// `PF_KTHREAD`.
    pub kernel_thread: Option<bool>,
    /// Address of the `task_struct` (hex).
    pub task: String,
}

/// The `ps` response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessList {
    /// How the task-list walk ended: `complete`, `budget_exhausted`, `cycle`, `unreadable`.
    pub walk: String,
    /// Where a `cycle` or `unreadable` walk stopped (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub walk_at: Option<String>,
    /// The processes, in task-list order.
    pub processes: Vec<Process>,
}

/// The kernel's own page tables: `init_top_pgt` (swapper_pg_dir), which lives as long
/// as the kernel; else the CR3 taken when the kernel was identified (which may belong
/// to a process that has since exited, or to the early boot tables).
fn kernel_vm<'k>(kernel: &'k Kernel<'k>, view: &GuestView) -> VirtMem<'k> {
    let from_regs = kernel.kernel_vm(&view.regs);
    let Ok(pgt) = view.profile.symbol("init_top_pgt") else {
        return from_regs;
    };
    let swapper = VirtMem::new(
        kernel.mem(),
        PageRoot {
            table: view.layout.phys(pgt),
            mode: PagingMode::from_cr4(view.regs.cr4),
        },
    )
    .with_cache(kernel.cache());
    // Usable when it maps init_task (it is all zeroes until the kernel fills it).
    let probe = |vm: &VirtMem<'_>| {
        kernel
            .symbol("init_task")
            .is_ok_and(|t| vm.read_u64(t).is_ok())
    };
    if probe(&swapper) {
        swapper
    } else {
        from_regs
    }
}

/// The guest's process list, read from guest memory now.
pub fn process_list(view: &GuestView) -> anyhow::Result<ProcessList> {
    process_list_bounded(view, PS_TASK_BUDGET, PS_TOTAL_STRING_BYTES)
}

/// [`process_list`] with other budgets.
fn process_list_bounded(
    view: &GuestView,
    task_budget: usize,
    total_string_bytes: u64,
) -> anyhow::Result<ProcessList> {
    let kernel = Kernel::new(&*view.ram, &view.profile, view.layout);
    let vm = kernel_vm(&kernel, view);
    let reader = TaskReader::new(&kernel).context("cannot read tasks with this profile")?;
    let flags_off = reader.offsets().flags;
    let full = reader.with_limits(PS_LIMITS);
    let short = TaskReader::new(&kernel)?.with_limits(PS_SHORT_LIMITS);
    let walk = full
        .processes(&vm, task_budget)
        .context("cannot walk the task list")?;
    let mut string_bytes = 0u64;
    let mut processes = Vec::with_capacity(walk.tasks.len());
    for &task in &walk.tasks {
        let r = if string_bytes < total_string_bytes {
            &full
        } else {
            &short
        };
        let info = r.read(&vm, task);
        let kthread = vm
            .read_u32(task.wrapping_add(flags_off))
            .ok()
            .map(|f| f & PF_KTHREAD != 0)
            .or(info.is_kernel_thread.ok());
        let (args, args_truncated) = match info.argv {
            Ok(Some(a)) => (Some(a.args), a.truncated),
            Ok(None) => (Some(Vec::new()), false),
            Err(_) => (None, false),
        };
        let exe = info.exe_path.ok().flatten();
        string_bytes += args
            .iter()
            .flatten()
            .chain(&exe)
            .map(|a| a.len() as u64 + 1)
            .sum::<u64>();
        processes.push(Process {
            pid: info.pid.ok(),
            tgid: info.tgid.ok(),
            ppid: info.ppid.ok(),
            uid: info.uid.ok(),
            gid: info.gid.ok(),
            euid: info.euid.ok(),
            egid: info.egid.ok(),
            comm: info.comm.ok(),
            args,
            args_truncated,
            exe,
            kernel_thread: kthread,
            task: hex(task),
        });
    }
    let (walk_name, walk_at) = match walk.end {
        WalkEnd::Complete => ("complete", None),
        WalkEnd::BudgetExhausted => ("budget_exhausted", None),
        WalkEnd::Cycle { at } => ("cycle", Some(hex(at))),
        WalkEnd::Unreadable { at } => ("unreadable", Some(hex(at))),
    };
    Ok(ProcessList {
        walk: walk_name.into(),
        walk_at,
        processes,
    })
}

fn hex(a: Gva) -> String {
    format!("{:#x}", a.raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_engine::PhysMemory;
    use ornament_introspect::profile::Profile;
    use ornament_introspect::testing::{SynthConfig, SynthGuest, TaskSpec};
    use std::io::Read;

    const PROFILES: [&str; 2] = ["6.1.0-50-cloud-amd64", "6.12.117+deb12-cloud-amd64"];

    fn profile(release: &str) -> Profile {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../profiles")
            .join(format!("{release}.json"));
        Profile::load(&path).expect("committed profile")
    }

    /// A synthetic guest with a small known process tree, and what `ps` must say.
    struct World {
        g: SynthGuest,
        expected: Vec<Process>,
        tasks: Vec<Gva>,
    }

    fn process(task: Gva, spec: &TaskSpec, ppid: i32) -> Process {
        Process {
            pid: Some(spec.pid),
            tgid: Some(spec.tgid),
            ppid: Some(ppid),
            uid: Some(spec.creds[0]),
            gid: Some(spec.creds[1]),
            euid: Some(spec.creds[2]),
            egid: Some(spec.creds[3]),
            comm: Some(spec.comm.clone()),
            args: Some(spec.argv.clone()),
            args_truncated: false,
            exe: spec.exe_path.clone(),
            kernel_thread: Some(spec.kernel_thread),
            task: hex(task),
        }
    }

    fn world(release: &str) -> World {
        let mut g = SynthGuest::new(profile(release), SynthConfig::default()).expect("guest");
        let mut expected = Vec::new();
        let mut tasks = Vec::new();
        let mut add = |g: &mut SynthGuest, spec: TaskSpec, ppid: i32| {
            let t = g.add_task(&spec).expect("task");
            expected.push(process(t, &spec, ppid));
            tasks.push(t);
            t
        };
        let init = add(
            &mut g,
            TaskSpec::user(1, "init", "/bin/busybox", &["/bin/busybox", "sh", "/init"]),
            0,
        );
        let kthreadd = add(&mut g, TaskSpec::kthread(2, "kthreadd"), 0);
        let mut kworker = TaskSpec::kthread(3, "kworker/0:0");
        kworker.parent = Some(kthreadd);
        add(&mut g, kworker, 2);
        let mut sh = TaskSpec::user(
            80,
            "sh",
            "/bin/busybox",
            &["sh", "-c", "x &", "two words", ""],
        );
        sh.parent = Some(init);
        let sh = add(&mut g, sh, 1);
        let mut sleep = TaskSpec::user(81, "sleep", "/bin/busybox", &["sleep", "1001"]);
        sleep.parent = Some(sh);
        sleep.creds = [1000, 1001, 1002, 1003];
        add(&mut g, sleep, 80);
        World { g, expected, tasks }
    }

    fn view_of(g: SynthGuest) -> GuestView {
        let regs = g.regs_kernel(0, Gva(0));
        GuestView {
            ram: Arc::new(g.phys.mem),
            control: Arc::default(),
            profile: Arc::new(g.profile),
            layout: g.layout,
            vcpus: 2,
            regs,
        }
    }

    fn ask(view: &GuestView, line: &str) -> Value {
        Value::Object(handle_request(view, line.as_bytes()))
    }

    fn ps(view: &GuestView) -> ProcessList {
        let v = ask(view, r#"{"cmd":"ps"}"#);
        assert_eq!(v["ok"], Value::Bool(true), "{v}");
        serde_json::from_value(v).expect("ps response")
    }

    #[test]
    fn ps_lists_exactly_the_tasks_written() {
        for release in PROFILES {
            let w = world(release);
            let view = view_of(w.g);
            let list = ps(&view);
            assert_eq!(list.walk, "complete");
            assert_eq!(list.walk_at, None);
            assert_eq!(list.processes, w.expected, "{release}");
            // The id is echoed, the body is the same.
            let v = ask(&view, r#"{"cmd":"ps","id":[1,"x"]}"#);
            assert_eq!(v["id"], serde_json::json!([1, "x"]));
            assert_eq!(
                v["processes"][4]["args"],
                serde_json::json!(["sleep", "1001"])
            );
            assert_eq!(v["processes"][1]["args"], serde_json::json!([]));
            assert_eq!(v["processes"][1]["exe"], Value::Null);
        }
    }

    #[test]
    fn ps_reads_through_init_top_pgt_when_cr3_is_gone() {
        let w = world(PROFILES[0]);
        // Copy the kernel's top-level table where init_top_pgt lives, then give a CR3
        // that maps nothing (the process it belonged to has exited).
        let pgt = w.g.profile.symbol("init_top_pgt").expect("sym");
        let mut table = vec![0u8; 4096];
        w.g.phys
            .mem
            .read_phys(w.g.root.table, &mut table)
            .expect("read");
        w.g.phys
            .mem
            .write_phys(w.g.layout.phys(pgt), &table)
            .expect("write");
        let mut view = view_of(w.g);
        view.regs.cr3 = 0x10_0000;
        let list = ps(&view);
        assert_eq!(list.walk, "complete");
        assert_eq!(list.processes, w.expected);
    }

    #[test]
    fn hostile_task_lists_end_and_bad_fields_are_null() {
        let w = world(PROFILES[1]);
        let tasks_off = w.g.off("task_struct", "tasks").expect("off");
        let cred_off = w.g.off("task_struct", "cred").expect("off");
        let comm_off = w.g.off("task_struct", "comm").expect("off");
        // The sleeper's cred points into nowhere, the sh's comm is not NUL-terminated.
        w.g.write_u64(w.tasks[4].wrapping_add(cred_off), 0xffff_dead_0000_0000)
            .expect("w");
        w.g.write(w.tasks[3].wrapping_add(comm_off), &[b'A'; 16])
            .expect("w");
        // The sleeper's tasks.next points back at the sh: a cycle that misses the head.
        w.g.write_u64(
            w.tasks[4].wrapping_add(tasks_off),
            w.tasks[3].wrapping_add(tasks_off).raw(),
        )
        .expect("w");
        let view = view_of(w.g);
        let list = ps(&view);
        assert_eq!(list.walk, "cycle");
        assert_eq!(list.processes.len(), 5);
        let sleeper = &list.processes[4];
        assert_eq!((sleeper.uid, sleeper.gid, sleeper.euid), (None, None, None));
        assert_eq!(sleeper.pid, Some(81));
        assert_eq!(list.processes[3].comm.as_deref(), Some("AAAAAAAAAAAAAAAA"));
    }

    #[test]
    fn budgets_bound_the_answer() {
        let mut w = world(PROFILES[0]);
        let long = "x".repeat(1000);
        let spec = TaskSpec::user(90, "long", "/bin/long", &["long", &long]);
        let t = w.g.add_task(&spec).expect("task");
        let mut want = process(t, &spec, 0);
        w.expected.push(want.clone());
        let view = view_of(w.g);
        let all = process_list_bounded(&view, 100, 1 << 20).expect("ps");
        assert_eq!(all.processes, w.expected);
        let three = process_list_bounded(&view, 3, 1 << 20).expect("ps");
        assert_eq!(three.walk, "budget_exhausted");
        assert_eq!(three.processes, w.expected[..3]);
        // Past the string budget, command lines are cut short (and say so).
        let short = process_list_bounded(&view, 100, 10).expect("ps");
        assert_eq!(short.walk, "complete");
        assert_eq!(short.processes[..5], w.expected[..5]);
        let cut =
            usize::try_from(PS_SHORT_LIMITS.max_argv_bytes).expect("small") - "long".len() - 1;
        want.args = Some(vec!["long".into(), "x".repeat(cut)]);
        want.args_truncated = true;
        assert_eq!(short.processes[5], want);
    }

    #[test]
    fn info_and_errors() {
        let view = view_of(world(PROFILES[0]).g);
        let v = ask(&view, r#"{"cmd":"info"}"#);
        let info: Info = serde_json::from_value(v.clone()).expect("info");
        assert_eq!(v["ok"], Value::Bool(true));
        assert_eq!(info.release, "6.1.0-50-cloud-amd64");
        assert_eq!(info.protocol, PROTOCOL_VERSION);
        assert_eq!(info.vcpus, 2);
        assert_eq!(info.layout.virt_slide, "0x1e000000");
        assert_eq!(info.layout.phys_slide, "0x2000000");
        assert!(info
            .banner
            .is_some_and(|b| b.starts_with("Linux version 6.1.0-50-cloud-amd64")));
        for (line, error) in [
            (
                r#"{"cmd":"reboot"}"#,
                "unknown command \"reboot\" (known: info, ps, pause, resume, status)",
            ),
            (r#"{"cmd":1}"#, "bad request: `cmd` must be a string"),
            (r#"{"id":3}"#, "bad request: no `cmd`"),
            (r#"["ps"]"#, "bad request: expected a JSON object"),
        ] {
            let v = ask(&view, line);
            assert_eq!(v["ok"], Value::Bool(false), "{line}");
            assert_eq!(v["error"], Value::String(error.into()), "{line}");
        }
        let v = ask(&view, "not json");
        assert_eq!(v["ok"], Value::Bool(false));
        assert!(v["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("bad request: ")));
        assert_eq!(ask(&view, r#"{"id":3}"#)["id"], 3);
    }

    fn read_response(r: &mut impl BufRead) -> Value {
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        serde_json::from_str(&line).expect("json line")
    }

    #[test]
    fn socket_serves_many_requests_and_clients_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("ctl");
        let view = Arc::new(view_of(world(PROFILES[0]).g));
        let server = serve(&path, view.clone()).expect("serve");
        assert_eq!(
            std::fs::metadata(&path)
                .expect("socket")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(matches!(
            serve(&path, view.clone()).map_err(|e| e.downcast::<ControlError>()),
            Err(Ok(ControlError::InUse { .. }))
        ));
        let mut a = UnixStream::connect(&path).expect("a");
        let mut b = UnixStream::connect(&path).expect("b");
        a.write_all(b"{\"cmd\":\"info\"}\n\n{\"cmd\":\"ps\"}\n{bad\n{\"cmd\":\"ps\",")
            .expect("write");
        b.write_all(b"{\"cmd\":\"ps\"}\n").expect("write");
        let mut ra = BufReader::new(a.try_clone().expect("clone"));
        let mut rb = BufReader::new(b.try_clone().expect("clone"));
        assert_eq!(read_response(&mut rb)["processes"][0]["pid"], 1);
        assert_eq!(read_response(&mut ra)["release"], "6.1.0-50-cloud-amd64");
        assert_eq!(read_response(&mut ra)["walk"], "complete");
        assert_eq!(read_response(&mut ra)["ok"], false);
        a.write_all(b"\"id\":9}\n").expect("write");
        let v = read_response(&mut ra);
        assert_eq!(
            (v["ok"].clone(), v["id"].clone()),
            (Value::Bool(true), 9.into())
        );
        // A line over the cap: an error, then the connection is closed.
        let mut c = UnixStream::connect(&path).expect("c");
        let _ = c.write_all(&vec![b' '; MAX_REQUEST_BYTES + 10]);
        let mut rc = BufReader::new(c);
        let v = read_response(&mut rc);
        assert_eq!(v["ok"], false);
        let mut rest = Vec::new();
        assert_eq!(rc.read_to_end(&mut rest).map(|n| n == 0).ok(), Some(true));
        // Dropping the server closes the connections and removes the socket.
        drop(server);
        assert!(!path.exists());
        let mut rest = String::new();
        assert_eq!(ra.read_to_string(&mut rest).ok(), Some(0));
    }

    #[test]
    fn too_many_clients_are_told_so() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("ctl");
        let view = Arc::new(view_of(world(PROFILES[1]).g));
        let _server = serve(&path, view).expect("serve");
        let mut clients = Vec::new();
        for _ in 0..MAX_CLIENTS {
            let mut s = UnixStream::connect(&path).expect("connect");
            s.write_all(b"{\"cmd\":\"info\"}\n").expect("write");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            assert_eq!(read_response(&mut r)["ok"], true);
            clients.push(s);
        }
        let extra = UnixStream::connect(&path).expect("connect");
        let v = read_response(&mut BufReader::new(extra));
        assert_eq!(v["error"], "too many clients (at most 16)");
        // Once one leaves, a new one is served.
        drop(clients.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut s = UnixStream::connect(&path).expect("connect");
            let _ = s.write_all(b"{\"cmd\":\"info\"}\n");
            if read_response(&mut BufReader::new(s))["ok"] == true {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no slot freed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn stale_sockets_are_replaced_and_other_files_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("ctl");
        drop(UnixListener::bind(&path).expect("stale"));
        assert!(path.exists());
        let view = Arc::new(view_of(world(PROFILES[0]).g));
        let server = serve(&path, view.clone()).expect("serve over a stale socket");
        drop(server);
        std::fs::write(&path, b"keep me").expect("file");
        let err = serve(&path, view).expect_err("not a socket");
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).expect("kept"), b"keep me");
    }
}
