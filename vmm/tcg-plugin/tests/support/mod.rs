//! Shared by the plugin's real-guest tests (`real_guest_*.rs`): inputs, the guest booted
//! under QEMU with the plugin, the host side of the link, guest RAM through the shared file.
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
#![allow(dead_code)] // each test file uses some of it

#[path = "../../../qemu/src/plugin_link/mod.rs"]
pub mod plugin_link;

use ornament_engine::wire::{ProbeSpec, RegMask};
use ornament_engine::{Action, Gpa, Gva, MemError, PhysMemory, ProbeId};
use plugin_link::{GuestRam, PluginHit, PluginLink, PluginLinkError};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Kernel and System.map of the default image (built into the cache if needed).
pub fn default_image() -> Result<(PathBuf, PathBuf), String> {
    static IMG: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    IMG.get_or_init(|| {
        // The reference kernel of the default image: its profile is committed.
        let img = ornament_images::build_image(
            ornament_images::DEFAULT_IMAGE,
            &ornament_images::BuildOptions::reference(ornament_images::DEFAULT_IMAGE),
        )
        .map_err(|e| format!("building the default image: {e}"))?;
        Ok((img.kernel(), img.system_map()))
    })
    .clone()
}
pub const GUEST_MEM_MIB: u64 = 512;

/// The inputs every real-guest test needs (see the module documentation); under the
/// workspace's one rule (`ornament_test_gate`) a missing one fails under CI.
pub const INPUTS: &str =
    "the real-guest inputs (kernel and System.map, QEMU >= 10.0, the plugin, musl-gcc, python3)";

pub struct Env {
    pub kernel: PathBuf,
    pub symbols: HashMap<String, u64>,
    pub initramfs: PathBuf,
    pub plugin: PathBuf,
    pub qemu: String,
    /// The booted kernel's release and its committed profile (`None`: no profile).
    pub release: String,
    pub profile: Option<serde_json::Value>,
    pub comm_offset: u64,
    pub syscall_work_offset: u64,
    pub emu_bit: u32,
    pub pt_regs_ax: u64,
}

pub fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

pub fn env() -> Result<Env, String> {
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

/// The release of a bzImage (`6.1.0-50-cloud-amd64`): the first word of the version string
/// its setup header points at, as the image builder reads it.
pub fn kernel_release(kernel: &Path) -> Result<String, String> {
    ornament_images::kernel_file::inspect(kernel)
        .map_err(|e| e.to_string())?
        .release()
        .map(str::to_owned)
        .ok_or_else(|| {
            format!(
                "kernel {} is not a bzImage with a version string",
                kernel.display()
            )
        })
}

/// The committed profile of `release`, if there is one.
pub fn committed_profile(release: &str) -> Result<Option<serde_json::Value>, String> {
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
pub fn profile_offset(p: &serde_json::Value, s: &str, f: &str) -> u64 {
    p["structs"][s]["fields"][f]["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("{s}.{f} is not in the committed profile"))
}

/// The plugin `.so`: `ORNAMENT_TEST_PLUGIN`, or built now (a no-op when fresh) into the target
/// directory of this test binary with its profile (`cargo test` builds only the rlib).
pub fn plugin_so() -> Result<PathBuf, String> {
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
pub fn build_initramfs() -> Result<PathBuf, String> {
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
    pub fn current_task_offset(&self) -> u64 {
        self.symbols
            .get("current_task")
            .or_else(|| self.symbols.get("pcpu_hot"))
            .copied()
            .expect("current_task or pcpu_hot in System.map")
    }

    /// Arm the getppid probe (`__x64_sys_getppid`, the workload's counted call) with `spec`.
    pub fn arm_getppid(&self, l: &mut PluginLink, spec: ProbeSpec) {
        l.arm(P_GETPPID, self.sym("__x64_sys_getppid"), spec)
            .expect("arm getppid");
    }

    /// Arm the mark probe: `getpid`, held, so the workload's `mark` steps the test.
    pub fn arm_mark(&self, l: &mut PluginLink, regs: RegMask) {
        l.arm(P_MARK, self.sym("__x64_sys_getpid"), held(regs))
            .expect("arm mark");
    }

    pub fn sym(&self, name: &str) -> Gva {
        Gva(*self
            .symbols
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in System.map")))
    }

    pub fn spawn_qemu(
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
pub struct ShmRam {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through bounds-checked copies
// or atomics.
unsafe impl Send for ShmRam {}
// SAFETY: as above.
unsafe impl Sync for ShmRam {}

impl ShmRam {
    pub fn open(path: &Path) -> ShmRam {
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

    pub fn range(&self, gpa: Gpa, n: usize) -> Result<usize, MemError> {
        let err = MemError::OutOfRange { gpa, len: n as u64 };
        let s = usize::try_from(gpa.raw()).map_err(|_| err.clone())?;
        if s.checked_add(n).is_none_or(|e| e > self.len) {
            return Err(err);
        }
        Ok(s)
    }

    pub fn atomic(&self, gpa: Gpa) -> Result<&AtomicU64, MemError> {
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

pub struct Outcome {
    pub hits: Vec<PluginHit>,
    pub serial: String,
    pub link: PluginLink,
    pub wall: Duration,
}

impl Outcome {
    pub fn wl_line(&self, prefix: &str) -> String {
        self.serial
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in serial output:\n{}", self.serial))
            .to_owned()
    }
}

pub fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.split('(').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
}

/// Boot the guest with the plugin; `setup` arms the initial probes (and may enable denies),
/// `on_hit` decides held hits and may arm/disarm. Returns every hit delivered.
pub fn run(
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
pub fn run_with(
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

pub const P_GETPPID: ProbeId = ProbeId(1);
pub const P_FORK: ProbeId = ProbeId(2);
pub const P_EXEC: ProbeId = ProbeId(3);
pub const P_EXIT: ProbeId = ProbeId(4);
pub const P_MARK: ProbeId = ProbeId(10);
pub const P_GETUID: ProbeId = ProbeId(11);
pub const P_SYSCALL: ProbeId = ProbeId(12);

/// The first 5 bytes of the task's `comm` (memory read 0) are "init\0".
pub fn comm_is_init(h: &PluginHit) -> bool {
    h.mem[0].is_some_and(|v| v & 0xff_ffff_ffff == u64::from_le_bytes(*b"init\0\0\0\0"))
}

pub fn held(regs: RegMask) -> ProbeSpec {
    let mut s = ProbeSpec::regs(regs);
    s.hold = true;
    s
}

/// `task->mm`, `mm->arg_start` and `mm->arg_end` offsets: `ORNAMENT_TEST_MM_OFFSETS`
/// (`mm,arg_start,arg_end`), else from the committed profile of the kernel booted.
pub fn mm_offsets(e: &Env) -> (u64, u64, u64) {
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

/// The kernel's direct map without KASLR (the test guests boot with `nokaslr`):
/// `page_offset_base`, where guest-physical 0 is mapped.
pub const DIRECT_MAP_NOKASLR: u64 = 0xffff_8880_0000_0000;
