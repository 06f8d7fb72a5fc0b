//! Real-guest tests of the TCG plugin: the Debian 6.1 cloud kernel under `qemu-system-x86_64
//! -accel tcg`, a static workload as `/init` (`tests/guest/workload.c`), the host side
//! (`plugin_link.rs`) counting hits exactly.
//!
//! Inputs (by `ornament_test_gate`'s rule: skipped with a message when missing, failing
//! under CI):
//! - `ORNAMENT_TEST_KERNEL` (bzImage), `ORNAMENT_TEST_SYSTEM_MAP` (its real System.map);
//!   by default the default guest image's, built into the image cache when missing;
//! - `qemu-system-x86_64` >= 10.0 on `PATH` (or `ORNAMENT_TEST_QEMU`), `musl-gcc`, `python3`;
//! - the plugin: `ORNAMENT_TEST_PLUGIN`, else built with cargo into this test's target dir;
//! - struct offsets: from the committed profile (`profiles/<release>.json`) of the kernel
//!   booted, its release read from the bzImage's own version string; `ORNAMENT_TEST_OFFSETS`
//!   = `comm,syscall_work,emu_bit,pt_regs_ax` and `ORNAMENT_TEST_MM_OFFSETS` =
//!   `mm,arg_start,arg_end` (hex or decimal) override them for a kernel without one.
#![allow(missing_docs, clippy::cast_possible_truncation)]

#[path = "../../qemu/src/plugin_link.rs"]
pub mod plugin_link;

use ornament_engine::wire::{MemRead, ProbeSpec, Reg, RegMask};
use ornament_engine::{Action, Gpa, Gva, MemError, PhysMemory, ProbeId};
use ornament_test_gate::require;
use plugin_link::{DenyConfig, GuestRam, PluginHit, PluginLink, PluginLinkError};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Kernel and System.map of the default image with its reference kernel (whose
/// profile is committed; built into the cache if needed).
fn default_image() -> Result<(PathBuf, PathBuf), String> {
    static IMG: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    IMG.get_or_init(|| {
        let img = ornament_images::build_image(
            ornament_images::DEFAULT_IMAGE,
            &ornament_images::BuildOptions::reference(ornament_images::DEFAULT_IMAGE),
        )
        .map_err(|e| format!("building the default image: {e}"))?;
        Ok((img.kernel(), img.system_map()))
    })
    .clone()
}
const GUEST_MEM_MIB: u64 = 512;

/// The inputs every real-guest test needs (see the module documentation); under the
/// workspace's one rule (`ornament_test_gate`) a missing one fails under CI.
const INPUTS: &str =
    "the real-guest inputs (kernel and System.map, QEMU >= 10.0, the plugin, musl-gcc, python3)";

struct Env {
    kernel: PathBuf,
    symbols: HashMap<String, u64>,
    initramfs: PathBuf,
    plugin: PathBuf,
    qemu: String,
    /// The booted kernel's release and its committed profile (`None`: no profile).
    release: String,
    profile: Option<serde_json::Value>,
    comm_offset: u64,
    syscall_work_offset: u64,
    emu_bit: u32,
    pt_regs_ax: u64,
}

fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn env() -> Result<Env, String> {
    let (kernel, map) = match (
        std::env::var_os("ORNAMENT_TEST_KERNEL"),
        std::env::var_os("ORNAMENT_TEST_SYSTEM_MAP"),
    ) {
        (Some(k), Some(m)) => (PathBuf::from(k), PathBuf::from(m)),
        _ => default_image()?,
    };
    if !kernel.is_file() {
        return Err(format!(
            "kernel {} not found (ORNAMENT_TEST_KERNEL)",
            kernel.display()
        ));
    }
    let text = std::fs::read_to_string(&map).map_err(|e| {
        format!(
            "System.map {} unreadable (ORNAMENT_TEST_SYSTEM_MAP): {e}",
            map.display()
        )
    })?;
    let mut symbols = HashMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(a), Some(_), Some(n)) = (it.next(), it.next(), it.next()) {
            if let Ok(a) = u64::from_str_radix(a, 16) {
                symbols.entry(n.to_owned()).or_insert(a);
            }
        }
    }
    let qemu = std::env::var("ORNAMENT_TEST_QEMU").unwrap_or("qemu-system-x86_64".into());
    let v = Command::new(&qemu)
        .arg("--version")
        .output()
        .map_err(|e| format!("{qemu} not runnable: {e}"))?;
    let vs = String::from_utf8_lossy(&v.stdout).to_string();
    let major = vs
        .split("version ")
        .nth(1)
        .and_then(|r| r.split('.').next())
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if major < 10 {
        return Err(format!(
            "{qemu} is not QEMU >= 10.0 (plugin API v4): {}",
            vs.trim()
        ));
    }
    static PLUGIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let plugin = PLUGIN.get_or_init(plugin_so).clone()?;
    static INITRAMFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let initramfs = INITRAMFS.get_or_init(build_initramfs).clone()?;
    let release = kernel_release(&kernel)?;
    let profile = committed_profile(&release)?;
    let offs: Vec<u64> = match (std::env::var("ORNAMENT_TEST_OFFSETS"), &profile) {
        (Ok(v), _) => v.split(',').filter_map(parse_num).collect(),
        (Err(_), Some(p)) => vec![
            profile_offset(p, "task_struct", "comm"),
            profile_offset(p, "task_struct", "thread_info.syscall_work"),
            // SYSCALL_WORK_BIT_SYSCALL_EMU: an enum value, the same in 6.1 and 6.12.
            3,
            profile_offset(p, "pt_regs", "ax"),
        ],
        (Err(_), None) => {
            return Err(format!(
                "no committed profile for kernel {release} (profiles/{release}.json): \
                 set ORNAMENT_TEST_OFFSETS and ORNAMENT_TEST_MM_OFFSETS"
            ))
        }
    };
    if offs.len() != 4 {
        return Err("ORNAMENT_TEST_OFFSETS must be comm,syscall_work,emu_bit,pt_regs_ax".into());
    }
    Ok(Env {
        kernel,
        symbols,
        initramfs,
        plugin,
        qemu,
        release,
        profile,
        comm_offset: offs[0],
        syscall_work_offset: offs[1],
        emu_bit: u32::try_from(offs[2]).map_err(|e| e.to_string())?,
        pt_regs_ax: offs[3],
    })
}

