//! Our own minimal declarations of QEMU's TCG plugin API v4, resolved at install time.
//!
//! Written from the API's documented semantics, not copied from QEMU's header. The functions
//! are looked up with `dlsym(RTLD_DEFAULT, ..)` in the QEMU process when the plugin is
//! installed, so a missing symbol is a clean install error (not a loader failure) and the
//! crate's own tests link without QEMU.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

/// The plugin id QEMU hands to `qemu_plugin_install`.
pub type PluginId = u64;

/// Opaque QEMU translation block (valid only inside the translation callback).
#[repr(C)]
#[derive(Debug)]
pub struct Tb {
    _opaque: [u8; 0],
}

/// Opaque QEMU instruction (valid only inside the translation callback).
#[repr(C)]
#[derive(Debug)]
pub struct Insn {
    _opaque: [u8; 0],
}

/// Opaque register handle from `qemu_plugin_get_registers`.
#[repr(C)]
#[derive(Debug)]
pub struct RegHandle {
    _opaque: [u8; 0],
}

/// One entry of the array `qemu_plugin_get_registers` returns.
#[repr(C)]
#[derive(Debug)]
pub struct RegDescriptor {
    /// Handle for `qemu_plugin_read_register`.
    pub handle: *mut RegHandle,
    /// Register name (gdb's name for it).
    pub name: *const c_char,
    /// gdb feature the register belongs to.
    pub feature: *const c_char,
}

/// glib's `GArray` / `GByteArray` header (both are `{ data, len }`).
#[repr(C)]
#[derive(Debug)]
pub struct GArray {
    /// Element storage.
    pub data: *mut u8,
    /// Number of elements.
    pub len: c_uint,
}

/// Version pair in [`QemuInfo`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct QemuInfoVersion {
    /// Oldest plugin API version QEMU accepts.
    pub min: c_int,
    /// QEMU's plugin API version.
    pub cur: c_int,
}

/// System-emulation part of [`QemuInfo`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct QemuInfoSystem {
    /// vCPUs at start.
    pub smp_vcpus: c_int,
    /// Most vCPUs the machine can have.
    pub max_vcpus: c_int,
}

/// What QEMU tells the plugin at install (`qemu_info_t`).
#[repr(C)]
#[derive(Debug)]
pub struct QemuInfo {
    /// Target architecture name, e.g. "x86_64".
    pub target_name: *const c_char,
    /// API versions.
    pub version: QemuInfoVersion,
    /// True for system emulation.
    pub system_emulation: bool,
    /// Valid when `system_emulation`.
    pub system: QemuInfoSystem,
}

/// Callback flag: the callback reads registers (`QEMU_PLUGIN_CB_R_REGS`).
pub const CB_R_REGS: c_int = 1;

/// Translation callback.
pub type TbTransCb = extern "C" fn(PluginId, *mut Tb);
/// vCPU callback with user data.
pub type VcpuUdataCb = extern "C" fn(c_uint, *mut c_void);
/// Simple vCPU callback (init, idle).
pub type VcpuSimpleCb = extern "C" fn(PluginId, c_uint);
/// Simple callback (reset done).
pub type SimpleCb = extern "C" fn(PluginId);
/// Callback with user data (atexit).
pub type UdataCb = extern "C" fn(PluginId, *mut c_void);

