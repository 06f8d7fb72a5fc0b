//! [`OtlpExport`]: the ornament that hands each event to OpenTelemetry's SDK as a log
//! record, and the counts ([`ExportStats`]) that say how many reached the collector.

use crate::record;
use crate::{OtlpConfig, OtlpError};
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{
    BatchConfigBuilder, BatchLogProcessor, LogBatch, LogExporter, SdkLogger, SdkLoggerProvider,
};
use opentelemetry_sdk::Resource;
use ornament_introspect::event::{Event, EventMask};
use ornament_introspect::lineage::RunInfo;
use ornament_introspect::ornament::{Decision, Ornament};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How often the batch processor sends what it holds.
const SEND_EVERY: Duration = Duration::from_millis(500);

/// What became of the records, counted as they go (shared with the exporter's thread).
#[derive(Debug, Default)]
pub struct ExportStats {
    endpoint: String,
    emitted: AtomicU64,
    delivered: AtomicU64,
    error: Mutex<Option<String>>,
}

/// The counts at the end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// Where the records went.
    pub endpoint: String,
    /// Records handed to the SDK.
    pub emitted: u64,
    /// Records a collector accepted (its answer was a success).
    pub delivered: u64,
    /// The last error of an export or of the shutdown, if any.
    pub error: Option<String>,
}

impl ExportReport {
    /// Records that never reached the collector: dropped from the SDK's full queue, in a
    /// batch the collector refused after every retry, or still queued at the end.
    pub fn lost(&self) -> u64 {
        self.emitted.saturating_sub(self.delivered)
    }
}