/// The release of a bzImage (`6.1.0-50-cloud-amd64`): the first word of the version
/// string its setup header points at (`kernel_version` at 0x20e, plus 0x200).
fn kernel_release(kernel: &Path) -> Result<String, String> {
    let b = std::fs::read(kernel).map_err(|e| format!("kernel {}: {e}", kernel.display()))?;
    let bad = || {
        format!(
            "kernel {} is not a bzImage with a version string",
            kernel.display()
        )
    };
    if b.get(0x202..0x206) != Some(b"HdrS") {
        return Err(bad());
    }
    let at = b
        .get(0x20e..0x210)
        .map(|v| usize::from(u16::from_le_bytes([v[0], v[1]])) + 0x200)
        .ok_or_else(bad)?;
    let text = b.get(at..at.saturating_add(256)).ok_or_else(bad)?;
    let release: String = text
        .iter()
        .take_while(|c| c.is_ascii_graphic())
        .map(|c| char::from(*c))
        .collect();
    if release.is_empty() {
        return Err(bad());
    }
    Ok(release)
}

/// The committed profile of `release`, if there is one.
fn committed_profile(release: &str) -> Result<Option<serde_json::Value>, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../profiles")
        .join(format!("{release}.json"));
    match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// `struct.field`'s offset in a profile.
