//! The line ornament's `/init` writes on the guest's second serial port when the command
//! has ended: `ornament-exit N`. Both engines read it the same way. It is the guest's
//! word, not an observation: the run's status comes from the command's exit as the
//! hypervisor saw it, and this line is only a cross-check (or the status itself where no
//! kernel profile allows observing).

/// The start of the report line.
pub const EXIT_REPORT: &str = "ornament-exit ";

/// `N` of the last complete (newline-ended) `ornament-exit N` line in the bytes written
/// so far: `/init` writes its line after the command has ended, so a line the command
/// wrote itself comes before it.
pub fn last_exit_report(bytes: &[u8]) -> Option<i32> {
    let text = String::from_utf8_lossy(bytes);
    let complete = &text[..text.rfind('\n')?];
    complete
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(EXIT_REPORT))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_complete_line_counts() {
        assert_eq!(last_exit_report(b"ornament-exit 7\n"), Some(7));
        assert_eq!(
            last_exit_report(b"noise\r\nornament-exit 137\r\n"),
            Some(137)
        );
        assert_eq!(
            last_exit_report(b"ornament-exit 0\nornament-exit 1\n"),
            Some(1)
        );
        assert_eq!(
            last_exit_report(b"ornament-exit 0\nornament-exit 1"),
            Some(0)
        );
        assert_eq!(last_exit_report(b"ornament-exit 4"), None);
        assert_eq!(last_exit_report(b"ornament-exit x\n"), None);
        assert_eq!(last_exit_report(b"nothing\n"), None);
        assert_eq!(last_exit_report(b""), None);
        assert_eq!(last_exit_report(b"ornament-exit -1\n"), Some(-1));
    }
}
