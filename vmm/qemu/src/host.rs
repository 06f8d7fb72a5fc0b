//! What the host's QEMU is: where, which version, whether it takes TCG plugins.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming the QEMU binary to use.
pub const QEMU_ENV: &str = "ORNAMENT_QEMU";

/// Default binary name, looked up on PATH.
pub const QEMU_DEFAULT: &str = "qemu-system-x86_64";

/// Facts about one QEMU binary.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QemuInfo {
    /// The binary.
    pub binary: PathBuf,
    /// Version triple, e.g. (10, 0, 2).
    pub version: (u32, u32, u32),
    /// The first line of `--version`.
    pub version_line: String,
    /// TCG plugin API version this QEMU offers, if it takes plugins
    /// (v4 in QEMU 10.0, v1 in 7.2, none when built without plugins).
    pub plugin_api: Option<u32>,
}

/// Why QEMU is unusable.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum HostError {
    /// QEMU binary {binary} not found or not runnable (on Debian: apt-get install qemu-system-x86; set ORNAMENT_QEMU to use another)
    NotFound {
        /// What was tried.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// {binary} --version printed something unexpected: {output}
    BadVersion {
        /// The binary.
        binary: PathBuf,
        /// What it printed.
        output: String,
    },
}

/// The QEMU binary to use: `explicit`, else `$ORNAMENT_QEMU`, else `qemu-system-x86_64`.
pub fn qemu_binary(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os(QEMU_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(QEMU_DEFAULT))
}

/// Parse `QEMU emulator version 10.0.2 (Debian ...)`.
pub fn parse_version(line: &str) -> Option<(u32, u32, u32)> {
    let v = line.split("version ").nth(1)?.split_whitespace().next()?;
    let mut it = v.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    });
    Some((
        it.next()??,
        it.next().flatten().unwrap_or(0),
        it.next().flatten().unwrap_or(0),
    ))
}

/// Plugin API version of a QEMU release (QEMU reports none itself).
pub fn plugin_api_for(version: (u32, u32, u32)) -> u32 {
    match version {
        (v, _, _) if v >= 11 => 5,
        (10, m, _) if m >= 1 => 5,
        (10, 0, _) => 4,
        (9, m, _) if m >= 1 => 3,
        (9, 0, _) | (8, 2, _) => 2,
        _ => 1,
    }
}

/// Probe a QEMU binary.
pub fn probe(binary: &Path) -> Result<QemuInfo, HostError> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|source| HostError::NotFound {
            binary: binary.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().next().unwrap_or_default().to_owned();
    let version = parse_version(&line).ok_or_else(|| HostError::BadVersion {
        binary: binary.to_path_buf(),
        output: text.trim().to_owned(),
    })?;
    // A QEMU built without plugins rejects the -plugin option outright.
    let plugins = Command::new(binary)
        .args(["-plugin", "help", "-M", "none", "-display", "none"])
        .output()
        .map(|o| {
            let e = String::from_utf8_lossy(&o.stderr);
            !e.contains("invalid option") && !e.contains("plugin support not")
        })
        .unwrap_or(false);
    Ok(QemuInfo {
        binary: binary.to_path_buf(),
        version,
        version_line: line,
        plugin_api: plugins.then(|| plugin_api_for(version)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15 (Debian)"),
            Some((7, 2, 15))
        );
        assert_eq!(parse_version("nonsense"), None);
        assert_eq!(plugin_api_for((10, 0, 2)), 4);
        assert_eq!(plugin_api_for((7, 2, 15)), 1);
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let e = probe(Path::new("/nonexistent/qemu")).expect_err("missing");
        assert!(
            e.to_string().contains("apt-get install qemu-system-x86"),
            "{e}"
        );
    }
}