fn profile_offset(p: &serde_json::Value, s: &str, f: &str) -> u64 {
    p["structs"][s]["fields"][f]["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("{s}.{f} is not in the committed profile"))
}

/// The plugin `.so`: `ORNAMENT_TEST_PLUGIN`, or built now (a no-op when fresh) into the target
/// directory of this test binary with its profile (`cargo test` builds only the rlib).
fn plugin_so() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("ORNAMENT_TEST_PLUGIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe.parent().and_then(Path::parent).ok_or("no target dir")?;
    let target = profile_dir.parent().ok_or("no target dir")?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or("cargo".into());
    let mut c = Command::new(cargo);
    c.args(["build", "--lib", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target);
    if release {
        c.arg("--release");
    }
    let st = c
        .status()
        .map_err(|e| format!("cannot run cargo to build the plugin: {e}"))?;
    let so = profile_dir.join("libornament_tcg_plugin.so");
    if !st.success() || !so.is_file() {
        return Err(format!("plugin {} could not be built", so.display()));
    }
    Ok(so)
}

/// `tests/guest/workload.c` as `/init` of an initramfs, built once per test process under
/// cargo's test scratch directory (written to a per-process name, then renamed into place).
fn build_initramfs() -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ornament-tcg-plugin");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pid = std::process::id();
    let bin = dir.join(format!("workload-{pid}"));
    let st = Command::new("musl-gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(src.join("workload.c"))
        .status()
        .map_err(|e| format!("musl-gcc not runnable: {e}"))?;
    if !st.success() {
        return Err("musl-gcc failed on workload.c".into());
    }
    let tmp = dir.join(format!("workload-{pid}.cpio"));
    let st = Command::new("python3")
        .arg(src.join("mkcpio.py"))
        .arg(&bin)
        .arg(&tmp)
        .status()
        .map_err(|e| format!("python3 not runnable: {e}"))?;
    let _ = std::fs::remove_file(&bin);
    if !st.success() {
        return Err("mkcpio.py failed".into());
    }
    let out = dir.join("workload.cpio");
    std::fs::rename(&tmp, &out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(out)
}

impl Env {
    /// Per-CPU offset of the current task pointer: `current_task` (6.1), or the start of
    /// `pcpu_hot`, whose first field it is (6.12).
    fn current_task_offset(&self) -> u64 {
        self.symbols
            .get("current_task")
            .or_else(|| self.symbols.get("pcpu_hot"))
            .copied()
            .expect("current_task or pcpu_hot in System.map")
    }

    /// Arm the mark probe: `getpid`, held, so the workload's `mark` steps the test.
    fn arm_mark(&self, l: &mut PluginLink, regs: RegMask) {
        l.arm(P_MARK, self.sym("__x64_sys_getpid"), held(regs))
            .expect("arm mark");
    }

    fn sym(&self, name: &str) -> Gva {
        Gva(*self
            .symbols
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in System.map")))
    }

    fn spawn_qemu(
        &self,
        vcpus: u32,
        workload: &str,
        plugin_arg: Option<String>,
        ram: &Path,
    ) -> Child {
        let mut c = Command::new(&self.qemu);
        c.args(["-M", "pc", "-accel", "tcg", "-smp"])
            .arg(vcpus.to_string())
            .args(["-m", &format!("{GUEST_MEM_MIB}")])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 nokaslr quiet -- {workload}"
            ))
            .arg("-no-reboot")
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={GUEST_MEM_MIB}M,mem-path={},share=on",
                ram.display()
            ))
            .args(["-machine", "memory-backend=mem"]);
        if let Some(p) = plugin_arg {
            c.arg("-plugin").arg(p);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().expect("spawn qemu")
    }
}

/// Guest RAM through QEMU's shared file (`-M pc` with <= 2.75 GiB: gpa == file offset).
struct ShmRam {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through bounds-checked copies
// or atomics.
unsafe impl Send for ShmRam {}
// SAFETY: as above.
unsafe impl Sync for ShmRam {}

impl ShmRam {
    fn open(path: &Path) -> ShmRam {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open ram file");
        let len = usize::try_from(f.metadata().expect("stat").len()).expect("size");
        use std::os::fd::AsRawFd;
        // SAFETY: mapping a regular file we opened read-write, shared, whole length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap ram file");
        ShmRam {
            ptr: ptr.cast(),
            len,
        }
    }

    fn range(&self, gpa: Gpa, n: usize) -> Result<usize, MemError> {
        let err = MemError::OutOfRange { gpa, len: n as u64 };
        let s = usize::try_from(gpa.raw()).map_err(|_| err.clone())?;
        if s.checked_add(n).is_none_or(|e| e > self.len) {
            return Err(err);
        }
        Ok(s)
    }

    fn atomic(&self, gpa: Gpa) -> Result<&AtomicU64, MemError> {
        let s = self.range(gpa, 8)?;
        if s % 8 != 0 {
            return Err(MemError::OutOfRange { gpa, len: 8 });
        }
        // SAFETY: in bounds, 8-aligned (the mapping is page-aligned), and the memory is only
        // accessed atomically by us while the guest uses locked ops or plain stores on it.
        Ok(unsafe { &*self.ptr.add(s).cast::<AtomicU64>() })
    }
}

impl Drop for ShmRam {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `open` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl PhysMemory for ShmRam {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        let s = self.range(gpa, buf.len())?;
        // SAFETY: in bounds of the live mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(s), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn write_phys(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemError> {
        let s = self.range(gpa, buf.len())?;
        // SAFETY: in bounds of the live mapping.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.add(s), buf.len()) };
        Ok(())
    }
    fn size(&self) -> u64 {
        self.len as u64
    }
}

impl GuestRam for ShmRam {
    fn fetch_or_u64(&self, gpa: Gpa, bits: u64) -> Result<u64, MemError> {
        Ok(self.atomic(gpa)?.fetch_or(bits, Ordering::SeqCst))
    }
    fn fetch_and_u64(&self, gpa: Gpa, mask: u64) -> Result<u64, MemError> {
        Ok(self.atomic(gpa)?.fetch_and(mask, Ordering::SeqCst))
    }
}

struct Outcome {
    hits: Vec<PluginHit>,
    serial: String,
    link: PluginLink,
    wall: Duration,
}

impl Outcome {
    fn wl_line(&self, prefix: &str) -> String {
        self.serial
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in serial output:\n{}", self.serial))
            .to_owned()
    }
}

fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.split('(').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
}

/// Boot the guest with the plugin; `setup` arms the initial probes (and may enable denies),
/// `on_hit` decides held hits and may arm/disarm. Returns every hit delivered.
fn run(
    e: &Env,
    name: &str,
    vcpus: u32,
    workload: &str,
    setup: impl FnOnce(&mut PluginLink, &Path),
    on_hit: impl FnMut(&mut PluginLink, &PluginHit) -> Action,
) -> Outcome {
    run_with(e, name, vcpus, workload, &[], setup, on_hit, |_| true)
}

/// `run` with extra plugin options and a per-held-hit choice to leave it unanswered.
#[allow(clippy::too_many_arguments)]
fn run_with(
    e: &Env,
    name: &str,
    vcpus: u32,
    workload: &str,
    plugin_opts: &[&str],
    setup: impl FnOnce(&mut PluginLink, &Path),
    mut on_hit: impl FnMut(&mut PluginLink, &PluginHit) -> Action,
    mut answer: impl FnMut(&PluginHit) -> bool,
) -> Outcome {
    // Sockets stay in the system temp dir: unix socket paths are limited to 108 bytes.
    let sock = std::env::temp_dir().join(format!(
        "ornament-plugin-{}-{name}.sock",
        std::process::id()
    ));
    let ram = PathBuf::from(format!(
        "/dev/shm/ornament-plugin-test-{}-{name}",
        std::process::id()
    ));
    let mut link = PluginLink::listen(&sock).expect("listen");
    // Created here at its final size so `setup` can map it; QEMU uses an existing file as is.
    std::fs::File::create(&ram)
        .and_then(|f| f.set_len(GUEST_MEM_MIB << 20))
        .expect("create guest RAM file");
    setup(&mut link, &ram);
    let [_, parg] = link.qemu_args(&e.plugin, plugin_opts);
    let t0 = Instant::now();
    let mut child = e.spawn_qemu(vcpus, workload, Some(parg), &ram);
    let mut out = child.stdout.take().expect("stdout");
    let serial_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    if let Err(err) = link.accept(Duration::from_secs(30)) {
        let _ = child.kill();
        let mut es = String::new();
        let _ = child.stderr.take().expect("stderr").read_to_string(&mut es);
        panic!("plugin did not connect: {err}; qemu stderr: {es}");
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut hits = Vec::new();
    loop {
        match link.next_hit(Duration::from_millis(200)) {
            Ok(Some(h)) => {
                if h.hit.held {
                    let a = on_hit(&mut link, &h);
                    if answer(&h) {
                        link.answer(&h, a).expect("answer");
                    }
                } else {
                    let _ = on_hit(&mut link, &h);
                }
                hits.push(h);
            }
            Ok(None) => {}
            Err(PluginLinkError::Closed) => break,
            Err(err) => panic!("link: {err}"),
        }
        assert!(Instant::now() < deadline, "guest did not finish in time");
    }
    let st = child.wait().expect("wait qemu");
    let wall = t0.elapsed();
    let serial = serial_t.join().expect("serial thread");
    let mut es = String::new();
    let _ = child.stderr.take().expect("stderr").read_to_string(&mut es);
    let _ = std::fs::remove_file(&ram);
    assert!(st.success(), "qemu failed: {st}; stderr: {es}");
    assert!(
        serial.contains("WL done"),
        "workload did not finish:\n{serial}\n{es}"
    );
    Outcome {
        hits,
        serial,
        link,
        wall,
    }
}

const P_GETPPID: ProbeId = ProbeId(1);
const P_FORK: ProbeId = ProbeId(2);
const P_EXEC: ProbeId = ProbeId(3);
const P_EXIT: ProbeId = ProbeId(4);
const P_MARK: ProbeId = ProbeId(10);
const P_GETUID: ProbeId = ProbeId(11);
const P_SYSCALL: ProbeId = ProbeId(12);

/// The first 5 bytes of the task's `comm` (memory read 0) are "init\0".
fn comm_is_init(h: &PluginHit) -> bool {
    h.mem[0].is_some_and(|v| v & 0xff_ffff_ffff == u64::from_le_bytes(*b"init\0\0\0\0"))
}

fn held(regs: RegMask) -> ProbeSpec {
    let mut s = ProbeSpec::regs(regs);
    s.hold = true;
    s
}

fn counts_on(vcpus: u32) {
    let e = require!(INPUTS, env());
    let (n, m, pn) = (3000u64, 25u64, 2000u64);
    let mut marks = 0;
    let mut exits = 0u64;
    let conn = {
        let mut s = ProbeSpec::regs(RegMask::of(&[Reg::Rip, Reg::Rdi]));
        s.mem[0] = MemRead::at_reg(Reg::Rdi, e.comm_offset, 8);
        s
    };
    let o = run(
        &e,
        &format!("counts{vcpus}"),
        vcpus,
        &format!("mark fork {m} mark getppid {n} pgetppid {pn}"),
        |l, _| {
            l.arm(
                P_GETPPID,
                e.sym("__x64_sys_getppid"),
                ProbeSpec::regs(RegMask::of(&[Reg::Rip])),
            )
            .expect("arm");
            l.add_candidate(P_FORK, e.sym("proc_fork_connector"), conn)
                .expect("cand");
            l.add_candidate(P_EXEC, e.sym("proc_exec_connector"), conn)
                .expect("cand");
            l.add_candidate(P_EXIT, e.sym("proc_exit_connector"), conn)
                .expect("cand");
            e.arm_mark(l, RegMask::of(&[Reg::Rip]));
        },
        |l, h| {
            // A child reaches `proc_exit_connector` only after `exit_notify` has woken its
            // parent, so with 2 vCPUs the parent's second mark can come before the last
            // child's exit hit. The exit probe is therefore disarmed at the later of the
            // second mark and the m-th exit; the pinned getppid child, forked after that,
            // exits after it and must not be counted.
            if h.hit.probe == P_EXIT && comm_is_init(h) {
                exits += 1;
                if marks == 2 && exits == m {
                    l.disarm(P_EXIT).expect("disarm");
                }
            }
            if h.hit.probe == P_MARK {
                marks += 1;
                for p in [P_FORK, P_EXEC, P_EXIT] {
                    if marks == 2 && p == P_EXIT && exits < m {
                        continue;
                    }
                    if marks == 1 {
                        l.arm(
                            p,
                            e.sym(match p {
                                P_FORK => "proc_fork_connector",
                                P_EXEC => "proc_exec_connector",
                                _ => "proc_exit_connector",
                            }),
                            conn,
                        )
                        .expect("arm");
                    } else {
                        l.disarm(p).expect("disarm");
                    }
                }
            }
            Action::Continue
        },
    );
    let count = |p: ProbeId, only_init: bool| {
        o.hits
            .iter()
            .filter(|h| h.hit.probe == p && (!only_init || comm_is_init(h)))
            .count() as u64
    };
    let line = o.wl_line("WL fork");
    assert_eq!(field(&line, "ok"), m as i64, "{line}");
    eprintln!(
        "vcpus={vcpus}: getppid {} fork {}/{} exec {}/{} exit {}/{} marks {} (init-only/all), wall {:?}, per-vcpu getppid {:?}",
        count(P_GETPPID, false),
        count(P_FORK, true),
        count(P_FORK, false),
        count(P_EXEC, true),
        count(P_EXEC, false),
        count(P_EXIT, true),
        count(P_EXIT, false),
        count(P_MARK, false),
        o.wall,
        (0..vcpus)
            .map(|v| o.hits.iter().filter(|h| h.hit.probe == P_GETPPID && h.hit.vcpu == v).count())
            .collect::<Vec<_>>()
    );
    assert_eq!(count(P_GETPPID, false), n + 2 * pn);
    if vcpus > 1 {
        let on1 = o
            .hits
            .iter()
            .filter(|h| h.hit.probe == P_GETPPID && h.hit.vcpu == 1)
            .count();
        assert!(on1 as u64 >= pn, "the pinned child ran on vCPU 1");
    }
    assert_eq!(count(P_FORK, true), m);
    assert_eq!(count(P_EXEC, true), m);
    assert_eq!(count(P_EXIT, true), m);
    assert_eq!(count(P_MARK, false), 2);
    for h in o.hits.iter().filter(|h| h.hit.probe == P_GETPPID) {
        assert_eq!(Gva(h.hit.regs.rip), e.sym("__x64_sys_getppid"));
    }
    // Per-vCPU sequence numbers have no gaps: no record was lost.
    for v in 0..vcpus {
        let seqs: Vec<u64> = o
            .hits
            .iter()
            .filter(|h| h.hit.vcpu == v)
            .map(|h| h.vcpu_seq)
            .collect();
        assert!(
            seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + 1),
            "vcpu {v} seq gap"
        );
    }
    assert!(
        o.link.plugin_errors().is_empty(),
        "{:?}",
        o.link.plugin_errors()
    );
}

#[test]
fn exact_counts_one_vcpu() {
    counts_on(1);
}

#[test]
fn exact_counts_two_vcpus() {
    counts_on(2);
}

/// `task->mm`, `mm->arg_start` and `mm->arg_end` offsets: `ORNAMENT_TEST_MM_OFFSETS`
/// (`mm,arg_start,arg_end`), else from the committed profile of the kernel booted.
fn mm_offsets(e: &Env) -> (u64, u64, u64) {
    if let Ok(v) = std::env::var("ORNAMENT_TEST_MM_OFFSETS") {
        let o: Vec<u64> = v.split(',').filter_map(parse_num).collect();
        assert_eq!(
            o.len(),
            3,
            "ORNAMENT_TEST_MM_OFFSETS must be mm,arg_start,arg_end"
        );
        return (o[0], o[1], o[2]);
    }
    let p = e.profile.as_ref().unwrap_or_else(|| {
        panic!(
            "no committed profile for kernel {}: set ORNAMENT_TEST_MM_OFFSETS",
            e.release
        )
    });
    (
        profile_offset(p, "task_struct", "mm"),
        profile_offset(p, "mm_struct", "arg_start"),
        profile_offset(p, "mm_struct", "arg_end"),
    )
}

/// A byte range read at the hit: at `proc_exec_connector` the new command line between
/// `mm->arg_start` and `mm->arg_end` (chained reads), whole, and cut at the probe's `max`.
#[test]
fn byte_range_is_the_exec_command_line() {
    use ornament_engine::wire::BytesRead;
    let e = require!(INPUTS, env());
    let (mm, arg_start, arg_end) = mm_offsets(&e);
    let spec = |max: u32| {
        let mut s = ProbeSpec::regs(RegMask::of(&[Reg::Rip, Reg::Rdi, Reg::Cr3, Reg::Cr4]));
        s.mem[0] = MemRead::at_reg(Reg::Rdi, mm, 8);
        s.mem[1] = MemRead::at_mem(0, arg_start, 8);
        s.mem[2] = MemRead::at_mem(0, arg_end, 8);
        s.bytes = BytesRead {
            start: 1,
            end: 2,
            max,
        };
        s
    };
    for (max, want, complete) in [
        (4096, &b"/init\0child\0"[..], true),
        (8, &b"/init\0ch"[..], false),
    ] {
        let o = run(
            &e,
            &format!("bytes{max}"),
            1,
            "fork 3",
            |l, _| {
                l.arm(P_EXEC, e.sym("proc_exec_connector"), spec(max))
                    .expect("arm");
            },
            |_, _| Action::Continue,
        );
        // The kernel's exec of /init (its own command line), then three of `/init child`.
        let execs: Vec<_> = o.hits.iter().filter(|h| h.hit.probe == P_EXEC).collect();
        assert_eq!(execs.len(), 4, "/init, then three execs of /init child");
        for (i, h) in execs.iter().enumerate() {
            assert!(!h.hit.held);
            let b = h.hit.bytes.as_ref().expect("bytes read at the hit");
            let got = (b.data.as_slice(), b.complete);
            let text = String::from_utf8_lossy(&b.data);
            if i == 0 {
                assert!(b.data.starts_with(b"/init\0"), "{text:?}");
                assert_ne!(got, (want, complete), "{text:?}");
            } else {
                assert_eq!(got, (want, complete), "{text:?}");
            }
        }
        assert!(o.link.plugin_errors().is_empty());
    }
}

/// The kernel's direct map without KASLR (the test guests boot with `nokaslr`):
/// `page_offset_base`, where guest-physical 0 is mapped.
const DIRECT_MAP_NOKASLR: u64 = 0xffff_8880_0000_0000;

/// Memory reads before and after the host hands the plugin guest RAM (its own page walk over
/// the RAM file instead of QEMU's accessor) give the same values; chained reads follow the
/// pointer they name, and fail when it failed.
///
/// To show the later reads really come from the file the host sent, that file is a copy of
/// guest RAM taken while the guest is held at the mark, with one change: the task's `comm`
/// says `ramfile`. Only the plugin's own page walk can see it; every other value (the task,
/// its pid, tgid, parent, mm, page-table root, cred and uid, read through chains) must equal
/// what QEMU's accessor read before the mark, on every one of the hits.
#[test]
fn reads_through_the_ram_file_match_qemus() {
    use ornament_engine::wire::{MemBase, RamPaging, RamRegion};
    use std::cell::RefCell;
    let e = require!(INPUTS, env());
    let p = e
        .profile
        .as_ref()
        .unwrap_or_else(|| panic!("no committed profile for kernel {}", e.release));
    let off = |s: &str, f: &str| profile_offset(p, s, f);
    let n = 400u64;
    let mut spec = ProbeSpec::regs(RegMask::of(&[Reg::GsBase, Reg::Cr3, Reg::Cr4]));
    spec.mem[0] = MemRead::at_reg(Reg::GsBase, e.current_task_offset(), 8);
    let chain = |j: u8, offset: u64| MemRead::at_mem(j, offset, 8);
    spec.mem[1] = chain(0, e.comm_offset);
    // A read of the NULL page fails, and so does the read chained to it.
    spec.mem[2] = MemRead {
        base: MemBase::Absolute,
        offset: 0,
        len: 8,
    };
    spec.mem[3] = chain(2, 0);
    // A read that crosses into the next page (split by the plugin's walk).
    spec.mem[4] = chain(0, 0xffc);
    spec.mem[5] = MemRead::at_mem(0, 0xffc, 4);
    spec.mem[6] = chain(0, 0x1000);
    // Fields that stay put while the workload loops: pid, tgid, parent and its pid, mm and
    // its page-table root, cred and its uid.
    spec.mem[7] = MemRead::at_mem(0, off("task_struct", "pid"), 4);
    spec.mem[8] = MemRead::at_mem(0, off("task_struct", "tgid"), 4);
    spec.mem[9] = chain(0, off("task_struct", "real_parent"));
    spec.mem[10] = MemRead::at_mem(9, off("task_struct", "pid"), 4);
    spec.mem[11] = chain(0, off("task_struct", "mm"));
    spec.mem[12] = chain(11, off("mm_struct", "pgd"));
    spec.mem[13] = chain(0, off("task_struct", "cred"));
    spec.mem[14] = MemRead::at_mem(13, off("cred", "uid"), 4);
    const STABLE: [usize; 9] = [0, 7, 8, 9, 10, 11, 12, 13, 14];
    let snap = PathBuf::from(format!(
        "/dev/shm/ornament-plugin-test-{}-ramfile-copy",
        std::process::id()
    ));
    let ram_path = RefCell::new(PathBuf::new());
    let mut task = None;
    let mut sent = false;
    let o = run(
        &e,
        "ramfile",
        1,
        &format!("getppid {n} mark getppid {n}"),
        |l, ram| {
            *ram_path.borrow_mut() = ram.to_path_buf();
            l.arm(P_GETPPID, e.sym("__x64_sys_getppid"), spec)
                .expect("arm");
            e.arm_mark(l, RegMask::of(&[Reg::Rip]));
        },
        |l, h| {
            if h.hit.probe == P_GETPPID && !sent {
                task = h.mem[0];
            }
            if h.hit.probe == P_MARK && !sent {
                use std::os::fd::AsFd;
                use std::os::unix::fs::FileExt;
                // The only vCPU is held here: the copy is a still picture of guest RAM.
                std::fs::copy(&*ram_path.borrow(), &snap).expect("copy guest RAM");
                let task = task.expect("getppid hits before the mark");
                let comm_gpa = (task + e.comm_offset)
                    .checked_sub(DIRECT_MAP_NOKASLR)
                    .expect("task_struct in the direct map");
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&snap)
                    .expect("open the copy");
                f.write_all_at(b"ramfile\0", comm_gpa)
                    .expect("mark the copy");
                // -M pc, 512 MiB: low RAM below the VGA hole, then RAM from 1 MiB, at
                // file offset == guest-physical address.
                let regions = [
                    RamRegion {
                        gpa: 0,
                        len: 0xa_0000,
                        file_offset: 0,
                    },
                    RamRegion {
                        gpa: 0x10_0000,
                        len: (GUEST_MEM_MIB << 20) - 0x10_0000,
                        file_offset: 0x10_0000,
                    },
                ];
                l.send_ram(f.as_fd(), &regions, RamPaging::FromCr4)
                    .expect("send ram");
                sent = true;
            }
            Action::Continue
        },
    );
    let _ = std::fs::remove_file(&snap);
    assert!(sent, "no mark hit");
    let mut marked = false;
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for h in &o.hits {
        if h.hit.probe == P_MARK {
            marked = true;
            continue;
        }
        assert_eq!(
            (h.mem[2], h.mem[3]),
            (None, None),
            "NULL page and its chain"
        );
        let split = h.mem[4].expect("page-crossing read");
        let (lo, hi) = (h.mem[5].expect("lo"), h.mem[6].expect("hi"));
        assert_eq!(split, lo | (hi << 32), "split read");
        (if marked { &mut after } else { &mut before }).push(h);
    }
    assert_eq!(before.len() as u64, n);
    assert_eq!(after.len() as u64, n);
    let comm = |h: &PluginHit| h.mem[1].map(u64::to_le_bytes);
    // Before: QEMU's accessor, the live guest. After: the marked copy, so the plugin's own walk.
    for h in &before {
        let c = comm(h).expect("comm");
        assert_eq!(&c[..5], b"init\0", "comm before the RAM file: {c:?}");
    }
    for h in &after {
        assert_eq!(
            comm(h),
            Some(*b"ramfile\0"),
            "reads after the mark did not come from the RAM file the host sent"
        );
    }
    // Every stable read of every hit, both ways, equals the first hit's; and they are what
    // they must be: pid 1 (/init), its own tgid, parent pid 0, uid 0, kernel pointers.
    let stable = |h: &PluginHit| STABLE.map(|i| h.mem[i]);
    let first = stable(before[0]);
    for h in before.iter().chain(&after) {
        assert_eq!(stable(h), first, "hit {}", h.hit.seq);
    }
    let v = |i: usize| first[STABLE.iter().position(|&j| j == i).expect("stable")];
    assert_eq!(
        (v(7), v(8), v(10), v(14)),
        (Some(1), Some(1), Some(0), Some(0))
    );
    for i in [0, 9, 11, 13] {
        assert!(
            v(i).is_some_and(|a| a >= DIRECT_MAP_NOKASLR),
            "read {i}: {first:x?}"
        );
    }
    assert!(
        v(12).is_some_and(|a| a >= DIRECT_MAP_NOKASLR),
        "pgd: {first:x?}"
    );
    assert!(
        o.link.plugin_errors().is_empty(),
        "{:?}",
        o.link.plugin_errors()
    );
}

