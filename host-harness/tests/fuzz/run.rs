//! What every fuzz target shares: settings from the environment, chains of release `.wasm`
//! files, the per-case seed, the known-findings switch, and the report.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use host_harness::chain::CalloutResolver;
use host_harness::{Chain, FailurePolicy, Limits, PluginSpec, Shared};
use rand::SeedableRng;

use super::generate::Rng;

/// The test clock: 2026-01-01T00:00:00Z, the scenarios' default (the JWT fixtures are minted
/// for it).
pub const START_SECS: u64 = 1_767_225_600;
pub const START_NANOS: u64 = START_SECS * 1_000_000_000;

/// Whether the known classes below are tolerated (counted, printed, never silently). False since
/// the fixes merged (header maps read as bytes, bounded query expansion): a known class seen
/// again is a finding like any other.
pub const TOLERATE_KNOWN_FINDINGS: bool = false;

/// A known finding: the class, and why this input belongs to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Known {
    /// A request header value that is not UTF-8 traps the VM (the SDK's `get_map` panics).
    NonUtf8RequestHeader,
    /// A callout answer header that is not UTF-8 traps the VM (same cause, through
    /// `proxy_glue::callout_answer`; check the proxy-glue fix covers it too).
    NonUtf8CalloutHeader,
    /// A list query whose ids × attrs expansion is huge exhausts the VM's memory (or fuel).
    HugeQueryExpansion,
}

/// Run settings: `FUZZ_SEED` (default fixed), `FUZZ_CASES` (overrides every target's
/// default), `FUZZ_STRICT` (no known finding tolerated), `FUZZ_CASE` (replay one case).
#[derive(Debug, Clone)]
pub struct Settings {
    pub seed: u64,
    pub cases: u64,
    pub strict: bool,
    pub only_case: Option<u64>,
}

pub const DEFAULT_SEED: u64 = 0x5eed_f17e_2026;

pub fn settings(default_cases: u64) -> Settings {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let seed = var("FUZZ_SEED").map_or(DEFAULT_SEED, |v| {
        let v = v.trim_start_matches("0x");
        u64::from_str_radix(v, 16).unwrap_or_else(|_| panic!("FUZZ_SEED {v:?} is not hex"))
    });
    let cases = var("FUZZ_CASES").map_or(default_cases, |v| {
        v.parse().unwrap_or_else(|_| panic!("FUZZ_CASES {v:?}"))
    });
    let only_case =
        var("FUZZ_CASE").map(|v| v.parse().unwrap_or_else(|_| panic!("FUZZ_CASE {v:?}")));
    Settings {
        seed,
        cases,
        strict: !TOLERATE_KNOWN_FINDINGS || var("FUZZ_STRICT").is_some(),
        only_case,
    }
}

impl Settings {
    /// The case numbers to run.
    pub fn case_numbers(&self) -> Vec<u64> {
        match self.only_case {
            Some(case) => vec![case],
            None => (0..self.cases).collect(),
        }
    }

    /// Case `case` of `target` draws from its own stream: any case replays alone.
    pub fn rng(&self, target: &str, case: u64) -> Rng {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        key[8..16].copy_from_slice(&case.to_le_bytes());
        for (i, b) in target.bytes().enumerate().take(16) {
            key[16 + i] = b;
        }
        Rng::from_seed(key)
    }
}

/// A chain of release filters, with the clusters they call answered by `resolver`.
pub fn chain(
    filters: &[(&str, &str, bool)],
    clusters: &[&str],
    resolver: Box<dyn CalloutResolver>,
) -> Chain {
    let shared = Arc::new(Shared::new(START_NANOS, false));
    let clusters: HashSet<String> = clusters.iter().map(|c| c.to_string()).collect();
    let mut chain = Chain::new(super::runtime(), shared, clusters, resolver);
    for (wasm, config, allow_on_headers_stop_iteration) in filters {
        let path = wasm_path(wasm);
        chain
            .add_filter(PluginSpec {
                name: wasm.trim_end_matches(".wasm").into(),
                root_id: String::new(),
                vm_id: String::new(),
                wasm: path,
                configuration: config.as_bytes().to_vec(),
                vm_configuration: Vec::new(),
                limits: Limits::default(),
                allow_on_headers_stop_iteration: *allow_on_headers_stop_iteration,
                // A trap is a finding: keep the failed VM as it is rather than reload it.
                failure_policy: FailurePolicy::FailClosed,
                vm_env: Vec::new(),
            })
            .expect("filter loads");
    }
    chain
}

pub fn wasm_path(wasm: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-wasip1/release")
        .join(wasm);
    assert!(
        path.is_file(),
        "{} is missing: build the filters first with `cargo wasm`",
        path.display()
    );
    path
}

/// Bounds every VM must stay within over a run (asserted): linear memory after the run, and
/// fuel in any one callback. Measured figures are in BENCHMARKS.md.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub memory_bytes: usize,
    pub fuel_per_call: u64,
}

