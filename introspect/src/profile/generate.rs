//! `generate`: System.map + BTF (vmlinux or raw) -> [`Profile`]; `generate_from_kernel`:
//! a bzImage (or ELF vmlinux) alone -> its kallsyms + its `.BTF` -> [`Profile`].

use super::syscalls::{parse_table, X86_64_TABLE};
use super::{
    Field, KernelIdentity, PerCpuVar, Profile, ProfileError, StructLayout, FORMAT_VERSION,
};
use crate::btf::{Btf, BTF_MAGIC};
use crate::bzimage::{self, Vmlinux};
use crate::elf::{self, ElfSections, MAX_SECTION_BYTES};
use crate::kallsyms;
use crate::symbols::{Symbol, SymbolTable};
use ornament_engine::Gva;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Revision of what the generator records: raised whenever it records more (symbols,
/// fields), so that profiles made by an older one are made again (cached `--kernel`
/// profiles, and the profiles inside cached images).
pub const GENERATOR_REVISION: u32 = 4;

/// Symbols every profile must have.
pub const REQUIRED_SYMBOLS: &[&str] = &[
    "_text",
    "linux_banner",
    "init_task",
    "entry_SYSCALL_64",
    "do_syscall_64",
    "__per_cpu_offset",
    "page_offset_base",
    "phys_base",
    "proc_fork_connector",
    "proc_exec_connector",
    "proc_exit_connector",
    "proc_id_connector",
    "wake_up_new_task",
    "do_exit",
    "kernel_clone",
    "bprm_execve",
    "begin_new_exec",
    "syscall_exit_to_user_mode",
];

/// Symbols recorded when present.
const OPTIONAL_SYMBOLS: &[&str] = &[
    "__fentry__",
    "x64_sys_call",
    "sys_call_table",
    "_stext",
    "_etext",
    "_end",
    "init_top_pgt",
    "vmalloc_base",
    "vmemmap_base",
    "do_group_exit",
    "release_task",
    // Where our VMM arms its probes (the first exec of user space): with it in the
    // profile, a kernel given as a bzImage alone (no System.map) arms there too.
    "kernel_execve",
    // Signals: generated, delivered to a handler, stopping the task.
    "__send_signal_locked",
    "send_signal_locked",
    "signal_setup_done",
    "do_signal_stop",
];

/// Struct members recorded: (struct, required members, optional members).
const STRUCT_FIELDS: &[(&str, &[&str], &[&str])] = &[
    (
        "task_struct",
        &[
            "pid",
            "tgid",
            "comm",
            "real_parent",
            "parent",
            "mm",
            "active_mm",
            "cred",
            "real_cred",
            "flags",
            "exit_code",
            "exit_signal",
            "tasks",
            "children",
            "sibling",
            "group_leader",
            "stack",
            "thread_pid",
            "signal",
        ],
        &[
            "thread_info",
            "thread_info.flags",
            "thread_info.syscall_work",
            "thread_group",
            "thread_node",
            "__state",
            "state",
            "start_time",
            "fs",
        ],
    ),
    (
        "mm_struct",
        &["pgd", "arg_start", "arg_end", "exe_file"],
        &["env_start", "env_end", "start_stack"],
    ),
    (
        "cred",
        &["uid", "gid", "euid", "egid"],
        &["suid", "sgid", "fsuid", "fsgid"],
    ),
    ("kuid_t", &["val"], &[]),
    (
        "linux_binprm",
        &["filename", "argc", "file", "p"],
        &["envc", "interp", "mm"],
    ),
    (
        "pt_regs",
        &[
            "di", "si", "dx", "r10", "r8", "r9", "ax", "orig_ax", "ip", "sp", "cs",
        ],
        &[
            "r15", "r14", "r13", "r12", "bp", "bx", "r11", "cx", "flags", "ss",
        ],
    ),
    ("file", &["f_path"], &["f_inode"]),
    ("path", &["dentry", "mnt"], &[]),
    ("fs_struct", &[], &["pwd"]),
    ("dentry", &["d_name", "d_parent"], &["d_iname", "d_hash"]),
    ("hlist_bl_node", &[], &["pprev"]),
    // The mount tree, for paths across mount points (fs/mount.h).
    ("mount", &[], &["mnt_parent", "mnt_mountpoint", "mnt"]),
    ("vfsmount", &[], &["mnt_root"]),
    ("qstr", &["name", "len"], &["hash"]),
    ("list_head", &["next", "prev"], &[]),
    (
        "signal_struct",
        &[],
        &[
            "thread_head",
            "nr_threads",
            "live",
            "flags",
            "group_exit_code",
        ],
    ),
    ("pid", &[], &["numbers"]),
    ("ksignal", &[], &["sig", "info"]),
    ("upid", &[], &["nr"]),
];

/// THREAD_SIZE on x86-64: `PAGE_SIZE << THREAD_SIZE_ORDER`, order 2 (16 KiB), or
/// order 3 (32 KiB) with KASAN (arch/x86/include/asm/page_64_types.h).
const THREAD_SIZE_DEFAULT: u64 = 16 << 10;
const THREAD_SIZE_KASAN: u64 = 32 << 10;

/// Build a profile from a kernel's System.map and either its vmlinux ELF (the `.BTF`
/// section and the `linux_banner` text are read from it) or a raw BTF file.
pub fn generate(system_map: &Path, btf_or_vmlinux: &Path) -> Result<Profile, ProfileError> {
    let syms = SymbolTable::from_system_map(system_map)?;
    let (btf_bytes, banner) = read_btf_and_banner(btf_or_vmlinux, &syms)?;
    let release = banner
        .as_deref()
        .and_then(release_from_banner)
        .or_else(|| {
            system_map
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("System.map-"))
                .map(str::to_owned)
        })
        .ok_or_else(|| ProfileError::NoRelease {
            path: system_map.to_path_buf(),
        })?;
    assemble(
        &syms,
        system_map,
        &btf_bytes,
        btf_or_vmlinux,
        release,
        banner,
    )
}

