"""Calling the aggregator over mutual TLS: the bank's agent and Airflow (an operator) both use this.

Transient failures (connection refused or reset, timeouts, 502/503/504) are retried a bounded
number of times with exponential backoff; a refusal (4xx) is raised at once with the check that
refused it, so a bank never retries an upload the aggregator has judged.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fedfraud.config_file import TLSFiles

log = logging.getLogger("fedfraud.client")
RETRY_STATUSES = (502, 503, 504)


@dataclass(frozen=True)
class Retry:
    attempts: int = 8
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff_seconds * 2 ** attempt, self.max_backoff_seconds)


class AggregatorUnreachable(ConnectionError):
    """No answer from the aggregator after every retry."""


class ServiceRefused(RuntimeError):
    """The aggregator answered with a refusal: HTTP ``status``, the ``check`` that refused, ``detail``."""

    def __init__(self, status: int, check: str, detail: str):
        super().__init__(f"{status} {check}: {detail}")
        self.status, self.check, self.detail = status, check, detail


def tls_context(tls: TLSFiles) -> ssl.SSLContext:
    """Trust only the consortium CA; present this participant's certificate."""
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


class AggregatorClient:
    def __init__(self, url: str, tls: TLSFiles, retry: Retry = Retry(), timeout_s: float = 120.0):
        self.url, self.retry = url.rstrip("/"), retry
        self.http = httpx.Client(base_url=self.url, verify=tls_context(tls), timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One call, retried on transient failures; refusals are raised as ``ServiceRefused``."""
        for attempt in range(self.retry.attempts):
            try:
                response = self.http.request(method, path, **kwargs)
                if response.status_code not in RETRY_STATUSES:
                    break
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            if attempt + 1 == self.retry.attempts:
                raise AggregatorUnreachable(f"{method} {self.url}{path}: {problem} "
                                            f"(gave up after {self.retry.attempts} attempts)")
            delay = self.retry.delay(attempt)
            log.warning("%s %s: %s; retrying in %.1fs", method, path, problem, delay)
            time.sleep(delay)
        if response.status_code >= 400:
            try:
                body = response.json()
                check, detail = body.get("rejected", "refused"), body.get("detail", response.text)
            except ValueError:
                check, detail = "refused", response.text
            raise ServiceRefused(response.status_code, check, str(detail))
        return response

    def call(self, method: str, path: str, **kwargs) -> Any:
        response = self.request(method, path, **kwargs)
        return response.json() if response.content else None

    # ---- a bank's calls ---------------------------------------------------------------------

    def next_task(self, wait_s: float = 20.0) -> dict[str, Any] | None:
        response = self.request("GET", "/v1/tasks/next", params={"wait": wait_s},
                                timeout=wait_s + self.http.timeout.read)
        return None if response.status_code == 204 else response.json()

    def heartbeat(self) -> None:
        """Tell the aggregator this bank is alive (while it works on a task: no polls then)."""
        self.request("POST", "/v1/heartbeat")

    def task_input(self, task_id: str) -> bytes:
        return self.request("GET", f"/v1/tasks/{task_id}/input").content

    def upload_result(self, task_id: str, body: bytes) -> dict[str, Any]:
        return self.call("PUT", f"/v1/tasks/{task_id}/result", content=body)

    def upload_failure(self, task_id: str, reason: str) -> dict[str, Any]:
        return self.call("PUT", f"/v1/tasks/{task_id}/failure", json={"reason": reason})

    # ---- an operator's calls (Airflow) -------------------------------------------------------

    @classmethod
    def from_env(cls) -> "AggregatorClient":
        """``FEDFRAUD_AGGREGATOR_URL`` and the operator's ``FEDFRAUD_TLS_CA`` / ``_CERT`` / ``_KEY``."""
        names = ("FEDFRAUD_AGGREGATOR_URL", "FEDFRAUD_TLS_CA", "FEDFRAUD_TLS_CERT", "FEDFRAUD_TLS_KEY")
        missing = [name for name in names if not os.environ.get(name)]
        if missing:
            raise RuntimeError(f"networked mode needs {', '.join(missing)} (the aggregator and Airflow's certificate)")
        url, ca, cert, key = (os.environ[name] for name in names)
        return cls(url, TLSFiles(Path(ca), Path(cert), Path(key)))

    def start_federation(self, key: str, request: dict[str, Any]) -> dict[str, Any]:
        return self.call("PUT", f"/v1/federations/{key}", json=request)

    def federation(self, key: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/federations/{key}")

    def plan(self, key: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/federations/{key}/plan")

    def open_round(self, key: str, round_id: int) -> dict[str, Any]:
        return self.call("PUT", f"/v1/federations/{key}/rounds/{round_id}")

    def round(self, key: str, round_id: int) -> dict[str, Any]:
        return self.call("GET", f"/v1/federations/{key}/rounds/{round_id}")
