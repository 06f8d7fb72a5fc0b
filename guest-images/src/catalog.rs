//! The guest images ornament knows how to build, by name.

/// One buildable image: a name and the Debian packages it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpec {
    /// Name used on the command line (`--image NAME`).
    pub name: &'static str,
    /// Kernel release (`uname -r` in the guest).
    pub release: &'static str,
    /// The kernel image package.
    pub package: &'static str,
    /// Its debug-symbols package (real System.map and vmlinux): images do not use it;
    /// the tests that check kallsyms against the real System.map fetch it.
    pub dbg_package: &'static str,
    /// One line for `--help` and `ornament image list`.
    pub summary: &'static str,
}

/// Name of the image `ornament run` uses when none is given.
pub const DEFAULT_IMAGE: &str = "debian-6.1-cloud";

/// Every image ornament can build.
pub const IMAGES: &[ImageSpec] = &[
    ImageSpec {
        name: "debian-6.1-cloud",
        release: "6.1.0-50-cloud-amd64",
        package: "linux-image-6.1.0-50-cloud-amd64",
        dbg_package: "linux-image-6.1.0-50-cloud-amd64-dbg",
        summary: "Debian 12 cloud kernel 6.1 (the default)",
    },
    ImageSpec {
        name: "debian-6.12-cloud",
        release: "6.12.117+deb12-cloud-amd64",
        package: "linux-image-6.12.117+deb12-cloud-amd64",
        dbg_package: "linux-image-6.12.117+deb12-cloud-amd64-dbg",
        summary: "Debian 12 (bookworm-security) cloud kernel 6.12",
    },
];

/// Look an image up by name.
pub fn find(name: &str) -> Option<&'static ImageSpec> {
    IMAGES.iter().find(|s| s.name == name)
}

/// Names of every image, for error messages.
pub fn names() -> Vec<&'static str> {
    IMAGES.iter().map(|s| s.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_listed_and_names_unique() {
        assert!(find(DEFAULT_IMAGE).is_some());
        let mut n = names();
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), IMAGES.len());
        for s in IMAGES {
            assert!(s.package.ends_with(s.release));
            assert_eq!(s.dbg_package, format!("{}-dbg", s.package));
        }
    }
}
