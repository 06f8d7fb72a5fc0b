//! The end of a run: ornament's exit status, decided from what the hypervisor saw, and
//! the one-line summary on stderr.
//!
//! The command's status is the one its own process exited with, read from the guest
//! kernel at `proc_exit_connector` ([`CommandView`]). The line `/init` writes on the
//! second serial port is only a cross-check: the guest can write anything there. Only
//! when the kernel has no profile (so nothing can be observed) is the guest's word
//! taken, and ornament says so.

use crate::watch::Record;
use anyhow::{bail, Result};
use ornament_introspect::command::CommandView;
use std::io::ErrorKind;

/// Exit status when the event output was a pipe that its reader closed (what a shell
/// reports for a tool killed by SIGPIPE).
pub const BROKEN_PIPE_STATUS: u8 = 128 + 13;

/// The status to exit with: the observed one; with no observation (no profile), the
/// guest's own report. `reported` is `/init`'s `ornament-exit N` line, if any; `why_no_report`
/// says how the guest ended, for the error when there is nothing to go on.
pub fn decide(
    observed: Option<&CommandView>,
    reported: Option<i32>,
    why_no_report: impl FnOnce() -> String,
) -> Result<u8> {
    let Some(view) = observed else {
        return match reported {
            Some(r) => match u8::try_from(r) {
                Ok(s) => {
                    eprintln!("ornament: exit status {s} as the guest's /init reported it (unverified: without a kernel profile ornament cannot see the command's exit)");
                    Ok(s)
                }
                Err(_) => bail!("the guest reported an impossible exit status {r} (not 0-255)"),
            },
            None => bail!(
                "the guest stopped without reporting the command's exit status: {}",
                why_no_report()
            ),
        };
    };
    let state = view.snapshot();
    match (state.exit, state.root) {
        (Some(exit), _) => {
            let s = exit.status();
            if let Some(r) = reported.filter(|&r| r != i32::from(s)) {
                eprintln!("ornament: warning: the guest's /init reported exit status {r}, but the command's process exited with {s} as the hypervisor saw it; using {s}");
            }
            Ok(s)
        }
        (None, Some(pid)) => bail!(
            "the guest stopped before the command (guest pid {pid}) ended{}: {}",
            match reported {
                Some(r) => format!(" (a status line {r} written in the guest was ignored)"),
                None => String::new(),
            },
            why_no_report()
        ),
        (None, None) => bail!(
            "the command never started in the guest (its process was not seen to exec): {}",
            why_no_report()
        ),
    }
}

/// Fail the run when events were lost or the timeline could not be written; else print the summary line: what the watched
/// processes did, the events written, the time. A closed pipe ends quietly with
/// [`BROKEN_PIPE_STATUS`] (`Some`); any other output error is an error.
pub fn check_output(record: &Record, target: &str) -> Result<Option<u8>> {
    if let Some(why) = &record.pages_failed {
        bail!("{why}");
    }
    if record.dropped > 0 {
        bail!(
            "{} events were dropped: the event output ({target}) stopped taking events (its queue of {} events stayed full for {} s at a time); the tree, the timeline and the summary miss them too",
            record.dropped,
            ornament_introspect::ornament::CONSUMER_QUEUE,
            ornament_introspect::ornament::CONSUMER_PATIENCE.as_secs()
        );
    }
    if let Some(o) = record.otlp.as_ref().filter(|o| o.lost() > 0) {
        bail!(
            "{} of {} events did not reach the OTLP collector at {}{}",
            o.lost(),
            o.emitted,
            o.endpoint,
            match &o.error {
                Some(why) => format!(": {why}"),
                None => " (the exporter's queue was full)".to_owned(),
            }
        );
    }
    let exported = match &record.otlp {
        Some(o) => format!(
            "; {} event{} exported to {}, 0 lost",
            o.delivered,
            if o.delivered == 1 { "" } else { "s" },
            o.endpoint
        ),
        None => String::new(),
    };
    let summary = |events: String| {
        eprintln!(
            "ornament: {}{events}{exported}; {:.1} s",
            record.summary,
            record.elapsed.as_secs_f64()
        );
    };
    let Some(health) = &record.output else {
        summary(String::new());
        return Ok(None);
    };
    let r = health.report();
    match r.error {
        None => {
            let s = if r.written == 1 { "" } else { "s" };
            summary(format!(
                "; {} event{s} written to {target}, 0 lost",
                r.written
            ));
            Ok(None)
        }
        Some(ErrorKind::BrokenPipe) => Ok(Some(BROKEN_PIPE_STATUS)),
        Some(_) => bail!(
            "writing events to {target} failed ({}): {} written, {} lost; the run was stopped",
            health.error_text().unwrap_or_default(),
            r.written,
            r.lost
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_introspect::command::{CommandMatch, CommandTracker};
    use ornament_introspect::event::{Event, ExecEvent, ExitEvent, TaskHeader};
    use ornament_introspect::ornament::Registry;

    fn header(pid: i32) -> TaskHeader {
        TaskHeader {
            pid: Some(pid),
            tgid: Some(pid),
            ppid: Some(1),
            ..TaskHeader::default()
        }
    }

    /// A tracker that saw the command (pid 83) exec, and exit with `code` if given.
    fn seen(code: Option<u8>) -> CommandView {
        let t = CommandTracker::new(CommandMatch {
            parent_tgid: 1,
            argv_prefix: vec!["sh".into(), "/ornament/cmd".into()],
        });
        let view = t.view();
        let mut reg = Registry::new();
        reg.attach(Box::new(t));
        reg.dispatch(&Event::Exec(ExecEvent {
            task: header(83),
            argv: vec!["sh".into(), "/ornament/cmd".into()],
            ..ExecEvent::default()
        }));
        if let Some(c) = code {
            reg.dispatch(&Event::Exit(ExitEvent {
                task: header(83),
                exit_code: c,
                group_exit: true,
                ..ExitEvent::default()
            }));
        }
        view
    }

    #[test]
    fn the_observed_status_wins_over_the_guests_word() {
        let v = seen(Some(1));
        assert_eq!(decide(Some(&v), Some(0), String::new).expect("status"), 1);
        assert_eq!(decide(Some(&v), None, String::new).expect("status"), 1);
        let err =
            decide(Some(&seen(None)), Some(0), || "powered off".into()).expect_err("no exit seen");
        assert!(err
            .to_string()
            .contains("before the command (guest pid 83) ended"));
        let err =
            decide(Some(&CommandView::default()), Some(0), String::new).expect_err("never started");
        assert!(err.to_string().contains("never started"));
    }

    #[test]
    fn without_a_profile_the_report_is_taken_but_never_clamped() {
        assert_eq!(decide(None, Some(255), String::new).expect("status"), 255);
        assert!(decide(None, Some(-1), String::new).is_err());
        assert!(decide(None, Some(256), String::new).is_err());
        assert!(decide(None, None, String::new).is_err());
    }
}
