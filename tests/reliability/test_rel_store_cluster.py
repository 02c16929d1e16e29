"""Scenario 23, a JetStream cluster: three real nats-servers on loopback, a stream with three
replicas, and its leader node SIGKILLed mid-run. The ackservice server and ``export
--follow`` are connected to another node, so what they live through is the election of a
new leader (several seconds: nats-server's Raft election timeout), not a lost connection."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from rel_checker import History, check
from rel_harness import ServerUnderTest, poll_until
from store_harness import (
    Fault,
    all_ids,
    check_store_outage_logged,
    is_warm_up,
    plain_env,
    run_clients,
    running_cluster,
    start_store_server,
    stored_frames,
    stored_records,
)

from ackservice.client import open_client
from ackservice.protocol import MessageFramer
from ackservice.store.jetstream import DUPLICATE_WINDOW
from ackservice.store.jetstream_connection import NANOS
from conftest import Report, StartServer
from nats_support import NatsCluster, NatsServer, api, create_stream, poll

STREAM = "CLUSTER"
# Enough left after FAULT_AT that the kill lands in traffic even when it comes late (a
# loaded machine: with 500 each, the clients once finished before the kill took effect, and
# no commit was refused).
MESSAGES_PER_CLIENT = 2000
# The leader is killed once the clients hold this many receipts in all (of 8,000).
FAULT_AT = 500
# The election alone takes 4 to 9 s (nats-server's Raft election timeout).
RUN_TIMEOUT = 30
# Shorter than any election, so that the commits waiting for one are refused (the outage the
# scenario is about): with the default 5 s, an election of under 5 s (one full-scale run)
# only delayed them, and nothing was refused, logged or recovered.
STORE_TIMEOUT = 2


@dataclass
class LeaderKill:
    """What ``kill_the_leader`` saw: the node killed, the receipts then, and how long until
    polling found a new leader with its replicas current."""

    killed: str = ""
    new_leader: str = ""
    election_seconds: float = 0.0
    in_flight_at_kill: int = 0
    receipts_at_kill: int = 0
    moved_before: bool = False
    """The leader at the kill was not the one found when the stream was made."""


def replicated_stream(cluster: NatsCluster) -> tuple[NatsServer, NatsServer]:
    """Create the stream as the store would (three replicas), and wait until its replicas
    are current; its leader, and another node to connect to (blocking)."""
    answer = create_stream(
        cluster.nodes[0].url,
        {
            "name": STREAM,
            "subjects": [f"ackservice.{STREAM}"],
            "storage": "file",
            "num_replicas": 3,
            "allow_atomic": True,
            "duplicate_window": int(DUPLICATE_WINDOW * NANOS),
        },
    )
    assert "error" not in answer, answer
    leader = cluster.leader(STREAM)
    return leader, next(node for node in cluster.nodes if node is not leader)


def kill_the_leader(cluster: NatsCluster, leader: NatsServer, kill: LeaderKill) -> Fault:
    """A ``run_clients`` fault: once ``FAULT_AT`` receipts are in with messages in flight,
    SIGKILL ``leader`` by its PID and wait for the cluster to elect another."""

    async def fault(receipts: Callable[[], int], in_flight: Callable[[], int]) -> None:
        # The leader now (it may have moved since the stream was made), asked before the
        # run gets to FAULT_AT: asking takes a NATS connection and a request, up to a few
        # hundred milliseconds under load, in which the clients could finish the run and
        # leave no traffic for the election to refuse.
        victim = await trio.to_thread.run_sync(cluster.leader_now, STREAM)
        await poll_until(lambda: receipts() >= FAULT_AT and in_flight() > 0, 0.0005)
        kill.in_flight_at_kill = in_flight()
        kill.receipts_at_kill = receipts()
        kill.killed = victim.config_path.parent.name
        kill.moved_before = victim is not leader
        killed_at = time.monotonic()
        await trio.to_thread.run_sync(victim.kill)
        new_leader = await trio.to_thread.run_sync(cluster.leader, STREAM)
        kill.election_seconds = time.monotonic() - killed_at
        kill.new_leader = new_leader.config_path.parent.name

    return fault


async def run_through_a_leader_kill(
    start_server: StartServer, cluster: NatsCluster, follower: NatsServer, leader: NatsServer
) -> tuple[ServerUnderTest, History, dict[str, int], LeaderKill]:
    """The server on ``follower``'s URL, the clients' run, ``leader`` killed in it."""
    server = await start_store_server(
        start_server,
        f"{follower.url}/{STREAM}?replicas=3",
        flags=["--store-timeout", str(STORE_TIMEOUT)],
    )
    history = History()
    kill = LeaderKill()
    with trio.fail_after(RUN_TIMEOUT):
        counts = await run_clients(
            server.port, history, kill_the_leader(cluster, leader, kill), MESSAGES_PER_CLIENT
        )
    return server, history, counts, kill


@pytest.mark.slow
async def test_leader_killed_mid_run_keeps_every_acknowledged_message(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    """Four clients pipeline 2,000 messages each into a server whose stream has three
    replicas; after 500 receipts the stream's leader node is SIGKILLed. While the cluster
    elects another, the server answers ``unavailable`` (logged once as
    ``store_unavailable``) and the clients resend; the server recovers by itself
    (``store_recovered``, the refused messages acknowledged when resent, a new client's
    served at once) and every message ends acknowledged. Read back, the stream holds
    every message any client saw acknowledged (lost 0), each ``Nats-Msg-Id`` (conn_id,
    seq) once."""
    with running_cluster(tmp_path / "cluster") as cluster:
        leader, follower = await trio.to_thread.run_sync(replicated_stream, cluster)
        server, history, counts, kill = await run_through_a_leader_kill(
            start_server, cluster, follower, leader
        )
        await check_store_outage_logged(server)
        store_url = f"{follower.url}/{STREAM}"
        records = await stored_records(store_url)
        # And a client that comes after the election is served at once.
        async with open_client("127.0.0.1", server.port) as late:
            late_payloads = [b"@late%d|sent after the election" % n for n in range(10)]
            with trio.fail_after(5):
                late_acked = sum([r.acked async for r in late.send_many(late_payloads)])
        assert late_acked == len(late_payloads)
    verdict = check(history, records)
    verdict.assert_valid()
    assert {record.pid for record in records} == all_ids(MESSAGES_PER_CLIENT)
    per_msg_id = Counter((record.conn, record.seq) for record in records)
    assert max(per_msg_id.values()) == 1, per_msg_id.most_common(3)
    refused = sum(history.refused.values())
    assert refused > 0, "no client was answered unavailable during the election"
    # No leader, no PubAck: what was acknowledged after the kill (the refused messages
    # among it) was acknowledged by the new leader.
    acked_after_kill = 4 * MESSAGES_PER_CLIENT - kill.receipts_at_kill
    assert acked_after_kill > 0
    times_stored = Counter(record.pid for record in records)
    report(
        killed=kill.killed,
        leader_moved_before_kill=kill.moved_before,
        new_leader=kill.new_leader,
        election_seconds=round(kill.election_seconds, 2),
        in_flight_at_kill=kill.in_flight_at_kill,
        unavailable_answers=refused,
        acked_after_kill=acked_after_kill,
        stored_twice_by_payload=sum(1 for count in times_stored.values() if count > 1),
        **counts,
        **verdict.summary(),
    )


def consumer_leader(url: str) -> str:
    """The node that serves the stream's one consumer (the export's), once there is one
    (blocking)."""
    names: list[str] = []

    def created() -> bool:
        consumers = asyncio.run(api(url, f"CONSUMER.LIST.{STREAM}", {})).get("consumers") or []
        names[:] = [consumer["cluster"]["leader"] for consumer in consumers]
        return len(names) == 1

    poll(created, "the export's consumer")
    return names[0]


@pytest.mark.slow
async def test_export_follow_goes_on_across_a_leader_change(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    """``export --follow`` (a real process, on the same node as the server) started before
    the run of the test above, through the leader kill: it keeps following, says the wait
    at most once on stderr, and ends up having written every message of the stream once,
    in the stream's order, as a plain export afterwards reads it."""
    with running_cluster(tmp_path / "cluster") as cluster:
        leader, follower = await trio.to_thread.run_sync(replicated_stream, cluster)
        store_url = f"{follower.url}/{STREAM}"
        out_path, err_path = tmp_path / "follow.out", tmp_path / "follow.err"
        command = [sys.executable, "-m", "ackservice.store", "export", "--follow"]
        with out_path.open("wb") as out, err_path.open("wb") as err:
            follow = await trio.lowlevel.open_process(
                [*command, "--store", store_url, "--format", "lines", "--timeout", "1"],
                stdout=out,
                stderr=err,
                env=plain_env(),
            )
        try:
            consumer_node = await trio.to_thread.run_sync(consumer_leader, follower.url)
            _, _, _, kill = await run_through_a_leader_kill(start_server, cluster, follower, leader)
            stored = await stored_frames(store_url)

            def followed() -> list[bytes]:
                assert follow.poll() is None, f"export --follow exited: {err_path.read_text()}"
                # Complete lines only: the last may be half written.
                written = MessageFramer(1 << 30).feed(out_path.read_bytes())
                return [f for f in written if isinstance(f, bytes) and not is_warm_up(f)]

            with trio.fail_after(10):
                await poll_until(lambda: len(followed()) >= len(stored), 0.05)
            await trio.sleep(0.3)  # nothing more comes
            assert followed() == stored
        finally:
            follow.kill()
            with trio.CancelScope(shield=True):
                await follow.wait()
    notices = err_path.read_text().splitlines()
    assert len(notices) <= 1, notices
    report(
        killed=kill.killed,
        leader_moved_before_kill=kill.moved_before,
        new_leader=kill.new_leader,
        election_seconds=round(kill.election_seconds, 2),
        followed=len(stored),
        consumer_on_killed_node=consumer_node == kill.killed,
        notices=len(notices),
        notice=notices[0] if notices else "",
    )
