"""LLM-as-judge: verdict parsing, both-orders win/tie/loss, the HTTP client's retries and errors, the cache, the CLI.

A chat-completions server on 127.0.0.1 (port 0, in a thread) stands in for the judge, and the client (the openai SDK)
really talks HTTP to it. It answers from the content: an answer holding GOOD beats one without; both or neither ->
[[tie]]; an answer holding BIAS makes it always say [[1]] (a position-biased judge, so the two orders disagree);
GARBAGE anywhere -> a reply without a verdict. Its error replies ask for a 10 ms wait (``retry-after-ms``), which the
SDK honours, so that retries cost the tests nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from adakd.cli import judge as judge_cli
from adakd.cli import main
from adakd.errors import AdakdError, InputError
from adakd.eval import judge as J
from adakd.eval.judge.run import _outcome, _preferred


def _answer(text: str, k: int) -> str:
    return re.search(rf"\[The Start of Answer {k}\]\n(.*?)\n\[The End of Answer {k}\]", text, re.S).group(1)


def _decide(user: str) -> str:
    if "GARBAGE" in user:
        return "Both answers have merits and I cannot decide."
    a1, a2 = _answer(user, 1), _answer(user, 2)
    if "BIAS" in a1 or "BIAS" in a2:
        verdict = "1"
    elif ("GOOD" in a1) == ("GOOD" in a2):
        verdict = "tie"
    else:
        verdict = "1" if "GOOD" in a1 else "2"
    # Quotes the instructions first: the parser must take the last token.
    return f"I was asked to end with [[1]], [[2]] or [[tie]]. Having compared them:\n[[{verdict}]]"


class FakeJudge:
    """The state shared with the handler: recorded requests and scripted failures."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        # (status, body) or (status, body, headers) answered before any real reply
        self.script: list[tuple] = []
        self.delays: list[float] = []  # seconds to stall the next requests (for timeouts)
        self.lock = threading.Lock()
        self.url = ""

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)


