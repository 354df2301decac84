"""The aggregator's HTTP API. Every connection is mutual TLS; who calls is who the certificate says.

Banks (role ``bank``): fetch their next task, its input, upload its result or say why they
could not. Operators (Airflow, role ``operator``): start and plan a federation, open rounds,
read their status. Anyone of the consortium: ``/v1/health``. A certificate from another CA or
an expired one fails the TLS handshake; a valid one for a participant this service does not
know, or for the wrong role, gets 403.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from aggregator.service.config import ServiceConfig
from aggregator.service.coordinator import REQUEST_KEYS, Coordinator
from aggregator.service.intake import MAX_FAILURE_BYTES, MAX_SUMMARY_BYTES, Refused, limit_for
from aggregator.strategies import STRATEGIES
from fedfraud.settings import REQUEST_OPTIONS, requested_options, requested_settings

MAX_LONG_POLL_S = 30.0


class MutualTLSProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus the verified client certificate in the ASGI ``tls`` extension."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer, app = transport.get_extra_info("peercert"), self.app

        async def with_peer(scope, receive, send):
            scope.setdefault("extensions", {})["tls"] = {"client_cert": peer}
            await app(scope, receive, send)

        self.app = with_peer


def peer_identity(peer: dict[str, Any] | None) -> tuple[str, str]:
    """(common name, organizational unit) of a certificate as ``ssl.getpeercert()`` returns it."""
    fields = {key: value for rdn in (peer or {}).get("subject", ()) for key, value in rdn}
    return fields.get("commonName", ""), fields.get("organizationalUnitName", "")


def create_app(coordinator: Coordinator) -> FastAPI:
    app = FastAPI(title="fedfraud aggregator", version="1", docs_url=None, redoc_url=None)
    participants = coordinator.config.participants

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse(exc.as_dict(), status_code=exc.status)

    def caller(request: Request) -> tuple[str, str]:
        name, role = peer_identity(request.scope.get("extensions", {}).get("tls", {}).get("client_cert"))
        if participants.get(name) != role or not name:
            raise Refused(403, "unknown_participant", f"certificate for {name or '?'} ({role or 'no role'}) "
                          "is not a participant of this consortium")
        return name, role

    def bank(identity=Depends(caller)) -> str:
        return _require(identity, "bank")

    def operator(identity=Depends(caller)) -> str:
        return _require(identity, "operator")

    @app.get("/v1/health")
    def health(identity=Depends(caller)) -> dict[str, Any]:
        return {"status": "ok", "consortium": coordinator.config.consortium, "caller": identity[0]}

    # ---- operators -----------------------------------------------------------------------

    @app.put("/v1/federations/{key}")
    async def start_federation(key: str, request: Request, _op: str = Depends(operator)) -> dict[str, Any]:
        body = _federation_request(await read_bounded(request, MAX_SUMMARY_BYTES, "federation request"))
        return await run_in_threadpool(coordinator.start_federation, key, body)

    @app.get("/v1/federations/{key}")
    def federation_status(key: str, _op: str = Depends(operator)) -> dict[str, Any]:
        return coordinator.federation_status(key)

    @app.post("/v1/federations/{key}/plan")
    def plan(key: str, _op: str = Depends(operator)) -> dict[str, Any]:
        return coordinator.plan_federation(key)

    @app.put("/v1/federations/{key}/rounds/{round_id}")
    def open_round(key: str, round_id: int, _op: str = Depends(operator)) -> dict[str, Any]:
        return coordinator.open_round(key, round_id)

    @app.get("/v1/federations/{key}/rounds/{round_id}")
    def round_status(key: str, round_id: int, _op: str = Depends(operator)) -> dict[str, Any]:
        return coordinator.round_status(key, round_id)

    # ---- banks ---------------------------------------------------------------------------

    @app.get("/v1/tasks/next")
    async def next_task(wait: float = 0.0, me: str = Depends(bank)) -> Response:
        """Long poll: the bank's next task, or 204 after ``wait`` seconds without one."""
        deadline = asyncio.get_running_loop().time() + min(max(wait, 0.0), MAX_LONG_POLL_S)
        await run_in_threadpool(coordinator.seen, me)
        while True:
            task = await run_in_threadpool(coordinator.next_task, me)
            if task is not None:
                return JSONResponse(task)
            if asyncio.get_running_loop().time() >= deadline:
                return Response(status_code=204)
            await asyncio.sleep(0.25)

    @app.post("/v1/heartbeat", status_code=204)
    async def heartbeat(me: str = Depends(bank)) -> Response:
        """The bank is alive (its agent beats while it works): a silent bank's tasks are given up early."""
        await run_in_threadpool(coordinator.seen, me)
        return Response(status_code=204)

    @app.get("/v1/tasks/{tid}/input")
    def task_input(tid: str, me: str = Depends(bank)) -> Response:
        return Response(coordinator.task_input(me, tid), media_type="application/json")

    @app.put("/v1/tasks/{tid}/result")
    async def upload_result(tid: str, request: Request, me: str = Depends(bank)) -> dict[str, Any]:
        async def accept():
            kind = await run_in_threadpool(coordinator.task_kind, me, tid)
            body = await read_bounded(request, limit_for(kind, coordinator.config.max_update_bytes), kind)
            return await run_in_threadpool(coordinator.accept_result, me, tid, body)

        return await _recorded(coordinator, me, tid, accept)

    @app.put("/v1/tasks/{tid}/failure")
    async def upload_failure(tid: str, request: Request, me: str = Depends(bank)) -> dict[str, Any]:
        async def accept():
            body = await read_bounded(request, MAX_FAILURE_BYTES, "failure report")
            try:
                reason = str(json.loads(body)["reason"])
            except (ValueError, KeyError, TypeError) as exc:
                raise Refused(400, "malformed", f'a failure report is {{"reason": "..."}}: {exc}') from exc
            return await run_in_threadpool(coordinator.accept_failure, me, tid, reason)

        return await _recorded(coordinator, me, tid, accept)

    return app


