//! Debian packages: download with `apt-get download` (which package and version:
//! `resolve`), and unpack chosen members with `dpkg-deb --fsys-tarfile`.

use crate::progress;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a package step failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DebianError {
    /// cannot run `{tool}` (install it: apt-get install {package})
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
        /// Why it could not start.
        #[source]
        source: io::Error,
    },
    /// `apt-get download {package}` failed (is the package in your apt sources? run `apt-get update`): {stderr}
    Download {
        /// The package.
        package: String,
        /// What apt said.
        stderr: String,
    },
    /// no downloaded .deb for {package} in {dir}
    NoDeb {
        /// The package.
        package: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// {deb} is not a readable Debian package: {stderr}
    BadDeb {
        /// The file.
        deb: PathBuf,
        /// What dpkg-deb said.
        stderr: String,
    },
    /// {deb} has no member {member}
    NoMember {
        /// The package file.
        deb: PathBuf,
        /// The missing member.
        member: String,
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

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DebianError + '_ {
    move |source| DebianError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Download `packages` (`NAME` or `NAME=VERSION`) into `dir` with `apt-get download`;
/// returns the .deb paths in order.
pub fn download(packages: &[&str], dir: &Path) -> Result<Vec<PathBuf>, DebianError> {
    let pb = progress::spinner(&format!("downloading {}", packages.join(" ")));
    let out = Command::new("apt-get")
        .arg("download")
        .args(packages)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DebianError::ToolMissing {
            tool: "apt-get",
            package: "apt",
            source,
        })?;
    pb.finish_and_clear();
    if !out.status.success() {
        return Err(DebianError::Download {
            package: packages.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    packages.iter().map(|p| find_deb(dir, p)).collect()
}

/// The `PACKAGE_*.deb` file in `dir`.
fn find_deb(dir: &Path, package: &str) -> Result<PathBuf, DebianError> {
    let name = package.split_once('=').map_or(package, |(n, _)| n);
    let prefix = format!("{name}_");
    let entries = fs::read_dir(dir).map_err(io_err(dir))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(e.path());
        }
    }
    Err(DebianError::NoDeb {
        package: package.to_owned(),
        dir: dir.to_path_buf(),
    })
}

/// The `Version` field of a .deb.
pub fn deb_version(deb: &Path) -> Result<String, DebianError> {
    let out = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(deb)
        .arg("Version")
        .output()
        .map_err(|source| DebianError::ToolMissing {
            tool: "dpkg-deb",
            package: "dpkg",
            source,
        })?;
    if !out.status.success() {
        return Err(DebianError::BadDeb {
            deb: deb.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Unpack the members named in `wanted` (tar paths like `./boot/vmlinuz-X`) of `deb`
/// into the paths given beside them. Every member must be present.
pub fn extract(deb: &Path, wanted: &[(String, PathBuf)]) -> Result<(), DebianError> {
    let size = fs::metadata(deb).map_err(io_err(deb))?.len();
    let name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| DebianError::ToolMissing {
            tool: "dpkg-deb",
            package: "dpkg",
            source,
        })?;
    let stdout = child.stdout.take().ok_or_else(|| DebianError::BadDeb {
        deb: deb.to_path_buf(),
        stderr: "no output pipe".into(),
    })?;
    // The tar stream is several times the .deb's size; show unpacked bytes.
    let pb = progress::bytes_bar(size.saturating_mul(4), &format!("unpacking {name}"));
    let reader = CountingReader {
        inner: stdout,
        pb: pb.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut found = vec![false; wanted.len()];
    let entries = archive.entries().map_err(io_err(deb))?;
    for entry in entries {
        let mut entry = entry.map_err(io_err(deb))?;
        let path = entry
            .path()
            .map_err(io_err(deb))?
            .to_string_lossy()
            .into_owned();
        let norm = path.trim_start_matches("./");
        if let Some(i) = wanted
            .iter()
            .position(|(m, _)| m.trim_start_matches("./") == norm)
        {
            let dest = &wanted[i].1;
            let mut out = fs::File::create(dest).map_err(io_err(dest))?;
            io::copy(&mut entry, &mut out).map_err(io_err(dest))?;
            out.flush().map_err(io_err(dest))?;
            found[i] = true;
            if found.iter().all(|f| *f) {
                break;
            }
        }
    }
    pb.finish_and_clear();
    // Stop dpkg-deb if we left early, then collect it.
    let _ = child.kill();
    let status = child.wait().map_err(io_err(deb))?;
    if let Some(i) = found.iter().position(|f| !f) {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        if !status.success() && !stderr.is_empty() {
            return Err(DebianError::BadDeb {
                deb: deb.to_path_buf(),
                stderr: stderr.trim().to_owned(),
            });
        }
        return Err(DebianError::NoMember {
            deb: deb.to_path_buf(),
            member: wanted[i].0.clone(),
        });
    }
    Ok(())
}

struct CountingReader<R> {
    inner: R,
    pb: indicatif::ProgressBar,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pb.inc(n as u64);
        Ok(n)
    }
}
