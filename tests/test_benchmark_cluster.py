"""The `cluster` benchmark: its rounds, its `--nodes` option, and one small real round."""

from __future__ import annotations

import pytest

from outbound.benchmarks import cli, cluster


def test_rounds_alternate_the_order_of_node_counts() -> None:
    assert cluster.order([1, 2], 2) == [1, 2, 2, 1]
    assert cluster.order([1, 2, 4], 3) == [1, 2, 4, 4, 2, 1, 1, 2, 4]


def test_nodes_option_is_refused_for_another_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["durable", "--nodes", "1,2"])
    assert exited.value.code == 2
    assert "--nodes applies to the cluster scenario only" in capsys.readouterr().err


def test_nodes_option_must_be_counts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["cluster", "--nodes", "one,two"])
    assert "node counts separated by commas" in capsys.readouterr().err


def test_a_round_on_two_nodes_commits_every_published_event(postgres_url: str) -> None:
    events = 300
    postgres = cluster.Postgres(postgres_url, None)
    with cluster.nats_server() as nats:
        measured = cluster.measure(nats, postgres, nodes=2, events=events)
    assert sum(measured.node_events) == events  # each event ran once, on one node or the other
    assert len(measured.node_cpu) == 2
    assert measured.seconds > 0 and measured.postgres_cpu is None
