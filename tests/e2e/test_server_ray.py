"""`corral serve --replicas 2`: two CPU replicas of the default model on a local Ray cluster
behind one port (Ray Serve's proxy); both answer the `openai` client, and a replica whose
process is killed is replaced by Ray while later requests succeed.

One server for the whole file: a local Ray cluster and two model loads take ~40 s here."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from corral.server.launch import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_server():
    args = ["--model", "default", "--replicas", "2", "--max-num-seqs", "8",
            "--max-model-len", "512"]
    with ServerProcess(args, timeout=400, new_session=True) as srv:
        # the proxy may answer /health from the first replica while the second still loads;
        # the ready line comes once serve.run has seen both up
        deadline = time.monotonic() + 300
        while "replica(s) of default on Ray Serve" not in srv.output():
            assert time.monotonic() < deadline, srv.output()[-3000:]
            time.sleep(0.5)
        yield srv


def ask(client, i: int) -> tuple[str, str]:
    """(replica id, text) of one short greedy chat request."""
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": f"Count to {i}."}],
        max_tokens=4, temperature=0)
    return raw.headers["x-corral-replica"], raw.parse().choices[0].message.content


def test_two_replicas_answer_and_a_killed_one_is_replaced(ray_server):
    from openai import OpenAI

    client = OpenAI(base_url=ray_server.url + "/v1", api_key="unused", max_retries=0,
                    timeout=60)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: ask(client, i), range(20)))
    replicas = {r for r, _ in answers}
    assert len(replicas) == 2, answers  # the proxy spread the 20 requests over both
    assert all(text for _, text in answers)
    # the same prompt gets the same greedy answer from either replica
    same = [ask(client, 3)[1] for _ in range(4)]
    assert len(set(same)) == 1

    # which process is which replica (each /replica answer comes from the replica it names)
    identity = httpx.get(ray_server.url + "/replica", timeout=30).json()
    assert identity["replica"] in replicas and identity["pid"] != ray_server.proc.pid
    os.kill(identity["pid"], signal.SIGKILL)
    survivor = (replicas - {identity["replica"]}).pop()

    # Ray notices the dead actor and starts a replacement; requests meanwhile go on
    seen: set[str] = set()
    failures = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            seen.add(ask(client, 2)[0])
        except Exception:  # noqa: BLE001 - a request routed to the dead actor in the gap
            failures += 1
            time.sleep(0.5)
        if seen - {survivor, identity["replica"]}:
            break
    new = seen - {survivor, identity["replica"]}
    assert len(new) == 1, f"no replacement replica answered; seen {seen}, {failures} failures"
    # once replaced, every request succeeds and the killed replica's id never comes back
    with ThreadPoolExecutor(4) as pool:
        later = list(pool.map(lambda i: ask(client, i), range(12)))
    assert all(text for _, text in later)
    assert {r for r, _ in later} <= {survivor, *new}
    health = httpx.get(ray_server.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers["x-corral-replica"] in {survivor, *new}


def test_sigterm_stops_the_server_and_its_cluster(ray_server):
    """Last in the file: the server exits 0 on SIGTERM and takes its local Ray cluster (GCS,
    raylet, controller, proxy, replicas: all in its process group) along."""
    proc = ray_server.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anything left in the server's process group?
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("Ray processes outlived the server by 30 s")
    with pytest.raises(httpx.HTTPError):
        httpx.get(ray_server.url + "/health", timeout=5)
