//! The per-run initramfs overlay: the command to run and any `--add` files, as a
//! second (uncompressed) cpio archive that the kernel unpacks over the image's.

use crate::cpio::CpioWriter;
use crate::image::ImageError;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Why the overlay could not be written.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum OverlayError {
    /// guest path {0} must be absolute and must not contain `..`
    BadGuestPath(String),
    /// --add {0}: expected HOST:GUEST
    BadAddSpec(String),
    /// guest path {0} is ornament's own: /init and /ornament/ run the command and report its status; add the file elsewhere
    ReservedGuestPath(String),
    /// building the overlay failed
    Image(#[from] ImageError),
    /// I/O on {path} failed
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where a run's command script lies in the guest.
pub const COMMAND_SCRIPT: &str = "/ornament/cmd";

/// The command line ornament's `/init` (`init.sh`) gives the command's process, a child
/// of `/init`, before the script execs the command: how the host recognises that
/// process from outside, at its first exec.
pub const COMMAND_ARGV: [&str; 2] = ["sh", COMMAND_SCRIPT];

/// The script run when no command is given: the built-in demo.
const DEMO_SCRIPT: &str = "echo 'ornament: no command given; running the built-in demo (/ornament/bin/demo)'\nexec /ornament/bin/demo\n";

/// What a run adds to the image's initramfs.
#[derive(Debug, Clone, Default)]
pub struct RunOverlay {
    /// The command and its arguments (empty: the built-in demo, through the same script).
    pub command: Vec<String>,
    /// Host files to add: (host path, guest path).
    pub add: Vec<(PathBuf, String)>,
}

/// Parse an `--add HOST:GUEST` argument.
pub fn parse_add(spec: &str) -> Result<(PathBuf, String), OverlayError> {
    let (host, guest) = spec
        .rsplit_once(':')
        .filter(|(h, g)| !h.is_empty() && !g.is_empty())
        .ok_or_else(|| OverlayError::BadAddSpec(spec.to_owned()))?;
    check_guest_path(guest)?;
    Ok((PathBuf::from(host), guest.to_owned()))
}

fn check_guest_path(p: &str) -> Result<(), OverlayError> {
    if !p.starts_with('/') || p.split('/').any(|c| c == "..") || p == "/" {
        return Err(OverlayError::BadGuestPath(p.to_owned()));
    }
    // `//init` and `/./ornament/x` are the same files.
    let comps: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if comps == ["init"] || comps.first() == Some(&"ornament") {
        return Err(OverlayError::ReservedGuestPath(p.to_owned()));
    }
    Ok(())
}

/// Quote one argument for the guest's `sh` so it arrives unchanged.
pub fn sh_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// The script /init runs: `exec` plus the quoted argv.
pub fn command_script(command: &[String]) -> String {
    let mut s = String::from("exec");
    for a in command {
        s.push(' ');
        s.push_str(&sh_quote(a));
    }
    s.push('\n');
    s
}

impl RunOverlay {
    /// Write `base` followed by the overlay archive to `out` (a new initramfs file).
    pub fn write_combined(&self, base: &Path, out: &Path) -> Result<(), OverlayError> {
        let io_at = |p: &Path| {
            let p = p.to_path_buf();
            move |source| OverlayError::Io { path: p, source }
        };
        let mut dst = io::BufWriter::new(fs::File::create(out).map_err(io_at(out))?);
        let mut src = fs::File::open(base).map_err(io_at(base))?;
        io::copy(&mut src, &mut dst).map_err(io_at(base))?;
        // The kernel looks for the next archive at a 4-byte boundary; a gzip member
        // has arbitrary length, so pad with zeros (skipped by the unpacker).
        let len = fs::metadata(base).map_err(io_at(base))?.len();
        let pad = usize::try_from((4 - len % 4) % 4).unwrap_or(0);
        dst.write_all(&[0u8; 3][..pad]).map_err(io_at(out))?;
        let mut w = CpioWriter::new(dst);
        (|| -> io::Result<()> {
            w.dir("/ornament", 0o755)?;
            // Always a script, the demo included: the command's process is recognised
            // by `sh /ornament/cmd` whatever it runs.
            let script = if self.command.is_empty() {
                DEMO_SCRIPT.to_owned()
            } else {
                command_script(&self.command)
            };
            w.file(COMMAND_SCRIPT, 0o644, script.as_bytes())?;
            Ok(())
        })()
        .map_err(io_at(out))?;
        add_files(&mut w, &self.add)?;
        let dst = w.finish().map_err(io_at(out))?;
        dst.into_inner()
            .map_err(|e| OverlayError::Io {
                path: out.to_path_buf(),
                source: e.into_error(),
            })?
            .sync_all()
            .map_err(io_at(out))?;
        Ok(())
    }
}

/// Add host files (with their parent directories) to an archive being written.
pub fn add_files<W: Write>(
    w: &mut CpioWriter<W>,
    add: &[(PathBuf, String)],
) -> Result<(), ImageError> {
    for (host, guest) in add {
        let data = fs::read(host).map_err(|source| ImageError::AddFile {
            path: host.clone(),
            source,
        })?;
        let mode = fs::metadata(host)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o7777
            })
            .unwrap_or(0o644);
        let mut prefix = String::new();
        let comps: Vec<&str> = guest.trim_start_matches('/').split('/').collect();
        let io = |source| ImageError::Io {
            path: host.clone(),
            source,
        };
        for c in &comps[..comps.len().saturating_sub(1)] {
            prefix.push('/');
            prefix.push_str(c);
            w.dir(&prefix, 0o755).map_err(io)?;
        }
        w.file(guest, mode, &data)
            .map_err(|source| ImageError::Io {
                path: host.clone(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_arguments_exact() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(
            command_script(&["echo".into(), "$HOME; rm -rf /".into()]),
            "exec 'echo' '$HOME; rm -rf /'\n"
        );
    }

    #[test]
    fn add_specs() {
        assert_eq!(
            parse_add("/tmp/x:/opt/x").expect("valid"),
            (PathBuf::from("/tmp/x"), "/opt/x".to_owned())
        );
        assert!(parse_add("/tmp/x").is_err());
        assert!(parse_add("/tmp/x:rel").is_err());
        assert!(parse_add("/tmp/x:/a/../b").is_err());
        assert!(parse_add(":/a").is_err());
        for reserved in [
            "/init",
            "//init",
            "/./init",
            "/ornament",
            "/ornament/cmd",
            "/ornament/x/y",
        ] {
            assert!(
                matches!(
                    parse_add(&format!("/tmp/x:{reserved}")),
                    Err(OverlayError::ReservedGuestPath(p)) if p == reserved
                ),
                "{reserved}"
            );
        }
        assert!(parse_add("/tmp/x:/init.d/x").is_ok());
        assert!(parse_add("/tmp/x:/opt/ornament").is_ok());
    }
}