/// Arming a new address (not a candidate: needs retranslation) and disarming it while held at
/// a marker take effect: hits come only from the middle loop, and none from the 20000 calls
/// after the disarm (the guest runs them: the workload reports the loop). Disarming is exact
/// (a flag); arming a new address waits for QEMU's asynchronous `qemu_plugin_reset`, which
/// runs once every vCPU is outside guest code, so the first calls of the middle loop may run
/// before it (on a loaded 2-core host it took longer than a 200-call loop once).
#[test]
fn arm_new_address_and_disarm_while_running() {
    let e = require!(INPUTS, env());
    let mut marks = 0;
    let o = run(
        &e,
        "armnew",
        2,
        "getppid 100 mark getppid 20000 mark getppid 20000",
        |l, _| {
            e.arm_mark(l, RegMask::NONE);
        },
        |l, h| {
            if h.hit.probe == P_MARK {
                marks += 1;
                if marks == 1 {
                    l.arm(
                        P_GETPPID,
                        e.sym("__x64_sys_getppid"),
                        ProbeSpec::regs(RegMask::of(&[Reg::Rip])),
                    )
                    .expect("arm");
                } else {
                    l.disarm(P_GETPPID).expect("disarm");
                }
            }
            Action::Continue
        },
    );
    // getppid hits in each stretch between marks, in delivery order (hit order).
    let mut per_stretch = [0usize; 3];
    let mut stretch = 0;
    for h in &o.hits {
        match h.hit.probe {
            P_MARK => stretch += 1,
            P_GETPPID => per_stretch[stretch.min(2)] += 1,
            other => panic!("unexpected probe {other:?}"),
        }
    }
    assert_eq!(stretch, 2, "two marks");
    let loops: Vec<i64> = o
        .serial
        .lines()
        .filter(|l| l.starts_with("WL getppid"))
        .map(|l| field(l, "n"))
        .collect();
    assert_eq!(loops, [100, 20000, 20000], "the guest ran all three loops");
    let [before, middle, after] = per_stretch;
    assert_eq!(before, 0, "hits before the probe was armed");
    assert!(middle > 0, "arming at run time never took effect");
    assert!(middle <= 20000, "{middle} hits in a 20000-call loop");
    assert_eq!(after, 0, "hits after the disarm, over 20000 calls");
    eprintln!("armed at run time: {middle} of the middle loop's 20000 calls seen, 0 after");
}

