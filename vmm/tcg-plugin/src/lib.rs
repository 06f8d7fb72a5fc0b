//! ornament-tcg-plugin: a QEMU TCG plugin (GPL-2.0-or-later) that is stage \[1\] of ornament's
//! QEMU engine.
//!
//! ```text
//! guest vCPU reaches a probe address
//!   -> exec callback (only on probe instructions)   this crate
//!   -> registers + small memory reads (guestmem), one ordered batch
//!   -> unix socket, ornament_engine::wire records   -> ornament-qemu::plugin_link -> ProbeHit
//!   <- answer (held probes only) / arm / disarm / RAM file (once)   <-
//! ```
//!
//! Loaded as `-plugin libornament_tcg_plugin.so,sock=PATH[,hold_timeout_ms=N][,flush_us=N]
//! [,batch_bytes=N][,verbose=on]` into `qemu-system-x86_64 -accel tcg` (QEMU >= 10.0, plugin
//! API v4).
//!
//! - Install: connect to `sock`, send `Hello`, take `Arm` records until `Go`, then let the guest
//!   start: the initial probes are in place before its first instruction.
//! - Translation: an exec callback is put on an instruction only when its address is in the
//!   probe table (armed or not); no other instruction gets anything.
//! - Arm/disarm at run time: a probe at an address already in the table is switched by a flag
//!   its callback checks (no flush). A probe at a new address needs the already translated code
//!   to be translated again: the plugin asks QEMU for `qemu_plugin_reset` (which flushes every
//!   translation block and drops all callbacks, which the plugin then registers again) from the
//!   next callback that runs on a vCPU thread (a probe hit, a translation, a vCPU going idle,
//!   or the held vCPU being answered). Arming a new address while a vCPU is held at a hit is
//!   therefore exact for that vCPU: the host sends the arm before the answer, and the vCPU asks
//!   for the reset as it resumes, so it runs at most the rest of its current translation block
//!   before all code is retranslated (other vCPUs may run a little further).
//!   QEMU runs that reset when every vCPU is outside guest code, so while a vCPU is held the
//!   reset (and every other vCPU) waits for the hold to end.
//! - Hits: appended to one buffer shared by all vCPUs in the order the callbacks ran (so a
//!   parent's fork record always comes before anything its child does on another vCPU), written
//!   to the socket when the buffer holds `batch_bytes` or by a flusher thread every `flush_us`;
//!   a held hit flushes at once and blocks only its own vCPU until the host answers or
//!   `hold_timeout_ms` passes (then it goes on and reports `HoldTimeout`). The socket is
//!   blocking: a host that stops reading slows the guest, it never loses hits.
//! - Memory reads: a probe's reads are done in index order; a read's address is a constant, a
//!   register plus an offset, or an earlier read's value plus an offset (pointer chains: a read
//!   whose base read failed fails). Once the host has sent the RAM record (with QEMU's RAM file
//!   descriptor), reads walk the guest's page tables from `cr3` over the mapped file
//!   ([`guestmem`]); before that, or when that mapping failed (reported once as
//!   `RamFallback`), or for an address the walk cannot resolve, they go through QEMU's
//!   `qemu_plugin_read_memory_vaddr`.
//! - Filters: a register filter is tested before anything else is read; a filter on a memory
//!   read does that read alone (with its chain) first. A dropped hit reports nothing.
//! - Cost: the time spent in reported hits' callbacks (and in their memory reads), and in
//!   testing the filters of dropped hits, is summed and sent in the `Bye` record.
//! - No panic crosses into QEMU: every `extern "C"` entry runs under `catch_unwind`, and a
//!   caught panic is reported over the socket.

mod args;
mod callbacks;
pub mod ffi;
pub mod guestmem;
mod hit;
mod host;
mod state;

pub use args::{ArgsError, PluginArgs};

use ffi::{Api, PluginId, QemuInfo};
use host::{flusher_loop, read_record, reader_loop, FdReader};
use ornament_engine::wire::{self, ArmRecord, Hello, Msg};
use state::{mono_ns, State, Vcpu, STATE};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::Instant;

/// The plugin API version this plugin is written against (QEMU checks it at load).
#[no_mangle]
#[used]
pub static qemu_plugin_version: c_int = 4;

