"""Fixtures of the Envoy end-to-end tests: the IdP, the broker stand-in and the Envoys, started
once per session (each test uses its own tokens and probe ids), stopped at the end."""

import os
import shutil
import time

import pytest

import e2e_support as e2e

KEEP_RUNS = 5


@pytest.fixture(scope="session")
def work_dir():
    """tests/e2e/work/run-<time>-<pid>/: configurations and logs of this run (gitignored)."""
    base = os.path.join(e2e.HERE, "work")
    os.makedirs(base, exist_ok=True)
    runs = sorted(d for d in os.listdir(base) if d.startswith("run-"))
    for old in runs[:-(KEEP_RUNS - 1)] if len(runs) >= KEEP_RUNS else []:
        shutil.rmtree(os.path.join(base, old), ignore_errors=True)
    path = os.path.join(base, time.strftime("run-%Y%m%d-%H%M%S-") + str(os.getpid()))
    os.makedirs(path)
    return path


@pytest.fixture(scope="session")
def wasm(work_dir):
    """A copy of the default sidecar's module, ngsi_gateway.wasm, taken at the start, so a
    rebuild during the run cannot swap the module under a running Envoy. (A module that runs
    the separate filters overrides this fixture with token_auth_wasm: README.md, "Which form
    each module runs".)"""
    return e2e.copy_module(work_dir, e2e.GATEWAY_WASM)


@pytest.fixture(scope="session")
def token_auth_wasm(work_dir):
    """A copy of token_auth.wasm, the separate filter (e2e.Envoy(separate=True))."""
    return e2e.copy_module(work_dir, e2e.WASM)


@pytest.fixture(scope="session")
def idp(work_dir):
    server = e2e.IdP(work_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def broker(work_dir):
    server = e2e.Broker(work_dir)
    yield server
    server.stop()


def _envoy(work_dir, wasm, idp, broker, name, **kwargs):
    return e2e.Envoy(
        work_dir=work_dir,
        name=name,
        filter_config=e2e.token_auth_config(idp),
        broker_port=broker.port,
        idp_port=idp.port,
        wasm=wasm,
        **kwargs,
    ).start()


@pytest.fixture(scope="session")
def envoy(work_dir, wasm, idp, broker):
    """The sidecar as shipped (envoy/sidecar.yaml, render.py's defaults: ngsi-gateway, here
    with its token_auth stage alone), two worker threads."""
    proxy = _envoy(work_dir, wasm, idp, broker, "envoy")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def envoy_stop_iteration(work_dir, wasm, idp, broker):
    """The same with allow_on_headers_stop_iteration: the filter's body callbacks run while it
    waits, and the filter itself must hold the body."""
    proxy = _envoy(work_dir, wasm, idp, broker, "envoy-stop-iteration",
                   allow_on_headers_stop_iteration=True)
    yield proxy
    proxy.stop()


@pytest.fixture(params=["default", "stop-iteration"])
def any_envoy(request):
    """Runs a test against both body-handling modes."""
    name = "envoy" if request.param == "default" else "envoy_stop_iteration"
    return request.getfixturevalue(name)


@pytest.fixture
def held_idp(idp):
    """The IdP, parking introspection requests until the test releases them (released at the
    end of the test in any case)."""
    idp.hold_introspection()
    yield idp
    idp.release_introspection()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the filter's log lines and the IdP's request log."""
    report = yield
    if report.failed and call.when == "call":
        wanted = lambda l: "[wasm]" in l or "idp:" in l or "[critical]" in l  # noqa: E731
        for name, path, keep in e2e.started_logs(wanted):
            report.sections.append((f"{name} ({path}), last lines", "\n".join(keep[-40:])))
    return report
