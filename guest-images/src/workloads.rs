//! Guest-side programs: C sources shipped in `guest/`, compiled statically on the host.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A guest program: its name in `/ornament/bin` and its C source.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// File name under `/ornament/bin/`.
    pub name: &'static str,
    /// C source text.
    pub source: &'static str,
    /// Extra compiler flags.
    pub flags: &'static [&'static str],
}

/// Every guest program in the image.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "demo",
        source: include_str!("../guest/demo.c"),
        flags: &[],
    },
    Workload {
        name: "ornament-workload",
        source: include_str!("../guest/workload.c"),
        flags: &["-pthread"],
    },
];

/// The `/init` script.
pub const INIT_SCRIPT: &str = include_str!("../guest/init.sh");

/// SHA-256 (hex) of everything this build of ornament puts into an image's userland of
/// its own: every program's name, flags and source, the `/init` script, and the revision of
/// the profile generator that made its profile. Recorded in the manifest, so a cached image
/// built by another ornament is rebuilt rather than run with stale guest programs or a
/// profile that lacks what this one reads.
pub fn guest_digest() -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for w in WORKLOADS {
        for part in [w.name, &w.flags.join(" "), w.source] {
            h.update(part.len().to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    h.update(INIT_SCRIPT.as_bytes());
    // The image's profile is made by the generator: a newer one records more.
    h.update(ornament_introspect::profile::GENERATOR_REVISION.to_le_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a workload did not compile.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum WorkloadError {
    /// cannot run the C compiler `{cc}` (install gcc and libc6-dev, or set CC)
    NoCompiler {
        /// The compiler tried.
        cc: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// compiling guest program {name} failed: {stderr}
    Compile {
        /// The program.
        name: &'static str,
        /// Compiler output.
        stderr: String,
    },
    /// I/O on {path} failed
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Compile every workload statically into `dir`; returns (name, binary path).
pub fn compile_all(dir: &Path) -> Result<Vec<(&'static str, PathBuf)>, WorkloadError> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    WORKLOADS
        .iter()
        .map(|w| {
            let src = dir.join(format!("{}.c", w.name));
            std::fs::write(&src, w.source).map_err(|source| WorkloadError::Io {
                path: src.clone(),
                source,
            })?;
            let bin = dir.join(w.name);
            let out = Command::new(&cc)
                .args(["-static", "-O2", "-Wall", "-o"])
                .arg(&bin)
                .arg(&src)
                .args(w.flags)
                .output()
                .map_err(|source| WorkloadError::NoCompiler {
                    cc: cc.clone(),
                    source,
                })?;
            if !out.status.success() {
                return Err(WorkloadError::Compile {
                    name: w.name,
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            Ok((w.name, bin))
        })
        .collect()
}
