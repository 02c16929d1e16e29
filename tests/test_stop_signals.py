"""The CLIs' stop signals in process: what ``StopSignals.installed`` takes over and gives back.
(What a signal does to a real client or export: test_client_cli_signals.py, test_store_cli.py.)"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from ackservice._stop_signals import STOP_SIGNALS, StopSignals


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("restored_handlers")
def test_the_handlers_are_given_back() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    with StopSignals(b"bye\n").installed() as signals:
        for signum in STOP_SIGNALS:
            assert signal.getsignal(signum) == signals._handle
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before


@pytest.mark.usefixtures("restored_handlers")
def test_a_signal_ignored_at_start_stays_ignored() -> None:
    """``nohup`` or a ``cmd &`` of a script starts us with SIGINT ignored: that is kept, as
    Python itself keeps it; it was taken over."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with StopSignals(b"bye\n").installed() as signals:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signals._handle
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
