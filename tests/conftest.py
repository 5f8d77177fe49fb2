"""Tests use tiny networks, for which one intra-op thread is faster than two and keeps runs repeatable
(with more, thousands of tiny ops only add contention on a shared 2-core machine)."""

import faulthandler
import os

import pytest
import torch

from robustnas.data.datasets import load_dataset

torch.set_num_threads(1)


def pytest_configure(config):
    """The stderr the backstop below writes to: a copy of it as it is now, before a test's output is captured
    (pytest's own faulthandler plugin keeps one the same way)."""
    config._robustnas_stderr_fd = os.dup(2)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Backstop behind pytest-timeout (pyproject.toml): a worker deadlocked inside malloc after heap corruption
    may never run pytest-timeout's Python thread, so faulthandler, which writes without allocating, dumps every
    thread's stack and ends the process 60 s after that limit; pytest-xdist then reports this test as failed."""
    limit = float(item.config.getoption("timeout", None) or item.config.getini("timeout") or 0)
    if limit > 0:
        faulthandler.dump_traceback_later(limit + 60, exit=True, file=item.config._robustnas_stderr_fd)
    try:
        return (yield)
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto` (make test): one worker per core this process may run on (the affinity mask, logical
    cores: each test runs one torch thread), at most 4: each worker imports torch, and with whole files per
    worker (--dist loadfile) the longest files, test_resume.py first, soon set the pace.
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data():
    """200 digits images: the search tests' dataset."""
    return load_dataset("digits", subset=200, seed=0)


@pytest.fixture(autouse=True, scope="session")
def _archive_in_tmp(tmp_path_factory):
    """Runs record into the results archive of the working directory: keep tests out of the checkout's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ROBUSTNAS_ARCHIVE", str(tmp_path_factory.mktemp("archive") / "archive.sqlite"))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def _cli_server():
    """One process that runs robustnas commands for the resume checks (tests/resume.py)."""
    from resume import CliServer

    server = CliServer()
    yield server
    server.close()


@pytest.fixture
def resume_check(_cli_server, tmp_path):
    """check(args, read, kind="write", at=(0.5,)): run `robustnas <args>` uninterrupted, and again killed mid-way
    (at the `at` share of its fault points of `kind`, core/faults.py) and resumed; assert that read(out) of the
    two output directories is equal and return it (tests/resume.py)."""
    from resume import ResumeHarness

    return ResumeHarness(_cli_server, tmp_path).check
