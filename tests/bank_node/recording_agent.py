"""Run ``fedfraud`` (a bank's agent) with every HTTP request it sends recorded: a test-level wrapper, production
code unchanged. ``python recording_agent.py RECORD.jsonl node run --config FILE``.

Each request is written *before* it is sent (bytes that left even if no answer came): method, path, query,
header names and the body (base64). The answers the test needs to judge the requests are recorded too: the
task handed out by ``GET /v1/tasks/next`` (its id and kind) and the input of a masked evaluation task (its
model, so the test can recompute on the bank's side the plaintext that was masked).
"""

from __future__ import annotations

import base64
import json
import re
import sys
import threading

import httpx

MASKED_INPUT = ("evaluate", "evaluate_champion", "crossval")  # crossval: masked questions since issue 12


def install(record_path: str) -> None:
    lock, send = threading.Lock(), httpx.Client.send
    kinds: dict[str, str] = {}

    def write(entry: dict) -> None:
        with lock, open(record_path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def recorded_send(self, request: httpx.Request, **kwargs) -> httpx.Response:
        body = request.read()
        write({"method": request.method, "path": request.url.path, "query": dict(request.url.params),
               "headers": list(request.headers.keys()), "body": base64.b64encode(body).decode()})
        response = send(self, request, **kwargs)
        path = request.url.path
        if path == "/v1/tasks/next" and response.status_code == 200:
            task = json.loads(response.read())
            kinds[task["id"]] = task["kind"]
            write({"task": task["id"], "kind": task["kind"]})
        elif (match := re.fullmatch(r"/v1/tasks/(.+)/input", path)) and kinds.get(match[1]) in MASKED_INPUT:
            write({"input_of": match[1], "body": base64.b64encode(response.read()).decode()})
        return response

    httpx.Client.send = recorded_send


if __name__ == "__main__":
    install(sys.argv[1])
    from fedfraud.cli import app

    sys.exit(app(args=sys.argv[2:], prog_name="fedfraud"))