impl ExportStats {
    /// The counts so far (final once the ornament finished).
    pub fn report(&self) -> ExportReport {
        ExportReport {
            endpoint: self.endpoint.clone(),
            emitted: self.emitted.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            error: self.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    fn failed(&self, why: String) {
        tracing::warn!(endpoint = %self.endpoint, error = %why, "OTLP export failed");
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// An exporter that counts what its inner exporter got accepted.
#[derive(Debug)]
struct Counting<E> {
    inner: E,
    stats: Arc<ExportStats>,
}

impl<E: LogExporter> LogExporter for Counting<E> {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let n = batch.iter().count() as u64;
        let r = self.inner.export(batch).await;
        match &r {
            Ok(()) => {
                self.stats.delivered.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => self
                .stats
                .failed(format!("a batch of {n} records was not accepted: {e}")),
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Exports every event it gets (of its mask) as an OpenTelemetry log record. Attach it
/// behind the session's consumer queue, after the ornaments that decide: a denied
/// syscall is exported with its errno.
pub struct OtlpExport {
    provider: Option<SdkLoggerProvider>,
    logger: SdkLogger,
    mask: EventMask,
    seq: u64,
    run: RunInfo,
    stats: Arc<ExportStats>,
    timeout: Duration,
}

impl std::fmt::Debug for OtlpExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExport")
            .field("stats", &self.stats.report())
            .finish_non_exhaustive()
    }
}

impl OtlpExport {
    /// Events of `mask` of run `run`, to the OTLP/HTTP endpoint of `cfg`.
    pub fn new(cfg: &OtlpConfig, run: RunInfo, mask: EventMask) -> Result<Self, OtlpError> {
        let exporter = opentelemetry_otlp::LogExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(cfg.timeout)
            .build()
            .map_err(|source| OtlpError::Build {
                url: cfg.endpoint.clone(),
                source,
            })?;
        Ok(Self::with_exporter(exporter, cfg, run, mask))
    }

    /// The same with any exporter (tests give one of their own).
    pub fn with_exporter<E: LogExporter + 'static>(
        exporter: E,
        cfg: &OtlpConfig,
        run: RunInfo,
        mask: EventMask,
    ) -> Self {
        let stats = Arc::new(ExportStats {
            endpoint: cfg.endpoint.clone(),
            ..ExportStats::default()
        });
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(cfg.queue.max(1))
            .with_scheduled_delay(SEND_EVERY)
            .build();
        let processor = BatchLogProcessor::builder(Counting {
            inner: exporter,
            stats: stats.clone(),
        })
        .with_batch_config(batches)
        .build();
        let mut resource = vec![
            KeyValue::new("service.name", "ornament"),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", run.run_id.clone()),
        ];
        if let Some(h) = &run.host {
            resource.push(KeyValue::new("host.name", h.clone()));
        }
        let provider = SdkLoggerProvider::builder()
            .with_resource(Resource::builder_empty().with_attributes(resource).build())
            .with_log_processor(processor)
            .build();
        let logger = provider.logger("ornament");
        Self {
            provider: Some(provider),
            logger,
            mask,
            seq: 0,
            run,
            stats,
            timeout: cfg.timeout,
        }
    }

    /// The counts, for the caller to read once the ornament finished.
    pub fn stats(&self) -> Arc<ExportStats> {
        self.stats.clone()
    }
}

impl Ornament for OtlpExport {
    fn name(&self) -> &str {
        "otlp-export"
    }

    fn mask(&self) -> EventMask {
        self.mask
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        if !ev.is_reported() || self.provider.is_none() {
            return;
        }
        let ev = ev.as_decided(d.denied());
        self.seq += 1;
        let parts = record::parts(&ev, self.seq, &self.run);
        let mut rec = self.logger.create_log_record();
        let now = SystemTime::now();
        rec.set_timestamp(parts.time.unwrap_or(now));
        rec.set_observed_timestamp(now);
        rec.set_severity_number(Severity::Info);
        rec.set_severity_text("INFO");
        rec.set_event_name(parts.event_name);
        rec.set_body(AnyValue::String(parts.body.into()));
        rec.add_attributes(parts.attributes);
        self.stats.emitted.fetch_add(1, Ordering::Relaxed);
        // Never blocks: a full queue drops the record (counted: emitted, not delivered).
        self.logger.emit(rec);
    }

    fn finish(&mut self) {
        // Send what is queued and wait for it (each export retries within `timeout`).
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown_with_timeout(self.timeout * 3) {
                self.stats
                    .failed(format!("shutting the exporter down: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkError;
    use ornament_introspect::event::{ExecEvent, ExitEvent, SyscallEvent, TaskHeader};
    use ornament_introspect::ornament::{DenySyscalls, Registry};

    /// Event names and the `error.code` attribute, as exported.
    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

    /// Keeps the event names and `process.pid`s it was given; refuses the first
    /// `refuse` batches.
    #[derive(Debug, Clone, Default)]
    struct Fake {
        got: Seen,
        refuse: Arc<AtomicU64>,
    }

    impl LogExporter for Fake {
        async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
            if self
                .refuse
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(OTelSdkError::InternalFailure("503 from the fake".into()));
            }
            let mut got = self.got.lock().expect("lock");
            for (r, _) in batch.iter() {
                let code = r
                    .attributes_iter()
                    .find(|(k, _)| k.as_str() == "error.code")
                    .map(|(_, v)| format!("{v:?}"));
                got.push((r.event_name().unwrap_or_default().to_owned(), code));
            }
            Ok(())
        }
    }

    fn cfg() -> OtlpConfig {
        OtlpConfig {
            endpoint: "http://fake/v1/logs".into(),
            queue: 16,
            timeout: Duration::from_secs(2),
        }
    }

    fn events() -> Vec<Event> {
        let task = TaskHeader {
            pid: Some(5),
            tgid: Some(5),
            ..TaskHeader::default()
        };
        vec![
            Event::Exec(ExecEvent {
                task: task.clone(),
                argv: vec!["x".into()],
                ..ExecEvent::default()
            }),
            Event::Syscall(SyscallEvent {
                task: task.clone(),
                nr: 83,
                reported: true,
                ..SyscallEvent::default()
            }),
            // Trapped only for a deny rule: never reported.
            Event::Syscall(SyscallEvent {
                task: task.clone(),
                nr: 84,
                reported: false,
                ..SyscallEvent::default()
            }),
            Event::Exit(ExitEvent {
                task,
                group_exit: true,
                ..ExitEvent::default()
            }),
        ]
    }

    #[test]
    fn every_reported_event_arrives_once_with_what_was_decided() {
        let fake = Fake::default();
        let got = fake.got.clone();
        let exp = OtlpExport::with_exporter(fake, &cfg(), RunInfo::new(), EventMask::ALL);
        let stats = exp.stats();
        let mut reg = Registry::new();
        reg.attach(Box::new(DenySyscalls::new([(83, 1)].into())));
        reg.attach(Box::new(exp));
        for ev in events() {
            reg.dispatch(&ev);
        }
        reg.finish();
        let got = got.lock().expect("lock").clone();
        assert_eq!(
            got,
            [
                ("ornament.exec".to_owned(), None),
                (
                    "ornament.syscall".to_owned(),
                    Some("String(Owned(\"EPERM\"))".to_owned())
                ),
                ("ornament.exit".to_owned(), None),
            ]
        );
        let r = stats.report();
        assert_eq!((r.emitted, r.delivered, r.lost(), r.error), (3, 3, 0, None));
    }

    #[test]
    fn a_refused_batch_is_counted_as_lost_and_says_why() {
        let fake = Fake::default();
        fake.refuse.store(1, Ordering::SeqCst);
        let exp = OtlpExport::with_exporter(fake, &cfg(), RunInfo::new(), EventMask::ALL);
        let stats = exp.stats();
        let mut reg = Registry::new();
        reg.attach(Box::new(exp));
        for ev in events() {
            reg.dispatch(&ev);
        }
        reg.finish();
        let r = stats.report();
        assert_eq!((r.emitted, r.delivered, r.lost()), (3, 0, 3));
        let why = r.error.expect("an error");
        assert!(
            why.contains("a batch of 3 records was not accepted"),
            "{why}"
        );
        assert!(why.contains("503 from the fake"), "{why}");
    }
}
