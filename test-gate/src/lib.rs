//! The one rule for "this host lacks X", shared by every test and bench of the workspace.
//!
//! A test that needs something the host may not have (QEMU, `/dev/kvm`, apt-get, a
//! buildable image, an opt-in environment gate) asks for it through [`require`] or the
//! [`require!`] macro:
//!
//! - present: the test goes on (with the probe's value, for `Result` and `Option`);
//! - missing, and `CI` is set to anything non-empty other than `0` or `false`: the test
//!   panics with a message naming what is missing and why;
//! - missing outside CI: it prints `SKIPPED: <test> needs <what>: <why>` on stderr and
//!   returns early.
//!
//! No test may skip by any other path: a silent early `return` passes a test that
//! tested nothing.
#![forbid(unsafe_code)]

use std::error::Error;
use std::ffi::OsStr;

/// The environment variable that marks a CI run.
pub const CI_VAR: &str = "CI";

/// Whether a value of `CI` means "this is a CI run": set, non-empty, and neither `0`
/// nor `false` (any case).
pub fn ci_value_is_on(value: Option<&OsStr>) -> bool {
    match value.map(OsStr::to_string_lossy) {
        None => false,
        Some(v) => {
            let v = v.trim();
            !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
        }
    }
}

/// Whether this process runs under CI (see [`ci_value_is_on`]).
pub fn in_ci() -> bool {
    ci_value_is_on(std::env::var_os(CI_VAR).as_deref())
}

/// Something a test can ask for: a yes/no answer, or a probe that yields a value
/// (`Ok`/`Some`) or says why not (`Err`; `None` has no reason beyond its name).
pub trait Requirement {
    /// What the test gets when the requirement is met.
    type Value;
    /// The value, or why the requirement is not met (may be empty).
    fn check(self) -> Result<Self::Value, String>;
}

impl Requirement for bool {
    type Value = ();
    fn check(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err(String::new())
        }
    }
}

impl<T> Requirement for Option<T> {
    type Value = T;
    fn check(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

/// Any error (with its chain of sources), or a plain `String` reason.
impl<T, E: Into<Box<dyn Error>>> Requirement for Result<T, E> {
    type Value = T;
    fn check(self) -> Result<T, String> {
        self.map_err(|e| error_chain(e.into().as_ref()))
    }
}

/// `e` and its sources, joined with `: `.
pub fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("this test")
        .to_owned()
}

/// The line the rule prints or panics with: `<test> needs <what>[: <why>]`.
fn needs(what: &str, why: &str) -> String {
    let why = why.trim();
    if why.is_empty() {
        format!("{} needs {what}", test_name())
    } else {
        format!("{} needs {what}: {why}", test_name())
    }
}

/// Apply the rule to a requirement that is not met: panic under CI, else print the
/// `SKIPPED:` line. Returns only outside CI.
pub fn missing(what: &str, why: &str) {
    let line = needs(what, why);
    if in_ci() {
        panic!("{line} (it is missing, and CI is set, so this is a failure, not a skip)");
    }
    eprintln!("SKIPPED: {line}");
}

/// Check `requirement`, named `what` in messages: its value when met; otherwise
/// [`missing`] (panic under CI) and `None`, on which the caller must return at once.
pub fn require<R: Requirement>(what: &str, requirement: R) -> Option<R::Value> {
    match requirement.check() {
        Ok(v) => Some(v),
        Err(why) => {
            missing(what, &why);
            None
        }
    }
}

/// `require!("QEMU", probe)`: [`require`], returning from the calling test (a function
/// returning `()`) when the requirement is missing outside CI. Evaluates to the
/// probe's value (`()` for a `bool`).
#[macro_export]
macro_rules! require {
    ($what:expr, $requirement:expr $(,)?) => {
        match $crate::require($what, $requirement) {
            ::std::option::Option::Some(v) => v,
            ::std::option::Option::None => return,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_values() {
        let on = |v: &str| ci_value_is_on(Some(OsStr::new(v)));
        assert!(!ci_value_is_on(None));
        for off in ["", " ", "0", "false", "FALSE", "False"] {
            assert!(!on(off), "{off:?}");
        }
        for yes in ["1", "true", "TRUE", "yes", "github", "2"] {
            assert!(on(yes), "{yes:?}");
        }
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot start QEMU")
        }
    }
    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn requirements_give_values_or_reasons() {
        assert_eq!(true.check(), Ok(()));
        assert_eq!(false.check(), Err(String::new()));
        assert_eq!(Some(3).check(), Ok(3));
        assert_eq!(None::<u8>.check(), Err(String::new()));
        let r: Result<u8, Outer> = Err(Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file",
        )));
        assert_eq!(r.check(), Err("cannot start QEMU: no such file".to_owned()));
        let r: Result<(), String> = Err("musl-gcc not runnable".into());
        assert_eq!(r.check(), Err("musl-gcc not runnable".to_owned()));
    }

    #[test]
    fn met_requirements_pass_their_value() {
        // Met requirements never consult CI, so these hold in and out of CI.
        assert_eq!(require("a number", Some(7)), Some(7));
        assert_eq!(require("a yes", true), Some(()));
        let mut got = None;
        let mut gated = || {
            let v = require!("an Ok", Ok::<_, std::io::Error>(5));
            got = Some(v);
        };
        gated();
        assert_eq!(got, Some(5));
    }

    #[test]
    fn messages_name_the_test_and_what_is_missing() {
        let m = needs("QEMU", " not on PATH ");
        assert!(
            m.ends_with(
                "tests::messages_name_the_test_and_what_is_missing needs QEMU: not on PATH"
            ),
            "{m}"
        );
        assert!(needs("QEMU", "").ends_with("needs QEMU"));
    }
}