/// The QEMU functions the plugin uses, resolved once.
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct Api {
    pub register_vcpu_tb_trans_cb: unsafe extern "C" fn(PluginId, TbTransCb),
    pub tb_n_insns: unsafe extern "C" fn(*const Tb) -> usize,
    pub tb_get_insn: unsafe extern "C" fn(*const Tb, usize) -> *mut Insn,
    pub insn_vaddr: unsafe extern "C" fn(*const Insn) -> u64,
    pub register_vcpu_insn_exec_cb:
        unsafe extern "C" fn(*mut Insn, VcpuUdataCb, c_int, *mut c_void),
    pub register_vcpu_init_cb: unsafe extern "C" fn(PluginId, VcpuSimpleCb),
    pub register_vcpu_idle_cb: unsafe extern "C" fn(PluginId, VcpuSimpleCb),
    pub register_atexit_cb: unsafe extern "C" fn(PluginId, UdataCb, *mut c_void),
    pub get_registers: unsafe extern "C" fn() -> *mut GArray,
    pub read_register: unsafe extern "C" fn(*mut RegHandle, *mut GArray) -> c_int,
    pub read_memory_vaddr: unsafe extern "C" fn(u64, *mut GArray, usize) -> bool,
    pub reset: unsafe extern "C" fn(PluginId, SimpleCb),
    pub outs: unsafe extern "C" fn(*const c_char),
    pub g_byte_array_new: unsafe extern "C" fn() -> *mut GArray,
    pub g_byte_array_set_size: unsafe extern "C" fn(*mut GArray, c_uint) -> *mut GArray,
    pub g_array_free: unsafe extern "C" fn(*mut GArray, c_int) -> *mut c_char,
}

/// A symbol QEMU (or glib) did not export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingSymbol(pub &'static CStr);

fn sym(name: &'static CStr) -> Result<*mut c_void, MissingSymbol> {
    // SAFETY: `name` is a NUL-terminated C string; RTLD_DEFAULT searches the global scope of
    // the process (QEMU's executable and the libraries it loaded), and dlsym has no other
    // preconditions.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if p.is_null() {
        Err(MissingSymbol(name))
    } else {
        Ok(p)
    }
}

macro_rules! resolve {
    ($name:literal) => {{
        let p = sym($name)?;
        // SAFETY: the symbol was found by its exact exported name, and the field's type (the
        // transmute's target) is the C signature QEMU's plugin API v4 (or glib) documents for that function.
        unsafe { std::mem::transmute::<*mut c_void, _>(p) }
    }};
}

impl Api {
    /// Look every function up in the running process.
    // The transmute's target type is the struct field's declared type at each use.
    #[allow(clippy::missing_transmute_annotations)]
    pub fn resolve() -> Result<Api, MissingSymbol> {
        Ok(Api {
            register_vcpu_tb_trans_cb: resolve!(c"qemu_plugin_register_vcpu_tb_trans_cb"),
            tb_n_insns: resolve!(c"qemu_plugin_tb_n_insns"),
            tb_get_insn: resolve!(c"qemu_plugin_tb_get_insn"),
            insn_vaddr: resolve!(c"qemu_plugin_insn_vaddr"),
            register_vcpu_insn_exec_cb: resolve!(c"qemu_plugin_register_vcpu_insn_exec_cb"),
            register_vcpu_init_cb: resolve!(c"qemu_plugin_register_vcpu_init_cb"),
            register_vcpu_idle_cb: resolve!(c"qemu_plugin_register_vcpu_idle_cb"),
            register_atexit_cb: resolve!(c"qemu_plugin_register_atexit_cb"),
            get_registers: resolve!(c"qemu_plugin_get_registers"),
            read_register: resolve!(c"qemu_plugin_read_register"),
            read_memory_vaddr: resolve!(c"qemu_plugin_read_memory_vaddr"),
            reset: resolve!(c"qemu_plugin_reset"),
            outs: resolve!(c"qemu_plugin_outs"),
            g_byte_array_new: resolve!(c"g_byte_array_new"),
            g_byte_array_set_size: resolve!(c"g_byte_array_set_size"),
            g_array_free: resolve!(c"g_array_free"),
        })
    }

    /// Print a line on QEMU's plugin log (stderr unless `-D` says otherwise).
    pub fn log(&self, msg: &str) {
        let mut s: Vec<u8> = msg.bytes().filter(|b| *b != 0).collect();
        s.extend_from_slice(b"\n\0");
        // SAFETY: `s` is NUL-terminated with no interior NUL, and lives across the call.
        unsafe { (self.outs)(s.as_ptr().cast()) };
    }
}