def _require(identity: tuple[str, str], role: str) -> str:
    name, actual = identity
    if actual != role:
        raise Refused(403, "wrong_role", f"{name} is a {actual}; this call is for a {role}")
    return name


async def _recorded(coordinator: Coordinator, caller: str, tid: str, accept):
    """Run an upload; a refusal is recorded (who, which task, which check) before it is returned."""
    try:
        return await accept()
    except Refused as exc:
        await run_in_threadpool(coordinator.record_rejection, caller, tid, exc)
        raise


async def read_bounded(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` (never buffered beyond it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, "too_large", f"{what} of {declared} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, "too_large", f"{what} exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _federation_request(body: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(body)
        request = {key: raw[key] for key in REQUEST_KEYS}
        if not (isinstance(request["banks"], list) and request["banks"]):
            raise ValueError("banks must be a non-empty list")
        if request["strategy"] not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
        for key in ("rounds", "seed", "min_banks", "trees_per_round"):
            request[key] = int(request[key])
        options = {key: value for key, value in raw.items() if key not in REQUEST_KEYS}
        request.update(requested_options(requested_settings(request["trees_per_round"], request["min_banks"], options)))
    except (ValueError, KeyError, TypeError) as exc:
        raise Refused(422, "malformed", f"a federation request needs {', '.join(REQUEST_KEYS)} and may set "
                                        f"{', '.join(REQUEST_OPTIONS)}: {exc}") from exc
    return request


def configure_histogram(config: ServiceConfig) -> None:
    """The histogram strategy's federated server: reachable as ``federated_host``, with the aggregator's certificate."""
    import os

    os.environ["FEDFRAUD_FEDERATED_HOST"] = config.federated_host  # read by each Histogram strategy it builds
    os.environ["FEDFRAUD_FEDERATED_SERVER_KEY"] = str(config.tls.key)
    os.environ["FEDFRAUD_FEDERATED_SERVER_CERT"] = str(config.tls.cert)
    os.environ["FEDFRAUD_FEDERATED_CLIENT_CA"] = str(config.tls.ca)


def serve(config: ServiceConfig) -> None:
    """Run until interrupted: HTTPS on ``host:port``, client certificates required and verified."""
    import uvicorn

    configure_histogram(config)
    coordinator = Coordinator(config).start()
    try:
        uvicorn.Server(uvicorn.Config(
            create_app(coordinator), host=config.host, port=config.port, http=MutualTLSProtocol,
            ssl_certfile=str(config.tls.cert), ssl_keyfile=str(config.tls.key), ssl_ca_certs=str(config.tls.ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED, log_level="info", timeout_keep_alive=30, timeout_graceful_shutdown=5,
        )).run()
    finally:
        coordinator.stop()


def health(config: ServiceConfig) -> dict[str, Any]:
    """The service's own health, asked with the aggregator's certificate (container healthcheck)."""
    from fedfraud.transport import AggregatorClient, Retry

    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    client = AggregatorClient(f"https://{host}:{config.port}", config.tls, Retry(attempts=1), timeout_s=10)
    try:
        return client.call("GET", "/v1/health")
    finally:
        client.close()
