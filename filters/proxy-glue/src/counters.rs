//! Counters counted in guest memory and handed to the host in batches.
//!
//! A counter's increment used to be one host call (`proxy_increment_metric`) per event: three
//! to nine per request, each a crossing of the wasm/C++ boundary in Envoy. Now an increment
//! adds to this VM's tally, and the tally reaches the host (one call per counter that moved):
//! - on the root context's tick (every filter's root ticks at least once a second:
//!   [`FLUSH_PERIOD`]; mqtt-acl every 250 ms),
//! - as soon as [`FLUSH_EVERY`] increments are pending (a busy VM flushes well before its tick),
//! - when the root context is done (the plugin is removed or replaced, e.g. by ECDS), and
//! - in the panic hook, before a failing VM aborts.
//!
//! So a figure in Envoy's stats is at most one tick period (or [`FLUSH_EVERY`] events) behind
//! what the filters counted; nothing is lost while the VM lives. Each Envoy worker has its own
//! VM, tally and tick.
//!
//! Counters are defined once per name per VM: Envoy hands out a new metric id on every
//! `proxy_define_metric`, so a name defined again (e.g. a rarely-hit counter defined where it
//! is used) reuses the first definition.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

/// How often a root context flushes its VM's counters at the latest (its tick period, when it
/// has no shorter one of its own).
pub const FLUSH_PERIOD: Duration = Duration::from_secs(1);

/// A batch this large is flushed at once, without waiting for the tick.
pub const FLUSH_EVERY: u64 = 256;

/// One VM's counters: each defined name's host metric id and what it counted since the last
/// flush. Pure bookkeeping (no host calls), so it is tested natively.
#[derive(Debug, Default)]
pub struct Tally {
    /// (host metric id, pending count), by slot.
    slots: Vec<(u32, u64)>,
    by_name: HashMap<String, usize>,
    /// Increments since the last flush, over every slot.
    pending: u64,
}

impl Tally {
    /// The slot of `name`, defining it with `define` (the host's metric id) on first use. None
    /// when the host refused to define it (then nothing is counted for it).
    pub fn slot(&mut self, name: &str, define: impl FnOnce() -> Option<u32>) -> Option<usize> {
        if let Some(slot) = self.by_name.get(name) {
            return Some(*slot);
        }
        let id = define()?;
        let slot = self.slots.len();
        self.slots.push((id, 0));
        self.by_name.insert(name.to_string(), slot);
        Some(slot)
    }

    /// Counts `n` events on `slot`; true when the batch is full (flush it now).
    pub fn add(&mut self, slot: usize, n: u64) -> bool {
        if let Some((_, count)) = self.slots.get_mut(slot) {
            *count = count.saturating_add(n);
            self.pending = self.pending.saturating_add(n);
        }
        self.pending >= FLUSH_EVERY
    }

    /// What to hand to the host: (metric id, count) of every counter that moved since the last
    /// drain, each reset to zero.
    pub fn drain(&mut self) -> Vec<(u32, u64)> {
        self.pending = 0;
        self.slots
            .iter_mut()
            .filter(|(_, count)| *count > 0)
            .map(|(id, count)| (*id, std::mem::take(count)))
            .collect()
    }

    /// How many counters are defined.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

thread_local! {
    static TALLY: RefCell<Tally> = RefCell::new(Tally::default());
}

/// The slot of counter `name` in this VM's tally (defined with the host on first use).
pub(crate) fn slot(name: &str, define: impl FnOnce() -> Option<u32>) -> Option<usize> {
    TALLY.with(|tally| tally.borrow_mut().slot(name, define))
}

/// Counts `n` on `slot`; flushes when the batch is full.
pub(crate) fn add(slot: usize, n: u64) {
    let full = TALLY.with(|tally| tally.borrow_mut().add(slot, n));
    if full {
        flush();
    }
}

/// Hands every pending count to the host: one `proxy_increment_metric` per counter that moved.
/// Called by each root context on its tick and when it is done; safe to call at any time (a
/// flush inside another flush, e.g. from the panic hook, is skipped).
pub fn flush() {
    let batch = TALLY.with(|tally| match tally.try_borrow_mut() {
        Ok(mut tally) => tally.drain(),
        Err(_) => Vec::new(),
    });
    for (id, count) in batch {
        if let Ok(count) = i64::try_from(count) {
            let _ = proxy_wasm::hostcalls::increment_metric(id, count);
        }
    }
}

/// The flush as an export of every filter module. Envoy never calls it (its tick does the
/// flushing); host-harness calls it before a scenario's `metrics` expectation reads the host's
/// counters, which is what Envoy's stats show once the flush period has passed.
#[no_mangle]
pub extern "C" fn iot_flush_counters() {
    flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_defined_once_and_counts_accumulate_until_drained() {
        let mut tally = Tally::default();
        let mut defined = 0;
        let mut define = |id| {
            defined += 1;
            Some(id)
        };
        let a = tally.slot("a", || define(7)).unwrap();
        let b = tally.slot("b", || define(9)).unwrap();
        assert_eq!(tally.slot("a", || define(99)), Some(a));
        assert_eq!(defined, 2);
        assert!(!tally.add(a, 1));
        assert!(!tally.add(a, 2));
        assert!(!tally.add(b, 0));
        assert_eq!(tally.drain(), vec![(7, 3)]);
        assert_eq!(tally.drain(), vec![]);
        assert!(!tally.add(b, 1));
        assert_eq!(tally.drain(), vec![(9, 1)]);
    }

    #[test]
    fn a_refused_definition_counts_nothing_and_is_asked_again() {
        let mut tally = Tally::default();
        assert_eq!(tally.slot("x", || None), None);
        assert!(tally.is_empty());
        assert_eq!(tally.slot("x", || Some(3)), Some(0));
        assert_eq!(tally.len(), 1);
    }

    #[test]
    fn a_full_batch_asks_for_a_flush() {
        let mut tally = Tally::default();
        let a = tally.slot("a", || Some(1)).unwrap();
        let b = tally.slot("b", || Some(2)).unwrap();
        for _ in 0..FLUSH_EVERY / 2 - 1 {
            assert!(!tally.add(a, 1));
            assert!(!tally.add(b, 1));
        }
        assert!(!tally.add(a, 1));
        assert!(tally.add(b, 1));
        let mut drained = tally.drain();
        drained.sort_unstable();
        assert_eq!(drained, vec![(1, FLUSH_EVERY / 2), (2, FLUSH_EVERY / 2)]);
        assert!(!tally.add(a, 1));
    }

    #[test]
    fn an_unknown_slot_counts_nothing() {
        let mut tally = Tally::default();
        assert!(!tally.add(5, 1));
        assert!(tally.drain().is_empty());
    }
}
