//! [`EventWriter`]: the ornament that writes events out, one line each, and never
//! loses one silently.
//!
//! Every line written carries its number (`seq`, from 1, in the JSON form), so a gap
//! shows. The first write error (a full disk, a closed pipe) is kept in an
//! [`OutputHealth`] that the caller reads at the end; from then on no more lines are
//! written and each event is counted as lost, and the caller's stop flag, if one was
//! given, is set so that the run ends instead of going on unrecorded.

use super::{Decision, Ornament};
use crate::event::{Event, EventMask, SCHEMA_VERSION};
use crate::lineage::RunInfo;
use serde::Serialize;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Output format of [`EventWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// The one-line text form.
    #[default]
    Text,
    /// JSON lines (the schema of `introspect/EVENTS.md`).
    Json,
    /// Elastic Common Schema documents, one per line ([`super::ecs`]).
    Ecs,
}

#[derive(Debug, Default)]
struct HealthState {
    written: AtomicU64,
    lost: AtomicU64,
    error: Mutex<Option<io::Error>>,
}

/// What became of a writer's output; shared with the caller (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct OutputHealth(Arc<HealthState>);

/// A summary of an [`OutputHealth`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputReport {
    /// Lines written.
    pub written: u64,
    /// Events not written because the output had failed.
    pub lost: u64,
    /// The kind of the first write error, if there was one.
    pub error: Option<io::ErrorKind>,
}

impl OutputHealth {
    /// The counts and the first error's kind.
    pub fn report(&self) -> OutputReport {
        OutputReport {
            written: self.0.written.load(Ordering::Relaxed),
            lost: self.0.lost.load(Ordering::Relaxed),
            error: self.error_kind(),
        }
    }

    fn error_kind(&self) -> Option<io::ErrorKind> {
        self.0
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(io::Error::kind)
    }

    /// The first write error as text, if there was one.
    pub fn error_text(&self) -> Option<String> {
        self.0
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(ToString::to_string)
    }

    fn failed(&self, e: io::Error) {
        let mut slot = self.0.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn broken(&self) -> bool {
        self.0
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// One JSON line: the schema version, the line's number and the run, then the event's own
/// fields.
#[derive(Serialize)]
struct Numbered<'a> {
    schema: u32,
    seq: u64,
    run_id: &'a str,
    host: Option<&'a str>,
    #[serde(flatten)]
    event: &'a Event,
}

/// Writes each event as one line (text or JSON). A syscall that an earlier ornament
/// denied is written with the errno it was made to fail with. Attach it after the
/// ornaments that decide, so that it reports what they decided.
pub struct EventWriter {
    out: Box<dyn Write + Send>,
    format: Format,
    mask: EventMask,
    seq: u64,
    run: RunInfo,
    health: OutputHealth,
    stop: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter")
            .field("format", &self.format)
            .field("mask", &self.mask)
            .field("health", &self.health.report())
            .finish()
    }
}

impl EventWriter {
    /// Every event, in `format`, to `out`.
    pub fn new(out: Box<dyn Write + Send>, format: Format) -> Self {
        Self {
            out,
            format,
            mask: EventMask::ALL,
            seq: 0,
            run: RunInfo::new(),
            health: OutputHealth::default(),
            stop: None,
        }
    }

    /// Only the kinds in `mask`.
    pub fn with_mask(mut self, mask: EventMask) -> Self {
        self.mask = mask;
        self
    }

    /// Lines name `run` (the session's [`crate::session::Session::run_info`], whose id the
    /// events' `exec_id`s carry); without it, a run of the writer's own.
    pub fn for_run(mut self, run: RunInfo) -> Self {
        self.run = run;
        self
    }

    /// Set `stop` when the output fails (the run should end: its events can no
    /// longer be recorded).
    pub fn stop_on_error(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The writer's health, for the caller to read at the end.
    pub fn health(&self) -> OutputHealth {
        self.health.clone()
    }

    fn line(&self, ev: &Event) -> String {
        match self.format {
            Format::Text => ev.to_text(),
            // Serialising these plain structs cannot fail (string keys, no maps).
            Format::Json => serde_json::to_string(&Numbered {
                schema: SCHEMA_VERSION,
                seq: self.seq,
                run_id: &self.run.run_id,
                host: self.run.host.as_deref(),
                event: ev,
            })
            .unwrap_or_default(),
            Format::Ecs => super::ecs::document(ev, self.seq, &self.run).to_string(),
        }
    }

    fn write(&mut self, ev: &Event, d: &Decision) {
        if !ev.is_reported() {
            return;
        }
        if self.health.broken() {
            self.health.0.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let ev = ev.as_decided(d.denied());
        self.seq += 1;
        let line = self.line(&ev);
        match writeln!(self.out, "{line}") {
            Ok(()) => {
                self.health.0.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.fail(e, 1),
        }
    }

    fn fail(&mut self, e: io::Error, lost: u64) {
        if !self.health.broken() {
            if e.kind() == io::ErrorKind::BrokenPipe {
                // The reader went away (`| head`): the caller ends the run quietly.
                tracing::debug!("event output closed by its reader; stopping the run");
            } else {
                tracing::error!(error = %e, "cannot write events; stopping the run");
            }
        }
        self.health.failed(e);
        self.health.0.lost.fetch_add(lost, Ordering::Relaxed);
        if let Some(stop) = &self.stop {
            stop.store(true, Ordering::SeqCst);
        }
    }
}

impl Ornament for EventWriter {
    fn name(&self) -> &str {
        "event-writer"
    }
    fn mask(&self) -> EventMask {
        self.mask
    }
    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        self.write(ev, d);
    }
    fn finish(&mut self) {
        if self.health.broken() {
            return;
        }
        if let Err(e) = self.out.flush() {
            // Lines still buffered are lost; which ones is not known, so the count
            // stays as it is and the error says it.
            self.fail(e, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::SharedBuf as Buf;
    use crate::event::{ExitEvent, SyscallEvent, TaskHeader};
    use crate::ornament::{DenySyscalls, Registry};

    /// Accepts `ok` lines, then fails every write with `kind`.
    struct Failing {
        ok: usize,
        kind: io::ErrorKind,
    }
    impl Write for Failing {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::from(self.kind));
            }
            if b.ends_with(b"\n") {
                self.ok -= 1;
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn exit_ev(pid: i32) -> Event {
        Event::Exit(ExitEvent {
            task: TaskHeader {
                pid: Some(pid),
                tgid: Some(pid),
                ..TaskHeader::default()
            },
            ..ExitEvent::default()
        })
    }

    #[test]
    fn lines_are_numbered_and_a_denied_syscall_says_so() {
        let buf = Buf::default();
        let mut reg = Registry::new();
        reg.attach(Box::new(DenySyscalls::new([(83, 1)].into())));
        let w = EventWriter::new(Box::new(buf.clone()), Format::Json);
        let health = w.health();
        reg.attach(Box::new(w));
        reg.dispatch(&exit_ev(5));
        for nr in [83, 84] {
            reg.dispatch(&Event::Syscall(SyscallEvent {
                nr,
                ..SyscallEvent::default()
            }));
        }
        let text = buf.text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 3);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["seq"], i + 1, "{l}");
        }
        assert_eq!(lines[1]["denied"], 1, "{}", lines[1]);
        assert_eq!(lines[2]["denied"], serde_json::Value::Null);
        // The numbered line still parses as the event.
        assert_eq!(
            Event::from_json(text.lines().next().expect("line")).expect("event"),
            exit_ev(5)
        );
        assert_eq!(
            health.report(),
            OutputReport {
                written: 3,
                lost: 0,
                error: None
            }
        );
    }

    #[test]
    fn every_json_line_validates_against_the_schema_and_breaks_it_when_changed() {
        use crate::event::tests::{samples, schema_validator, RUN_ID};
        let v = schema_validator();
        let buf = Buf::default();
        let mut w = EventWriter::new(Box::new(buf.clone()), Format::Json).for_run(RunInfo {
            run_id: RUN_ID.into(),
            host: Some("builder".into()),
        });
        let d = Decision::new(false);
        for e in samples() {
            w.write(&e, &d);
        }
        let text = buf.text();
        let mut kinds = Vec::new();
        for line in text.lines() {
            let j: serde_json::Value = serde_json::from_str(line).expect("json");
            if let Err(e) = v.validate(&j) {
                panic!("{e} at {}: {line}", e.instance_path());
            }
            assert_eq!(
                (&j["schema"], &j["run_id"], &j["host"]),
                (&2.into(), &RUN_ID.into(), &"builder".into())
            );
            kinds.push(j["event"].as_str().expect("kind").to_owned());
            // What a reader relies on is enforced: a missing field, an unknown one, a
            // time without nanoseconds, another version, a foreign exec_id.
            let obj = j.as_object().expect("object");
            let mut broken = Vec::new();
            for k in obj.keys() {
                let mut b = obj.clone();
                b.remove(k);
                broken.push(b);
            }
            for (k, bad) in [
                ("extra", serde_json::json!(1)),
                ("time", "2026-12-03T07:30:01Z".into()),
                ("schema", 1.into()),
                ("exec_id", "42".into()),
                ("uid", (-1).into()),
            ] {
                let mut b = obj.clone();
                b.insert(k.into(), bad);
                broken.push(b);
            }
            for b in broken {
                let b = serde_json::Value::Object(b);
                assert!(!v.is_valid(&b), "accepted {b}");
            }
        }
        assert_eq!(
            kinds,
            [
                "fork",
                "exec",
                "exit",
                "syscall",
                "setid",
                "syscall_return",
                "exec_failed",
                "signal",
                "signal_deliver"
            ]
        );
    }

    #[test]
    fn a_failed_output_stops_the_run_and_counts_what_was_lost() {
        let stop = Arc::new(AtomicBool::new(false));
        let mut w = EventWriter::new(
            Box::new(Failing {
                ok: 2,
                kind: io::ErrorKind::StorageFull,
            }),
            Format::Text,
        )
        .stop_on_error(stop.clone());
        let health = w.health();
        let d = Decision::new(false);
        for pid in 1..=5 {
            w.write(&exit_ev(pid), &d);
        }
        w.finish();
        assert!(stop.load(Ordering::SeqCst));
        assert_eq!(
            health.report(),
            OutputReport {
                written: 2,
                lost: 3,
                error: Some(io::ErrorKind::StorageFull)
            }
        );
        assert!(health.error_text().is_some());
    }
}
