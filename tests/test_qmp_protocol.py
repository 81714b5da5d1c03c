"""The QMP wire protocol of ``blockgraph serve`` on a raw socket: greeting, negotiation, framing,
malformed input (the daemon survives it), id echo, several clients, events."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from blockgraph.daemon.harness import ServeProcess
from blockgraph.qmp.protocol import QMPError, Splitter, check_args, check_request


class Raw:
    """A bare QMP connection: send bytes, read one JSON line at a time."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.recv()

    def recv(self) -> dict:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def cmd(self, obj: dict | str) -> dict:
        self.send(obj if isinstance(obj, str) else json.dumps(obj))
        return self.recv()

    def negotiate(self) -> Raw:
        assert self.cmd({"execute": "qmp_capabilities"}) == {"return": {}}
        return self

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("qmp")
    with ServeProcess(tmp, ["--blockdev", "null-co,node-name=n0"]) as d:
        yield d


def error(cls: str, desc: str) -> dict:
    return {"error": {"class": cls, "desc": desc}}


def test_greeting_names_version_and_no_capabilities(daemon: ServeProcess) -> None:
    c = Raw(daemon.socket)
    qmp = c.greeting["QMP"]
    assert set(qmp) == {"version", "capabilities"}
    assert set(qmp["version"]) == {"qemu", "package"}
    assert set(qmp["version"]["qemu"]) == {"micro", "minor", "major"}
    assert qmp["version"]["package"].startswith("blockgraph ")
    assert qmp["capabilities"] == []
    c.close()


