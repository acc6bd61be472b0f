"""NATS with credentials and TLS: components connect with what the environment names
(TANDEM_NATS_*), and a server that requires them refuses a component without them. Against a
real nats-server on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest
from nats_support import needs_nats

from tandem.deploy.processes import NatsServer
from tandem.runtime import InstanceInfo
from tandem.runtime.nats_client import NATS_ENV
from tandem.runtime.nats_discovery import NatsDiscovery

pytestmark = needs_nats


def registered_and_listed(url: str) -> list[str]:
    async def main():
        discovery = await NatsDiscovery.connect(url)
        try:
            info = InstanceInfo(namespace="ns", component="c", endpoint="e", instance_id="a",
                                address="127.0.0.1:1")  # fmt: skip
            await discovery.register(info, ttl=5)
            return [i.instance_id for i in await discovery.list("ns")]
        finally:
            await discovery.close()

    return asyncio.run(asyncio.wait_for(main(), 20))


def test_token_authorization(monkeypatch):
    with NatsServer(extra_args=("--auth", "s3cret")) as server:
        monkeypatch.setenv(NATS_ENV["token"], "s3cret")
        assert registered_and_listed(server.url) == ["a"]
        monkeypatch.setenv(NATS_ENV["token"], "guess")
        with pytest.raises(ConnectionError, match=r"(?i)refused this component.*authorization"):
            registered_and_listed(server.url)
        monkeypatch.delenv(NATS_ENV["token"])
        with pytest.raises(ConnectionError, match=r"(?i)refused this component.*authorization"):
            registered_and_listed(server.url)


def test_user_and_password(monkeypatch):
    with NatsServer(extra_args=("--user", "tandem", "--pass", "pw")) as server:
        monkeypatch.setenv(NATS_ENV["user"], "tandem")
        monkeypatch.setenv(NATS_ENV["password"], "pw")
        assert registered_and_listed(server.url) == ["a"]
        monkeypatch.setenv(NATS_ENV["password"], "wrong")
        with pytest.raises(ConnectionError, match=r"(?i)refused this component.*authorization"):
            registered_and_listed(server.url)


def test_mutual_tls(tmp_path, monkeypatch):
    import trustme

    ca, other = trustme.CA(), trustme.CA()
    paths = {}
    for name, authority in (("server", ca), ("client", ca), ("stranger", other)):
        cert = authority.issue_cert("127.0.0.1", "localhost")
        paths[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(paths[name][0])
        cert.private_key_pem.write_to_path(paths[name][1])
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    tls = ("--tls", "--tlscert", str(paths["server"][0]), "--tlskey", str(paths["server"][1]),
           "--tlsverify", "--tlscacert", str(tmp_path / "ca.pem"))  # fmt: skip
    with NatsServer(extra_args=tls) as server:
        monkeypatch.setenv(NATS_ENV["ca"], str(tmp_path / "ca.pem"))
        monkeypatch.setenv(NATS_ENV["cert"], str(paths["client"][0]))
        monkeypatch.setenv(NATS_ENV["key"], str(paths["client"][1]))
        assert registered_and_listed(server.url) == ["a"]
        monkeypatch.setenv(NATS_ENV["cert"], str(paths["stranger"][0]))  # another CA's
        monkeypatch.setenv(NATS_ENV["key"], str(paths["stranger"][1]))
        with pytest.raises(ConnectionError):  # the server drops the handshake
            registered_and_listed(server.url)
        monkeypatch.delenv(NATS_ENV["cert"])
        monkeypatch.delenv(NATS_ENV["key"])
        with pytest.raises(ConnectionError):  # no client certificate
            registered_and_listed(server.url)
        monkeypatch.delenv(NATS_ENV["ca"])
        with pytest.raises(ConnectionError):  # no TLS at all
            registered_and_listed(server.url)


def test_a_certificate_without_its_key_is_a_clear_error(monkeypatch):
    from tandem.runtime.nats_client import nats_options

    monkeypatch.setenv(NATS_ENV["cert"], "/x.pem")
    with pytest.raises(ValueError, match="TANDEM_NATS_TLS_KEY"):
        nats_options()


def test_an_unreachable_server_is_a_clear_error_not_a_hang():
    from tandem.deploy.processes import free_port
    from tandem.runtime.nats_client import NatsConnection

    async def main():
        with pytest.raises(ConnectionError, match=r"cannot connect to NATS .* within 1 s"):
            await NatsConnection.connect(f"nats://127.0.0.1:{free_port()}",
                                         first_connect_timeout=1.0)  # fmt: skip

    asyncio.run(asyncio.wait_for(main(), 10))
