//! The run's recorder: every client's invocations and completions, the nemeses' faults and
//! the monitor's marks, appended to `history.jsonl` as they happen (so a run cut short still
//! leaves its history) and kept in memory for the checker.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::history::{Call, Event, Fault, Mark, MarkKind, Nanos, Outcome, Workload};

pub struct Recorder {
    start: Instant,
    next_id: AtomicU64,
    events: Mutex<Vec<Event>>,
    file: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl Recorder {
    pub fn create(path: &Path) -> anyhow::Result<Recorder> {
        let file = std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Recorder {
            start: Instant::now(),
            next_id: AtomicU64::new(0),
            events: Mutex::new(Vec::new()),
            file: Mutex::new(std::io::BufWriter::new(file)),
        })
    }

    /// Nanoseconds since the run started.
    pub fn now(&self) -> Nanos {
        self.start.elapsed().as_nanos() as Nanos
    }

    fn push(&self, e: Event) {
        // One lock order (events, then file) so that the file's lines are in the events' order.
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(line) = serde_json::to_string(&e) {
            let _ = writeln!(file, "{line}");
        }
        events.push(e);
    }

    /// Records an invocation; the operation's id.
    pub fn invoke(&self, process: u64, workload: Workload, key: &str, call: Call, node: u64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.push(Event::Invoke { id, time: self.now(), process, workload, key: key.to_string(), call, node });
        id
    }

    pub fn complete(&self, id: u64, outcome: Outcome, error: Option<String>) {
        self.push(Event::Complete { id, time: self.now(), outcome, error });
    }

    pub fn fault(&self, f: Fault) {
        self.push(Event::Fault(f));
    }

    pub fn mark(&self, kind: MarkKind, label: impl Into<String>) {
        self.push(Event::Mark(Mark { time: self.now(), kind, label: label.into() }));
    }

    /// Operations invoked so far.
    pub fn ops(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    pub fn flush(&self) {
        let _ = self.file.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.flush();
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