/// A profile made from a kernel file alone, with what it was made from.
#[derive(Debug, Clone)]
pub struct KernelProfile {
    /// The profile.
    pub profile: Profile,
    /// The kernel's symbols from its kallsyms, in table order.
    pub symbols: Vec<Symbol>,
    /// The kernel's ELF vmlinux (a bzImage's decompressed payload).
    pub vmlinux: Vmlinux,
}

/// Build a profile from a kernel file alone, a bzImage or an ELF vmlinux: struct
/// layouts from its `.BTF` section, symbols from its own kallsyms tables, the banner
/// from `linux_banner`. No System.map or debug package is needed.
pub fn generate_from_kernel(kernel: &Path) -> Result<KernelProfile, ProfileError> {
    let vmlinux = bzimage::read_vmlinux(kernel)?;
    let ks = kallsyms::read(&vmlinux.bytes, kernel)?;
    let syms = SymbolTable::new(ks.symbols.clone());
    let btf_bytes = elf::section_in(&vmlinux.bytes, ".BTF", kernel)?.ok_or_else(|| {
        ProfileError::NoBtfSection {
            path: kernel.to_path_buf(),
        }
    })?;
    let banner = match syms.lookup("linux_banner") {
        Some(Gva(addr)) => elf::vaddr_in(&vmlinux.bytes, addr, MAX_BANNER, kernel)?.map(|raw| {
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        }),
        None => None,
    };
    let release = banner
        .as_deref()
        .and_then(release_from_banner)
        .ok_or_else(|| ProfileError::NoRelease {
            path: kernel.to_path_buf(),
        })?;
    let profile = assemble(&syms, kernel, btf_bytes, kernel, release, banner)?;
    Ok(KernelProfile {
        profile,
        symbols: ks.symbols,
        vmlinux,
    })
}