/// A held hit on one vCPU: the workload on the other vCPU keeps running (and keeps hitting).
#[test]
fn hold_blocks_only_its_vcpu() {
    let e = require!(INPUTS, env());
    let hold = Duration::from_millis(1500);
    let mut window = None;
    let o = run(
        &e,
        "hold",
        2,
        "hold",
        |l, _| {
            l.arm(
                P_GETPPID,
                e.sym("__x64_sys_getppid"),
                ProbeSpec::regs(RegMask::of(&[Reg::Rip])),
            )
            .expect("arm");
            l.arm(
                P_GETUID,
                e.sym("__x64_sys_getuid"),
                held(RegMask::of(&[Reg::Rip])),
            )
            .expect("arm");
        },
        |_, h| {
            if h.hit.probe == P_GETUID {
                let t0 = h.hit.time_ns;
                std::thread::sleep(hold);
                window = Some((h.hit.vcpu, t0, t0 + hold.as_nanos() as u64));
            }
            Action::Continue
        },
    );
    let (held_vcpu, t0, t1) = window.expect("getuid was hit");
    let line = o.wl_line("WL hold");
    let during = o
        .hits
        .iter()
        .filter(|h| h.hit.probe == P_GETPPID && h.hit.time_ns > t0 && h.hit.time_ns < t1)
        .collect::<Vec<_>>();
    eprintln!(
        "{line}; hits during the hold: {} (vcpu of hold: {held_vcpu})",
        during.len()
    );
    assert!(field(&line, "held_ms") >= 1400, "{line}");
    assert!(field(&line, "child_calls_during_hold") > 100, "{line}");
    assert!(during.len() > 100);
    assert!(during.iter().all(|h| h.hit.vcpu != held_vcpu));
}