def _handler(state: FakeJudge):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output clean
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                        "time": time.monotonic(),
                    }
                )
                scripted = state.script.pop(0) if state.script else None
                delay = state.delays.pop(0) if state.delays else 0.0
            if delay:
                time.sleep(delay)
            if self.path != "/v1/chat/completions":
                scripted = (404, json.dumps({"error": {"message": f"no route {self.path}"}}))
            headers = {}
            if scripted is not None:
                status, text, *extra = scripted
                headers = extra[0] if extra else {"retry-after-ms": "10"}
            else:
                content = _decide(body["messages"][-1]["content"])
                status = 200
                text = json.dumps(
                    {
                        "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                    }
                )
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(text.encode())))
                self.end_headers()
                self.wfile.write(text.encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops concurrent connects, which the client's kernel then retries after a second.
    request_queue_size = 64


@pytest.fixture
def server(monkeypatch):
    # A proxy configured in the environment must not swallow requests to 127.0.0.1.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    state = FakeJudge()
    httpd = _Server(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _client(server: FakeJudge, **kw) -> J.ChatClient:
    kw = {"timeout": 5.0, "retries": 3, **kw}
    return J.ChatClient(server.url, "judge-model", **kw)


def _pair(a: str, b: str, prompt: str = "What is 2+2?", ref: str = "4") -> J.Pair:
    return J.Pair(prompt=prompt, answer_a=a, answer_b=b, reference=ref)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- parsing and the prompt ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Answer 1 is correct.\n[[1]]", "1"),
        ("[[2]]", "2"),
        ("They are equivalent. [[tie]]", "tie"),
        ("[[TIE]]", "tie"),
        ("[[ 2 ]]", "2"),
        ("My verdict: [[Answer 1]]", "1"),
        ("End with [[1]], [[2]] or [[tie]]... so: [[2]]", "2"),
        ("Answer 1 is better.", None),
        ("[1]", None),
        ("[[3]]", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict(reply, expected):
    assert J.parse_verdict(reply) == expected


def test_build_messages_shows_question_reference_and_answers_in_order():
    system, user = J.build_messages("Q?", "REF", "first", "second")
    assert system["role"] == "system" and "[[1]]" in system["content"] and "[[tie]]" in system["content"]
    assert user["role"] == "user"
    text = user["content"]
    assert text.index("Q?") < text.index("REF") < text.index("first") < text.index("second")
    assert _answer(text, 1) == "first" and _answer(text, 2) == "second"


def test_chat_completions_url():
    assert J.chat_completions_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions"
    assert J.chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert J.chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    for bad in ("h:8000/v1", "ftp://h/v1", ""):
        with pytest.raises(InputError, match="--endpoint"):
            J.chat_completions_url(bad)


# --- win / tie / loss ---------------------------------------------------------------------------------------------


def test_win_tie_loss_in_both_orders(server):
    pairs = [
        _pair("GOOD four", "five"),  # both orders prefer A -> win
        _pair("five", "GOOD 4"),  # both prefer B -> loss
        _pair("GOOD 4", "GOOD four"),  # [[tie]] twice -> tie
        _pair("BIAS four", "five"),  # [[1]] twice = A then B -> orders disagree -> tie
        _pair("GOOD GARBAGE", "five"),  # no verdict twice -> tie, unparsed
        _pair("GOOD", "plain", prompt="Another?"),  # win
    ]
    examples = J.judge_pairs(pairs, _client(server), concurrency=4)
    assert [e["outcome"] for e in examples] == ["win", "loss", "tie", "tie", "tie", "win"]
    assert [e["index"] for e in examples] == list(range(6))

    win, loss, tie, bias, garbage, _ = examples
    assert [(j["order"], j["verdict"], j["preferred"]) for j in win["judgements"]] == [
        ("AB", "1", "A"),
        ("BA", "2", "A"),
    ]
    assert [(j["verdict"], j["preferred"]) for j in loss["judgements"]] == [("2", "B"), ("1", "B")]
    assert [j["verdict"] for j in tie["judgements"]] == ["tie", "tie"]
    assert [(j["verdict"], j["preferred"]) for j in bias["judgements"]] == [("1", "A"), ("1", "B")]
    assert [j["verdict"] for j in garbage["judgements"]] == [None, None]
    assert "cannot decide" in garbage["judgements"][0]["reply"]

    summary = J.aggregate(examples)
    assert (summary["n"], summary["win"], summary["tie"], summary["loss"]) == (6, 2, 3, 1)
    assert summary["win_rate"] == pytest.approx(2 / 6) and summary["loss_rate"] == pytest.approx(1 / 6)
    assert summary["tie_rate"] == pytest.approx(3 / 6)
    assert summary["score"] == pytest.approx((2 + 1.5) / 6)
    assert (summary["unparsed"], summary["unparsed_examples"]) == (2, 1)
    assert summary["n_judgements"] == 12 and summary["cached"] == 0
    assert server.count == 12

    # Each order really showed the answers in the stated positions.
    seen = {
        (_answer(r["body"]["messages"][1]["content"], 1), _answer(r["body"]["messages"][1]["content"], 2))
        for r in server.requests
    }
    assert ("GOOD four", "five") in seen and ("five", "GOOD four") in seen


def test_one_unparsed_order_is_a_tie():
    examples = [
        {
            "outcome": "tie",
            "judgements": [
                {"verdict": "1", "preferred": "A", "cached": False},
                {"verdict": None, "preferred": "tie", "cached": True},
            ],
        }
    ]
    summary = J.aggregate(examples)
    assert summary["unparsed"] == 1 and summary["unparsed_examples"] == 1 and summary["cached"] == 1
    assert _outcome("A", "tie") == "tie" and _outcome("A", "A") == "win" and _outcome("B", "B") == "loss"
    assert _preferred(None, 1) == "tie" and _preferred("2", 2) == "A" and _preferred("2", 1) == "B"


def test_aggregate_empty():
    assert J.aggregate([])["n"] == 0 and J.aggregate([])["win_rate"] == 0.0


def test_identical_requests_are_sent_once(server):
    examples = J.judge_pairs([_pair("GOOD", "x"), _pair("GOOD", "x")], _client(server))
    assert server.count == 2
    assert [e["outcome"] for e in examples] == ["win", "win"]
    assert [j["cached"] for j in examples[1]["judgements"]] == [True, True]


# --- the HTTP client ----------------------------------------------------------------------------------------------


def test_request_body_and_authorization_header(server, monkeypatch):
    client = _client(server, api_key="sk-secret-123", max_tokens=77)
    assert "sk-secret" not in repr(client)
    messages = J.build_messages("Q", "R", "GOOD", "bad")
    assert client.complete(messages).endswith("[[1]]")
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    body = request["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.2 and body["max_tokens"] == 77
    assert body["messages"] == messages
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["authorization"] == "Bearer sk-secret-123"
    assert headers["content-type"] == "application/json"

    # No key, no header: not even the SDK's own fallback to $OPENAI_API_KEY.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    _client(server).complete(messages)
    assert "authorization" not in {k.lower() for k in server.requests[-1]["headers"]}


def test_retries_after_503_and_429_then_succeeds(server):
    server.script = [(503, '{"error": {"message": "overloaded"}}'), (429, '{"error": {"message": "slow down"}}')]
    client = _client(server)
    assert J.parse_verdict(client.complete(J.build_messages("Q", "R", "GOOD", "x"))) == "1"
    assert server.count == 3 and client.http_requests == 3


def test_retry_waits_as_long_as_the_server_asks(server):
    server.script = [(429, '{"error": {"message": "slow down"}}', {"retry-after-ms": "300"})]
    client = _client(server)
    assert J.parse_verdict(client.complete(J.build_messages("Q", "R", "GOOD", "x"))) == "1"
    first, second = server.requests
    assert second["time"] - first["time"] >= 0.29  # not before the 300 ms the server asked for


def test_gives_up_after_retries(server):
    server.script = [(500, "internal error")] * 3
    with pytest.raises(
        J.JudgeRequestError, match=r"giving up after 3 attempts, last error: HTTP 500: internal error"
    ) as e:
        _client(server, retries=2).complete(J.build_messages("Q", "R", "a", "b"))
    assert server.url in str(e.value) and isinstance(e.value, OSError)
    assert server.count == 3


def test_fatal_400_fails_at_once_with_the_servers_message(server):
    server.script = [(400, json.dumps({"error": {"message": "The model `nope` does not exist."}}))]
    with pytest.raises(OSError) as e:
        _client(server).complete(J.build_messages("Q", "R", "a", "b"))
    message = str(e.value)
    assert "HTTP 400" in message and "`nope` does not exist" in message and server.url in message
    assert "\n" not in message and e.value.status == 400
    assert server.count == 1


def test_401_hints_at_the_api_key(server):
    server.script = [(401, '{"error": {"message": "invalid api key"}}')]
    with pytest.raises(OSError, match=r"HTTP 401: invalid api key \(check --api-key-env\)"):
        _client(server).complete(J.build_messages("Q", "R", "a", "b"))


def test_wrong_path_is_a_clear_404(server):
    client = J.ChatClient(server.url.removesuffix("/v1"), "m", retries=0)
    with pytest.raises(OSError, match="HTTP 404.*check --model and --endpoint"):
        client.complete(J.build_messages("Q", "R", "a", "b"))


def test_timeout_is_retried(server):
    server.delays = [3.0]
    client = _client(server, timeout=0.25)
    start = time.monotonic()
    assert J.parse_verdict(client.complete(J.build_messages("Q", "R", "x", "GOOD"))) == "2"
    assert server.count == 2
    assert time.monotonic() - start < 3.0  # the stalled reply was not waited for


def test_connection_refused_is_retried_then_reported():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    # One retry: without a server to send Retry-After, the SDK's own backoff (about 0.5 s) applies.
    client = J.ChatClient(f"http://127.0.0.1:{port}/v1", "m", retries=1)
    with pytest.raises(
        J.JudgeRequestError, match=rf"127.0.0.1:{port}/v1/chat/completions: giving up after 2 attempts.*connection"
    ):
        client.complete(J.build_messages("Q", "R", "a", "b"))
    assert client.http_requests == 2


def test_a_non_chat_reply_is_a_clear_error(server):
    server.script = [(200, "<html>hello</html>")]
    with pytest.raises(OSError, match="not an OpenAI chat-completions reply"):
        _client(server).complete(J.build_messages("Q", "R", "a", "b"))


def test_fatal_error_in_the_pool_is_raised(server):
    server.script = [(400, '{"error": {"message": "bad request"}}')] * 50
    with pytest.raises(OSError, match="HTTP 400: bad request"):
        J.judge_pairs([_pair(f"a{i}", "b") for i in range(20)], _client(server), concurrency=2)
    assert server.count < 40  # the queued requests were dropped


def test_stopped_run_sends_nothing_more(server):
    stop = threading.Event()
    stop.set()
    with pytest.raises(J.JudgeRequestError, match="request abandoned"):
        _client(server).complete(J.build_messages("Q", "R", "a", "b"), stop=stop)
    assert server.count == 0


def test_client_rejects_bad_settings():
    for kw, flag in (
        ({"timeout": 0}, "--timeout"),
        ({"retries": -1}, "--retries"),
        ({"temperature": -1}, "--temperature"),
        ({"max_tokens": 0}, "--max-tokens"),
    ):
        with pytest.raises(InputError, match=flag):
            J.ChatClient("http://127.0.0.1:1/v1", "m", **kw)
    with pytest.raises(InputError, match="--model"):
        J.ChatClient("http://127.0.0.1:1/v1", "")
    with pytest.raises(InputError, match="--concurrency"):
        J.judge_pairs([], J.ChatClient("http://127.0.0.1:1/v1", "m"), concurrency=0)


# --- the cache ----------------------------------------------------------------------------------------------------


def test_cache_makes_a_rerun_free(server, tmp_path):
    pairs = [_pair(f"GOOD {i}", f"plain {i}", prompt=f"q{i}") for i in range(10)]
    path = tmp_path / "cache.jsonl"
    with J.JudgeCache(path) as cache:
        first = J.judge_pairs(pairs, _client(server), cache=cache, concurrency=8)
    assert server.count == 20
    lines = path.read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(line)["reply"].endswith("]]") for line in lines)

    with J.JudgeCache(path) as cache:
        assert len(cache) == 20
        second = J.judge_pairs(pairs, _client(server), cache=cache, concurrency=8)
    assert server.count == 20  # zero new requests
    assert [e["outcome"] for e in second] == [e["outcome"] for e in first] == ["win"] * 10
    assert all(j["cached"] for e in second for j in e["judgements"])
    assert J.aggregate(second)["cached"] == 20


def test_cache_key_depends_on_model_temperature_and_messages():
    messages = J.build_messages("Q", "R", "a", "b")
    base = J.ChatClient("http://h/v1", "m")
    keys = {
        base.cache_key(messages),
        J.ChatClient("http://h/v1", "m2").cache_key(messages),
        J.ChatClient("http://h/v1", "m", temperature=0.0).cache_key(messages),
        J.ChatClient("http://other/v1", "m").cache_key(messages),
        base.cache_key(J.build_messages("Q", "R", "b", "a")),
    }
    assert len(keys) == 5
    assert base.cache_key(messages) == J.ChatClient("http://h/v1/", "m", api_key="k").cache_key(messages)


def test_cache_survives_a_line_cut_short(tmp_path):
    path = tmp_path / "c.jsonl"
    with J.JudgeCache(path) as cache:
        cache.put("k1", "reply 1")
        cache.put("k2", "reply [[2]]\nwith a newline")
    with open(path, "a") as f:
        f.write('{"key": "k3", "rep')  # the run was killed mid-write
    with J.JudgeCache(path) as cache:
        assert len(cache) == 2 and cache.get("k2") == "reply [[2]]\nwith a newline" and cache.get("k3") is None
        cache.put("k4", "reply 4")
    with J.JudgeCache(path) as cache:
        assert {k: cache.get(k) for k in ("k1", "k2", "k4")} == {
            "k1": "reply 1",
            "k2": "reply [[2]]\nwith a newline",
            "k4": "reply 4",
        }


def test_partial_run_keeps_paid_replies(server, tmp_path):
    path = tmp_path / "c.jsonl"
    pairs = [_pair("GOOD", "x", prompt=f"q{i}") for i in range(4)]
    server.script = [(200, json.dumps({"choices": [{"message": {"content": "[[1]]"}}]}))]
    server.script += [(400, '{"error": {"message": "quota exceeded"}}')] * 20
    with J.JudgeCache(path) as cache, pytest.raises(OSError):
        J.judge_pairs(pairs, _client(server), cache=cache, concurrency=1)
    assert len(J.JudgeCache(path)) == 1
    server.script.clear()
    before = server.count
    with J.JudgeCache(path) as cache:
        J.judge_pairs(pairs, _client(server), cache=cache)
    assert server.count - before == 7  # one of the eight was already paid for


# --- pairing and input files --------------------------------------------------------------------------------------


def _records(n: int, prediction: str = "pred {i}", **extra) -> list[dict]:
    return [
        {
            "id": f"ex{i}",
            "prompt": f"prompt {i}",
            "prediction": prediction.format(i=i),
            "references": [f"ref {i}", "alt"],
            **extra,
        }
        for i in range(n)
    ]


def test_make_pairs_against_reference_and_against_other_predictions():
    a = _records(3)
    pairs = J.make_pairs(a, None)
    assert [(p.answer_a, p.answer_b, p.reference, p.id) for p in pairs] == [
        (f"pred {i}", f"ref {i}", f"ref {i}", f"ex{i}") for i in range(3)
    ]

    b = list(reversed(_records(4, prediction="other {i}")))
    pairs = J.make_pairs(a, b)
    assert [(p.prompt, p.answer_a, p.answer_b) for p in pairs] == [
        (f"prompt {i}", f"pred {i}", f"other {i}") for i in range(3)
    ]

    with pytest.raises(InputError, match="no prediction for the prompt 'prompt 2'"):
        J.make_pairs(a, b[2:])


def test_make_pairs_repeated_prompts_take_b_in_turn():
    a = [{"prompt": "p", "prediction": f"a{i}", "references": ["r"]} for i in range(2)]
    b = [{"prompt": "p", "prediction": f"b{i}", "references": ["r"]} for i in range(2)]
    assert [(p.answer_a, p.answer_b, p.id) for p in J.make_pairs(a, b)] == [("a0", "b0", 0), ("a1", "b1", 1)]
    with pytest.raises(ValueError, match="'p'"):
        J.make_pairs(a, b[:1])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"prompt": "p", "prediction": "x", "references": ["r"]}\nnot json\n', ":2: invalid JSON"),
        ('{"prompt": "p", "references": ["r"]}\n', ":1: 'prediction' must be a string"),
        ('{"prompt": "p", "prediction": "x", "references": []}\n', ":1: 'references' must be a non-empty list"),
        ("[1, 2]\n", ":1: expected a JSON object"),
        ("\n\n", "no records"),
    ],
)
def test_load_predictions_errors_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        J.load_predictions(path, "--against")
    assert str(e.value).startswith(f"--against {path}")


