"""The bank's side of histogram federation: one OS process that joins XGBoost's federated
communicator and grows the round's trees together with the other banks.

The bank's node (``BankNode.train_histogram``) writes the bank's binned training rows and a
job file into the bank's own work folder. It then starts this module as a process
(``python -m bank_node.histogram_worker JOB``), and the process reads only those files. What
leaves the bank while it trains is what XGBoost's row-split mode allreduces: per-node
gradient and hessian histograms, plus a few scalars. With secure aggregation (the default)
the worker talks only to the bank's masking sidecar (``bank_node.secagg_sidecar``, its own
process, started here first), which holds the bank's channel to the federated server and
masks every sum, so the server sees random words. What leaves at the end is the update (the
new trees, training statistics scrubbed), as for every other strategy.

Cut points come from ``GlobalBins.reference_matrix`` (public: derived from the shared edges).
The process does not sketch its own rows, which XGBoost would share with every peer. A
watchdog ends the process when its deadline passes or its parent dies, so a lost peer or
server can never leave it hanging.

A session with a ``world_id`` keeps the worker and its sidecar for the whole world (same server, same
banks): the rows are loaded and the communicator joined once, and each round is a command on the
worker's stdin (the sidecar re-keys for the round's session first). Between rounds the worker waits
for its next command; it exits when the server stops listening, the parent dies, or it idles past the
session's timeout. ``stop_live_workers`` ends them at once (the embedded driver's shutdown hook).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bank_node.child_process import server_watch, watchdog
from bank_node.collective_bytes import WIRE_FILE
from bank_node.policy import ALLOW_UNMASKED_ENV
from bank_node.kept_worker import persistent_round, stop_live_workers  # noqa: F401
from bank_node.worker_process import LAUNCH, SIDECAR_LAUNCH, WorkerFailed, WorkerProcess, _launch  # noqa: F401
from fedfraud.histogram_session import HistogramSession, loopback

RECORD_EGRESS_ENV = "FEDFRAUD_RECORD_EGRESS"  # "1": the sidecar logs each request it sends to histogram/egress.jsonl
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # one collective call on the federated channel
STARTED = time.monotonic()


@dataclass(frozen=True)
class ClientTLS:
    """The bank's credentials on the federated channel (the consortium's certificates)."""

    server_ca: str  # verifies the server's certificate
    client_key: str
    client_cert: str

    @classmethod
    def from_env(cls) -> "ClientTLS | None":
        """``FEDFRAUD_FEDERATED_SERVER_CA`` / ``_CLIENT_KEY`` / ``_CLIENT_CERT``, or None if unset."""
        names = ("FEDFRAUD_FEDERATED_SERVER_CA", "FEDFRAUD_FEDERATED_CLIENT_KEY", "FEDFRAUD_FEDERATED_CLIENT_CERT")
        values = [os.environ.get(name) for name in names]
        if not any(values):
            return None
        if not all(values):
            raise ValueError(f"set all of {', '.join(names)} or none")
        return cls(*values)

    def communicator_args(self) -> dict[str, str]:
        # xgboost 3.2's C++ reads these *_path keys. It silently ignores the names in its Python
        # docstring (federated_server_cert, ...) and would then connect without TLS.
        return {"federated_server_cert_path": self.server_ca, "federated_client_key_path": self.client_key,
                "federated_client_cert_path": self.client_cert}


def train_binned(dtrain, params: dict[str, Any], num_trees: int, base_model: dict | None, callbacks=(), obj=None):
    """K trees on an already binned matrix, warm-started from ``base_model``.

    Same parameter handling as ``bank_node.training.train_trees``.
    """
    import xgboost as xgb

    from bank_node.training import BASE_PARAMS
    from fedfraud import model_json

    base = model_json.to_booster(base_model) if base_model else None
    params = {**BASE_PARAMS, **params}
    if base is not None:
        params.pop("base_score", None)  # the global model fixes it for every bank
    return xgb.train(params, dtrain, num_boost_round=num_trees, xgb_model=base, callbacks=list(callbacks), obj=obj)


def start_worker(work_dir: Path, dataset, contract_hash: str, task_bytes: bytes, session: HistogramSession,
                 tls: ClientTLS | None, credentials=None, pair_keys: dict[str, bytes] | None = None,
                 private=None) -> WorkerProcess:
    """Bin the bank's training rows with the shared edges into its own work folder and start a worker.

    With secure aggregation the worker runs behind the bank's masking sidecar, which agrees the
    session's keys with the bank's consortium certificate: ``credentials`` (the node's
    ``SecAggCredentials``), else ``tls``'s certificate files. ``pair_keys``: keys agreed elsewhere.
    ``private``: a charged ``histogram_privacy.PrivateHistogram`` (clipped gradients, the sidecar's noise)."""
    from fedfraud.binning import GlobalBins
    from fedfraud.wire import TrainTask

    task = TrainTask.from_bytes(task_bytes)
    if task.bank != session.bank or task.round_id != session.round_id:
        raise WorkerFailed(f"task for {task.bank}/round {task.round_id} does not match the session "
                           f"({session.bank}/round {session.round_id})")
    if task.contract_hash != contract_hash:
        raise WorkerFailed(f"task's feature contract {task.contract_hash[:12]} is not this bank's {contract_hash[:12]}")
    if not 0 <= session.rank < session.world_size:
        raise WorkerFailed(f"rank {session.rank} outside a world of {session.world_size}")
    if session.tls and tls is None:
        raise WorkerFailed("the federated server requires TLS but this bank has no client certificate")
    if not session.tls and not loopback(session.server_address):
        raise WorkerFailed(f"refusing plain gRPC to {session.server_address}: only 127.0.0.1 may run without TLS")
    if not session.secagg and os.environ.get(ALLOW_UNMASKED_ENV) != "1":
        raise WorkerFailed(f"secagg_required: this bank joins histogram rounds only with masked sums "
                           f"({ALLOW_UNMASKED_ENV}=1 allows an unmasked session)")
    problem = session.world_problem()
    if problem:
        raise WorkerFailed(f"secagg_session: {problem}")
    if private is not None and not session.secagg:
        raise WorkerFailed("privacy_needs_secagg: the noise is added by the masking sidecar")
    secrets_in = _sidecar_secrets(pair_keys, credentials, tls, private) if session.secagg else b""
    bins = GlobalBins.from_dict(session.bins)
    if bins.num_feature != len(dataset.feature_names):
        raise WorkerFailed(f"bins for {bins.num_feature} features, the bank has {len(dataset.feature_names)}")
    folder = Path(work_dir) / "histogram"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("task.json", "job.json", "progress", "update.json", "worker.log",
                                              "sidecar.log", "sidecar.address", "collectives.jsonl", WIRE_FILE)}
    for stale in ("progress", "update.json", "sidecar.address", "collectives.jsonl", WIRE_FILE):
        paths[stale].unlink(missing_ok=True)
    paths["x.npy"], paths["y.npy"] = _binned_rows(folder, dataset, bins)
    paths["task.json"].write_bytes(task_bytes)
    job = {"session": json.loads(session.to_bytes()), "task": str(paths["task.json"]), "x": str(paths["x.npy"]),
           "y": str(paths["y.npy"]), "feature_names": list(dataset.feature_names), "counts": dataset.counts(),
           "out": str(paths["update.json"]), "progress": str(paths["progress"]), "parent_pid": os.getpid(),
           "tls": tls.communicator_args() if session.tls and tls and not session.secagg else None,
           "privacy": private and private.worker_job()}
    if not session.secagg and not session.world_id:
        paths["job.json"].write_text(json.dumps(job))
        return WorkerProcess(paths["job.json"], paths["worker.log"], paths["update.json"], session.timeout_s + 30.0)
    if session.secagg:
        job["sidecar_address_file"] = str(paths["sidecar.address"])
        job["sidecar"] = {
            "bank": session.bank, "rank": session.rank, "banks": list(session.banks),
            "upstream": session.server_address,
            "tls": {"server_ca": tls.server_ca, "client_key": tls.client_key, "client_cert": tls.client_cert}
            if session.tls and tls else None,
            "session_id": session.secagg_session, "address_file": str(paths["sidecar.address"]),
            "audit": str(paths["collectives.jsonl"]), "timeout_s": session.timeout_s, "max_bytes": MAX_MESSAGE_BYTES,
            "parent_pid": os.getpid(), "privacy": private and private.noise.to_dict(), "wire": str(paths[WIRE_FILE]),
            "egress": str(folder / "egress.jsonl") if os.environ.get(RECORD_EGRESS_ENV) == "1" else None}
    if session.world_id:  # kept for the world: one process per bank for all its rounds
        return persistent_round(folder, paths, job, session, task_bytes, bins.digest,
                                 _sidecar_secrets(pair_keys, credentials, tls) if session.secagg else b"",
                                private, pair_keys)
    paths["job.json"].write_text(json.dumps(job))
    return WorkerProcess(paths["job.json"], paths["worker.log"], paths["update.json"], session.timeout_s + 30.0,
                         paths["sidecar.log"], secrets_in)


