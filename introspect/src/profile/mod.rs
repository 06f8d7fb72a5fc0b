//! Kernel profiles: the symbols and struct offsets of one kernel build, as JSON.
//!
//! A profile is generated ([`generate`]) from the kernel's System.map and its BTF (a
//! vmlinux ELF or the raw `.BTF` bytes), written to `profiles/<release>.json`, and
//! loaded ([`Profile::load`]) by the readers. Nothing in it is typed by hand.

mod generate;
mod hex;
pub mod syscalls;

pub use generate::{
    generate, generate_from_kernel, KernelProfile, GENERATOR_REVISION, REQUIRED_SYMBOLS,
};

use ornament_engine::Gva;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The version of the profile format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Why a profile could not be generated, loaded or used.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ProfileError {
    /// cannot read or write {path}
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// cannot read symbols
    Symbols(#[from] crate::symbols::SymbolsError),
    /// cannot read the ELF file
    Elf(#[from] crate::elf::ElfError),
    /// cannot unpack the kernel file
    BzImage(#[from] crate::bzimage::BzImageError),
    /// cannot read the kernel's own symbol table (kallsyms)
    Kallsyms(#[from] crate::kallsyms::KallsymsError),
    /// {path}: the kernel has no .BTF section (built without CONFIG_DEBUG_INFO_BTF?), so it has no struct layouts
    NoBtfSection {
        /// The kernel file.
        path: PathBuf,
    },
    /// {path} is neither a vmlinux ELF nor raw BTF data
    NotBtf {
        /// The file.
        path: PathBuf,
    },
    /// cannot parse the BTF data of {path}
    Btf {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: crate::btf::BtfError,
    },
    /// {path}: the BTF data has no {strukt}.{member}
    MissingMember {
        /// The BTF or vmlinux file.
        path: PathBuf,
        /// The struct.
        strukt: &'static str,
        /// The member path.
        member: &'static str,
        /// What the lookup said.
        #[source]
        source: crate::btf::BtfError,
    },
    /// {path}: required symbol {name} is missing
    MissingSymbol {
        /// The System.map or vmlinux file.
        path: PathBuf,
        /// The symbol.
        name: &'static str,
    },
    /// {path}: neither per-CPU current_task nor pcpu_hot.current_task is present
    NoCurrentTask {
        /// The System.map file.
        path: PathBuf,
    },
    /// cannot tell the kernel release: no banner in {path} and its name does not end in the release
    NoRelease {
        /// The System.map file.
        path: PathBuf,
    },
    /// the built-in syscall table is invalid
    SyscallTable(#[from] syscalls::SyscallsError),
    /// {path} is not a valid profile
    Json {
        /// The file.
        path: PathBuf,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// {path} has profile format version {found}; this build reads version {expected}
    Version {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this code reads.
        expected: u32,
    },
    /// the profile of {release} has no {strukt}.{member}
    NoField {
        /// Kernel release of the profile.
        release: String,
        /// The struct.
        strukt: String,
        /// The member path.
        member: String,
    },
    /// the profile of {release} has no symbol {name}
    NoSymbol {
        /// Kernel release of the profile.
        release: String,
        /// The symbol.
        name: String,
    },
}

/// Everything `introspect` needs to know about one kernel build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Version of this file format ([`FORMAT_VERSION`]); [`Profile::load`] refuses others.
    pub format_version: u32,
    /// Which kernel this is.
    pub kernel: KernelIdentity,
    /// Addresses (as linked, before any KASLR slide) of the symbols the readers and
    /// probes use, by name. Per-CPU variables are in [`Profile::percpu_current_task`].
    #[serde(with = "hex::map")]
    pub symbols: BTreeMap<String, Gva>,
    /// Addresses of every `__x64_sys_*` syscall entry point, by symbol name.
    #[serde(with = "hex::map")]
    pub syscall_entry_points: BTreeMap<String, Gva>,
    /// x86-64 syscall numbers by syscall name (`openat` -> 257), restricted to those
    /// whose entry point exists in this kernel.
    pub syscall_numbers: BTreeMap<String, u32>,
    /// Where the running task's pointer lives in each CPU's per-CPU area.
    pub percpu_current_task: PerCpuVar,
    /// Size of a task's kernel stack (`THREAD_SIZE`): 16 KiB on x86-64, 32 KiB with KASAN
    /// (detected from KASAN's symbols in System.map). `pt_regs` sits at its top.
    pub thread_size: u64,
    /// Struct layouts from BTF, by struct name (`task_struct`, `mm_struct`, ...).
    pub structs: BTreeMap<String, StructLayout>,
}

/// The identity of a kernel build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelIdentity {
    /// The release string (`uname -r`), e.g. `6.1.0-50-cloud-amd64`.
    pub release: String,
    /// The full `linux_banner` text (`Linux version ...`, trailing newline kept, no NUL),
    /// read from the vmlinux image; `None` when only raw BTF was given. Checked against
    /// guest memory by `kaslr::verify_banner`.
    pub banner: Option<String>,
}

/// A per-CPU variable, or a member of one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerCpuVar {
    /// The per-CPU symbol (`current_task` in 6.1, `pcpu_hot` in 6.12).
    pub symbol: String,
    /// Offset of that symbol in a CPU's per-CPU area (its System.map value).
    pub symbol_offset: u64,
    /// Offset of the wanted value inside the symbol (0 for `current_task`; the offset of
    /// `current_task` in `struct pcpu_hot`).
    pub field_offset: u64,
}

impl PerCpuVar {
    /// Offset of the value from a CPU's per-CPU base (GS base in kernel mode).
    pub fn offset(&self) -> u64 {
        self.symbol_offset.wrapping_add(self.field_offset)
    }
}

/// Layout of one struct.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StructLayout {
    /// `sizeof` the struct in bytes.
    pub size: u64,
    /// Members by path (dotted for nested members, e.g. `thread_info.flags`); members of
    /// anonymous structs and unions are named directly.
    pub fields: BTreeMap<String, Field>,
}

/// Where one member lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    /// Byte offset from the start of the struct.
    pub offset: u64,
    /// Size in bytes of the member's type.
    pub size: u64,
}

impl Profile {
    /// Load a profile written by [`Profile::save`], checking its format version.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read(path).map_err(|source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parse profile JSON; `origin` names the source in errors.
    pub fn from_json(text: &[u8], origin: &Path) -> Result<Self, ProfileError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            format_version: u32,
        }
        let json = |source| ProfileError::Json {
            path: origin.to_path_buf(),
            source,
        };
        let v: VersionOnly = serde_json::from_slice(text).map_err(json)?;
        if v.format_version != FORMAT_VERSION {
            return Err(ProfileError::Version {
                path: origin.to_path_buf(),
                found: v.format_version,
                expected: FORMAT_VERSION,
            });
        }
        serde_json::from_slice(text).map_err(json)
    }

    /// Pretty JSON with a stable key order (maps are sorted) and a final newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Write [`Profile::to_json`] to `path`.
    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        std::fs::write(path, self.to_json()).map_err(|source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Address (unslid) of a recorded symbol.
    pub fn symbol(&self, name: &str) -> Result<Gva, ProfileError> {
        self.symbols
            .get(name)
            .copied()
            .ok_or_else(|| ProfileError::NoSymbol {
                release: self.kernel.release.clone(),
                name: name.into(),
            })
    }

    /// Layout of `strukt.member`.
    pub fn field(&self, strukt: &str, member: &str) -> Result<Field, ProfileError> {
        self.structs
            .get(strukt)
            .and_then(|s| s.fields.get(member))
            .copied()
            .ok_or_else(|| ProfileError::NoField {
                release: self.kernel.release.clone(),
                strukt: strukt.into(),
                member: member.into(),
            })
    }

    /// Byte offset of `strukt.member`.
    pub fn offset(&self, strukt: &str, member: &str) -> Result<u64, ProfileError> {
        self.field(strukt, member).map(|f| f.offset)
    }

    /// Name of syscall number `nr` (110 -> `"getppid"`).
    pub fn syscall_name(&self, nr: u32) -> Option<&str> {
        self.syscall_numbers
            .iter()
            .find(|&(_, &n)| n == nr)
            .map(|(name, _)| name.as_str())
    }

    /// Syscall number of `name` (`"getppid"` -> 110).
    pub fn syscall_nr(&self, name: &str) -> Option<u32> {
        self.syscall_numbers.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// System.map and (debug-stripped) vmlinux of a default image, from the image
    /// cache (built when missing). `None` when it cannot be built: skipped by the
    /// workspace's one rule (`ornament_test_gate`), a failure under CI.
    fn kernel_files(release: &str) -> Option<(PathBuf, PathBuf)> {
        let spec = ornament_images::IMAGES
            .iter()
            .find(|s| s.reference.is_some_and(|r| r.release == release))
            .unwrap_or_else(|| panic!("no image in the catalog has reference kernel {release}"));
        let img = ornament_test_gate::require(
            &format!("image {} with kernel {release}", spec.name),
            ornament_images::build_image(
                spec.name,
                &ornament_images::BuildOptions::reference(spec.name),
            ),
        )?;
        Some((
            img.system_map(),
            img.path(ornament_images::image::files::VMLINUX),
        ))
    }

    fn committed(release: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../profiles")
            .join(format!("{release}.json"))
    }

    #[test]
    fn committed_profiles_load_and_match_field_notes() {
        let p61 = Profile::load(&committed("6.1.0-50-cloud-amd64")).expect("6.1 profile");
        let off = |p: &Profile, m| p.offset("task_struct", m).expect("field");
        assert_eq!(off(&p61, "pid"), 0x970);
        assert_eq!(off(&p61, "tgid"), 0x974);
        assert_eq!(off(&p61, "real_parent"), 0x980);
        assert_eq!(off(&p61, "comm"), 0xba0);
        assert_eq!(p61.field("task_struct", "comm").expect("comm").size, 16);
        assert_eq!(off(&p61, "mm"), 0x8e0);
        assert_eq!(off(&p61, "cred"), 0xb90);
        assert_eq!(off(&p61, "exit_code"), 0x908);
        assert_eq!(off(&p61, "tasks"), 0x890);
        assert_eq!(p61.percpu_current_task.symbol, "current_task");
        assert_eq!(p61.percpu_current_task.offset(), 0x1fb80);
        assert_eq!(
            p61.symbol("proc_fork_connector").expect("sym"),
            Gva(0xffff_ffff_816e_dd10)
        );
        assert_eq!(p61.syscall_nr("getppid"), Some(110));
        assert_eq!(p61.syscall_name(59), Some("execve"));
        assert_eq!(p61.syscall_name(100_000), None);
        assert_eq!(p61.thread_size, 16384);
        let p612 = Profile::load(&committed("6.12.117+deb12-cloud-amd64")).expect("6.12");
        assert_eq!(p612.percpu_current_task.symbol, "pcpu_hot");
        assert_eq!(p612.percpu_current_task.offset(), 0x35000);
        assert_eq!(
            p612.symbol("proc_exit_connector").expect("sym"),
            Gva(0xffff_ffff_8193_2700)
        );
        assert_eq!(p612.syscall_nr("mseal"), Some(462));
        assert!(p612
            .kernel
            .banner
            .as_deref()
            .is_some_and(|b| b.starts_with("Linux version 6.12.117+deb12-cloud-amd64 ")));
        assert!(matches!(
            p612.field("task_struct", "nope"),
            Err(ProfileError::NoField { .. })
        ));
    }

    #[test]
    fn generation_is_deterministic_and_matches_committed() {
        for release in ["6.1.0-50-cloud-amd64", "6.12.117+deb12-cloud-amd64"] {
            let Some((map, vmlinux)) = kernel_files(release) else {
                continue;
            };
            let p = generate(&map, &vmlinux).expect("generate");
            let text = std::fs::read_to_string(committed(release)).expect("committed");
            assert_eq!(p.to_json(), text, "{release}: regenerate profiles/");
            // The same from raw BTF bytes, as the image builder keeps them; no banner then.
            let mut elf = crate::elf::ElfSections::open(&vmlinux).expect("elf");
            let btf = elf.read_section(".BTF").expect(".BTF");
            let dir = tempfile::tempdir().expect("tmp");
            let raw = dir.path().join("vmlinux.btf");
            std::fs::write(&raw, btf).expect("write");
            // Without a banner the release comes from the map's file name.
            let named_map = dir.path().join(format!("System.map-{release}"));
            std::fs::copy(&map, &named_map).expect("copy map");
            let q = generate(&named_map, &raw).expect("generate from raw BTF");
            assert_eq!(q.kernel.banner, None);
            assert_eq!(q.kernel.release, release);
            assert_eq!(q.structs, p.structs);
            assert_eq!(q.symbols, p.symbols);
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("p.json");
        std::fs::write(&f, br#"{"format_version": 99}"#).expect("write");
        let e = Profile::load(&f).expect_err("version");
        assert!(matches!(
            e,
            ProfileError::Version {
                found: 99,
                expected: 1,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            format!(
                "{} has profile format version 99; this build reads version 1",
                f.display()
            )
        );
        std::fs::write(&f, b"{").expect("write");
        assert!(matches!(Profile::load(&f), Err(ProfileError::Json { .. })));
        let missing = dir.path().join("none.json");
        assert!(matches!(
            Profile::load(&missing),
            Err(ProfileError::Io { .. })
        ));
    }

    #[test]
    fn missing_required_symbol_is_named() {
        let Some((map, vmlinux)) = kernel_files("6.1.0-50-cloud-amd64") else {
            return;
        };
        let text = std::fs::read_to_string(&map).expect("map");
        let cut: String = text
            .lines()
            .filter(|l| !l.ends_with(" do_syscall_64"))
            .map(|l| format!("{l}\n"))
            .collect();
        let dir = tempfile::tempdir().expect("tmp");
        let m = dir.path().join("System.map-6.1.0-50-cloud-amd64");
        std::fs::write(&m, cut).expect("write");
        let e = generate(&m, &vmlinux).expect_err("missing");
        assert_eq!(
            e.to_string(),
            format!("{}: required symbol do_syscall_64 is missing", m.display())
        );
        let e = generate(&m, &map).expect_err("not btf");
        assert!(matches!(e, ProfileError::NotBtf { .. }));
    }
}