# --- the CLI ------------------------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adakd")
    judge_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["judge", *argv])


def test_cli_against_reference_end_to_end(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-key")
    records = _records(4, prediction="GOOD {i}")
    records[1]["prediction"] = "wrong"  # neither it nor "ref 1" holds GOOD -> tie
    records[2]["prediction"] = "bad"
    records[2]["references"][0] = "GOOD ref 2"  # the reference wins -> loss
    a = _write_jsonl(tmp_path / "a.jsonl", records)
    out = tmp_path / "out" / "judge.json"
    args = _parse(
        [
            "--predictions",
            str(a),
            "--against",
            "reference",
            "--endpoint",
            server.url + "/",
            "--model",
            "jm",
            "--output",
            str(out),
        ]
    )
    assert args.handler is judge_cli.run
    assert (args.concurrency, args.timeout, args.retries, args.temperature) == (8, 60.0, 4, 0.2)

    assert judge_cli.run(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "win 2 (50.0%) / tie 1 (25.0%) / loss 1 (25.0%)" in line and "sk-cli-key" not in line
    report = json.loads(out.read_text())
    assert report["against"] == "reference" and report["predictions"] == str(a)
    assert report["judge"] == {
        "endpoint": server.url + "/chat/completions",
        "model": "jm",
        "temperature": 0.2,
        "max_tokens": 1024,
    }
    assert (report["n"], report["win"], report["tie"], report["loss"], report["unparsed"]) == (4, 2, 1, 1, 0)
    assert report["win_rate"] == 0.5 and report["http_requests"] == 8 and report["cached"] == 0
    assert [e["id"] for e in report["examples"]] == ["ex0", "ex1", "ex2", "ex3"]
    assert [e["outcome"] for e in report["examples"]] == ["win", "tie", "loss", "win"]
    assert "sk-cli-key" not in out.read_text()
    assert all(r["headers"].get("authorization") == "Bearer sk-cli-key" for r in server.requests)
    assert all(r["body"]["model"] == "jm" and r["body"]["temperature"] == 0.2 for r in server.requests)

    cache = out.parent / "judge.cache.jsonl"
    assert report["cache"] == str(cache) and len(cache.read_text().splitlines()) == 8

    # A rerun pays nothing.
    assert judge_cli.run(args) == 0
    assert server.count == 8
    rerun = json.loads(out.read_text())
    assert rerun["http_requests"] == 0 and rerun["cached"] == 8 and rerun["win"] == 2
    assert "8 cached, 0 HTTP requests" in capsys.readouterr().out


def test_cli_against_other_predictions_with_limit_and_explicit_cache(server, tmp_path, capsys):
    a = _write_jsonl(tmp_path / "a.jsonl", _records(5, prediction="GOOD {i}"))
    b_records = list(reversed(_records(5, prediction="{i}")))
    b_records[0]["prediction"] = "GOOD 4"  # prompt 4 -> tie, but --limit 3 leaves it out
    b_records[3]["prediction"] = "GOOD too"  # prompt 1 -> tie
    b = _write_jsonl(tmp_path / "b.jsonl", b_records)
    cache = tmp_path / "elsewhere" / "my-cache.jsonl"
    out = tmp_path / "r.json"
    args = _parse(
        ["--predictions", str(a), "--against", str(b), "--endpoint", server.url, "--model", "jm", "--limit", "3",
         "--cache", str(cache), "--concurrency", "2", "--temperature", "0", "--output", str(out)]
    )  # fmt: skip
    assert judge_cli.run(args) == 0
    report = json.loads(out.read_text())
    assert (
        report["against"] == str(b) and report["n"] == 3 and (report["win"], report["tie"], report["loss"]) == (2, 1, 0)
    )
    assert [e["prompt"] for e in report["examples"]] == ["prompt 0", "prompt 1", "prompt 2"]
    assert cache.is_file() and not (tmp_path / "r.cache.jsonl").exists()
    assert all(r["body"]["temperature"] == 0.0 for r in server.requests) and server.count == 6
    assert "authorization" not in {k.lower() for r in server.requests for k in r["headers"]}
    assert f"vs {b}" in capsys.readouterr().out


def test_cli_no_cache(server, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", _records(1))
    out = tmp_path / "j.json"
    args = _parse(
        [
            "--predictions",
            str(a),
            "--against",
            "reference",
            "--endpoint",
            server.url,
            "--model",
            "m",
            "--no-cache",
            "--output",
            str(out),
        ]
    )
    judge_cli.run(args)
    judge_cli.run(args)
    assert server.count == 4 and not (tmp_path / "j.cache.jsonl").exists()
    assert json.loads(out.read_text())["cache"] is None


def test_cli_warns_when_the_named_key_variable_is_unset(server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    a = _write_jsonl(tmp_path / "a.jsonl", _records(1))
    args = _parse(["--predictions", str(a), "--against", "reference", "--endpoint", server.url, "--model", "m",
                   "--api-key-env", "NO_SUCH_KEY_VAR", "--output", str(tmp_path / "j.json")])  # fmt: skip
    assert judge_cli.run(args) == 0
    assert "$NO_SUCH_KEY_VAR is not set" in capsys.readouterr().err


def test_cli_user_errors_are_one_line_input_errors(server, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", _records(2))
    b = _write_jsonl(tmp_path / "b.jsonl", _records(1))
    base = ["--endpoint", server.url, "--model", "m", "--output", str(tmp_path / "j.json")]
    cases = [
        (
            ["--predictions", str(tmp_path / "missing.jsonl"), "--against", "reference"],
            "--predictions .*missing.jsonl: no such file",
        ),
        (["--predictions", str(a), "--against", str(tmp_path / "nope.jsonl")], "--against .*nope.jsonl: no such file"),
        (["--predictions", str(a), "--against", str(b)], f"--against {b}: no prediction for the prompt 'prompt 1'"),
        (["--predictions", str(a), "--against", "reference", "--limit", "0"], "--limit 0: must be >= 1"),
        (["--predictions", str(a), "--against", "reference", "--concurrency", "0"], "--concurrency 0"),
        (["--predictions", str(a), "--against", "reference", "--timeout", "0"], "--timeout"),
        (
            ["--predictions", str(a), "--against", "reference", "--endpoint", "localhost:8000"],
            "--endpoint 'localhost:8000'",
        ),
    ]
    for argv, match in cases:
        with pytest.raises(InputError, match=match) as e:
            judge_cli.run(_parse(argv + base if "--endpoint" not in argv else argv + base[2:]))
        assert "\n" not in str(e.value)
    assert server.count == 0

    server.script = [(400, '{"error": {"message": "unknown model m"}}')] * 4
    with pytest.raises(
        J.JudgeRequestError, match=rf"{re.escape(server.url)}/chat/completions: HTTP 400: unknown model m"
    ):
        judge_cli.run(_parse(["--predictions", str(a), "--against", "reference", *base]))
    assert not (tmp_path / "j.json").exists()


def test_cli_exit_status_and_one_line_errors(server, tmp_path, capsys):
    a = _write_jsonl(tmp_path / "a.jsonl", _records(1))
    argv = ["judge", "--against", "reference", "--endpoint", server.url, "--model", "m", "--retries", "1",
            "--output", str(tmp_path / "j.json")]  # fmt: skip
    assert main([*argv, "--predictions", str(tmp_path / "missing.jsonl")]) == 2  # bad input
    assert capsys.readouterr().err.strip().endswith("missing.jsonl: no such file")

    server.script = [(500, "internal error")] * 4  # the server stays broken: adakd's own error, not a bug
    assert main([*argv, "--predictions", str(a)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("adakd: error: ") and "giving up after 2 attempts" in err
    assert issubclass(J.JudgeRequestError, AdakdError) and not issubclass(J.JudgeRequestError, InputError)


def test_progress_bar_does_not_disturb_results(server, capsys):
    examples = J.judge_pairs([_pair("GOOD", "x"), _pair("x", "GOOD", prompt="q2")], _client(server), progress=True)
    assert [e["outcome"] for e in examples] == ["win", "loss"]
    assert capsys.readouterr().out == ""  # the bar goes to stderr, stdout stays for the summary line


def test_cli_without_openai_names_the_missing_module(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openai", None)  # makes `import openai` fail as if it were not installed
    a = _write_jsonl(tmp_path / "a.jsonl", _records(1))
    argv = ["judge", "--predictions", str(a), "--against", "reference", "--endpoint", "http://127.0.0.1:9/v1",
            "--model", "m", "--output", str(tmp_path / "j.json")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "adakd judge needs the Python module 'openai'" in err and "pip install" in err


def test_importing_the_judge_does_not_import_openai():
    code = "import sys, adakd.eval.judge, adakd.cli.judge; assert 'openai' not in sys.modules, 'openai imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
