//! [`Consumers`]: ornaments that only consume events (an event writer, a process tree, a
//! summary) run on a thread of their own behind a bounded queue, so their work is not done
//! while a vCPU waits. What the ornaments before them decided (a deny) travels with each
//! event. When the queue is full the caller waits for room, up to its patience (by
//! default [`DEFAULT_PATIENCE`]): a sink slower than the guest slows the guest (the
//! engine's hits back up to the vCPUs) rather than lose events. A sink stuck longer (a
//! pipe nobody reads) loses the event, counted ([`Consumers::dropped`]): never silently.

use super::{Decision, Ornament, Registry};
use crate::event::{Event, EventMask};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Events queued for the consumers, at most, by default.
pub const DEFAULT_CAPACITY: usize = 1 << 16;

/// How long one event waits for room in a full queue, by default, before it is dropped.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(10);

/// A group of consuming ornaments behind one bounded queue and one thread, in order.
pub struct Consumers {
    name: String,
    mask: EventMask,
    tx: Option<SyncSender<(Event, Option<i32>)>>,
    thread: Option<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
    patience: Duration,
    /// Time spent waiting for room, nanoseconds.
    waited_ns: Arc<AtomicU64>,
}

impl std::fmt::Debug for Consumers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumers")
            .field("name", &self.name)
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Consumers {
    /// `inner`, in this order, fed through a queue of `capacity` events.
    pub fn new(inner: Vec<Box<dyn Ornament>>, capacity: usize) -> Self {
        let names: Vec<String> = inner.iter().map(|o| o.name().to_owned()).collect();
        let mask = inner.iter().fold(EventMask::NONE, |m, o| m.union(o.mask()));
        let (tx, rx) = mpsc::sync_channel::<(Event, Option<i32>)>(capacity.max(1));
        let mut reg = Registry::new();
        for o in inner {
            reg.attach(o);
        }
        let thread = std::thread::Builder::new()
            .name("ornament-consumers".into())
            .spawn(move || {
                for (ev, denied) in rx {
                    reg.dispatch_decided(&ev, denied);
                }
                reg.finish();
            })
            .ok();
        Self {
            name: format!("consumers({})", names.join(", ")),
            mask,
            tx: thread.is_some().then_some(tx),
            thread,
            dropped: Arc::new(AtomicU64::new(0)),
            patience: DEFAULT_PATIENCE,
            waited_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Wait at most `patience` for room in a full queue (zero: drop at once).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Time callers waited for room in the queue in all (the guest was slowed that long,
    /// at most), nanoseconds.
    pub fn waited_ns(&self) -> Arc<AtomicU64> {
        self.waited_ns.clone()
    }

    /// Events dropped because the queue was full (or the consumers' thread was gone).
    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

impl Ornament for Consumers {
    fn name(&self) -> &str {
        &self.name
    }

    fn mask(&self) -> EventMask {
        self.mask
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        let Some(tx) = &self.tx else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut item = (ev.clone(), d.denied());
        let mut since: Option<Instant> = None;
        loop {
            match tx.try_send(item) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) => {
                    let start = *since.get_or_insert_with(Instant::now);
                    if start.elapsed() >= self.patience {
                        if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(ornaments = %self.name, patience = ?self.patience, "the event queue stayed full: events are dropped for these ornaments (counted)");
                        }
                        break;
                    }
                    item = back;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        if let Some(start) = since {
            let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.waited_ns.fetch_add(waited, Ordering::Relaxed);
        }
    }

    fn finish(&mut self) {
        // Closing the queue lets the thread drain it, finish its ornaments and end.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(ornaments = %self.name, "the consumers' thread panicked");
            }
        }
    }
}

impl Drop for Consumers {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, SyscallEvent, TaskHeader};
    use std::sync::Mutex;
    use std::time::Duration;

    /// What a consumer saw of an event: (pid, the deny decided before it).
    type Seen = Arc<Mutex<Vec<(i32, Option<i32>)>>>;

    /// Records what it sees and can be slow.
    struct Slow {
        seen: Seen,
        delay: Duration,
    }

    impl Ornament for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        fn on_event(&mut self, ev: &Event, d: &mut Decision) {
            std::thread::sleep(self.delay);
            self.seen
                .lock()
                .expect("lock")
                .push((ev.task().pid.unwrap_or(-1), d.denied()));
        }
    }

    fn syscall(pid: i32) -> Event {
        Event::Syscall(SyscallEvent {
            task: TaskHeader {
                pid: Some(pid),
                ..TaskHeader::default()
            },
            nr: 83,
            name: Some("mkdir".into()),
            args: [0; 6],
            path: None,
            denied: None,
            reported: true,
        })
    }

    #[test]
    fn consumers_see_every_event_in_order_with_the_deny_decided_before() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut c = Consumers::new(
            vec![Box::new(Slow {
                seen: seen.clone(),
                delay: Duration::ZERO,
            })],
            DEFAULT_CAPACITY,
        );
        assert!(c.mask().contains(EventKind::Syscall));
        for pid in 1..=100 {
            let mut d = Decision::new(true);
            if pid % 10 == 0 {
                assert!(d.deny(13));
            }
            c.on_event(&syscall(pid), &mut d);
        }
        c.finish();
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 100);
        for (i, (pid, denied)) in seen.into_iter().enumerate() {
            let want = i32::try_from(i).expect("small") + 1;
            assert_eq!(pid, want);
            assert_eq!(denied, (want % 10 == 0).then_some(13));
        }
        assert_eq!(c.dropped().load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_slow_consumer_slows_the_caller_and_loses_nothing() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut c = Consumers::new(
            vec![Box::new(Slow {
                seen: seen.clone(),
                delay: Duration::from_millis(5),
            })],
            4,
        );
        let begin = std::time::Instant::now();
        for pid in 1..=40 {
            c.on_event(&syscall(pid), &mut Decision::new(true));
        }
        // The queue holds 4: the caller waited for the rest.
        assert!(
            begin.elapsed() >= Duration::from_millis(5 * 30),
            "{:?}",
            begin.elapsed()
        );
        assert!(c.waited_ns().load(Ordering::Relaxed) > 0);
        c.finish();
        assert_eq!(seen.lock().expect("lock").len(), 40);
        assert_eq!(c.dropped().load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_stuck_consumer_holds_the_caller_only_its_patience_and_drops_are_counted() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut c = Consumers::new(
            vec![Box::new(Slow {
                seen: seen.clone(),
                delay: Duration::from_millis(50),
            })],
            4,
        )
        .with_patience(Duration::ZERO);
        let begin = std::time::Instant::now();
        for pid in 1..=40 {
            c.on_event(&syscall(pid), &mut Decision::new(true));
        }
        // 40 events to a consumer taking 50 ms each: delivering them took no such time.
        assert!(
            begin.elapsed() < Duration::from_millis(500),
            "{:?}",
            begin.elapsed()
        );
        c.finish();
        let got = u64::try_from(seen.lock().expect("lock").len()).expect("small");
        let dropped = c.dropped().load(Ordering::Relaxed);
        assert_eq!(got + dropped, 40, "every event either consumed or counted");
        assert!(dropped >= 30, "dropped {dropped}");
    }
}