/// `mkdir` denied with EPERM once (the directory is not created), then allowed.
#[test]
fn deny_syscall_returns_errno_and_next_runs() {
    let e = require!(INPUTS, env());
    let mut seen = 0;
    let cfg = DenyConfig {
        syscall_exit: e.sym("syscall_exit_to_user_mode"),
        current_task_offset: e.current_task_offset(),
        syscall_work_offset: e.syscall_work_offset,
        syscall_emu_bit: e.emu_bit,
        pt_regs_ax_offset: e.pt_regs_ax,
    };
    let o = run(
        &e,
        "deny",
        2,
        "deny",
        |l, ram| {
            l.enable_deny(cfg, Arc::new(ShmRam::open(ram)))
                .expect("enable deny");
            l.arm(
                P_SYSCALL,
                e.sym("do_syscall_64"),
                cfg.entry_spec(&[83], RegMask::NONE),
            )
            .expect("arm");
        },
        |l, h| {
            if h.hit.probe == P_SYSCALL && h.hit.regs.rsi == 83 {
                seen += 1;
                if seen == 1 {
                    return Action::DenySyscall { errno: 1 };
                }
            }
            let _ = l;
            Action::Continue
        },
    );
    let line = o.wl_line("WL deny");
    eprintln!("{line}; stats {:?}", o.link.stats());
    assert_eq!(seen, 2);
    assert_eq!(field(&line, "first"), -1, "{line}");
    assert_eq!(field(&line, "errno"), 1, "{line}");
    assert_eq!(field(&line, "exists_after_first"), 0, "{line}");
    assert_eq!(field(&line, "second"), 0, "{line}");
    assert_eq!(field(&line, "exists_after_second"), 1, "{line}");
    assert_eq!(o.link.stats().denied, 1);
    assert_eq!(o.link.stats().internal_hits, 1);
}