def _sidecar_secrets(pair_keys: dict[str, bytes] | None, credentials, tls: ClientTLS | None, private=None) -> bytes:
    """What the sidecar reads from its stdin pipe (never a file): pair keys, or the identity to agree them;
    and the noise seed of a private task."""
    from cryptography.hazmat.primitives import serialization

    from fedfraud.secagg.keys import Identity, Trust

    noise = private.secrets() if private is not None else {}
    if pair_keys is not None:
        return json.dumps({"pair_keys": {peer: key.hex() for peer, key in pair_keys.items()}, **noise}).encode()
    if credentials is not None:
        identity, trust = credentials.identity, credentials.trust
    elif tls is not None:
        identity, trust = Identity.from_files(tls.client_cert, tls.client_key), Trust.from_file(tls.server_ca)
    else:
        raise WorkerFailed("secagg_no_identity: masking needs this bank's consortium certificate to agree keys")
    pem = serialization.Encoding.PEM
    return json.dumps({"credentials": {
        "cert": identity.certificate.public_bytes(pem).decode(), "ca": trust.ca.public_bytes(pem).decode(),
        "key": identity.key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()).decode(),
        "banks": None if trust.banks is None else sorted(trust.banks)}, **noise}).encode()


def _binned_rows(folder: Path, dataset, bins) -> tuple[Path, Path]:
    """The bank's training rows binned with the shared edges, kept across the rounds of a federation."""
    digest = hashlib.blake2b(bins.digest.encode(), digest_size=12)
    digest.update(np.ascontiguousarray(dataset.X_train).tobytes())
    digest.update(np.ascontiguousarray(dataset.y_train).tobytes())
    key = digest.hexdigest()
    x_path, y_path = folder / f"x-{key}.npy", folder / f"y-{key}.npy"
    if not (x_path.exists() and y_path.exists()):
        for old in [*folder.glob("x-*.npy"), *folder.glob("y-*.npy")]:
            old.unlink(missing_ok=True)
        for path, rows in ((x_path, bins.apply(dataset.X_train)), (y_path, dataset.y_train.astype(np.float32))):
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, rows)
            tmp.replace(path)
    return x_path, y_path


