//! The x86-64 system call numbers (a stable ABI), parsed from `syscalls_x86_64.tbl`.

use std::collections::BTreeMap;

/// The table shipped with this crate (format: `<nr> <name> [<entry point>]`).
pub const X86_64_TABLE: &str = include_str!("../syscalls_x86_64.tbl");

/// Why a syscall table could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum SyscallsError {
    /// syscall table line {line} is malformed
    BadLine {
        /// 1-based line number.
        line: usize,
    },
    /// syscall table line {line} repeats number {nr}
    Duplicate {
        /// 1-based line number.
        line: usize,
        /// The repeated number.
        nr: u32,
    },
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyscallEntry {
    /// Syscall number.
    pub nr: u32,
    /// Its name (`openat`).
    pub name: String,
    /// Kernel entry point without the `__x64_` prefix (`sys_openat`).
    pub entry: String,
}

/// Parse a table in the `syscalls_x86_64.tbl` format.
pub fn parse_table(text: &str) -> Result<Vec<SyscallEntry>, SyscallsError> {
    let mut out: Vec<SyscallEntry> = Vec::new();
    let mut seen = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let body = raw.split('#').next().unwrap_or("").trim();
        if body.is_empty() {
            continue;
        }
        let mut cols = body.split_whitespace();
        let (Some(nr), Some(name)) = (cols.next(), cols.next()) else {
            return Err(SyscallsError::BadLine { line });
        };
        let entry = cols
            .next()
            .map_or_else(|| format!("sys_{name}"), str::to_owned);
        if cols.next().is_some() {
            return Err(SyscallsError::BadLine { line });
        }
        let nr: u32 = nr.parse().map_err(|_| SyscallsError::BadLine { line })?;
        if seen.insert(nr, ()).is_some() {
            return Err(SyscallsError::Duplicate { line, nr });
        }
        out.push(SyscallEntry {
            nr,
            name: name.to_owned(),
            entry,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_table_parses_and_has_known_numbers() {
        let t = parse_table(X86_64_TABLE).expect("shipped table is valid");
        let nr = |n: &str| t.iter().find(|e| e.name == n).map(|e| e.nr);
        assert_eq!(nr("read"), Some(0));
        assert_eq!(nr("execve"), Some(59));
        assert_eq!(nr("getppid"), Some(110));
        assert_eq!(nr("clone3"), Some(435));
        assert_eq!(nr("mseal"), Some(462));
        let um = t.iter().find(|e| e.name == "umount2").expect("umount2");
        assert_eq!(um.entry, "sys_umount");
        assert!(t.iter().all(|e| e.nr <= 462));
    }

    #[test]
    fn errors() {
        assert_eq!(parse_table("1"), Err(SyscallsError::BadLine { line: 1 }));
        assert_eq!(parse_table("x y"), Err(SyscallsError::BadLine { line: 1 }));
        assert_eq!(
            parse_table("1 a\n# c\n1 b"),
            Err(SyscallsError::Duplicate { line: 3, nr: 1 })
        );
        assert_eq!(
            parse_table("1 a b c"),
            Err(SyscallsError::BadLine { line: 1 })
        );
    }
}