/// Why install failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
enum InstallError {
    /// QEMU does not export {0:?}
    Symbol(&'static CStr),
    /// bad plugin arguments
    Args(#[from] ArgsError),
    /// not a system-emulation QEMU
    NotSystem,
    /// cannot connect to the host socket
    Connect(#[source] std::io::Error),
    /// host socket failed during the handshake
    Handshake(#[source] std::io::Error),
    /// host sent a bad record during the handshake
    Wire(#[from] wire::WireError),
    /// plugin installed twice
    Twice,
}

fn install(id: PluginId, info: &QemuInfo, argv: &[&str]) -> Result<(), InstallError> {
    let api = Api::resolve().map_err(|m| InstallError::Symbol(m.0))?;
    let args = PluginArgs::parse(argv.iter().copied())?;
    if !info.system_emulation {
        return Err(InstallError::NotSystem);
    }
    let nvcpus =
        usize::try_from(info.system.max_vcpus.max(info.system.smp_vcpus).max(1)).unwrap_or(1);
    let sock = UnixStream::connect(&args.sock).map_err(InstallError::Connect)?;
    sock.set_read_timeout(Some(args.connect_timeout))
        .map_err(InstallError::Handshake)?;
    let mut sock = FdReader { sock, fd: None };
    let hello = Msg::Hello(Hello {
        version: wire::WIRE_VERSION,
        pid: std::process::id(),
        mono_ns: mono_ns(),
    });
    sock.sock
        .write_all(&hello.to_bytes())
        .map_err(InstallError::Handshake)?;
    let mut initial = Vec::new();
    let mut ram = None;
    let mut buf = Vec::new();
    loop {
        match read_record(&mut sock, &mut buf).map_err(InstallError::Handshake)?? {
            Msg::Go => break,
            Msg::Arm(a) => initial.push(a),
            Msg::Disarm(d) => initial.retain(|a: &ArmRecord| a.probe != d.probe),
            Msg::Ram(r) => ram = Some((r, sock.fd.take())),
            _ => {}
        }
    }
    sock.sock
        .set_read_timeout(None)
        .map_err(InstallError::Handshake)?;
    let writer = sock.sock.try_clone().map_err(InstallError::Handshake)?;
    let state = State {
        api,
        id,
        args,
        writer: Mutex::new((writer, Vec::with_capacity(16 * 1024))),
        pending: Mutex::new(Vec::with_capacity(16 * 1024)),
        ram: OnceLock::new(),
        ram_failed: AtomicBool::new(false),
        callback_ns: AtomicU64::new(0),
        mem_ns: AtomicU64::new(0),
        max_callback_ns: AtomicU64::new(0),
        stall_ns: AtomicU64::new(0),
        by_addr: RwLock::new(HashMap::new()),
        by_id: Mutex::new(HashMap::new()),
        windows: Mutex::new(HashMap::new()),
        vcpus: (0..nvcpus).map(|_| Vcpu::new()).collect(),
        host_gone: AtomicBool::new(false),
        flush_wanted: AtomicBool::new(false),
        resetting: AtomicBool::new(false),
        start: Instant::now(),
    };
    STATE.set(state).map_err(|_| InstallError::Twice)?;
    let s = STATE.get().ok_or(InstallError::Twice)?;
    for a in &initial {
        s.apply_arm(a);
    }
    if let Some((r, fd)) = ram {
        s.apply_ram(&r, fd);
    }
    // Nothing is translated yet: no flush needed for the initial set.
    s.flush_wanted.store(false, Ordering::Release);
    s.register_callbacks();
    std::thread::Builder::new()
        .name("ornament-rx".into())
        .spawn(move || reader_loop(sock))
        .map_err(InstallError::Handshake)?;
    std::thread::Builder::new()
        .name("ornament-flush".into())
        .spawn(flusher_loop)
        .map_err(InstallError::Handshake)?;
    if s.args.verbose {
        api.log(&format!(
            "ornament: installed, {} probes, {nvcpus} vcpu slots, {:?} since start",
            initial.len(),
            s.start.elapsed()
        ));
    }
    Ok(())
}

/// QEMU's entry point: parse `argv`, connect to the host, take the initial probe set.
///
/// Returns 0 on success; anything else makes QEMU refuse to start, with our message on its
/// log.
///
/// # Safety
/// Called by QEMU with a valid `info` and `argc` NUL-terminated strings in `argv`.
#[no_mangle]
pub unsafe extern "C" fn qemu_plugin_install(
    id: PluginId,
    info: *const QemuInfo,
    argc: c_int,
    argv: *const *const c_char,
) -> c_int {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let n = usize::try_from(argc).unwrap_or(0);
        let owned: Vec<String> = (0..n)
            .filter_map(|i| {
                // SAFETY: QEMU passes `argc` valid pointers in `argv`.
                let p = unsafe { *argv.add(i) };
                // SAFETY: each is a NUL-terminated string owned by QEMU during this call.
                (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            })
            .collect();
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        // SAFETY: QEMU passes a valid `qemu_info_t` for the duration of this call.
        let info = unsafe { &*info };
        install(id, info, &args)
    }));
    let msg = match r {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => {
            let mut m = format!("ornament-tcg-plugin: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            m
        }
        Err(_) => "ornament-tcg-plugin: panic during install".to_owned(),
    };
    let _ = catch_unwind(|| {
        if let Ok(api) = Api::resolve() {
            api.log(&msg);
        }
    });
    -1
}