def _sidecar_address(path: Path, deadline: float) -> str:
    """The masking sidecar's loopback address, once it has agreed keys and listens."""
    while time.monotonic() < deadline:
        if path.exists():
            address = path.read_text().strip()
            if not loopback(address):
                raise WorkerFailed(f"sidecar address {address!r} is not on loopback")
            return address
        time.sleep(0.02)
    raise WorkerFailed("deadline passed before the masking sidecar listened")


def _wait_keyed(path: Path, session_id: str, deadline) -> None:
    """Block until the kept sidecar has agreed this round's keys (it writes the session it is keyed for)."""
    while time.monotonic() < deadline():
        try:
            if path.read_text().strip() == session_id:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise WorkerFailed("deadline passed before the masking sidecar agreed this round's keys")


def run(job_path: Path) -> None:
    """Join the communicator, train each round, write its update; any failure exits at once.

    One round (the job's) or, kept for a world, one round per command line on stdin."""
    import xgboost as xgb
    from xgboost import collective

    from fedfraud.binning import GlobalBins

    job = json.loads(job_path.read_text())
    session = HistogramSession.from_bytes(json.dumps(job["session"]).encode())
    persistent = bool(job.get("persistent"))
    deadline = [time.monotonic() + session.timeout_s]  # moved on by every command when kept
    threading.Thread(target=watchdog, args=(lambda: deadline[0], job["parent_pid"]), daemon=True).start()
    bins = GlobalBins.from_dict(session.bins)
    X = np.ascontiguousarray(np.load(job["x"]))
    y = np.load(job["y"])
    names = job["feature_names"]
    # The cut points come from the public edges, computed before joining: nothing of a sketch is exchanged.
    reference = xgb.QuantileDMatrix(bins.reference_matrix(), feature_names=names, missing=np.nan,
                                    max_bin=bins.max_bin, nthread=session.nthread)
    def train_matrix():
        return xgb.QuantileDMatrix(X, label=y, feature_names=names, missing=np.nan, max_bin=bins.max_bin,
                                   ref=reference, nthread=session.nthread)

    if not persistent:
        with collective.CommunicatorContext(**_communicator_args(job, session, deadline[0])):
            try:
                dtrain = train_matrix()
            except BaseException:  # leave now: finalising the communicator could wait on dead peers
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
            _train_round(job, session, bins, reference, dtrain, job["task"], job["out"], job.get("privacy"))
        return
    threading.Thread(target=server_watch, args=(session.server_address,), daemon=True).start()
    dtrain = None
    for line in sys.stdin:  # one round per line; the node closing the pipe ends the world
        command = json.loads(line)
        deadline[0] = time.monotonic() + float(command["timeout_s"])
        if job.get("sidecar_address_file"):
            _wait_keyed(Path(job["sidecar"]["keyed_file"]), command["secagg_session"], lambda: deadline[0])
        if dtrain is None:  # joined once for the world; the communicator numbers every later call on
            collective.init(**_communicator_args(job, session, deadline[0]))
            dtrain = train_matrix()
        _train_round(job, session, bins, reference, dtrain, command["task"], command["out"], command.get("privacy"))
        deadline[0] = time.monotonic() + session.timeout_s  # idle until the next round


