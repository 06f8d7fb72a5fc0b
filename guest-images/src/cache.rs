//! Where built images live, and how a complete image is told from a partial one.
//!
//! Layout: `<root>/images/<image name>/<package version>/` holding the image files
//! and `manifest.json`, written last, with the size and SHA-256 of every file.
//! A directory without a manifest, or whose files do not match it, is damaged
//! and is rebuilt.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Environment variable that moves the cache.
pub const CACHE_ENV: &str = "ORNAMENT_CACHE_DIR";

/// Version of the manifest format; a different one means rebuild. 3: the profile
/// records the mount tree (exec paths across mount points); 2: images from the kernel
/// package alone (System.map from kallsyms, vmlinux from the bzImage, a profile); 1 held
/// the `-dbg` package's System.map and vmlinux.
pub const MANIFEST_FORMAT: u32 = 3;

/// Name of the manifest file inside an image directory.
pub const MANIFEST: &str = "manifest.json";

/// Why a cached image cannot be used.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum CacheError {
    /// {path} is missing
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// {path} cannot be read
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// manifest {path} is not valid
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// manifest {path} has format {found}, expected {expected}
    ManifestFormat {
        /// The manifest.
        path: PathBuf,
        /// Its format.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// {path} does not match the manifest (damaged or partial image)
    Mismatch {
        /// The damaged file.
        path: PathBuf,
    },
}

/// One file of an image, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the image directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// What `manifest.json` records about a complete image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// `MANIFEST_FORMAT` at build time.
    pub format: u32,
    /// Image name.
    pub image: String,
    /// Kernel release.
    pub release: String,
    /// Debian package version the kernel came from.
    pub package_version: String,
    /// Every file of the image.
    pub files: Vec<FileEntry>,
}

/// The cache root: `override_dir`, else `$ORNAMENT_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/ornament`, else `$HOME/.cache/ornament`, else a directory in /tmp.
pub fn cache_root(override_dir: Option<&Path>) -> PathBuf {
    if let Some(d) = override_dir {
        return d.to_path_buf();
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env(CACHE_ENV) {
        return d;
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return d.join("ornament");
    }
    if let Some(h) = env("HOME") {
        return h.join(".cache").join("ornament");
    }
    std::env::temp_dir().join("ornament-cache")
}

/// Size and SHA-256 of a file.
pub fn hash_file(path: &Path) -> Result<FileEntry, CacheError> {
    let io = |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(FileEntry { name, size, sha256 })
}

/// Write the manifest for `dir` (call last, after every file is in place).
pub fn write_manifest(dir: &Path, mut manifest: Manifest) -> Result<Manifest, CacheError> {
    manifest.format = MANIFEST_FORMAT;
    let path = dir.join(MANIFEST);
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|source| CacheError::BadManifest {
            path: path.clone(),
            source,
        })?;
    fs::write(&path, text).map_err(|source| CacheError::Io { path, source })?;
    Ok(manifest)
}

/// Check `dir` against its manifest: every file present with its recorded size
/// and hash. Returns the manifest of a complete image.
pub fn verify(dir: &Path) -> Result<Manifest, CacheError> {
    let path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CacheError::Missing { path })
        }
        Err(source) => return Err(CacheError::Io { path, source }),
    };
    let m: Manifest = serde_json::from_str(&text).map_err(|source| CacheError::BadManifest {
        path: path.clone(),
        source,
    })?;
    if m.format != MANIFEST_FORMAT {
        return Err(CacheError::ManifestFormat {
            path,
            found: m.format,
            expected: MANIFEST_FORMAT,
        });
    }
    for f in &m.files {
        let p = dir.join(&f.name);
        let meta = fs::metadata(&p).map_err(|_| CacheError::Missing { path: p.clone() })?;
        if meta.len() != f.size || hash_file(&p)?.sha256 != f.sha256 {
            return Err(CacheError::Mismatch { path: p });
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Manifest {
        fs::write(dir.join("a"), b"hello").expect("write");
        let files = vec![hash_file(&dir.join("a")).expect("hash")];
        write_manifest(
            dir,
            Manifest {
                format: 0,
                image: "x".into(),
                release: "r".into(),
                package_version: "1".into(),
                files,
            },
        )
        .expect("manifest")
    }

    #[test]
    fn complete_image_verifies() {
        let d = tempfile::tempdir().expect("tempdir");
        let m = sample(d.path());
        assert_eq!(verify(d.path()).expect("valid"), m);
        assert_eq!(
            m.files[0].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }

    #[test]
    fn damage_is_detected() {
        let d = tempfile::tempdir().expect("tempdir");
        sample(d.path());
        fs::write(d.path().join("a"), b"hellO").expect("write");
        assert!(matches!(verify(d.path()), Err(CacheError::Mismatch { .. })));
        fs::write(d.path().join("a"), b"hell").expect("write");
        assert!(matches!(verify(d.path()), Err(CacheError::Mismatch { .. })));
        fs::remove_file(d.path().join("a")).expect("rm");
        assert!(matches!(verify(d.path()), Err(CacheError::Missing { .. })));
        fs::remove_file(d.path().join(MANIFEST)).expect("rm");
        assert!(matches!(verify(d.path()), Err(CacheError::Missing { .. })));
        fs::write(d.path().join(MANIFEST), b"{").expect("write");
        assert!(matches!(
            verify(d.path()),
            Err(CacheError::BadManifest { .. })
        ));
    }

    #[test]
    fn root_precedence() {
        assert_eq!(cache_root(Some(Path::new("/x"))), PathBuf::from("/x"));
    }
}
