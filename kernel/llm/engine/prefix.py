"""The prefix cache: KV of past prompts and outputs in a token radix tree, LRU under a budget."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import torch


class _Node:
    """An edge of the tree: a run of tokens and their KV ([layers, 2, kv_heads, n, dim])."""

    __slots__ = ("children", "kv", "last_used", "parent", "tokens")

    def __init__(self, tokens: tuple[int, ...], kv: torch.Tensor | None,
                 parent: _Node | None, last_used: int) -> None:
        self.tokens = tokens
        self.kv = kv
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_used = last_used


class PrefixCache:
    """Token-keyed KV reuse across requests, at token granularity (a radix tree, as in SGLang).

    Agents share a system prompt and each agent's conversation grows turn by turn, so a new
    request's prompt mostly repeats KV the engine already computed. The tree owns copies of that
    KV: a hit is copied into the request's row, so nothing in the tree is ever pinned by a running
    sequence and any leaf can be evicted, least recently used first, once the tree holds more
    than `capacity` tokens.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens = 0
        self.bytes = 0
        self._root = _Node((), None, None, 0)
        self._clock = 0

    def match(self, tokens: Sequence[int]) -> list[torch.Tensor]:
        """KV pieces covering the longest cached prefix of `tokens`, in order.

        The pieces are views into the tree: copy them before the tree changes.
        """
        self._clock += 1
        node, i, pieces = self._root, 0, []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = _common(child.tokens, tokens, i)
            child.last_used = self._clock
            pieces.append(child.kv[:, :, :, :n])
            i += n
            if n < len(child.tokens):
                break
            node = child
        return pieces

    def insert(self, tokens: Sequence[int], kv_of: Callable[[int, int], torch.Tensor]) -> None:
        """Cache the KV of `tokens`; `kv_of(a, b)` gives the KV of tokens a..b-1 when needed."""
        tokens = tokens[:self.capacity]
        self._clock += 1
        node, i = self._root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                kv = kv_of(i, len(tokens))
                node.children[tokens[i]] = _Node(tuple(tokens[i:]), kv, node, self._clock)
                self.tokens += len(tokens) - i
                self.bytes += kv.numel() * kv.element_size()
                break
            n = _common(child.tokens, tokens, i)
            if n < len(child.tokens):
                child = self._split(child, n)
            child.last_used = self._clock
            node, i = child, i + n
        self._evict()

    def clear(self) -> None:
        self._root = _Node((), None, None, 0)
        self.tokens = self.bytes = 0

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut `node`'s edge after n tokens; return the new upper half."""
        parent = node.parent
        assert parent is not None and node.kv is not None
        # Copies, not views: each half must free its memory when it alone is evicted.
        upper = _Node(node.tokens[:n], node.kv[:, :, :, :n].clone(), parent, node.last_used)
        node.tokens, node.kv = node.tokens[n:], node.kv[:, :, :, n:].clone()
        node.parent = upper
        upper.children[node.tokens[0]] = node
        parent.children[upper.tokens[0]] = upper
        return upper

    def _evict(self) -> None:
        if self.tokens <= self.capacity:
            return
        heap = [(n.last_used, id(n), n) for n in self._leaves()]
        heapq.heapify(heap)
        while self.tokens > self.capacity and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None and leaf.kv is not None
            del parent.children[leaf.tokens[0]]
            self.tokens -= len(leaf.tokens)
            self.bytes -= leaf.kv.numel() * leaf.kv.element_size()
            leaf.kv = None
            if parent is not self._root and not parent.children:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))

    def _leaves(self) -> list[_Node]:
        leaves, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append(node)
        return leaves


def _common(edge: tuple[int, ...], tokens: Sequence[int], at: int) -> int:
    """How many leading tokens of `edge` equal tokens[at:]."""
    n = min(len(edge), len(tokens) - at)
    for j in range(n):
        if edge[j] != tokens[at + j]:
            return j
    return n
