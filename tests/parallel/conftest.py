import multiprocessing
import multiprocessing.forkserver

import pytest

from .tp_worker import PRELOAD


@pytest.fixture(scope="session", autouse=True)
def _forkserver():
    """Rank processes fork from one fork server that imported torch and nextserve once (started here, so the first
    test to start ranks does not decide what it preloads)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
