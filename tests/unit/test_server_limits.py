"""Admission queue, auth and config checks (no model, no server)."""

from __future__ import annotations

import asyncio

import pytest

from corral.errors import CorralError
from corral.server.auth import bearer_ok
from corral.server.config import ServerConfig
from corral.server.errors import ApiError
from corral.server.limits import Admission


async def test_admission_queues_then_refuses_at_once():
    adm = Admission(max_running=1, max_queue=1)
    await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert adm.queued == 1 and not waiter.done()
    with pytest.raises(ApiError) as e:  # running and queue both full: 429 without waiting
        await asyncio.wait_for(adm.acquire(), 0.1)
    assert e.value.status == 429
    adm.release()  # hands the slot to the waiter
    await asyncio.wait_for(waiter, 1)
    assert adm.running == 1 and adm.queued == 0
    adm.release()
    assert adm.running == 0


async def test_cancelled_waiter_leaves_the_queue():
    adm = Admission(max_running=1, max_queue=2)
    await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert adm.queued == 0
    adm.release()
    assert adm.running == 0


async def test_draining_refuses_with_503():
    adm = Admission(max_running=4, max_queue=4)
    adm.draining = True
    with pytest.raises(ApiError) as e:
        await adm.acquire()
    assert e.value.status == 503


def test_bearer():
    assert bearer_ok(None, {}, "/v1/models")
    assert not bearer_ok("k", {}, "/v1/models")
    assert not bearer_ok("k", {"authorization": "Bearer x"}, "/v1/models")
    assert bearer_ok("k", {"authorization": "Bearer k"}, "/v1/models")
    assert bearer_ok("k", {}, "/health")


def test_config_resolve():
    cfg = ServerConfig().resolve(2048)
    assert (cfg.max_input_tokens, cfg.max_total_tokens) == (2047, 2048)
    with pytest.raises(CorralError):
        ServerConfig(max_total_tokens=4096).resolve(2048)
    with pytest.raises(CorralError):
        ServerConfig(max_input_tokens=600, max_total_tokens=512).resolve(2048)
