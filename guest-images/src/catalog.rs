//! The guest images ornament knows how to build, by name. An entry names Debian
//! meta-packages, not a kernel: which kernel package it is built from is resolved when
//! the image is built (`resolve`), so the catalogue follows Debian's archive.

/// Where a catalogue image's kernel comes from: a Debian meta-package, and the kernel
/// series (upstream `MAJOR.MINOR`) whose versions of it count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// The meta-package (`linux-image-cloud-amd64`).
    pub meta: &'static str,
    /// The series (`6.1`): a version of the meta-package counts if it starts `6.1.`.
    pub series: &'static str,
}

/// A fixed kernel whose profile is committed in `profiles/`: the tests that check
/// profiles, kallsyms and struct layouts against that kernel's `-dbg` package pin it
/// (`--kernel-package`), whatever the catalogue resolves to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reference {
    /// Kernel release (`uname -r` in the guest).
    pub release: &'static str,
    /// The kernel image package.
    pub package: &'static str,
    /// Its debug-symbols package (real System.map and vmlinux): images do not use it;
    /// the tests that check kallsyms against the real System.map fetch it.
    pub dbg_package: &'static str,
}

/// One buildable image: a name and the Debian meta-packages its kernel comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpec {
    /// Name used on the command line (`--image NAME`).
    pub name: &'static str,
    /// Where the kernel comes from: the newest version over these sources wins.
    pub sources: &'static [Source],
    /// The kernel of this flavour whose profile is committed, if any.
    pub reference: Option<Reference>,
    /// One line for `--help` and `ornament image list`.
    pub summary: &'static str,
}

/// Name of the image `ornament run` uses when none is given.
pub const DEFAULT_IMAGE: &str = "debian-6.1-cloud";

/// Every image ornament can build.
pub const IMAGES: &[ImageSpec] = &[
    ImageSpec {
        name: "debian-6.1-cloud",
        sources: &[Source {
            meta: "linux-image-cloud-amd64",
            series: "6.1",
        }],
        reference: Some(Reference {
            release: "6.1.0-50-cloud-amd64",
            package: "linux-image-6.1.0-50-cloud-amd64",
            dbg_package: "linux-image-6.1.0-50-cloud-amd64-dbg",
        }),
        summary: "Debian 12 cloud kernel 6.1 (the default)",
    },
    ImageSpec {
        name: "debian-6.1-generic",
        sources: &[Source {
            meta: "linux-image-amd64",
            series: "6.1",
        }],
        reference: None,
        summary: "Debian 12 generic kernel 6.1",
    },
    ImageSpec {
        name: "debian-6.1-rt",
        sources: &[Source {
            meta: "linux-image-rt-amd64",
            series: "6.1",
        }],
        reference: None,
        summary: "Debian 12 PREEMPT_RT kernel 6.1",
    },
    ImageSpec {
        name: "debian-6.12-cloud",
        // bookworm-security carries 6.12 under its own meta-package; bookworm-backports
        // under the plain one. The newer of the two wins.
        sources: &[
            Source {
                meta: "linux-image-6.12-cloud-amd64",
                series: "6.12",
            },
            Source {
                meta: "linux-image-cloud-amd64",
                series: "6.12",
            },
        ],
        reference: Some(Reference {
            release: "6.12.117+deb12-cloud-amd64",
            package: "linux-image-6.12.117+deb12-cloud-amd64",
            dbg_package: "linux-image-6.12.117+deb12-cloud-amd64-dbg",
        }),
        summary: "Debian 12 cloud kernel 6.12 (bookworm-security or -backports)",
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

/// The reference kernel of image `name` (panics when it has none: for tests).
pub fn reference(name: &str) -> Reference {
    find(name)
        .and_then(|s| s.reference)
        .unwrap_or_else(|| panic!("catalogue image {name} has no reference kernel"))
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
            assert!(!s.sources.is_empty(), "{}", s.name);
            for src in s.sources {
                assert!(s.name.contains(&format!("-{}-", src.series)), "{}", s.name);
            }
            if let Some(r) = s.reference {
                assert_eq!(r.package, format!("linux-image-{}", r.release));
                assert_eq!(r.dbg_package, format!("{}-dbg", r.package));
            }
        }
        assert_eq!(reference(DEFAULT_IMAGE).release, "6.1.0-50-cloud-amd64");
    }
}