/// What a run found.
pub struct Report {
    pub target: &'static str,
    pub settings: Settings,
    pub cases: u64,
    pub known: BTreeMap<Known, u64>,
    pub findings: Vec<String>,
    /// Highest memory and fuel per callback seen, with the VMs that reached them.
    pub max_memory: usize,
    pub max_fuel_call: (u64, &'static str),
    pub vms_started: u64,
}

impl Report {
    pub fn new(target: &'static str, settings: &Settings) -> Report {
        println!(
            "fuzz target={target} seed={:x} cases={} strict={}",
            settings.seed,
            settings.case_numbers().len(),
            settings.strict
        );
        Report {
            target,
            settings: settings.clone(),
            cases: 0,
            known: BTreeMap::new(),
            findings: Vec::new(),
            max_memory: 0,
            max_fuel_call: (0, ""),
            vms_started: 0,
        }
    }

    /// Records a finding, unless it is a known class and those are tolerated. At most 20 are
    /// kept in full (the count is exact).
    pub fn finding(&mut self, case: u64, known: Option<Known>, what: String) {
        if let (Some(class), false) = (known, self.settings.strict) {
            *self.known.entry(class).or_default() += 1;
            return;
        }
        let class = known
            .map(|k| format!(" (known class {k:?})"))
            .unwrap_or_default();
        let line = format!(
            "{} case {case}{class}: {what}\n    replay: FUZZ_SEED={:x} FUZZ_CASE={case} cargo test -p host-harness --test fuzz_filters {}",
            self.target,
            self.settings.seed,
            self.target.replace('-', "_")
        );
        if self.findings.len() < 20 {
            eprintln!("FINDING {line}");
        }
        self.findings.push(line);
    }

    /// Checks a VM's memory and fuel against the budget, and notes the highest seen.
    pub fn check_budget(&mut self, case: u64, chain: &mut Chain, budget: Budget) {
        for vm in chain.filters.iter_mut() {
            let memory = vm.memory_bytes();
            let usage = vm.usage;
            self.max_memory = self.max_memory.max(memory);
            if usage.fuel_max_call > self.max_fuel_call.0 {
                self.max_fuel_call = (usage.fuel_max_call, usage.fuel_max_call_export);
            }
            if memory > budget.memory_bytes {
                let name = vm.spec.name.clone();
                self.finding(
                    case,
                    None,
                    format!(
                        "{name}: linear memory {memory} bytes, over the budget of {}",
                        budget.memory_bytes
                    ),
                );
            }
            if usage.fuel_max_call > budget.fuel_per_call {
                let name = vm.spec.name.clone();
                self.finding(
                    case,
                    None,
                    format!(
                        "{name}: {} fuel in one {} callback, over the budget of {}",
                        usage.fuel_max_call, usage.fuel_max_call_export, budget.fuel_per_call
                    ),
                );
            }
        }
    }

    /// Notes the figures of a VM that trapped (its trap is the finding, not its budget).
    pub fn note_usage(&mut self, chain: &mut Chain) {
        for vm in chain.filters.iter_mut() {
            self.max_memory = self.max_memory.max(vm.memory_bytes());
        }
    }

    /// Prints the summary line scripts/fuzz reads, then fails the test on any finding.
    pub fn finish(self) {
        let known: Vec<String> = self
            .known
            .iter()
            .map(|(k, n)| format!("{k:?}={n}"))
            .collect();
        println!(
            "fuzz-result target={} seed={:x} cases={} findings={} known=[{}] vms={} max_memory_bytes={} max_fuel_per_call={} ({})",
            self.target,
            self.settings.seed,
            self.cases,
            self.findings.len(),
            known.join(","),
            self.vms_started,
            self.max_memory,
            self.max_fuel_call.0,
            self.max_fuel_call.1,
        );
        assert!(
            self.findings.is_empty(),
            "{} findings in {} (first ones):\n{}",
            self.findings.len(),
            self.target,
            self.findings
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// The request in a finding: method, path and headers with odd bytes escaped, body size.
pub fn describe_request(request: &host_harness::HttpRequest) -> String {
    let headers: Vec<String> = request
        .headers
        .iter()
        .map(|(k, v)| format!("{k:?}: {}", escape(v)))
        .collect();
    let body: Vec<u8> = request.body.concat();
    let shown = &body[..body.len().min(300)];
    format!(
        "headers [{}] body ({} bytes in {} chunks) {}{} trailers {}",
        headers.join(", "),
        body.len(),
        request.body.len(),
        escape(shown),
        if body.len() > 300 { "…" } else { "" },
        request.trailers.len()
    )
}

pub fn escape(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// The first failure of a VM in the chain (a trap, or a rejected configuration).
pub fn failure(chain: &Chain) -> Option<String> {
    chain.filters.iter().find_map(|vm| {
        vm.failure
            .as_ref()
            .map(|f| format!("{}: {f}", vm.spec.name))
    })
}

pub fn is_utf8(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
}
