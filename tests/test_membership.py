"""Who takes part on Flower: a site is the name its key was registered under, never one it
states; a node with none, a name two nodes claim, a name that is not plain or not in the
config are refused and said so once. The grid here is a list of nodes as Flower's Grid
reports them (``get_nodes``); the real SuperLink runs in tests/test_flower.py."""

from __future__ import annotations

from dataclasses import dataclass

from atoll.engines.flower import FlowerEngine


@dataclass
class Node:
    node_id: int
    name: str
    status: str = "online"
    public_key: bytes = b""


class Nodes:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_nodes(self):
        return list(self.nodes)


def test_only_registered_plain_unique_allowed_names_take_part():
    grid = Nodes([Node(1, "alice"), Node(2, ""), Node(3, "bob"), Node(4, "bob"),
                  Node(5, "../etc"), Node(6, "mallory"), Node(7, "carol", "offline")])
    lines = []
    engine = FlowerEngine(grid, allowed={"alice", "bob", "carol", "../etc"},
                          registered_only=True, log=lines.append)
    assert engine.available_sites() == ["alice"]
    said = "\n".join(lines)
    assert "node 2: no registered name" in said
    assert "nodes 3, 4 all claim site name 'bob': none of them takes part" in said
    assert "'../etc' is not a plain site name" in said
    assert "'mallory' is not among the config's [[sites]]" in said
    assert "sites joined: alice" in said
    engine.available_sites()
    assert len(lines) == len(said.split("\n"))  # each refusal said once, not every poll
    grid.nodes[3].status = "offline"  # one of the two bobs is gone: the other is bob
    grid.nodes[6].status = "online"
    assert engine.available_sites() == ["alice", "bob", "carol"]
    assert engine.nodes["bob"] == 3
