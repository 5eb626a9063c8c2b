"""The route-publishing plug point (``c.Broker.route_publisher_class``) and the Traefik publisher's
file, without services: the choice of publisher, its option errors, and the file the broker owns
(read back with jupyterhub-traefik-proxy's own reader; Traefik itself: tests/test_e2e_traefik.py)."""

from __future__ import annotations

import asyncssh
import pytest
from jupyterhub_traefik_proxy import traefik_utils
from traitlets.config import Config

from broker.core import Broker
from broker.options import OptionError
from broker.proxy import ChpClient, ChpRoutePublisher, publisher_needs_chp, resolve_publisher
from broker.store import SessionStore
from broker.traefik import ROUTER_PREFIX, TraefikRoutePublisher


@pytest.fixture
def make(tmp_path):
    """Broker(...) with *config*; the stores are closed after the test."""
    stores = []

    def _make(config: Config, chp: ChpClient | None = None) -> Broker:
        store = SessionStore(str(tmp_path / f"s{len(stores)}.sqlite"))
        stores.append(store)
        return Broker(
            store=store,
            host_key=asyncssh.generate_private_key("ssh-ed25519"),
            hub_api=("127.0.0.1", 1),
            chp=chp,
            config=config,
        )

    yield _make
    for s in stores:
        s.close()


def test_names_resolve_to_publishers():
    assert resolve_publisher("chp") is ChpRoutePublisher
    assert resolve_publisher(" CHP ") is ChpRoutePublisher
    assert resolve_publisher("traefik") is TraefikRoutePublisher
    assert resolve_publisher("none") is None
    assert resolve_publisher("broker.traefik.TraefikRoutePublisher") is TraefikRoutePublisher
    for bad in ("nginx", "broker.store.SessionStore", "no.such.module.Cls"):
        with pytest.raises(ValueError):
            resolve_publisher(bad)


def test_only_chp_needs_the_proxy_token():
    assert publisher_needs_chp(Config())
    assert publisher_needs_chp(Config(Broker={"route_publisher_class": "chp"}))
    assert not publisher_needs_chp(Config(Broker={"route_publisher_class": "none"}))
    assert not publisher_needs_chp(Config(Broker={"route_publisher_class": "traefik"}))
    with pytest.raises(ValueError):
        publisher_needs_chp(Config(Broker={"route_publisher_class": "nginx"}))


def test_broker_makes_the_publisher_it_is_told(make, tmp_path):
    chp = ChpClient("http://127.0.0.1:1", "t")
    assert isinstance(make(Config(), chp).routes, ChpRoutePublisher)
    assert make(Config(), None).routes is None  # no CHP client: no routes (the tests' in-process brokers)
    assert make(Config(Broker={"route_publisher_class": "none"}), chp).routes is None
    config = Config(
        Broker={"route_publisher_class": "traefik"},
        TraefikRoutePublisher={"dynamic_config_file": str(tmp_path / "broker.toml")},
        RoutePublisher={"reconcile_interval": 3.0},
    )
    routes = make(config).routes
    assert isinstance(routes, TraefikRoutePublisher) and routes.reconcile_interval == 3.0


@pytest.mark.parametrize(
    "config, needle",
    [
        (Config(Broker={"route_publisher_class": "nginx"}), "Broker.route_publisher_class"),
        (Config(Broker={"route_publisher_class": "traefik"}), "TraefikRoutePublisher.dynamic_config_file: not set"),
        (
            Config(
                Broker={"route_publisher_class": "traefik"},
                TraefikRoutePublisher={"dynamic_config_file": "/nonexistent-dir/broker.toml"},
            ),
            "its directory does not exist",
        ),
        (
            Config(
                Broker={"route_publisher_class": "traefik"},
                TraefikRoutePublisher={"dynamic_config_file": "/tmp/broker.json"},
            ),
            "must end in .toml or .yaml",
        ),
    ],
)
def test_bad_publisher_options_name_the_option(make, config, needle):
    with pytest.raises(OptionError, match=needle):
        make(config)


def routes_in(path: str) -> dict[str, tuple[str, str]]:
    """The routers in the broker's file: name -> (rule, target), read as Traefik's file would be."""
    conf = traefik_utils.TraefikConfigFileHandler(path).load()
    http = conf.get("http", {})
    return {
        name: (r["rule"], http["services"][r["service"]]["loadBalancer"]["servers"][0]["url"])
        for name, r in http.get("routers", {}).items()
    }


@pytest.mark.asyncio
async def test_traefik_file_follows_the_ready_sessions(tmp_path):
    path = str(tmp_path / "broker.toml")
    want: dict[str, tuple[str, dict]] = {}
    pub = TraefikRoutePublisher(desired=lambda: dict(want), dynamic_config_file=path, entrypoint="web")
    assert await pub.reconcile_once() == 1  # an empty file: no routes
    assert traefik_utils.TraefikConfigFileHandler(path).load() in ({}, None)

    want["/user/zoe/"] = ("http://127.0.0.1:4001", {"user": "zoe"})
    want["/user/ana b/lab/"] = ("http://127.0.0.1:4002", {"user": "ana b"})
    await pub.publish("/user/zoe/", "http://127.0.0.1:4001", {})
    routes = routes_in(path)
    # the names and rules of jupyterhub-traefik-proxy's own routes, with the broker's prefix
    for spec, (target, _) in want.items():
        name = ROUTER_PREFIX + traefik_utils.generate_alias(spec, "router")
        assert routes[name] == (traefik_utils.generate_rule(spec), target)
    assert len(routes) == 2
    conf = traefik_utils.TraefikConfigFileHandler(path).load()
    assert all(r["entryPoints"] == ["web"] for r in conf["http"]["routers"].values())

    assert await pub.reconcile_once() == 0  # unchanged: not rewritten
    del want["/user/zoe/"]
    await pub.unpublish("/user/zoe/", "http://127.0.0.1:4001")
    assert list(routes_in(path)) == [ROUTER_PREFIX + traefik_utils.generate_alias("/user/ana b/lab/", "router")]

    # a deleted or garbled file is written again by the next pass
    (tmp_path / "broker.toml").unlink()
    assert await pub.reconcile_once() == 1 and len(routes_in(path)) == 1
    (tmp_path / "broker.toml").write_text("[[[ not a config")
    assert await pub.reconcile_once() >= 1 and len(routes_in(path)) == 1