/// Per-hit cost on a getppid loop, in one boot with the plugin (no probe at the address /
/// probe reporting registers and a memory read / callback present but disarmed / probe
/// reporting no registers / probe reporting registers only) and one boot without the plugin. Prints the numbers; run with
/// `cargo test --release -p ornament-tcg-plugin --test real_guest -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, prints numbers"]
fn measure_per_hit_cost() {
    let e = require!(INPUTS, env());
    let n = 20_000u64;
    let rounds: usize = std::env::var("ORNAMENT_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let per_call = |o: &Outcome| -> Vec<i64> {
        o.serial
            .lines()
            .filter(|l| l.starts_with("WL getppid"))
            .map(|l| field(l, "min_chunk_ns_per_call"))
            .collect()
    };
    for round in 0..rounds {
        // Without the plugin: same kernel, same workload, same RAM file backend.
        let ram = PathBuf::from(format!(
            "/dev/shm/ornament-plugin-bench-{}",
            std::process::id()
        ));
        let t0 = Instant::now();
        let mut c = e.spawn_qemu(
            1,
            &format!("getppid {n} getppid {n} getppid {n} getppid {n}"),
            None,
            &ram,
        );
        let mut s = String::new();
        let _ = c.stdout.take().expect("stdout").read_to_string(&mut s);
        let _ = c.wait();
        let _ = std::fs::remove_file(&ram);
        let bare: Vec<i64> = s
            .lines()
            .filter(|l| l.starts_with("WL getppid"))
            .map(|l| field(l, "min_chunk_ns_per_call"))
            .collect();
        let bare_wall = t0.elapsed();

        let mut marks = 0;
        let full = {
            let mut sp = ProbeSpec::regs(RegMask::of(&[
                Reg::Rip,
                Reg::Rdi,
                Reg::Rsi,
                Reg::GsBase,
                Reg::Cr3,
            ]));
            sp.mem[0] = MemRead::at_reg(Reg::GsBase, e.current_task_offset(), 8);
            sp
        };
        let o = run(
            &e,
            "bench",
            1,
            &format!(
                "getppid {n} mark getppid {n} mark getppid {n} mark getppid {n} mark getppid {n}"
            ),
            |l, _| {
                e.arm_mark(l, RegMask::NONE);
            },
            |l, h| {
                if h.hit.probe == P_MARK {
                    marks += 1;
                    match marks {
                        1 => l
                            .arm(P_GETPPID, e.sym("__x64_sys_getppid"), full)
                            .expect("arm"),
                        2 => l.disarm(P_GETPPID).expect("disarm"),
                        3 => l
                            .arm(
                                P_GETPPID,
                                e.sym("__x64_sys_getppid"),
                                ProbeSpec::regs(RegMask::NONE),
                            )
                            .expect("arm"),
                        _ => l
                            .arm(
                                P_GETPPID,
                                e.sym("__x64_sys_getppid"),
                                ProbeSpec::regs(full.regs),
                            )
                            .expect("arm"),
                    }
                }
                Action::Continue
            },
        );
        let got = o.hits.iter().filter(|h| h.hit.probe == P_GETPPID).count() as u64;
        assert_eq!(got, 3 * n);
        let p = per_call(&o);
        eprintln!(
            "round {round}: ns per getppid (fastest tenth of each loop): no plugin {bare:?} (boot+run {bare_wall:?}); plugin: no probe {}, \
             probe (5 regs + 1 mem read) {}, probe disarmed {}, probe (no regs) {}, probe (5 regs) {} \
             (boot+run {:?}); hits {got}",
            p[0], p[1], p[2], p[3], p[4], o.wall
        );
    }
}