/// The profile from symbols (read from `sym_origin`) and BTF (from `btf_origin`).
fn assemble(
    syms: &SymbolTable,
    sym_origin: &Path,
    btf_bytes: &[u8],
    btf_origin: &Path,
    release: String,
    banner: Option<String>,
) -> Result<Profile, ProfileError> {
    let (system_map, btf_or_vmlinux) = (sym_origin, btf_origin);
    let missing_sym = |name: &'static str| ProfileError::MissingSymbol {
        path: system_map.to_path_buf(),
        name,
    };
    let btf = Btf::parse(btf_bytes).map_err(|source| ProfileError::Btf {
        path: btf_or_vmlinux.to_path_buf(),
        source,
    })?;

    let mut symbols = BTreeMap::new();
    for &name in REQUIRED_SYMBOLS {
        let addr = syms.lookup(name).ok_or_else(|| missing_sym(name))?;
        symbols.insert(name.to_owned(), addr);
    }
    for &name in OPTIONAL_SYMBOLS {
        if let Some(addr) = syms.lookup(name) {
            symbols.insert(name.to_owned(), addr);
        }
    }

    let mut syscall_entry_points = BTreeMap::new();
    for s in syms.iter().filter(|s| s.name.starts_with("__x64_sys_")) {
        if let Some(addr) = syms.lookup(&s.name) {
            syscall_entry_points.insert(s.name.clone(), addr);
        }
    }
    let syscall_numbers = parse_table(X86_64_TABLE)?
        .into_iter()
        .filter(|e| syscall_entry_points.contains_key(&format!("__x64_{}", e.entry)))
        .map(|e| (e.name, e.nr))
        .collect();

    let percpu_current_task = current_task_var(syms, &btf, system_map)?;
    let kasan = syms.lookup("kasan_init").is_some() || syms.lookup("__asan_load8").is_some();
    let thread_size = if kasan {
        THREAD_SIZE_KASAN
    } else {
        THREAD_SIZE_DEFAULT
    };

    let mut structs = BTreeMap::new();
    for &(strukt, required, optional) in STRUCT_FIELDS {
        let root = match btf.find_struct(strukt) {
            Ok(id) => Some(id),
            Err(_) => btf
                .ids_by_name(strukt)
                .first()
                .copied()
                .filter(|&id| btf.size_of(id).is_ok()),
        };
        let Some(root) = root else {
            if let Some(&member) = required.first() {
                return Err(ProfileError::MissingMember {
                    path: btf_or_vmlinux.to_path_buf(),
                    strukt,
                    member,
                    source: crate::btf::BtfError::NoStruct {
                        name: strukt.into(),
                    },
                });
            }
            continue;
        };
        let size = btf
            .size_of(root)
            .map_err(|source| ProfileError::MissingMember {
                path: btf_or_vmlinux.to_path_buf(),
                strukt,
                member: "<size>",
                source,
            })?;
        let mut fields = BTreeMap::new();
        for &member in required {
            let f = btf.member_path_in(root, strukt, member).map_err(|source| {
                ProfileError::MissingMember {
                    path: btf_or_vmlinux.to_path_buf(),
                    strukt,
                    member,
                    source,
                }
            })?;
            fields.insert(
                member.to_owned(),
                Field {
                    offset: f.offset,
                    size: f.size,
                },
            );
        }
        for &member in optional {
            if let Ok(f) = btf.member_path_in(root, strukt, member) {
                fields.insert(
                    member.to_owned(),
                    Field {
                        offset: f.offset,
                        size: f.size,
                    },
                );
            }
        }
        structs.insert(strukt.to_owned(), StructLayout { size, fields });
    }

    tracing::info!(%release, symbols = symbols.len(), syscalls = syscall_entry_points.len(), "profile generated");
    Ok(Profile {
        format_version: FORMAT_VERSION,
        kernel: KernelIdentity { release, banner },
        symbols,
        syscall_entry_points,
        syscall_numbers,
        percpu_current_task,
        thread_size,
        structs,
    })
}

/// `Linux version <release> (...)` -> `<release>`.
fn release_from_banner(banner: &str) -> Option<String> {
    banner
        .strip_prefix("Linux version ")?
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

fn current_task_var(
    syms: &SymbolTable,
    btf: &Btf,
    system_map: &Path,
) -> Result<PerCpuVar, ProfileError> {
    if let (Some(off), Ok(f)) = (
        syms.percpu_offset("pcpu_hot"),
        btf.member_path("pcpu_hot", "current_task"),
    ) {
        return Ok(PerCpuVar {
            symbol: "pcpu_hot".into(),
            symbol_offset: off,
            field_offset: f.offset,
        });
    }
    if let Some(off) = syms.percpu_offset("current_task") {
        return Ok(PerCpuVar {
            symbol: "current_task".into(),
            symbol_offset: off,
            field_offset: 0,
        });
    }
    Err(ProfileError::NoCurrentTask {
        path: system_map.to_path_buf(),
    })
}

/// Longest banner read from the image.
const MAX_BANNER: u64 = 512;

fn read_btf_and_banner(
    path: &Path,
    syms: &SymbolTable,
) -> Result<(Vec<u8>, Option<String>), ProfileError> {
    let io = |source| ProfileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(io)?;
    f.read_exact(&mut magic).map_err(io)?;
    if magic == *b"\x7fELF" {
        let mut elf = ElfSections::open(path)?;
        let btf = elf.read_section(".BTF")?;
        let banner = match syms.lookup("linux_banner") {
            Some(Gva(addr)) => {
                let raw = elf.read_vaddr(addr, MAX_BANNER)?;
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                Some(String::from_utf8_lossy(&raw[..end]).into_owned())
            }
            None => None,
        };
        return Ok((btf, banner));
    }
    if u16::from_le_bytes([magic[0], magic[1]]) == BTF_MAGIC {
        let len = f.metadata().map_err(io)?.len();
        if len > MAX_SECTION_BYTES {
            return Err(ProfileError::NotBtf {
                path: path.to_path_buf(),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        return Ok((bytes, None));
    }
    Err(ProfileError::NotBtf {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_parsing() {
        assert_eq!(
            release_from_banner(
                "Linux version 6.1.0-50-cloud-amd64 (debian-kernel@lists) #1 SMP\n"
            ),
            Some("6.1.0-50-cloud-amd64".into())
        );
        assert_eq!(release_from_banner("Linux 6.1"), None);
    }
}
