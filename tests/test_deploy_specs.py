"""Children of a local deployment get one typed spec on stdin; `tandem serve`'s flags reach
them through it, and a spec that does not fit the types is refused naming the field."""

from __future__ import annotations

import subprocess
import sys

from tandem.cli.main import parse_args
from tandem.cli.serve import local_specs
from tandem.deploy.specs import decode, encode


def test_serve_flags_reach_the_children_specs(tmp_path):
    args = parse_args([
        "serve", str(tmp_path), "--prefill-workers", "1", "--decode-workers", "2",
        "--engine", "mock", "--max-num-seqs", "7", "--router-mode", "round_robin",
        "--migration-limit", "0", "--max-local-prefill-length", "99", "--port", "8123",
        "--api-key", "k", "--drain-timeout", "4",
    ])  # fmt: skip
    workers, [frontend] = local_specs(args, tmp_path, "tiny", "cpu")("nats://h:1")
    assert [w.role for w in workers] == ["prefill", "decode", "decode"]
    for w in workers:
        assert decode("worker", encode(w)) == w
        assert w.engine.max_num_seqs == 7 and w.engine.engine == "mock" and w.nats == "nats://h:1"
        assert w.drain_timeout == 4 and w.served == "tiny"
    assert decode("frontend", encode(frontend)) == frontend
    assert (frontend.policy, frontend.migration_limit, frontend.port) == ("round_robin", 0, 8123)
    assert frontend.disagg.max_local_prefill_length == 99 and frontend.api_key == "k"
    assert (frontend.min_workers, frontend.min_prefill_workers) == (2, 1)
    assert frontend.tokenizer == str(tmp_path) and not frontend.reuse_port
    args = parse_args(["serve", str(tmp_path), "--api-server-count", "3", "--engine", "mock"])
    workers, frontends = local_specs(args, tmp_path, "tiny", "cpu")("nats://h:1")
    assert len(workers) == 1 and len(frontends) == 3
    assert all(f.reuse_port and f.port == frontends[0].port for f in frontends)


def test_a_child_refuses_a_bad_spec_naming_the_field():
    def child(kind: str, data: bytes) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "tandem.deploy.child", kind]
        return subprocess.run(cmd, input=data, capture_output=True, timeout=60)

    bad = child("frontend", b'{"nats": "nats://x", "port": "eighty"}')
    assert bad.returncode == 2 and b"port" in bad.stderr, bad.stderr
    unknown = child("frontend", b'{"nats": "nats://x", "prot": 1}')
    assert unknown.returncode == 2 and b"prot" in unknown.stderr, unknown.stderr
    kind = child("planner", b"{}")
    assert kind.returncode == 2 and b"planner" in kind.stderr, kind.stderr
