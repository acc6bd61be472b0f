"""`tandem deploy`: the graph spec, every validation rule with a graph that breaks it, the
example spec's round trip, and `deploy up` of a mock graph answering the `openai` client."""

from __future__ import annotations

import importlib.util

import httpx
import msgspec
import openai
import pytest
from nats_support import needs_nats
from process_support import serving, tandem

from tandem.cli.deploy import EXAMPLE, checked
from tandem.cli.main import main
from tandem.deploy.graph import Graph, GraphError, decode_graph, graph_schema, load_graph
from tandem.deploy.processes import free_port
from tandem.engine.testing import make_tiny_model

SPLIT = "pools: {prefill: {engine: mock}, decode: {engine: mock}}\n"

#: Where vLLM is not installed, a vllm pool is also told so.
VLLM_MISSING = (
    {"pools.aggregated.engine"} if importlib.util.find_spec("vllm") is None else set()
)
# (graph YAML, the field a problem names, words of its message, any other fields named)
RULES = [
    ("pools: {}\n", "pools", "no worker pool"),
    ("pools: {aggregated: {}, prefill: {}, decode: {}}\n", "pools.aggregated", "not both"),
    ("pools: {decode: {}}\n", "pools.prefill", "takes its KV from a prefill pool"),
    ("pools: {prefill: {}}\n", "pools.decode", "hands its KV to a decode pool"),
    ("pools: {prefill: {}, decode: {block_size: 32}}\n", "pools.decode.block_size",
     "32 here, 16 in pools.prefill"),
    ("pools: {prefill: {dtype: float16}, decode: {dtype: bfloat16}}\n", "pools.decode.dtype",
     "bfloat16 here, float16 in pools.prefill"),
    ("pools: {prefill: {engine: mock}, decode: {}}\n", "pools.decode.engine",
     "tandem here, mock in pools.prefill"),
    ("model: {block_size: 24}\npools: {aggregated: {}}\n", "model.block_size",
     "not a power of two"),
    ("pools: {aggregated: {tensor_parallel_size: 3}}\n", "pools.aggregated.tensor_parallel_size",
     "does not divide the model's 4 attention heads and 2 KV heads (the sizes that do: [1, 2])"),
    ("pools: {aggregated: {tensor_parallel_size: 2}}\n", "pools.aggregated.tensor_parallel_size",
     "one GPU per worker"),
    ("pools: {prefill: {}, decode: {tensor_parallel_size: 2}}\n",
     "pools.decode.tensor_parallel_size", "2 here, 1 in pools.prefill"),
    ("pools: {aggregated: {engine: vllm, tensor_parallel_size: 2, gpus_per_worker: 1}}\n",
     "pools.aggregated.gpus_per_worker", "below tensor_parallel_size 2", VLLM_MISSING),
    ("pools: {aggregated: {max_replicas: 4}}\n", "pools.aggregated.max_replicas",
     "bounds are for the planner"),
    ("planner: {enabled: true}\npools: {aggregated: {min_replicas: 3, max_replicas: 2}}\n",
     "pools.aggregated.min_replicas", "3 is above max_replicas 2"),
    ("planner: {enabled: true}\npools: {prefill: {replicas: 9}, decode: {}}\n",
     "pools.prefill.replicas", "outside the planner's bounds [1, 8]"),
    ("planner: {enabled: true, gpu_budget: 2}\npools: {prefill: {}, decode: {replicas: 2}}\n",
     "planner.gpu_budget", "below the 3 workers"),
    ("nats: {port: 8222}\npools: {aggregated: {}}\n", "nats.port", "monitoring port"),
    ("nats: {address: 'localhost:4222'}\npools: {aggregated: {}}\n", "nats.address",
     "not a NATS URL"),
    ("security: {tls_cert: c.pem}\npools: {aggregated: {}}\n", "security.tls_key",
     "go together"),
    ("security: {tls_key: k.pem}\npools: {aggregated: {}}\n", "security.tls_cert",
     "go together"),
    ("frontends: {host: 0.0.0.0}\npools: {aggregated: {}}\n", "security.cluster_secret",
     "reaches beyond this machine"),
    ("pools: {aggregated: {kv_tiers: {disk_path: /tmp/x}}}\n", "pools.aggregated.kv_tiers",
     "go together"),
    ("pools: {aggregated: {engine_args: {dtype: float16}}}\n",
     "pools.aggregated.engine_args.dtype", "set the pool's dtype"),
    ("pools: {aggregated: {engine_args: {no-such-flag: 1}}}\n",
     "pools.aggregated.engine_args.no-such-flag", "not an engine flag"),
    ("pools: {aggregated: {engine_args: {router-temperature: 0.5}}}\n",
     "pools.aggregated.engine_args.router-temperature", "not an engine flag"),
    ("pools: {aggregated: {engine_args: {max-num-seqs: many}}}\n",
     "pools.aggregated.engine_args.max-num-seqs", "expected an integer"),
    ("model: {path: /nonexistent/model}\npools: {aggregated: {}}\n", "model.path",
     "no such file or folder"),
    ("model: {path: /}\npools: {aggregated: {}}\n", "model.path", "without config.json"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("graph") / "tiny")


def problems_of(text: str, model) -> list:
    graph = decode_graph(text)
    if graph.model.path is None:
        path = msgspec.structs.replace(graph.model, path=str(model))
        graph = msgspec.structs.replace(graph, model=path)
    with pytest.raises(GraphError) as caught:
        checked(graph)
    return caught.value.problems


@pytest.mark.parametrize("rule", RULES, ids=[r[1] for r in RULES])
def test_each_rule_names_its_field_and_the_fix(rule: tuple, tiny) -> None:
    text, path, words, *others = rule
    problems = problems_of(text, tiny)
    assert any(p.path == path and words in p.message for p in problems), problems
    assert {p.path for p in problems} == {path, *(others[0] if others else ())}, problems


def test_every_problem_is_listed_at_once_and_the_exit_code_is_1(tmp_path, tiny, capsys) -> None:
    graph = tmp_path / "graph.yaml"
    graph.write_text(f"model: {{path: {tiny}, block_size: 24}}\nnats: {{port: 8222}}\n"
                     "pools: {decode: {tensor_parallel_size: 3}}\n")  # fmt: skip
    assert main(["deploy", "validate", str(graph)]) == 1
    err = capsys.readouterr().err
    for path in ("model.block_size", "nats.port", "pools.prefill",
                 "pools.decode.tensor_parallel_size"):  # fmt: skip
        assert f"  {path}: " in err, err
    assert "problem(s)" in err.splitlines()[0]


def test_a_mistyped_or_unknown_field_is_named_by_its_path(tmp_path) -> None:
    for text, path in (("pools: {decode: {replicas: -1}}\n", "pools.decode.replicas"),
                       ("pools: {decode: {replica: 1}}\n", "pools.decode"),
                       ("frontends: {port: 70000}\n", "frontends.port")):  # fmt: skip
        with pytest.raises(GraphError) as caught:
            decode_graph(text)
        assert caught.value.problems[0].path == path, caught.value.problems


def test_mistyped_fields_of_every_section_are_listed_at_once() -> None:
    text = ("frontends: {port: 70000}\npools: {decode: {replica: 1}, prefill: {replicas: 0}}\n"
            "planner: {gpu_budget: 0}\nbogus: 1\n")  # fmt: skip
    with pytest.raises(GraphError) as caught:
        decode_graph(text)
    assert [p.path for p in caught.value.problems] == [
        "bogus", "frontends.port", "pools.prefill.replicas", "pools.decode", "planner.gpu_budget"
    ]


def test_the_example_round_trips_and_is_valid(tmp_path, capsys) -> None:
    graph = load_graph(EXAMPLE)
    assert decode_graph(msgspec.yaml.encode(graph)) == graph
    assert graph.pools.decode.replicas == 2 and graph.pools.decode.engine_args == {
        "max-num-seqs": 128
    }
    # every field of the spec appears in the example, so its comments document them all
    text = EXAMPLE.read_text()
    for struct in (Graph, *[type(getattr(graph, f)) for f in Graph.__struct_fields__[1:]]):
        for field in struct.__struct_fields__:
            assert f"{field}:" in text, field
    assert main(["deploy", "validate", str(EXAMPLE)]) == 0
    assert "pool decode: 2 x tandem worker" in capsys.readouterr().out
    schema = graph_schema()
    assert "PoolSpec" in schema["$defs"] and "tensor_parallel_size" in str(schema)


@needs_nats
def test_deploy_up_runs_a_mock_graph_for_the_openai_client(tmp_path, tiny) -> None:
    """1 frontend, 1 prefill and 2 decode mock workers (planner off) on a bundled
    nats-server: the openai client gets its answers; SIGTERM drains and stops everything."""
    port = free_port()
    graph = tmp_path / "graph.yaml"
    graph.write_text(
        f"model: {{path: {tiny}, served_name: tiny}}\nfrontends: {{port: {port}}}\n"
        "pools:\n  prefill: {engine: mock, gpus_per_worker: 0}\n"
        "  decode: {replicas: 2, engine: mock, gpus_per_worker: 0,"
        " engine_args: {mock-speedup: 10}}\n"
    )
    up = tandem("deploy", "up", str(graph))
    with serving(up, tmp_path / "up.log", "serving 'tiny'"):
        base = f"http://127.0.0.1:{port}"
        roles = [w["role"] for w in httpx.get(f"{base}/v1/workers").json()["data"]]
        assert sorted(roles) == ["decode", "decode", "prefill"]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        for i in range(4):
            reply = client.completions.create(
                model="tiny", prompt=f"request {i} " * 40, max_tokens=12,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert reply.usage.completion_tokens == 12


def test_up_refuses_a_named_secret_that_is_not_set(tmp_path, tiny, monkeypatch, capsys) -> None:
    """An API key that silently went missing would serve without authentication."""
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    graph = tmp_path / "graph.yaml"
    graph.write_text(f"model: {{path: {tiny}}}\nfrontends: {{api_key_secret: NO_SUCH_KEY_VAR}}\n"
                     "pools: {aggregated: {engine: mock, gpus_per_worker: 0}}\n")  # fmt: skip
    assert main(["deploy", "up", str(graph)]) == 2
    assert "frontends.api_key_secret names $NO_SUCH_KEY_VAR, which is not set" in (
        capsys.readouterr().err
    )
