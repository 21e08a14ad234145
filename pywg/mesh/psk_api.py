"""The coordinator's preshared-key call (see :mod:`pywg.mesh.psk` for the keys themselves).

``POST /api/v1/nodes/{id}/preshared-keys`` with that node's token and the body
``{"peers": [{"nodeId": ID, "publicKey": KEY}, ...]}`` (at most ``psk.MAX_PEERS``)
answers ``{"publicKey": <the caller's key as the coordinator knows it>, "presharedKeys":
[{"nodeId", "publicKey", "presharedKey"}, ...], "secretId": ...}``: the pairs of the caller
with each peer, in the order asked; ``secretId`` changes when the secret does (an agent
that reconnects asks with an empty list and fetches every key again only then). Refusals: 501 when the coordinator runs without ``--preshared-keys``
(the agent then runs without preshared keys), 403 for another node's token or the admin
token (the admin is in no pair), 404 ``peers[i].nodeId`` for a node that does not exist
(any more), 409 ``peers[i].publicKey`` when that node has another key now, 400 for the
caller itself or a bad body. This response is the only place a preshared key appears.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from pywg.mesh import psk

if TYPE_CHECKING:
    from pywg.mesh.coordinator import Coordinator

ROUTE = "/api/v1/nodes/{id}/preshared-keys"


async def preshared_keys(coordinator: Coordinator, request: web.Request) -> web.Response:
    from pywg.mesh.coordinator import ApiError

    secret = coordinator.config.preshared_secret
    if secret is None:
        raise ApiError(501, "preshared keys are off on this coordinator "
                            "(pywg coordinator serve --preshared-keys FILE turns them on)")
    caller = await coordinator._the_node(request)
    peers = psk.read_psk_request(await coordinator._body(request))
    for i, peer in enumerate(peers):
        if peer.node_id == caller.id:
            raise ApiError(400, "a node has no preshared key with itself", f"peers[{i}].nodeId")
    store = coordinator.store
    found = await coordinator.run(lambda: [store.node(p.node_id) for p in peers]) if peers else []
    answer = []
    for i, (peer, node) in enumerate(zip(peers, found, strict=True)):
        if node is None:
            raise ApiError(404, f"no node has id {peer.node_id!r}", f"peers[{i}].nodeId")
        if node.public_key != peer.public_key:
            raise ApiError(409, f"node {peer.node_id} has another public key now", f"peers[{i}].publicKey")
        key = secret.pair_key(caller.id, node.id)
        answer.append({"nodeId": node.id, "publicKey": node.public_key.to_base64(),
                       "presharedKey": key.to_base64()})
    return web.json_response({"publicKey": caller.public_key.to_base64(), "secretId": secret.id,
                              "presharedKeys": answer},
                             headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application, coordinator: Coordinator) -> None:
    async def handler(request: web.Request) -> web.Response:
        return await preshared_keys(coordinator, request)

    app.router.add_post(ROUTE, handler)
