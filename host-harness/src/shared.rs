//! State one Envoy process holds across all its Wasm VMs: the clock, shared data, shared
//! queues, metrics and the log. Every VM of a [`crate::Harness`] sees the same `Shared`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::abi::{MetricType, Status};

/// Locks a mutex, recovering the data if a previous holder panicked: the harness must keep
/// reporting, not cascade.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub plugin: String,
    pub level: u32,
    pub message: String,
}

impl LogLine {
    pub fn level_name(&self) -> &'static str {
        match self.level {
            0 => "trace",
            1 => "debug",
            2 => "info",
            3 => "warn",
            4 => "error",
            _ => "critical",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    Counter(u64),
    Gauge(i64),
    Histogram(Vec<u64>),
}

#[derive(Default)]
struct Queue {
    vm_id: String,
    name: String,
    items: VecDeque<Vec<u8>>,
    /// The VM (by harness-wide index) and root context that registered the queue.
    owner: (usize, u32),
}

#[derive(Default)]
pub struct Shared {
    clock_nanos: AtomicU64,
    shared_data: Mutex<SharedData>,
    queues: Mutex<Vec<Queue>>,
    /// Queue-ready notifications waiting to be delivered after the current VM call.
    ready: Mutex<Vec<(usize, u32, u32)>>,
    metrics: Mutex<BTreeMap<String, MetricValue>>,
    logs: Mutex<Vec<LogLine>>,
    pub echo_logs: bool,
}

#[derive(Default)]
struct SharedData {
    entries: HashMap<(String, String), (Vec<u8>, u32)>,
    next_cas: u32,
}

impl Shared {
    pub fn new(start_nanos: u64, echo_logs: bool) -> Self {
        Shared {
            clock_nanos: AtomicU64::new(start_nanos),
            echo_logs,
            ..Default::default()
        }
    }

    pub fn now_nanos(&self) -> u64 {
        self.clock_nanos.load(Ordering::SeqCst)
    }

    pub fn advance_nanos(&self, by: u64) {
        self.clock_nanos.fetch_add(by, Ordering::SeqCst);
    }

    // --- shared data: a key space per vm_id, compare-and-swap on write ---

    pub fn get_shared_data(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.shared_data)
            .entries
            .get(&(vm_id.to_string(), key.to_string()))
            .cloned()
    }

    /// `cas` 0 writes unconditionally; any other value must equal an existing entry's cas.
    pub fn set_shared_data(&self, vm_id: &str, key: &str, value: Vec<u8>, cas: u32) -> Status {
        let mut data = lock(&self.shared_data);
        let id = (vm_id.to_string(), key.to_string());
        // Envoy compares the cas only with an existing entry; a new key is created whatever
        // cas was given.
        if let Some((_, current)) = data.entries.get(&id) {
            if cas != 0 && *current != cas {
                return Status::CasMismatch;
            }
        }
        data.next_cas = data.next_cas.wrapping_add(1).max(1);
        let next = data.next_cas;
        data.entries.insert(id, (value, next));
        Status::Ok
    }

    // --- shared queues ---

    pub fn register_queue(&self, vm_id: &str, name: &str, owner: (usize, u32)) -> u32 {
        let mut queues = lock(&self.queues);
        if let Some(i) = queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
        {
            queues[i].owner = owner;
            return i as u32 + 1;
        }
        queues.push(Queue {
            vm_id: vm_id.to_string(),
            name: name.to_string(),
            items: VecDeque::new(),
            owner,
        });
        queues.len() as u32
    }