def _communicator_args(job: dict, session: HistogramSession, deadline: float) -> dict[str, Any]:
    """How the worker joins: the server's address or, with secure aggregation, its sidecar's (only the
    sidecar talks to the server)."""
    address = session.server_address
    if job.get("sidecar_address_file"):
        address = _sidecar_address(Path(job["sidecar_address_file"]), deadline)
    return {"dmlc_communicator": "federated", "federated_server_address": address,
            "federated_world_size": session.world_size, "federated_rank": session.rank, **(job.get("tls") or {})}


def _train_round(job: dict, session: HistogramSession, bins, reference, dtrain, task_path: str, out_path: str,
                 privacy: dict | None) -> None:
    """The round's trees on the joined communicator, unbinned, as the bank's update (written atomically)."""
    import xgboost as xgb

    from bank_node.exact_gradients import fixed_point_logistic
    from bank_node.histogram_privacy import worker_privacy
    from bank_node.training import build_update
    from fedfraud import model_json
    from fedfraud.binning import unbin_model
    from fedfraud.wire import TrainTask

    task = TrainTask.from_bytes(Path(task_path).read_bytes())
    progress = Path(job["progress"])
    progress.unlink(missing_ok=True)

    class Progress(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            progress.write_text(str(epoch + 1))
            return False

    # privacy: clipped gradients here, the sidecar noises their sums (bank_node.histogram_privacy); without it,
    # gradients on the masking's fixed-point grid, so every sum is exact (bank_node.exact_gradients)
    objective, epsilon = worker_privacy(privacy, reference, task.params)
    objective = objective or fixed_point_logistic(task.params)
    try:
        joined = time.monotonic()
        booster = train_binned(dtrain, {**task.params, "nthread": session.nthread}, task.num_trees,
                               task.base_model, [Progress()], objective)
        print(f"{session.bank} rank {session.rank}/{session.world_size} round {task.round_id}: {task.num_trees} "
              f"trees in {time.monotonic() - joined:.2f}s (started {joined - STARTED:.2f}s after launch)", flush=True)
        doc = unbin_model(model_json.to_doc(booster), bins)
        update = build_update(task, model_json.to_booster(doc), job["counts"], {}, epsilon)
        out = Path(out_path)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(update.to_bytes())
        tmp.replace(out)
    except BaseException:  # leave now: finalising the communicator could wait on dead peers
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bank_node.histogram_worker JOB.json", file=sys.stderr)
        raise SystemExit(2)
    try:
        run(Path(argv[0]))
    except BaseException:  # noqa: BLE001 - report, then leave without waiting on the communicator
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