/// A held hit nobody answers: the vCPU goes on after the plugin's hold timeout, and the plugin
/// says so with a `HoldTimeout` error record.
#[test]
fn unanswered_hold_times_out_and_is_reported() {
    let e = require!(INPUTS, env());
    let o = run_with(
        &e,
        "holdtimeout",
        1,
        "mark getppid 10",
        &["hold_timeout_ms=700"],
        |l, _| {
            e.arm_mark(l, RegMask::NONE);
            l.arm(
                P_GETPPID,
                e.sym("__x64_sys_getppid"),
                ProbeSpec::regs(RegMask::of(&[Reg::Rip])),
            )
            .expect("arm");
        },
        |_, _| Action::Continue,
        |h| h.hit.probe != P_MARK,
    );
    let mark = o
        .hits
        .iter()
        .find(|h| h.hit.probe == P_MARK)
        .expect("mark hit");
    let first = o
        .hits
        .iter()
        .find(|h| h.hit.probe == P_GETPPID)
        .expect("getppid hit");
    let waited = Duration::from_nanos(first.hit.time_ns - mark.hit.time_ns);
    let errs = o.link.plugin_errors();
    eprintln!("waited {waited:?}; plugin errors {errs:?}");
    assert!(waited >= Duration::from_millis(650), "{waited:?}");
    assert_eq!(errs.len(), 1);
    assert_eq!(
        errs[0].code,
        ornament_engine::wire::PluginErrorCode::HoldTimeout as u32
    );
    assert_eq!(errs[0].probe, P_MARK.0);
    assert_eq!(
        o.hits.iter().filter(|h| h.hit.probe == P_GETPPID).count(),
        10
    );
}