    pub fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        lock(&self.queues)
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
            .map(|i| i as u32 + 1)
    }

    pub fn enqueue(&self, id: u32, value: Vec<u8>) -> Status {
        let mut queues = lock(&self.queues);
        let Some(queue) = (id as usize).checked_sub(1).and_then(|i| queues.get_mut(i)) else {
            return Status::NotFound;
        };
        queue.items.push_back(value);
        let (vm, root) = queue.owner;
        lock(&self.ready).push((vm, root, id));
        Status::Ok
    }

    pub fn dequeue(&self, id: u32) -> Result<Vec<u8>, Status> {
        let mut queues = lock(&self.queues);
        let queue = (id as usize)
            .checked_sub(1)
            .and_then(|i| queues.get_mut(i))
            .ok_or(Status::NotFound)?;
        queue.items.pop_front().ok_or(Status::Empty)
    }

    pub fn take_queue_ready(&self) -> Vec<(usize, u32, u32)> {
        std::mem::take(&mut *lock(&self.ready))
    }

    // --- metrics: one namespace for the process, as Envoy's stats store ---

    pub fn define_metric(&self, kind: MetricType, name: &str) {
        lock(&self.metrics)
            .entry(name.to_string())
            .or_insert(match kind {
                MetricType::Counter => MetricValue::Counter(0),
                MetricType::Gauge => MetricValue::Gauge(0),
                MetricType::Histogram => MetricValue::Histogram(Vec::new()),
            });
    }

    /// Envoy: counters only go up, gauges move either way, histograms can't be incremented.
    pub fn increment_metric(&self, name: &str, offset: i64) -> Status {
        match lock(&self.metrics).get_mut(name) {
            Some(MetricValue::Counter(v)) if offset > 0 => {
                *v = v.saturating_add(offset as u64);
                Status::Ok
            }
            Some(MetricValue::Gauge(v)) => {
                *v = v.saturating_add(offset);
                Status::Ok
            }
            Some(_) => Status::BadArgument,
            None => Status::NotFound,
        }
    }

    /// Envoy: a counter adds the value, a gauge is set to it, a histogram records it.
    pub fn record_metric(&self, name: &str, value: u64) -> Status {
        match lock(&self.metrics).get_mut(name) {
            Some(MetricValue::Counter(v)) => *v = v.saturating_add(value),
            Some(MetricValue::Gauge(v)) => *v = value as i64,
            Some(MetricValue::Histogram(values)) => values.push(value),
            None => return Status::NotFound,
        }
        Status::Ok
    }

    pub fn metric(&self, name: &str) -> Option<MetricValue> {
        lock(&self.metrics).get(name).cloned()
    }

    pub fn metrics(&self) -> BTreeMap<String, MetricValue> {
        lock(&self.metrics).clone()
    }

    // --- log ---

    pub fn log(&self, plugin: &str, level: u32, message: String) {
        if self.echo_logs {
            let line = LogLine {
                plugin: plugin.to_string(),
                level,
                message: message.clone(),
            };
            eprintln!("  [{}] {}: {}", line.level_name(), plugin, message);
        }
        lock(&self.logs).push(LogLine {
            plugin: plugin.to_string(),
            level,
            message,
        });
    }

    pub fn logs(&self) -> Vec<LogLine> {
        lock(&self.logs).clone()
    }

    pub fn log_count(&self) -> usize {
        lock(&self.logs).len()
    }

    pub fn logs_since(&self, from: usize) -> Vec<LogLine> {
        lock(&self.logs).iter().skip(from).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_compare_and_swap() {
        let s = Shared::default();
        assert!(s.get_shared_data("", "k").is_none());
        assert_eq!(
            s.set_shared_data("", "new", b"v".to_vec(), 42),
            Status::Ok,
            "a new key is created whatever the cas"
        );
        assert_eq!(s.set_shared_data("", "k", b"v1".to_vec(), 0), Status::Ok);
        let (v, cas) = s.get_shared_data("", "k").unwrap();
        assert_eq!(v, b"v1");
        assert_eq!(
            s.set_shared_data("", "k", b"v2".to_vec(), cas + 1),
            Status::CasMismatch
        );
        assert_eq!(s.set_shared_data("", "k", b"v2".to_vec(), cas), Status::Ok);
        assert_eq!(
            s.set_shared_data("", "k", b"v3".to_vec(), cas),
            Status::CasMismatch,
            "a stale cas must lose"
        );
        assert!(
            s.get_shared_data("other-vm", "k").is_none(),
            "vm_ids are separate"
        );
    }

    #[test]
    fn metric_semantics_follow_envoy() {
        let s = Shared::default();
        s.define_metric(MetricType::Counter, "c");
        s.define_metric(MetricType::Gauge, "g");
        s.define_metric(MetricType::Histogram, "h");
        assert_eq!(s.increment_metric("c", 2), Status::Ok);
        assert_eq!(s.increment_metric("c", -1), Status::BadArgument);
        assert_eq!(s.record_metric("c", 3), Status::Ok);
        assert_eq!(s.metric("c"), Some(MetricValue::Counter(5)));
        assert_eq!(s.increment_metric("g", -4), Status::Ok);
        assert_eq!(s.metric("g"), Some(MetricValue::Gauge(-4)));
        assert_eq!(s.increment_metric("h", 1), Status::BadArgument);
        assert_eq!(s.record_metric("h", 7), Status::Ok);
        assert_eq!(s.metric("h"), Some(MetricValue::Histogram(vec![7])));
        assert_eq!(s.increment_metric("missing", 1), Status::NotFound);
    }

    #[test]
    fn queues_notify_their_owner() {
        let s = Shared::default();
        let id = s.register_queue("vm", "q", (3, 1));
        assert_eq!(s.resolve_queue("vm", "q"), Some(id));
        assert_eq!(s.resolve_queue("vm", "nope"), None);
        assert_eq!(s.dequeue(id), Err(Status::Empty));
        assert_eq!(s.enqueue(id, b"x".to_vec()), Status::Ok);
        assert_eq!(s.take_queue_ready(), vec![(3, 1, id)]);
        assert_eq!(s.dequeue(id), Ok(b"x".to_vec()));
        assert_eq!(s.enqueue(99, b"x".to_vec()), Status::NotFound);
    }
}
