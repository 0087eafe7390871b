"""The loop's poller: zmq.Poller's answers for sockets and plain fds alike, from an epoll set."""

from __future__ import annotations

import os
import socket

import pytest
import zmq

from kernel.poller import Poller


def test_sockets_and_fds_are_reported_as_zmq_poller_reports_them() -> None:
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://poller-test")
    push.connect("inproc://poller-test")
    quiet, rung = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    ours, theirs = socket.socketpair()
    poller, reference = Poller(), zmq.Poller()
    try:
        for p in (poller, reference):
            for target in (pull, quiet, rung, ours.fileno()):
                p.register(target, zmq.POLLIN)
        assert poller.poll(0) == reference.poll(0) == []
        push.send(b"x")
        os.eventfd_write(rung, 1)
        assert dict(poller.poll(1000)) == dict(reference.poll(1000)) == {pull: zmq.POLLIN,
                                                                          rung: zmq.POLLIN}
        theirs.close()  # a hung-up peer: readable (EOF) and, as libzmq maps HUP, POLLERR
        assert dict(poller.poll(0))[ours.fileno()] == dict(reference.poll(0))[ours.fileno()]
        poller.unregister(rung)
        assert rung not in dict(poller.poll(0))
        with pytest.raises(KeyError):
            poller.unregister(rung)
        poller.register(quiet, 0)  # flags 0: unregistered, as zmq.Poller
        assert len(poller) == 2
    finally:
        poller.close()
        for fd in (quiet, rung):
            os.close(fd)
        ours.close()
        pull.close()
        push.close()


def test_among_thousands_of_idle_fds_a_wait_returns_the_one_that_rang() -> None:
    """2,000 agents' doorbells, pidfds and log pipes: ~6,000 idle fds."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 6300 if hard == resource.RLIM_INFINITY else min(6300, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(want - 300)]
    poller = Poller()
    try:
        for fd in fds:
            poller.register(fd, zmq.POLLIN)
        assert poller.poll(0) == []
        os.eventfd_write(fds[4321 % len(fds)], 1)
        assert poller.poll(None) == [(fds[4321 % len(fds)], zmq.POLLIN)]
        assert len(poller) == len(fds)
    finally:
        poller.close()
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