def test_negotiation_comes_first_and_only_once(daemon: ServeProcess) -> None:
    c = Raw(daemon.socket)
    assert c.cmd({"execute": "query-version"}) == error(
        "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
    assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == error(
        "GenericError", "Capability 'oob' not available")
    assert c.cmd({"execute": "qmp_capabilities", "id": "neg"}) == {"return": {}, "id": "neg"}
    assert c.cmd({"execute": "qmp_capabilities"}) == error(
        "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
    c.close()


@pytest.mark.parametrize(("request_text", "reply"), [
    ("garbage\n", error("GenericError", "JSON parse error, invalid keyword 'garbage'")),
    ('{"a": }', error("GenericError", "JSON parse error, expecting value")),
    ("[1, 2]", error("GenericError", "QMP input must be a JSON object")),
    ('{"foo": 1}', error("GenericError", "QMP input member 'foo' is unexpected")),
    ('{"execute": 1}', error("GenericError", "QMP input member 'execute' must be a string")),
    ('{"execute": "query-version", "arguments": []}',
     error("GenericError", "QMP input member 'arguments' must be an object")),
    ('{"arguments": {}}', error("GenericError", "QMP input lacks member 'execute'")),
    ('{"execute": "nosuch"}', error("CommandNotFound", "The command nosuch has not been found")),
    ('{"execute": "query-version", "arguments": {"x": 1}}', error("GenericError", "Parameter 'x' is unexpected")),
    ('{"execute": "block_resize", "arguments": {"node-name": "n0"}}',
     error("GenericError", "Parameter 'size' is missing")),
    ('{"execute": "block_resize", "arguments": {"node-name": "n0", "size": "big"}}',
     error("GenericError", "Invalid parameter type for 'size', expected: integer")),
    ('{"execute": "query-named-block-nodes", "arguments": {"flat": 1}}',
     error("GenericError", "Invalid parameter type for 'flat', expected: boolean")),
])
def test_bad_requests_get_qemu_errors_and_the_daemon_survives(daemon: ServeProcess, request_text: str,
                                                              reply: dict) -> None:
    c = Raw(daemon.socket).negotiate()
    assert c.cmd(request_text) == reply
    assert c.cmd({"execute": "query-version"})["return"]["qemu"]["major"] == 7
    c.close()


def test_id_is_echoed_whatever_its_type_even_on_errors(daemon: ServeProcess) -> None:
    c = Raw(daemon.socket).negotiate()
    assert c.cmd({"execute": "query-version", "id": {"a": [1, None]}})["id"] == {"a": [1, None]}
    assert c.cmd({"execute": "nosuch", "id": 7}) == {**error("CommandNotFound",
                                                             "The command nosuch has not been found"), "id": 7}
    c.close()


def test_framing_split_and_batched_messages(daemon: ServeProcess) -> None:
    c = Raw(daemon.socket).negotiate()
    text = json.dumps({"execute": "query-version", "id": 1})
    c.send(text[:7])
    c.send(text[7:])
    assert c.recv()["id"] == 1
    c.send('{"execute": "query-version", "id": 2}{"execute": "query-version", "id": "a}{"}\n')
    assert [c.recv()["id"], c.recv()["id"]] == [2, "a}{"]
    c.send('{\n  "execute":\n  "query-version",\n "id": 3\n}')
    assert c.recv()["id"] == 3
    c.close()


def test_binary_junk_and_abrupt_disconnects_leave_other_clients_working(daemon: ServeProcess) -> None:
    keeper = Raw(daemon.socket).negotiate()
    for junk in (b"\xff\xfe\x00{{{", b"}" * 10, b'{"execute": "quit"'):
        c = Raw(daemon.socket)
        c.send(junk)
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    assert keeper.cmd({"execute": "query-version", "id": "alive"})["id"] == "alive"
    keeper.close()


def test_several_clients_interleave(daemon: ServeProcess) -> None:
    clients = [Raw(daemon.socket) for _ in range(4)]
    for i, c in enumerate(clients):
        assert c.cmd({"execute": "qmp_capabilities", "id": i}) == {"return": {}, "id": i}
    for i, c in reversed(list(enumerate(clients))):
        names = [n["node-name"] for n in c.cmd({"execute": "query-named-block-nodes", "id": i})["return"]]
        assert "n0" in names
    for c in clients:
        c.close()


def test_quit_replies_then_broadcasts_shutdown_to_negotiated_clients(tmp_path: Path) -> None:
    with ServeProcess(tmp_path, []) as d:
        watcher = Raw(d.socket).negotiate()
        silent = Raw(d.socket)  # not negotiated: gets no events
        c = Raw(d.socket).negotiate()
        assert c.cmd({"execute": "quit", "id": "q"}) == {"return": {}, "id": "q"}
        ev = watcher.recv()
        assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        assert 0 <= ev["timestamp"]["microseconds"] < 1_000_000
        assert silent.file.readline() == b""
        assert d.wait() == 0
    assert not Path(d.socket).exists() and not Path(d.pidfile).exists()


def test_pretty_monitor_output(tmp_path: Path) -> None:
    sock = tmp_path / "p.sock"
    with ServeProcess(tmp_path, ["--chardev", f"socket,id=p,path={sock},server=on,wait=off",
                                 "--monitor", "chardev=p,pretty=on"]) as d:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        f = s.makefile("rb")
        first = f.readline()
        assert first == b"{\r\n" or first.startswith(b"{\n")
        s.close()
        assert d.stop() == 0


# ---------------------------------------------------------------- units


def test_splitter_cuts_on_balanced_braces_outside_strings() -> None:
    sp = Splitter()
    assert list(sp.feed(b'{"a": "}\\"{"')) == []
    assert list(sp.feed(b'}  {"b": [1, {"c": 2}]}x ')) == [b'{"a": "}\\"{"}', b'{"b": [1, {"c": 2}]}', b"x"]


def test_splitter_refuses_deep_nesting_without_recursing() -> None:
    out = list(Splitter().feed(b"[" * 5000))
    assert isinstance(out[0], QMPError) and "nesting" in out[0].desc


def test_check_request_and_args_use_qemu_texts() -> None:
    assert check_request({"execute": "x", "id": None}) == ("x", {})
    with pytest.raises(QMPError, match="QMP input member 'exec-oob' is unexpected"):
        check_request({"exec-oob": "x"})
    with pytest.raises(QMPError, match="Parameter 'a' is missing"):
        check_args({}, {"a": "str", "*b": "int"})
    with pytest.raises(QMPError, match="Invalid parameter type for 'b', expected: integer"):
        check_args({"a": "x", "b": True}, {"a": "str", "*b": "int"})
