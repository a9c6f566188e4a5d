"""Recovery from a failed Wasm VM in Envoy 1.40: failure_policy FAIL_RELOAD (our templates'
default) against FAIL_CLOSED, with two workers.

The VM is killed on demand with the abi-probe TEST filter (never deployed): a request carrying
`x-probe-trap: 1` makes it execute `unreachable`. Only that worker's VM dies; the request gets
503. With FAIL_RELOAD, the next request on that worker starts a fresh VM (`vm_reload_success`)
and is served -- unless the VM was loaded less than the reload backoff ago (1 s base, jittered;
here the trap comes right after Envoy's start): those requests are refused
(`wasm.<plugin>.vm_reload_backoff`). With FAIL_CLOSED that worker refuses every request until
Envoy restarts.

Reaching both workers: the listener gets `connection_balance_config: {exact_balance: {}}`
(render.py exact_balance=True): each new connection goes to the worker with the fewest active
connections. A round opens several connections *at once* and holds them while it sends one
request on each, so they are spread evenly over the workers (connections opened one after
another, each closed before the next, would all land on the first worker). The per-worker
listener stats (listener.<address>.worker_<n>.downstream_cx_total) show that both got some.
"""

import http.client
import os
import time

import pytest

import e2e_support as e2e
import render

PROBE_WASM = os.path.join(e2e.ROOT, "target", "wasm32-wasip1", "release", "abi_probe.wasm")
WORKERS = 2
# Connections per round: two per worker under exact_balance.
ROUND = 2 * WORKERS
# Generous: Envoy's backoff is 1 s; this only catches a VM that never comes back.
RECOVERY_BOUND_S = 30.0
# How long the FAIL_CLOSED worker is watched (well past the 1 s reload backoff).
FAIL_CLOSED_WATCH_S = 3.0


@pytest.fixture(scope="module")
def probe_wasm(work_dir):
    return e2e.copy_module(work_dir, PROBE_WASM)


def start_envoy(work_dir, broker, probe_wasm, policy):
    probe = render.test_probe_filter({"mode": "buffer", "trap_header": "x-probe-trap"},
                                     wasm=probe_wasm)
    return e2e.Envoy(work_dir=work_dir, name=f"envoy-recovery-{policy}", filter_config=None,
                     broker_port=broker.port, idp_port=broker.port, extra_filters=[probe],
                     failure_policy=policy, exact_balance=True, concurrency=WORKERS,
                     separate=True).start()  # abi-probe is a test filter, no gateway stage


def wait_until_idle(proxy, bound_s=10):
    """Waits until no worker holds a connection. exact_balance gives a new connection to the
    worker with the fewest active ones: a closed connection that a busy worker has not yet
    processed would skew the next round's spread."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        active = [value for name, value in proxy.stats("listener.").items()
                  if name.endswith("downstream_cx_active") and ".worker_" in f".{name}"]
        if active and not any(active):
            return
        time.sleep(0.02)


def one_round(proxy, headers=()):
    """ROUND connections opened at once (spread over the workers), one GET on each:
    [(status, x-vm-stream)]."""
    wait_until_idle(proxy)
    conns = [http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=e2e.HTTP_TIMEOUT)
             for _ in range(ROUND)]
    try:
        for conn in conns:
            conn.connect()
        out = []
        for conn in conns:
            conn.request("GET", "/version", headers=dict(headers))
            resp = conn.getresponse()
            resp.read()
            out.append((resp.status, resp.getheader("x-vm-stream")))
        return out
    finally:
        for conn in conns:
            conn.close()


def trap(proxy):
    resp = e2e.request(proxy.port, "GET", "/version", {"x-probe-trap": "1"})
    assert resp.status == 503, f"the trapping request must be refused, got {resp.status}"
    return time.monotonic()


def worker_connections(proxy):
    """Connections each worker accepted: {worker: count}, from Envoy's per-worker stats."""
    out = {}
    for name, value in proxy.stats("listener.").items():
        head, _, tail = name.rpartition(".")
        if tail == "downstream_cx_total" and ".worker_" in f".{head}":
            out[head.rpartition("worker_")[2]] = value
    return out


def reload_stats(proxy):
    return proxy.stats("wasm.abi-probe.")


def test_fail_reload_serves_again_on_both_workers(work_dir, broker, probe_wasm):
    proxy = start_envoy(work_dir, broker, probe_wasm, "reload")
    try:
        # Stream numbers depend on what each VM served before (the launcher's readiness
        # request lands on one worker), so only the statuses are fixed here; the spread over
        # the workers is checked from Envoy's per-worker stats at the end.
        assert [s for s, _ in one_round(proxy)] == [200] * ROUND, \
            "before the trap every connection is served"
        trapped_at = trap(proxy)

        refused, seen_fresh_vm = 0, False
        while True:
            results = one_round(proxy)
            refused += sum(1 for status, _ in results if status == 503)
            assert all(status in (200, 503) for status, _ in results), results
            seen_fresh_vm |= any(vm_stream == "1" for _, vm_stream in results)
            if all(status == 200 for status, _ in results):
                recovered_s = time.monotonic() - trapped_at
                break
            assert time.monotonic() - trapped_at < RECOVERY_BOUND_S, \
                f"the trapped worker's VM did not come back within {RECOVERY_BOUND_S} s"
            time.sleep(0.05)
        print(f"\nFAIL_RELOAD: both workers serve again {recovered_s:.2f} s after the trap "
              f"({refused} requests refused meanwhile); reload stats {reload_stats(proxy)}")

        # A fresh VM (its root context counts streams from 1 again) serves on the worker that
        # trapped; then every round is all 200 on both workers.
        assert seen_fresh_vm
        stats = reload_stats(proxy)
        assert stats.get("vm_reload_success") == 1, stats
        for _ in range(3):
            assert [s for s, _ in one_round(proxy)] == [200] * ROUND
        workers = worker_connections(proxy)
        assert len(workers) == WORKERS and all(n >= ROUND for n in workers.values()), workers
    finally:
        proxy.stop()


def test_fail_closed_keeps_refusing_on_the_trapped_worker(work_dir, broker, probe_wasm):
    proxy = start_envoy(work_dir, broker, probe_wasm, "fail-closed")
    try:
        assert [s for s, _ in one_round(proxy)] == [200] * ROUND
        trapped_at = trap(proxy)
        rounds = 0
        while time.monotonic() - trapped_at < FAIL_CLOSED_WATCH_S:
            results = one_round(proxy)
            rounds += 1
            statuses = sorted(s for s, _ in results)
            # One worker's VM is dead for good, the other's serves: half and half.
            assert statuses == [200] * WORKERS + [503] * WORKERS, results
            time.sleep(0.1)
        stats = reload_stats(proxy)
        print(f"\nFAIL_CLOSED: the trapped worker still refuses after {FAIL_CLOSED_WATCH_S} s "
              f"({rounds} rounds); reload stats {stats}")
        assert rounds >= 3
        assert stats.get("vm_reload_success", 0) == 0, stats
    finally:
        proxy.stop()
