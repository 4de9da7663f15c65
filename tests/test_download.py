"""The `data=lima` download path, for real, without the internet: the file is served over HTTP on 127.0.0.1.

It is what a user's clone without ../shared runs (make demo, the bench scripts): download at the configured URL,
sha256 check, cache; a corrupted download is refused with a clear error and never cached.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import runpy
import shutil
import threading

import pytest

from im_repro.common import ChecksumError
from im_repro.data import load_examples
from tests.conftest import CONVERSATIONS, REPO, compose_with


class Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        Handler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.requests = []
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def lima_cfg(url: str, sha256: str):
    return compose_with("data=lima", f"data.source.uri={url}", f"data.source.args.sha256={sha256}").data


def test_download_checks_sha256_and_caches(server, tmp_path):
    root, base = server
    shutil.copy(CONVERSATIONS, root / "lima_data.jsonl")
    sha = hashlib.sha256(CONVERSATIONS.read_bytes()).hexdigest()
    cfg = lima_cfg(f"{base}/lima_data.jsonl", sha)
    examples, report = load_examples(cfg, tmp_path / "cache")
    expected = [json.loads(line)["messages"] for line in CONVERSATIONS.read_text().splitlines()]
    assert [e["messages"] for e in examples] == expected and report.source == f"{base}/lima_data.jsonl"
    assert Handler.requests == ["/lima_data.jsonl"]
    cached = list((tmp_path / "cache" / "downloads").rglob("lima_data.jsonl"))
    assert len(cached) == 1 and cached[0].read_bytes() == CONVERSATIONS.read_bytes()

    (root / "lima_data.jsonl").write_text("changed upstream\n")  # a second load reads the cache, not the server
    again, _ = load_examples(cfg, tmp_path / "cache")
    assert again == examples and Handler.requests == ["/lima_data.jsonl"]


def test_corrupted_download_is_refused_and_not_cached(server, tmp_path):
    root, base = server
    good = CONVERSATIONS.read_bytes()
    (root / "lima_data.jsonl").write_bytes(good[:-100])  # truncated in transit
    cfg = lima_cfg(f"{base}/lima_data.jsonl", hashlib.sha256(good).hexdigest())
    with pytest.raises(ChecksumError, match=r"sha256 mismatch: .*lima_data.jsonl as downloaded .*not cached"):
        load_examples(cfg, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache" / "downloads").rglob("*") if p.is_file()]

    (root / "lima_data.jsonl").write_bytes(good)  # fixed upstream: the next run downloads again and succeeds
    examples, _ = load_examples(cfg, tmp_path / "cache")
    assert len(examples) == len(good.decode().splitlines()) and len(Handler.requests) == 2


def test_unreachable_url_names_it(tmp_path):
    cfg = lima_cfg("http://127.0.0.1:9/lima_data.jsonl", "0" * 64)  # port 9 (discard): nothing listens
    with pytest.raises(ConnectionError, match=r"cannot download http://127.0.0.1:9/lima_data.jsonl"):
        load_examples(cfg, tmp_path / "cache")


def test_demo_prompts_come_through_the_loader(server, tmp_path, monkeypatch):
    """scripts/demo_prompts.py as `make demo` runs it on a clone without ../shared: data=lima, downloaded."""
    root, base = server
    shutil.copy(CONVERSATIONS, root / "lima_data.jsonl")
    sha = hashlib.sha256(CONVERSATIONS.read_bytes()).hexdigest()
    out = tmp_path / "prompts.json"
    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))
    demo = runpy.run_path(str(REPO / "scripts" / "demo_prompts.py"))
    demo["main"]([str(out), "--skip", "20", "--n", "3", f"data.source.uri={base}/lima_data.jsonl",
                  f"data.source.args.sha256={sha}"])
    rows = json.loads(out.read_text())
    held_out = [json.loads(line)["messages"] for line in CONVERSATIONS.read_text().splitlines()[20:]]
    assert [r["instruction"] for r in rows] == [m[0]["content"] for m in held_out][:3]
    assert [r["output"] for r in rows] == [m[1]["content"] for m in held_out][:3]
    assert Handler.requests == ["/lima_data.jsonl"]
