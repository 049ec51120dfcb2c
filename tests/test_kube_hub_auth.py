"""Who calls the Kubernetes sandbox service, as a real JupyterHub says (kubernetes/hub.py).

The service knows a caller only by the token it sends, asked of the hub: a user's
token gives that user's name and hub groups; a forged, expired or a service's token
is refused; a token limited to one server may act for that server only. The
service's own token says which servers a user runs (gc), and nothing is collected on
the hub's silence.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from kube_kit import Hub

from provisioner.errors import PolicyError, ServiceError
from provisioner.kubernetes.hub import Caller, Unauthenticated
from provisioner.kubernetes.hub import Hub as HubApi

log = logging.getLogger("test")


def identify(hub: Hub, token: str, ttl: float = 30.0) -> Caller:
    async def ask() -> Caller:
        api = HubApi(hub.api_url, hub.service_token, log, ttl=ttl)
        try:
            return await api.identify(token)
        finally:
            await api.close()

    return asyncio.run(ask())


def test_a_users_token_gives_the_users_name_and_hub_groups(jupyterhub: Hub) -> None:
    amy = identify(jupyterhub, jupyterhub.token("amy"))
    assert (amy.name, amy.groups) == ("amy", frozenset())
    carol = identify(jupyterhub, jupyterhub.token("carol"))
    assert (carol.name, carol.groups) == ("carol", frozenset({"instructors"}))


@pytest.mark.parametrize("header", ["", "not-a-token", "0" * 64])
def test_a_forged_or_missing_token_is_refused(jupyterhub: Hub, header: str) -> None:
    with pytest.raises(Unauthenticated):
        identify(jupyterhub, header)


def test_an_expired_token_is_refused(jupyterhub: Hub) -> None:
    token = jupyterhub.token("amy", expires_in=1)
    time.sleep(2.5)
    with pytest.raises(Unauthenticated, match="forged, expired or revoked"):
        identify(jupyterhub, token)


def test_a_revoked_token_is_refused_once_its_trust_ends(jupyterhub: Hub) -> None:
    made = jupyterhub.api("POST", "/users/amy/tokens", json={"note": "to revoke"}).json()
    token = made["token"]
    api = HubApi(jupyterhub.api_url, jupyterhub.service_token, log, ttl=1.0)

    async def twice() -> None:
        try:
            assert (await api.identify(token)).name == "amy"
            revoked = jupyterhub.api("DELETE", f"/users/amy/tokens/{made['id']}")
            assert revoked.status_code == 204, revoked.text
            await asyncio.sleep(1.2)
            with pytest.raises(Unauthenticated):
                await api.identify(token)
        finally:
            await api.close()

    asyncio.run(twice())


def test_only_a_users_token_starts_kernels(jupyterhub: Hub) -> None:
    with pytest.raises(PolicyError, match="not a service's"):
        identify(jupyterhub, jupyterhub.admin_token)


def test_a_token_for_one_server_acts_for_that_server_only(jupyterhub: Hub) -> None:
    token = jupyterhub.token("amy", scopes=["access:servers!server=amy/"])
    amy = identify(jupyterhub, token)
    assert amy.may_act_for("") and not amy.may_act_for("other")
    anything = identify(jupyterhub, jupyterhub.token("amy"))
    assert anything.may_act_for("other")  # the user's own full token: any of the user's


def test_the_service_token_says_which_servers_run(jupyterhub: Hub) -> None:
    async def servers(user: str) -> frozenset[str] | None:
        api = HubApi(jupyterhub.api_url, jupyterhub.service_token, log)
        try:
            return await api.running_servers(user)
        finally:
            await api.close()

    assert asyncio.run(servers("ben")) == frozenset()
    assert asyncio.run(servers("nobody-here")) == frozenset()  # no such user: none run
    jupyterhub.start_server("ben")
    try:
        assert asyncio.run(servers("ben")) == frozenset({""})
    finally:
        jupyterhub.stop_server("ben")
    wrong = HubApi(jupyterhub.api_url, "not-the-token", log)

    async def silent() -> frozenset[str] | None:
        try:
            return await wrong.running_servers("ben")
        finally:
            await wrong.close()

    assert asyncio.run(silent()) is None  # the hub would not say: nothing is collected


def test_an_unreachable_hub_is_an_error_not_a_refusal() -> None:
    async def ask() -> None:
        api = HubApi("http://127.0.0.1:9/hub/api", "x", log)
        try:
            await api.identify("some-token")
        finally:
            await api.close()

    with pytest.raises(ServiceError, match="cannot reach the hub"):
        asyncio.run(ask())
